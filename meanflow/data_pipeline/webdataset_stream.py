"""A resumable stream of local batches from WebDataset shards at any fsspec URL (s3://, file://, memory://).

Each rank runs a DataLoader over a ``ShardDataset``; DataLoader worker w reads one slot (``shard_plan``) and hands
out whole batches, and the DataLoader takes batches from its workers strictly round-robin, so the batch sequence is
a function of the slot positions and of which worker is next. Every sample carries its slot's position after it;
the main process keeps the latest per slot, so ``state_dict()`` describes exactly what the trainer has consumed
(not what workers have prefetched). ``load_state_dict`` and ``skip`` drop the running workers; the next
``next_batch()`` starts new ones from the stored positions.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import warnings
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .errors import UNUSABLE_DATA, DataUnreadable, DataUnusable
from .manifest import read_manifest, select_shards
from .records import RecordDecoder
from .shard_plan import ShardPlan, SlotPosition
from .shard_reader import ShardReader

PRIVATE = ("_slot", "_epoch", "_record", "_skipped")


class ShardDataset(IterableDataset):
    """Endless samples of one rank's slots; worker w of the DataLoader serves slot worker (w + batches) % W."""

    def __init__(self, url: str, reader: ShardReader, plan: ShardPlan, decoder: RecordDecoder, rank: int,
                 workers: int, positions: dict[int, SlotPosition], skipped: dict[int, int], batches: int):
        self.url, self.reader, self.plan, self.decoder = url, reader, plan, decoder
        self.rank, self.workers, self.batches = rank, workers, batches
        self.positions, self.skipped = positions, skipped

    def __iter__(self):
        info = get_worker_info()
        worker = 0 if info is None else info.id
        slot = self.rank * self.workers + (worker + self.batches) % self.workers
        return self.slot_samples(slot)

    def slot_samples(self, slot: int):
        plan, block = self.plan, self.plan.block
        start = self.positions.get(slot, SlotPosition(0, 0))
        skipped = self.skipped.get(slot, 0)
        epoch, block_start = start.epoch, start.record - start.record % block
        records = self.reader.slot_records(plan, slot, SlotPosition(epoch, block_start))
        first = start.record - block_start
        emitted_this_epoch, read_this_epoch, lost_this_epoch = 0, 0, 0
        while True:
            length = plan.slot_length(epoch, slot)
            n = min(block, length - block_start)
            rows = list(itertools.islice(records, n))
            order = plan.block_permutation(epoch, slot, block_start // block, n)
            for j in range(first, n):
                record = rows[order[j]]
                sample = self.decoder(record, epoch)
                read_this_epoch += 1
                lost_this_epoch += record is None   # the tar gave nothing here (corrupt or truncated)
                if sample is None:
                    skipped += 1
                    continue
                emitted_this_epoch += 1
                after = block_start + j + 1   # the position after this record; the epoch's end is the next's start
                yield {**sample, "_slot": slot, "_epoch": epoch + (after == length),
                       "_record": after % length, "_skipped": skipped}
            first, block_start = 0, block_start + n
            if block_start == length:
                if emitted_this_epoch == 0 and read_this_epoch > 0:   # would loop forever, silently
                    shards = [self.reader.urls[k] for k in plan.slot_shards(epoch, slot)]
                    if lost_this_epoch == read_this_epoch:
                        raise DataUnreadable(f"data.url {self.url}: none of the {len(shards)} shard(s) reader slot "
                                             f"{slot} read in epoch {epoch} holds a readable record (not tar files, "
                                             f"or corrupt from their start): {shards}")
                    raise DataUnusable(f"data.url {self.url}: reader slot {slot}: no record of its {read_this_epoch} "
                                       f"in epoch {epoch} decodes "
                                       f"(shards {shards}); last error: {self.decoder.last_error}")
                epoch, block_start = epoch + 1, 0
                emitted_this_epoch, read_this_epoch, lost_this_epoch = 0, 0, 0


def _fingerprint(urls: list[str], manifest: dict[str, Any]) -> str:
    """Identifies the sample sequence: the shards selected and the whole manifest (counts, write id, VAE, …)."""
    names = [u.rsplit("/", 1)[-1] for u in urls]
    return hashlib.sha256(json.dumps([names, manifest], sort_keys=True).encode()).hexdigest()[:16]


def merge_stream_states(states: list[dict[str, Any]]) -> dict[str, Any]:
    """One state for every rank's slots (what a checkpoint stores): the union of the ranks' ``slots``; progress is
    the mean over ranks (all ranks consume the same number of batches)."""
    merged = {**states[0], "slots": {k: v for s in states for k, v in s["slots"].items()}}
    merged["progress"] = sum(s["progress"] for s in states) / len(states)
    return merged


class ShardStream:
    """This rank's batches of ``global_batch // world_size`` samples: dict x, y (if labelled), index."""

    def __init__(self, url: str, *, global_batch: int, seed: int, rank: int = 0, world_size: int = 1,
                 num_workers: int = 2, shuffle_block: int = 1000, latent_norm: str = "mf",
                 latent_flip: bool = True, pixel_flip: bool = False, io_retries: int = 5):
        if global_batch % world_size:
            raise ValueError(f"data.global_batch {global_batch} is not divisible by the world size {world_size}")
        self.url, self.seed, self.rank, self.world_size = url, int(seed), rank, world_size
        self.global_batch, self.local_batch = global_batch, global_batch // world_size
        self.num_workers = num_workers
        self.workers = max(num_workers, 1)   # num_workers = 0 reads one slot in this process
        self.manifest = read_manifest(url)
        urls, counts = select_shards(url, self.manifest)
        self.plan = ShardPlan(counts, world_size * self.workers, self.seed, shuffle_block)
        if len(counts) % self.plan.num_slots:
            # Readers then get unequal shares per epoch and drift apart in epochs (each one still reads each of its
            # records once per its own epoch): harmless for long runs, but worth knowing.
            warnings.warn(f"data.url {url}: {len(counts)} shards over {self.plan.num_slots} readers (world size × "
                          "data.num_workers) is uneven; a multiple keeps every reader's epoch the same length",
                          stacklevel=2)
        self.fingerprint = _fingerprint(urls, self.manifest)
        self.reader = ShardReader(urls, retries=io_retries)
        self.decoder = RecordDecoder(self.manifest, self.seed, latent_norm, latent_flip, pixel_flip)
        self.my_slots = [rank * self.workers + w for w in range(self.workers)]
        self.positions = {s: SlotPosition(0, 0) for s in self.my_slots}
        self.skipped = {s: 0 for s in self.my_slots}
        self.batches = 0
        self._iterator = None

    # ------------------------------------------------------------------------------------------ description
    @property
    def name(self) -> str:
        return self.manifest["name"]

    @property
    def kind(self) -> str:
        return self.manifest["kind"]

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.manifest["sample_shape"])

    @property
    def num_classes(self) -> int:
        return int(self.manifest["num_classes"])

    # ------------------------------------------------------------------------------------------------ batches
    def _start(self):
        dataset = ShardDataset(self.url, self.reader, self.plan, self.decoder, self.rank, self.workers,
                               dict(self.positions), dict(self.skipped), self.batches)
        loader = DataLoader(dataset, batch_size=self.local_batch, num_workers=self.num_workers,
                            prefetch_factor=2 if self.num_workers else None)
        return iter(loader)

    def next_batch(self) -> dict[str, torch.Tensor]:
        if self._iterator is None:
            self._iterator = self._start()
        try:
            batch = next(self._iterator)
        except UNUSABLE_DATA as err:   # from a DataLoader worker, the message wraps the worker's traceback
            last_line = str(err).strip().splitlines()[-1]
            raise type(err)(last_line.removeprefix(f"{type(err).__module__}.{type(err).__name__}: ")) from None
        slot = int(batch["_slot"][0])
        self.positions[slot] = SlotPosition(int(batch["_epoch"][-1]), int(batch["_record"][-1]))
        self.skipped[slot] = int(batch["_skipped"][-1])
        self.batches += 1
        return {k: v for k, v in batch.items() if k not in PRIVATE}

    def metrics(self) -> dict[str, int]:
        return {"data/skipped": sum(self.skipped.values())}

    def marginal_velocity(self):
        """Unknown for a data set of shards (the 2-D toys' embedded streams know theirs)."""
        return None

    def close(self) -> None:
        self._iterator = None   # DataLoader workers exit when their iterator is collected

    # ------------------------------------------------------------------------------------------------ position
    def skip(self, n_samples: int) -> None:
        """Advance past ``n_samples`` global samples (whole global batches) without decoding them: each skipped
        batch advances the slot that would have served it by one local batch of records. Corrupt records inside
        the skipped window count as records, so after bad data the landing point can differ from reading by
        those few records; it is the same in every rerun. The next batch re-reads the current shard up to the
        landing point (tar has no index), but decodes nothing before it."""
        if n_samples % self.global_batch:
            raise ValueError(f"skip({n_samples}): must be a multiple of the global batch {self.global_batch}")
        for k in range(n_samples // self.global_batch):
            slot = self.my_slots[(self.batches + k) % self.workers]
            self.positions[slot] = self.plan.advance(self.positions[slot], slot, self.local_batch)
        self.batches += n_samples // self.global_batch
        self.close()

    def state_dict(self) -> dict[str, Any]:
        progress = sum(self.plan.progress(p, s) for s, p in self.positions.items()) / len(self.positions)
        return {"kind": "webdataset", "fingerprint": self.fingerprint, "seed": self.seed,
                "num_slots": self.plan.num_slots, "shuffle_block": self.plan.block,
                "local_batch": self.local_batch, "batches": self.batches, "progress": progress,
                "slots": {str(s): {"epoch": p.epoch, "record": p.record, "skipped": self.skipped[s]}
                          for s, p in self.positions.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> str:
        """Restore a position (a ``state_dict`` or ``merge_stream_states`` of every rank's); returns "exact", or,
        when the world size, data workers, batch or shuffle block changed, "approximate": every reader restarts at
        the mean epoch progress of the saved readers (the global sample offset expressed as a fraction of the
        epoch); samples near the cut may be repeated or missed."""
        if state.get("kind") != "webdataset":
            raise ValueError(f"checkpoint data state is {state.get('kind')!r}, config reads shards at {self.url}")
        for key, mine in (("fingerprint", self.fingerprint), ("seed", self.seed)):
            if state[key] != mine:
                raise ValueError(f"checkpoint data {key} {state[key]!r} differs from this stream's {mine!r} "
                                 f"(data.url {self.url}); resuming would not continue the same sample sequence")
        same_layout = all(state[k] == v for k, v in (("num_slots", self.plan.num_slots),
                                                     ("shuffle_block", self.plan.block),
                                                     ("local_batch", self.local_batch)))
        exact = same_layout and all(str(s) in state["slots"] for s in self.my_slots)
        for s in self.my_slots:
            if exact:
                saved = state["slots"][str(s)]
                self.positions[s] = SlotPosition(saved["epoch"], saved["record"])
                self.skipped[s] = saved["skipped"]
            else:
                self.positions[s] = self.plan.position_at(state["progress"], s)
        self.batches = state["batches"]
        self.close()
        return "exact" if exact else "approximate"

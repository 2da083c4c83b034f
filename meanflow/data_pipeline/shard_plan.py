"""Which records each reader slot reads, in what order: pure arithmetic over the manifest's shard counts.

A *slot* is one (rank, DataLoader worker) pair: slot = rank · workers + worker, ``num_slots`` = world · workers.
Epoch e permutes the shards with a generator seeded by (seed, e) and deals them round-robin to the slots, so every
record is read by exactly one slot per epoch. A slot's *position* is (epoch, record): the number of records of its
epoch-e sequence (its shards concatenated in order) already emitted. Records are shuffled in blocks of ``block``
consecutive records with a permutation seeded by (seed, epoch, slot, block number): unlike a reservoir buffer,
whose contents depend on the whole history, a block's contents follow from the position alone, so the exact
resume state is two integers per slot and resuming re-reads at most one block.
"""

from __future__ import annotations

import bisect
import functools
from dataclasses import dataclass

import torch

from meanflow.seeding import stream_seed


@dataclass(frozen=True)
class SlotPosition:
    epoch: int
    record: int


class ShardPlan:
    def __init__(self, counts: list[int], num_slots: int, seed: int, block: int):
        if not counts:
            raise ValueError("a shard plan needs at least one shard")
        if any(c <= 0 for c in counts):
            raise ValueError(f"every shard must hold at least one record; counts {counts}")
        if len(counts) < num_slots:
            raise ValueError(f"{len(counts)} shard(s) cannot feed {num_slots} reader slots (world size × data "
                             "workers): write more, smaller shards or lower data.num_workers")
        if block <= 0:
            raise ValueError(f"shuffle block must be positive, got {block}")
        self.counts, self.num_slots, self.seed, self.block = list(counts), int(num_slots), int(seed), int(block)
        self.total = sum(self.counts)

    @functools.lru_cache(maxsize=8)
    def shard_order(self, epoch: int) -> tuple[int, ...]:
        g = torch.Generator().manual_seed(stream_seed(self.seed, "shard-order", epoch))
        return tuple(torch.randperm(len(self.counts), generator=g).tolist())

    def slot_shards(self, epoch: int, slot: int) -> tuple[int, ...]:
        """Shard numbers (manifest order) that ``slot`` reads in ``epoch``, in reading order."""
        return self.shard_order(epoch)[slot::self.num_slots]

    def _starts(self, epoch: int, slot: int) -> list[int]:
        starts, acc = [], 0
        for s in self.slot_shards(epoch, slot):
            starts.append(acc)
            acc += self.counts[s]
        return starts + [acc]

    def slot_length(self, epoch: int, slot: int) -> int:
        return sum(self.counts[s] for s in self.slot_shards(epoch, slot))

    def locate(self, epoch: int, slot: int, record: int) -> tuple[int, int]:
        """(shard cursor in ``slot_shards``, record offset inside that shard) of a record of a slot's epoch."""
        starts = self._starts(epoch, slot)
        if not 0 <= record < starts[-1]:
            raise IndexError(f"record {record} outside slot {slot}'s epoch {epoch} ({starts[-1]} records)")
        cursor = bisect.bisect_right(starts, record) - 1
        return cursor, record - starts[cursor]

    def advance(self, position: SlotPosition, slot: int, records: int) -> SlotPosition:
        """The position ``records`` further on, across epoch ends, without reading anything."""
        epoch, record = position.epoch, position.record + records
        while record >= (length := self.slot_length(epoch, slot)):
            epoch, record = epoch + 1, record - length
        return SlotPosition(epoch, record)

    def block_permutation(self, epoch: int, slot: int, block_number: int, length: int) -> list[int]:
        g = torch.Generator().manual_seed(stream_seed(self.seed, "block", epoch, slot, block_number))
        return torch.randperm(length, generator=g).tolist()

    def progress(self, position: SlotPosition, slot: int) -> float:
        """Epochs completed by a slot, as a float (used to carry a position over to another world size)."""
        return position.epoch + position.record / self.slot_length(position.epoch, slot)

    def position_at(self, progress: float, slot: int) -> SlotPosition:
        epoch = int(progress)
        return SlotPosition(epoch, int((progress - epoch) * self.slot_length(epoch, slot)))

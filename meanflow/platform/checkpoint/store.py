"""Checkpoint store: committed step directories under any fsspec URL (file://, s3://, memory://).

Layout of ``<url>/step-00001234/``:
- ``model.pt``, ``optimizer.pt``, ``ema.pt``  replicated engines (single, ddp): written by rank 0
- ``engine/``                               sharded engines write their own files (fsdp2: torch.distributed.checkpoint;
                                            deepspeed: its save_checkpoint); each rank stages locally, then uploads
- ``train_state.pt``                         step, every rank's RNG states, the data position of every reader, …
- ``COMMIT.json``                            written last, by rank 0, after a barrier: step, ``healthy``, metadata,
                                            and every file's size and sha256 (hashed from the bytes as uploaded)

Only a directory with a readable COMMIT whose files all have their recorded sizes counts (``steps()``: one listing,
no downloads); an empty or truncated COMMIT is a damaged commit, skipped with a warning. A commit is immutable:
saving a committed step again is refused. ``load`` verifies every sha256 before anything is deserialised
(``torch.load(weights_only=True)``; DCP and DeepSpeed unpickle their own files only after the check). Resuming from
"latest" falls back to the previous committed step, with a warning, when a file fails its check; loading a named
step fails loudly. Uploads are bounded (``upload.py``); retention is ``retention.py``.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import tempfile
import warnings
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

import torch

from ..distributed import all_gather_objects, barrier, new_group_like_world
from ..storage import filesystem, join, read_bytes
from .faults import fault_point
from .layout import COMMIT, PIN, STEP_DIR, Scan, step_dir
from .retention import Retention
from .upload import BoundedWriter, OneInFlight


class CheckpointError(RuntimeError):
    pass


def _torch_bytes(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _torch_load(data: bytes) -> Any:
    return torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")


@contextlib.contextmanager
def _engine_dir(verified: Iterable[tuple[str, bytes]]) -> Iterator[str]:
    """A local directory holding the verified ``engine/`` files as the engine wrote them, for loaders that read a
    directory (DCP, DeepSpeed: they unpickle their metadata, so only ever after the sha256 check)."""
    with tempfile.TemporaryDirectory(prefix="meanflow-ckpt-") as tmp:
        for name, data in verified:
            if name.startswith("engine/"):
                path = Path(tmp, name[len("engine/"):])
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)
        yield tmp


def _parse_commit(data: bytes) -> Optional[dict]:
    """The COMMIT record, or None when ``data`` is not one (empty, truncated, not this store's record)."""
    try:
        commit = json.loads(data)
    except ValueError:   # JSONDecodeError, UnicodeDecodeError
        return None
    if not (isinstance(commit, dict) and "format" in commit and isinstance(commit.get("files"), dict)):
        return None
    if not all(isinstance(meta, dict) and {"bytes", "sha256"} <= meta.keys() for meta in commit["files"].values()):
        return None
    return commit


class CheckpointStore(Retention):
    def __init__(self, url: str, keep_last: int = 3, keep_every: int = 0, rank: int = 0,
                 upload_timeout_s: float = 300.0, max_outage_s: float = 1800.0, backoff_s: float = 1.0,
                 async_save: bool = False):
        self.url, self.keep_last, self.keep_every, self.rank = url.rstrip("/"), keep_last, keep_every, rank
        self.async_save = async_save
        self.fs, self.path = filesystem(self.url)
        self.writer = BoundedWriter("checkpoint", upload_timeout_s, max_outage_s, backoff_s)
        self._uploads = OneInFlight()
        # The save path's own group, also for synchronous saves: its collectives wait while a rank retries an
        # upload, for up to max_outage_s, longer than the training group's timeout allows.
        self._group = new_group_like_world(timeout_s=max_outage_s + 2 * upload_timeout_s + 120)

    @property
    def upload_retries(self) -> int:
        return self.writer.retries

    def step_url(self, step: int) -> str:
        return join(self.url, step_dir(step))

    # ------------------------------------------------------------------------------------------------ save
    def _put(self, step: int, name: str, data: bytes) -> dict[str, dict]:
        self.writer.write(join(self.step_url(step), name), data)
        fault_point(f"wrote:{name}")
        return {name: {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}}

    def save(self, step: int, engine, train_state: dict[str, Any], metadata: dict[str, Any],
             healthy: bool = True) -> str:
        """Collective: every rank calls it. Stages this rank's files in memory (the engine state as it is now),
        then uploads them and commits: in this thread, or with ``async_save`` in a background thread while
        training goes on. At most one upload is in flight: a save first waits for the previous one. A step that is
        already committed is refused (CheckpointError): a commit is never rewritten."""
        self.wait()
        # Rank 0 looks (one read, not one per rank) and every rank follows its answer: all refuse, or none.
        if all_gather_objects(self.rank == 0 and self.writer.call(lambda: self._committed_else_cleared(step),
                                                                  self.step_url(step)))[0]:
            raise CheckpointError(f"{self.step_url(step)} is already committed; a commit is immutable, refusing "
                                  "to rewrite it")
        staged = self._stage(engine, train_state)
        args = (step, staged, engine.checkpoint_format, metadata, healthy)
        if self.async_save:
            self._uploads.start(self._upload_and_commit, *args, name=f"checkpoint-upload-{step}")
        else:
            self._upload_and_commit(*args)
        return self.step_url(step)

    def wait(self) -> None:
        """Block until the upload in flight (if any) has committed; re-raise its failure here."""
        self._uploads.wait()

    def close(self, timeout_s: float = 60.0) -> None:
        """End of training: the upload in flight commits (its failure is raised here), and a running retention pass
        gets ``timeout_s`` to finish; a process that exits kills it mid-deletion (harmless: what it leaves is
        uncommitted, and the next commit's pass removes it)."""
        self.wait()
        if not self.wait_for_pruning(timeout_s):
            warnings.warn(f"checkpoint retention pass in {self.url} still running after {timeout_s:g}s; the next "
                          "run's first commit finishes it", stacklevel=2)

    def _committed_else_cleared(self, step: int) -> bool:
        """True when ``step`` is committed. Otherwise a directory of it, left by a writer killed mid-save (whose
        world may have had more ranks: their shards would lie beside this save's files), is removed before any
        rank writes; a pinned one is left, its files being read."""
        if self._commit_exists(step):
            return True
        directory = join(self.path, step_dir(step))
        self.fs.invalidate_cache()
        if self.fs.exists(directory) and not self.fs.exists(join(directory, PIN)):
            self._delete_step(step)
        return False

    def _commit_exists(self, step: int) -> bool:
        try:
            return self._commit(step) is not None
        except CheckpointError:   # a damaged COMMIT is no commit: the step may be saved again
            return False

    def _stage(self, engine, train_state: dict[str, Any]) -> dict[str, bytes]:
        """This rank's files as bytes. Replicated engines: rank 0 serialises each state component. Sharded
        engines write their own files (DCP, DeepSpeed; collective) into a local directory, read back here."""
        staged: dict[str, bytes] = {}
        if engine.checkpoint_format == "files":
            with tempfile.TemporaryDirectory(prefix="meanflow-ckpt-") as tmp:
                engine.save_files(tmp)
                for path in sorted(p for p in Path(tmp).rglob("*") if p.is_file()):
                    staged[f"engine/{path.relative_to(tmp).as_posix()}"] = path.read_bytes()
        elif self.rank == 0:
            staged.update({f"{name}.pt": _torch_bytes(c) for name, c in engine.state_dict().items()})
        if self.rank == 0:
            staged["train_state.pt"] = _torch_bytes(train_state)
        return staged

    def _upload_and_commit(self, step: int, staged: dict[str, bytes], fmt: str, metadata: dict[str, Any],
                           healthy: bool) -> None:
        files = {}
        for name, data in staged.items():
            files.update(self._put(step, name, data))
        # The uploads' own process group: a background thread must not interleave collectives with training's.
        every_rank_files = all_gather_objects(files, group=self._group)
        barrier(group=self._group)                   # every shard is up before anyone can see a COMMIT
        if self.rank == 0:
            fault_point("before-commit")
            merged = {k: v for rank_files in every_rank_files for k, v in rank_files.items()}
            commit = {"step": step, "healthy": healthy, "format": fmt, "files": merged, "metadata": metadata}
            self.writer.write(join(self.step_url(step), COMMIT), json.dumps(commit, indent=1).encode())
            self.prune_in_background(step)
        barrier(group=self._group)

    # ------------------------------------------------------------------------------------------------ find
    def _commit(self, step: int) -> Optional[dict]:
        """The step's COMMIT record; None when it has none; CheckpointError when its COMMIT is damaged."""
        url = join(self.step_url(step), COMMIT)
        try:
            data = read_bytes(url)
        except FileNotFoundError:
            return None
        commit = _parse_commit(data)
        if commit is None:
            raise CheckpointError(f"{url} is damaged ({len(data)} bytes, not a commit record)")
        return commit

    def scan(self) -> Scan:
        """One listing (sizes included, no downloads but the COMMIT records): committed steps (COMMIT readable,
        every file at its recorded size), every step directory present, and the pinned steps. A damaged COMMIT
        makes its step uncommitted, with a warning."""
        self.fs.invalidate_cache(self.path)   # first: even the existence check may answer from a stale listing
        if not self.fs.exists(self.path):
            return Scan({}, set(), set())
        listing = self.fs.find(self.path, detail=True)
        sizes = {p[len(self.path):].strip("/"): info["size"] for p, info in listing.items()}
        present, pinned, committed = set(), set(), {}
        for key in sizes:
            directory, _, name = key.partition("/")
            if not (match := STEP_DIR.match(directory)):
                continue
            step = int(match.group(1))
            present.add(step)
            if name == PIN:
                pinned.add(step)
            if name != COMMIT:
                continue
            try:
                commit = self._commit(step)
            except CheckpointError as err:
                warnings.warn(f"checkpoint step {step} is not committed: {err}", stacklevel=2)
                continue
            if commit and all(sizes.get(f"{directory}/{f}") == meta["bytes"] for f, meta in commit["files"].items()):
                committed[step] = commit
        return Scan(dict(sorted(committed.items())), present, pinned)

    def commits(self) -> dict[int, dict]:
        """Committed steps and their COMMIT records (COMMIT present, every file at its recorded size)."""
        return self.scan().committed

    def steps(self) -> list[int]:
        return list(self.commits())

    def latest(self) -> Optional[int]:
        steps = self.steps()
        return steps[-1] if steps else None

    # ------------------------------------------------------------------------------------------------ load
    def _verified_bytes(self, step: int, commit: dict, name: str) -> bytes:
        url = join(self.step_url(step), name)
        data = read_bytes(url)
        if hashlib.sha256(data).hexdigest() != commit["files"][name]["sha256"]:
            raise CheckpointError(f"{url}: sha256 differs from COMMIT.json; refusing to load it")
        return data

    def _committed(self, step: int) -> dict:
        commit = self._commit(step)
        if commit is None:
            raise CheckpointError(f"{self.step_url(step)}: no {COMMIT} (not a committed checkpoint)")
        return commit

    def _verify(self, step: int, engine) -> tuple[dict, dict[str, bytes]]:
        """(COMMIT, every file's bytes), each checked against its sha256; raises CheckpointError otherwise."""
        commit = self._committed(step)
        if commit["format"] != engine.checkpoint_format:
            raise CheckpointError(f"{self.step_url(step)}: written by a '{commit['format']}'-format engine, this is "
                                  f"engine {engine.name} ('{engine.checkpoint_format}')")
        return commit, {name: self._verified_bytes(step, commit, name) for name in commit["files"]}

    def _apply(self, commit: dict, verified: dict[str, bytes], engine) -> tuple[dict, dict]:
        if commit["format"] == "files":
            with _engine_dir(verified.items()) as local:
                engine.load_files(local)
        else:
            engine.load_state_dict({name[:-3]: _torch_load(data)
                                    for name, data in verified.items() if name != "train_state.pt"})
        return _torch_load(verified["train_state.pt"]), commit["metadata"]

    def load(self, step: int, engine) -> tuple[dict, dict]:
        """Load a committed step into ``engine`` (collective for sharded engines); returns (train_state, metadata).
        Every rank must pass verification, or every rank raises."""
        try:
            commit, verified, error = *self._verify(step, engine), None
        except CheckpointError as err:
            commit, verified, error = None, None, str(err)
        errors = [e for e in all_gather_objects(error) if e]
        if errors:
            raise CheckpointError(errors[0])
        return self._apply(commit, verified, engine)

    def load_weights(self, step: int, template: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str]:
        """A committed step's sampling weights, for any engine's format, read by this rank alone (no collective:
        evaluation and export run on any world size): the EMA when the run kept one, else the model. Returns
        (state dict, "ema" | "model"). ``template``: a freshly built model's state dict, into which DCP reads a
        sharded (fsdp2) checkpoint's full tensors."""
        commit = self._committed(step)
        files = commit["files"]
        for which in ("ema", "model"):
            for name in (f"{which}.pt", f"engine/{which}.pt"):   # replicated engines; DeepSpeed's plain copies
                if name in files:
                    return _torch_load(self._verified_bytes(step, commit, name)), which
        import torch.distributed.checkpoint as dcp

        # every shard of the DCP checkpoint (optimizer included: DCP has no per-key files)
        shards = ((name, self._verified_bytes(step, commit, name)) for name in files if name.startswith("engine/"))
        with _engine_dir(shards) as local:
            keys = dcp.FileSystemReader(local).read_metadata().state_dict_metadata
            which = "ema" if any(k.startswith("ema.") for k in keys) else "model"
            state = {which: {k: torch.empty_like(v, device="cpu") for k, v in template.items()}}
            dcp.load(state, storage_reader=dcp.FileSystemReader(local), no_dist=True)
        return state[which], which

    def load_latest(self, engine) -> tuple[Optional[int], dict, dict]:
        """Newest committed step that passes verification; a failing one is skipped with a warning.
        Returns (step, train_state, metadata), or (None, {}, {}) when there is none."""
        for step in all_gather_objects(list(reversed(self.steps())))[0]:   # rank 0's listing, on every rank
            try:
                train_state, metadata = self.load(step, engine)
                return step, train_state, metadata
            except CheckpointError as err:
                warnings.warn(f"checkpoint step {step} is damaged ({err}); falling back to the previous one",
                              stacklevel=2)
        return None, {}, {}

"""Checkpoint store: committed step directories under any fsspec URL (file://, s3://, memory://).

Layout of ``<url>/step-00001234/``:
- ``model.pt``, ``optimizer.pt``, ``ema.pt``  replicated engines (single, ddp): written by rank 0
- ``engine/``                               sharded engines write their own files (fsdp2: torch.distributed.checkpoint;
                                            deepspeed: its save_checkpoint); each rank stages locally, then uploads
- ``train_state.pt``                         step, every rank's RNG states, the data position of every reader, …
- ``COMMIT.json``                            written last, by rank 0, after a barrier: step, ``healthy``, metadata,
                                            and every file's size and sha256 (hashed from the bytes as uploaded)

Only a directory with a COMMIT whose files all have their recorded sizes counts (``steps()``: one listing, no
downloads). ``load`` verifies every sha256 before anything is deserialised (``torch.load(weights_only=True)``;
DCP and DeepSpeed unpickle their own files only after the check). Resuming from "latest" falls back to the previous committed
step, with a warning, when a file fails its check; loading a named step fails loudly.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import signal
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Optional

import torch

from .distributed import all_gather_objects, barrier, new_group_like_world
from .storage import filesystem, join, read_bytes, write_bytes_atomic

STEP_DIR = re.compile(r"step-(\d{8})$")
COMMIT = "COMMIT.json"
PIN = "PINNED"
KILL_POINT_ENV = "MEANFLOW_CHECKPOINT_KILL_AT"


class CheckpointError(RuntimeError):
    pass


_fault_point_visits: dict[str, int] = {}
FAULT_HOOKS: dict[str, Any] = {}


def arm_fault_hook(visit: str, action) -> None:
    """In-process fault tests: run ``action`` at ``"<point>@<n>"`` (e.g. freeze the object store mid-save),
    counting visits from now."""
    _fault_point_visits.clear()
    FAULT_HOOKS[visit] = action


def disarm_fault_hooks() -> None:
    FAULT_HOOKS.clear()
    _fault_point_visits.clear()


def fault_point(name: str) -> None:
    """Named points of the save path where fault tests strike: ``MEANFLOW_CHECKPOINT_KILL_AT=<name>@<n>`` kills
    this process (SIGKILL: no cleanup, no flush) the n-th time the point is reached; ``FAULT_HOOKS`` runs a
    registered callable there. A no-op otherwise."""
    wanted = os.environ.get(KILL_POINT_ENV)
    if not wanted and not FAULT_HOOKS:
        return
    _fault_point_visits[name] = _fault_point_visits.get(name, 0) + 1
    visit = f"{name}@{_fault_point_visits[name]}"
    if wanted == visit:
        os.kill(os.getpid(), signal.SIGKILL)
    if visit in FAULT_HOOKS:
        FAULT_HOOKS.pop(visit)()


def _torch_bytes(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


class StorageOutage(RuntimeError):
    pass


def call_with_timeout(fn, timeout_s: float):
    """Run ``fn`` in a daemon thread and wait at most ``timeout_s``: a stalled upload (a store that accepts the
    connection and never answers) cannot hang the caller. An abandoned call may still finish later; uploads
    write the same bytes to the same key, so a late finish is harmless."""
    result: dict[str, Any] = {}

    def target():
        try:
            result["value"] = fn()
        except BaseException as err:   # reported to the caller's thread below
            result["error"] = err

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise TimeoutError(f"no answer within {timeout_s:g}s")
    if "error" in result:
        raise result["error"]
    return result.get("value")


class CheckpointStore:
    def __init__(self, url: str, keep_last: int = 3, keep_every: int = 0, rank: int = 0,
                 upload_timeout_s: float = 300.0, max_outage_s: float = 1800.0, backoff_s: float = 1.0,
                 async_save: bool = False):
        self.url, self.keep_last, self.keep_every, self.rank = url.rstrip("/"), keep_last, keep_every, rank
        self.upload_timeout_s, self.max_outage_s, self.backoff_s = upload_timeout_s, max_outage_s, backoff_s
        self.async_save = async_save
        self.fs, self.path = filesystem(self.url)
        self.upload_retries = 0
        self._pruner: threading.Thread | None = None
        self._uploader: threading.Thread | None = None
        self._upload_error: BaseException | None = None
        # The save path's own group, also for synchronous saves: its collectives wait while a rank retries an
        # upload, for up to max_outage_s, longer than the training group's timeout allows.
        self._group = new_group_like_world(timeout_s=max_outage_s + 2 * upload_timeout_s + 120)
        self._pinned: set[int] = set()

    def step_url(self, step: int) -> str:
        return join(self.url, f"step-{step:08d}")

    # ------------------------------------------------------------------------------------------------ save
    def _upload(self, url: str, data: bytes) -> None:
        """Write with a per-attempt timeout, retrying with backoff; give up loudly after ``max_outage_s``."""
        started, attempt = time.monotonic(), 0
        while True:
            try:
                call_with_timeout(lambda: write_bytes_atomic(url, data), self.upload_timeout_s)
                return
            except (OSError, TimeoutError) as err:
                attempt += 1
                self.upload_retries += 1
                down = time.monotonic() - started
                if down > self.max_outage_s:
                    raise StorageOutage(f"checkpoint store unreachable for {down:.0f}s (> checkpoint.max_outage_s="
                                        f"{self.max_outage_s:g}) writing {url}: {type(err).__name__}: {err}") from err
                warnings.warn(f"checkpoint upload {url} failed ({type(err).__name__}: {err}); retry {attempt}",
                              stacklevel=2)
                time.sleep(min(self.backoff_s * 2 ** (attempt - 1), 30.0))

    def _put(self, step: int, name: str, data: bytes) -> dict[str, dict]:
        self._upload(join(self.step_url(step), name), data)
        fault_point(f"wrote:{name}")
        return {name: {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}}

    def save(self, step: int, engine, train_state: dict[str, Any], metadata: dict[str, Any],
             healthy: bool = True) -> str:
        """Collective: every rank calls it. Stages this rank's files in memory (the engine state as it is now),
        then uploads them and commits: in this thread, or with ``async_save`` in a background thread while
        training goes on. At most one upload is in flight: a save first waits for the previous one."""
        self.wait()
        staged = self._stage(engine, train_state)
        args = (step, staged, engine.checkpoint_format, metadata, healthy)
        if self.async_save:
            self._uploader = threading.Thread(target=self._upload_in_background, args=args, daemon=True,
                                              name=f"checkpoint-upload-{step}")
            self._uploader.start()
        else:
            self._upload_and_commit(*args)
        return self.step_url(step)

    def wait(self) -> None:
        """Block until the upload in flight (if any) has committed; re-raise its failure here."""
        if self._uploader is not None:
            self._uploader.join()
            self._uploader = None
        if self._upload_error is not None:
            error, self._upload_error = self._upload_error, None
            raise error

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

    def _upload_in_background(self, *args) -> None:
        try:
            self._upload_and_commit(*args)
        except BaseException as err:   # surfaced by the next save() or wait() in the training thread
            self._upload_error = err

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
            self._upload(join(self.step_url(step), COMMIT), json.dumps(commit, indent=1).encode())
            self.prune_in_background()
        barrier(group=self._group)

    # ------------------------------------------------------------------------------------------------ find
    def _commit(self, step: int) -> Optional[dict]:
        try:
            return json.loads(read_bytes(join(self.step_url(step), COMMIT)))
        except FileNotFoundError:
            return None

    def commits(self) -> dict[int, dict]:
        """Committed steps and their COMMIT records (COMMIT present, every file at its recorded size)."""
        if not self.fs.exists(self.path):
            return {}
        self.fs.invalidate_cache(self.path)
        listing = self.fs.find(self.path, detail=True)   # one listing, sizes included
        sizes = {p[len(self.path):].strip("/"): info["size"] for p, info in listing.items()}
        committed = {}
        self._pinned = {int(m.group(1)) for key in sizes
                        if key.endswith(f"/{PIN}") and (m := STEP_DIR.match(key.partition("/")[0]))}
        for key in sizes:
            step_dir, _, name = key.partition("/")
            match = STEP_DIR.match(step_dir)
            if name != COMMIT or not match:
                continue
            commit = self._commit(int(match.group(1)))
            if commit and all(sizes.get(f"{step_dir}/{f}") == meta["bytes"] for f, meta in commit["files"].items()):
                committed[int(match.group(1))] = commit
        return dict(sorted(committed.items()))

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

    def _verify(self, step: int, engine) -> tuple[dict, dict[str, bytes]]:
        """(COMMIT, every file's bytes), each checked against its sha256; raises CheckpointError otherwise."""
        commit = self._commit(step)
        if commit is None:
            raise CheckpointError(f"{self.step_url(step)}: no {COMMIT} (not a committed checkpoint)")
        if commit["format"] != engine.checkpoint_format:
            raise CheckpointError(f"{self.step_url(step)}: written by a '{commit['format']}'-format engine, this is "
                                  f"engine {engine.name} ('{engine.checkpoint_format}')")
        return commit, {name: self._verified_bytes(step, commit, name) for name in commit["files"]}

    def _apply(self, commit: dict, verified: dict[str, bytes], engine) -> tuple[dict, dict]:
        if commit["format"] == "files":
            self._load_engine_files(engine, verified)
        else:
            engine.load_state_dict({name[:-3]: torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
                                    for name, data in verified.items() if name != "train_state.pt"})
        train_state = torch.load(io.BytesIO(verified["train_state.pt"]), weights_only=True, map_location="cpu")
        return train_state, commit["metadata"]

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

    def _load_engine_files(self, engine, verified: dict[str, bytes]) -> None:
        """The verified files, laid out locally as the engine wrote them, then the engine's own loader (DCP or
        DeepSpeed unpickle their metadata: only ever after the sha256 check)."""
        with tempfile.TemporaryDirectory(prefix="meanflow-ckpt-") as tmp:
            for name, data in verified.items():
                if name.startswith("engine/"):
                    path = Path(tmp, name[len("engine/"):])
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_bytes(data)
            engine.load_files(tmp)

    def load_weights(self, step: int, template: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str]:
        """A committed step's sampling weights, for any engine's format, read by this rank alone (no collective:
        evaluation and export run on any world size): the EMA when the run kept one, else the model. Returns
        (state dict, "ema" | "model"). ``template``: a freshly built model's state dict, into which DCP reads a
        sharded (fsdp2) checkpoint's full tensors."""
        commit = self._commit(step)
        if commit is None:
            raise CheckpointError(f"{self.step_url(step)}: no {COMMIT} (not a committed checkpoint)")
        files = commit["files"]
        for which in ("ema", "model"):
            for name in (f"{which}.pt", f"engine/{which}.pt"):   # replicated engines; DeepSpeed's plain copies
                if name in files:
                    data = self._verified_bytes(step, commit, name)
                    return torch.load(io.BytesIO(data), weights_only=True, map_location="cpu"), which
        import torch.distributed.checkpoint as dcp

        with tempfile.TemporaryDirectory(prefix="meanflow-ckpt-") as tmp:
            for name in files:   # every shard of the DCP checkpoint (optimizer included: DCP has no per-key files)
                if name.startswith("engine/"):
                    path = Path(tmp, name[len("engine/"):])
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_bytes(self._verified_bytes(step, commit, name))
            keys = dcp.FileSystemReader(tmp).read_metadata().state_dict_metadata
            which = "ema" if any(k.startswith("ema.") for k in keys) else "model"
            state = {which: {k: torch.empty_like(v, device="cpu") for k, v in template.items()}}
            dcp.load(state, storage_reader=dcp.FileSystemReader(tmp), no_dist=True)
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

    # ------------------------------------------------------------------------------------------------ retention
    def prune_in_background(self) -> None:
        """Retention never delays training (a slow or frozen store only delays deletions); one pass at a time."""
        if self._pruner is not None and self._pruner.is_alive():
            return
        self._pruner = threading.Thread(target=self._prune_quietly, daemon=True, name="checkpoint-prune")
        self._pruner.start()

    def wait_for_pruning(self, timeout_s: float = 60.0) -> None:
        if self._pruner is not None:
            self._pruner.join(timeout_s)

    def _prune_quietly(self) -> None:
        try:
            self.prune()
        except Exception as err:   # the next commit's pass retries; a failed deletion loses nothing
            warnings.warn(f"checkpoint retention pass failed: {type(err).__name__}: {err}", stacklevel=1)

    def discard_after(self, step: int) -> None:
        """Delete committed steps newer than ``step`` (a rollback abandoned them), COMMIT first so a half-deleted
        step is never taken for committed."""
        for newer in [s for s in self.steps() if s > step and s not in self._pinned]:
            self.fs.rm(join(self.path, f"step-{newer:08d}", COMMIT))
            self.fs.rm(self.step_url(newer), recursive=True)

    def pin(self, step: int, reason: str) -> None:
        """Protect a step from retention (an evaluation reading it, a rollback target) until ``unpin``."""
        write_bytes_atomic(join(self.step_url(step), PIN), reason.encode())

    def unpin(self, step: int) -> None:
        self.fs.rm(join(self.path, f"step-{step:08d}", PIN))

    def prune(self) -> None:
        """Keep the last ``keep_last`` committed steps, every ``keep_every``-th step as a milestone, the newest
        healthy step whatever its age, and pinned steps. Uncommitted directories are never touched (a save may be
        in flight)."""
        commits = self.commits()
        steps = list(commits)
        keep = set(steps[-self.keep_last:]) if self.keep_last > 0 else set()
        keep |= self._pinned
        if self.keep_every:
            keep |= {s for s in steps if s % self.keep_every == 0}
        healthy = [s for s, c in commits.items() if c.get("healthy", True)]
        if healthy:
            keep.add(healthy[-1])
        for step in steps:
            if step not in keep:
                self.fs.rm(self.step_url(step), recursive=True)

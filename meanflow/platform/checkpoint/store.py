"""Checkpoint store: committed step directories under any fsspec URL (file://, s3://, memory://).

Layout of ``<url>/step-00001234/``:
- ``model.pt``, ``optimizer.pt``, ``ema.pt``  replicated engines (single, ddp): written by rank 0
- ``engine/``                               sharded engines write their own files (fsdp2: torch.distributed.checkpoint;
                                            deepspeed: its save_checkpoint); each rank stages locally, then uploads
- ``train_state.pt``                         step, every rank's RNG states, the data position of every reader, …
- ``COMMIT.json``                            written last, by rank 0, after every upload: step, ``healthy``, metadata,
                                            and every file's size and sha256 (hashed from the bytes as uploaded)

``verdict(step)`` is the one judgement of a step, used by every path: an intact commit (a readable COMMIT, every
file it lists present at its recorded size; ``load`` adds every sha256), damaged (says what is wrong), or
uncommitted. ``steps()`` lists the intact ones (one listing, no downloads but the COMMIT records). An intact commit
is immutable: saving it again is refused. ``load`` verifies every sha256 before anything is deserialised
(``torch.load(weights_only=True)``; DCP and DeepSpeed unpickle their own files only after the check); loading a
named step fails loudly. Every damaged step the writer (rank 0) meets is named in a warning and in
``take_damage_reports()`` (the trainer's events); resuming from "latest" sets the damaged ones aside (COMMIT.json
becomes DAMAGED.json, with what is wrong; the files stay for inspection until retention) and falls back to the
previous intact step, so that training saves the damaged step anew when it gets there. Uploads are bounded
(``upload.py``); retention is ``retention.py``; pins are ``pins.py``.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import io
import json
import tempfile
import warnings
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

import torch

from ..distributed import all_gather_objects, finish_together, new_group_like_world
from ..storage import filesystem, join, read_bytes
from .faults import fault_point
from .layout import COMMIT, DAMAGED, PIN, STEP_DIR, Scan, Verdict, parse_commit, size_damage, step_dir
from .pins import Pins
from .retention import Retention, remove_if_present
from .upload import BoundedWriter, OneInFlight


class CheckpointError(RuntimeError):
    pass


class CheckpointDamaged(CheckpointError):
    """A step whose COMMIT record or files are damaged; ``damage`` says what is wrong (e.g. "model.pt: sha256
    mismatch"). Unlike other refusals (no commit; another engine's format), it makes the step one to set aside."""

    def __init__(self, url: str, damage: str):
        super().__init__(f"{url} is damaged: {damage}")
        self.url, self.damage = url, damage

    def __reduce__(self):   # gathered from every rank as an object
        return type(self), (self.url, self.damage)


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


class CheckpointStore(Retention):
    def __init__(self, url: str, keep_last: int = 3, keep_every: int = 0, rank: int = 0,
                 upload_timeout_s: float = 300.0, max_outage_s: float = 1800.0, backoff_s: float = 1.0,
                 async_save: bool = False, collective_timeout_s: float = 600.0):
        self.url, self.keep_last, self.keep_every, self.rank = url.rstrip("/"), keep_last, keep_every, rank
        self.async_save = async_save
        self.fs, self.path = filesystem(self.url)
        self.writer = BoundedWriter("checkpoint", upload_timeout_s, max_outage_s, backoff_s)
        self.pins = Pins(self.url, self.writer)
        self._uploads = OneInFlight()
        self._damage_named: set[tuple[int, str]] = set()   # each damage is reported once per store
        self._damage_reports: list[tuple[int, str]] = []
        # The save path's own group, also for synchronous saves. Its ranks wait for each other's uploads (retried
        # for up to max_outage_s) in polls, each bounded by the collective timeout: a lost peer fails a save in
        # that time, not after the outage allowance.
        self._group = new_group_like_world(timeout_s=collective_timeout_s)
        self._poll_s = min(5.0, collective_timeout_s / 4)

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
        an intact commit is refused (CheckpointError): a commit is never rewritten; a damaged one is saved anew."""
        self.wait()
        # Rank 0 looks (one listing, not one per rank) and every rank follows its answer: all refuse, or none.
        if all_gather_objects(self.rank == 0 and self._intact_else_cleared(step))[0]:
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

    def _intact_else_cleared(self, step: int) -> bool:
        """True when ``step`` is an intact commit. Otherwise its directory, left by a writer killed mid-save (whose
        world may have had more ranks: their shards would lie beside this save's files) or holding a damaged
        commit (reported), is removed before any rank writes; a pinned one keeps its files (being read) and loses
        only its records."""
        sizes = self._files(step)
        verdict = self.verdict(step, sizes)
        if verdict.intact:
            return True
        if verdict.damage and not verdict.set_aside:
            self._report_damage(step, verdict.damage)
        if sizes:
            self.writer.call(lambda: self._delete_step(step, keep_files=PIN in sizes), self.step_url(step), "clear")
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
        def upload() -> dict[str, dict]:
            files = {}
            for name, data in staged.items():
                files.update(self._put(step, name, data))
            return files

        def commit() -> None:
            if self.rank == 0:
                fault_point("before-commit")
                merged = {k: v for rank_files in every_rank_files for k, v in rank_files.items()}
                record = {"step": step, "healthy": healthy, "format": fmt, "files": merged, "metadata": metadata}
                self.writer.write(join(self.step_url(step), COMMIT), json.dumps(record, indent=1).encode())
                self.prune_in_background(step)

        # The uploads' own process group: a background thread must not interleave collectives with training's.
        # Every shard is up before anyone can see a COMMIT, and no rank goes on before it is written.
        every_rank_files = all_gather_objects(finish_together(upload, self._group, self._poll_s), group=self._group)
        finish_together(commit, self._group, self._poll_s)

    # ------------------------------------------------------------------------------------------------ find
    def _read_record(self, step: int, name: str) -> Optional[bytes]:
        """A record of the step's directory (COMMIT, DAMAGED); None when absent (deleted since it was listed)."""
        def read() -> Optional[bytes]:
            try:
                return read_bytes(join(self.step_url(step), name))
            except FileNotFoundError:
                return None

        return self.writer.call(read, join(self.step_url(step), name), "read")

    def _files(self, step: int) -> dict[str, int]:
        """The step directory's files (name -> bytes), one listing; empty when there is no such directory."""
        directory = join(self.path, step_dir(step))

        def listing() -> dict:
            self.fs.invalidate_cache(directory)
            try:
                return self.fs.find(directory, detail=True)
            except FileNotFoundError:
                return {}

        found = self.writer.call(listing, self.step_url(step), "list")
        return {p[len(directory):].strip("/"): info["size"] for p, info in found.items()}

    def verdict(self, step: int, files: Optional[dict[str, int]] = None) -> Verdict:
        """The one verdict on ``step``, from its records and each file COMMIT lists: present, at its recorded
        size (``load`` adds the sha256). ``files``: the directory's files (name -> bytes) from a listing in hand;
        listed here otherwise."""
        files = self._files(step) if files is None else files
        if COMMIT not in files:
            return Verdict(damage=f"set aside: {self._set_aside_damage(step)}", set_aside=True) \
                if DAMAGED in files else Verdict()
        data = self._read_record(step, COMMIT)
        if data is None:
            return Verdict()
        commit = parse_commit(data)
        if commit is None:
            return Verdict(damage=f"{COMMIT}: {len(data)} bytes, not a commit record")
        damage = size_damage(commit, files)
        return Verdict(damage=damage) if damage else Verdict(commit=commit)

    def _set_aside_damage(self, step: int) -> str:
        try:
            return json.loads(self._read_record(step, DAMAGED))["damage"]
        except (TypeError, ValueError, KeyError):   # gone since listed, not JSON, not our record
            return f"{DAMAGED} unreadable"

    def scan(self) -> Scan:
        """One listing (sizes included, no downloads but the records): the verdict on every step directory, and
        the pinned steps. Every damaged step not yet set aside is reported (``_report_damage``)."""
        self.fs.invalidate_cache(self.path)   # first: even the existence check may answer from a stale listing
        if not self.fs.exists(self.path):
            return Scan({}, set())
        listing = self.fs.find(self.path, detail=True)
        files: dict[int, dict[str, int]] = {}
        for path, info in listing.items():
            directory, _, name = path[len(self.path):].strip("/").partition("/")
            if match := STEP_DIR.match(directory):
                files.setdefault(int(match.group(1)), {})[name] = info["size"]
        verdicts = {step: self.verdict(step, names) for step, names in sorted(files.items())}
        for step, verdict in verdicts.items():
            if verdict.damage and not verdict.set_aside:
                self._report_damage(step, verdict.damage)
        return Scan(verdicts, {step for step, names in files.items() if PIN in names})

    def _report_damage(self, step: int, damage: str) -> None:
        """Rank 0 names each damaged step once per store: a warning, and a report for ``take_damage_reports``."""
        if self.rank != 0 or (step, damage) in self._damage_named:
            return
        self._damage_named.add((step, damage))
        self._damage_reports.append((step, damage))
        warnings.warn(f"checkpoint {self.step_url(step)} is damaged ({damage}); skipped", stacklevel=2)

    def take_damage_reports(self) -> list[tuple[int, str]]:
        """The damaged steps (step, what is wrong) reported since the last call, for the run's events."""
        reports, self._damage_reports = self._damage_reports, []
        return reports

    def set_aside(self, step: int, damage: str) -> None:
        """Rank 0: a damaged step stops being a commit: COMMIT.json becomes DAMAGED.json (its record, and what is
        wrong), written before COMMIT.json is removed, so a writer killed in between leaves the step damaged, never
        committed. The files stay for inspection until retention (or a new save of the step) removes them. A copy
        and a delete of one small object: object stores cannot rename a directory."""
        if self.rank != 0:
            return
        record = self._read_record(step, COMMIT)
        if record is None:
            return
        self._report_damage(step, damage)
        aside = {"damage": damage, "set_aside": datetime.datetime.now().isoformat(timespec="seconds"),
                 "commit": record.decode(errors="replace")}
        self.writer.write(join(self.step_url(step), DAMAGED), json.dumps(aside, indent=1).encode())
        path = join(self.path, step_dir(step), COMMIT)
        self.writer.call(lambda: remove_if_present(self.fs, path), self.step_url(step), "set aside")
        warnings.warn(f"checkpoint {self.step_url(step)} set aside: its {COMMIT} is now {DAMAGED}", stacklevel=2)

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
        data = read_bytes(join(self.step_url(step), name))
        if hashlib.sha256(data).hexdigest() != commit["files"][name]["sha256"]:
            raise CheckpointDamaged(self.step_url(step), f"{name}: sha256 mismatch")
        return data

    def _committed(self, step: int) -> dict:
        """The COMMIT record of an intact step; CheckpointDamaged, or CheckpointError when it is uncommitted."""
        verdict = self.verdict(step)
        if verdict.damage:
            raise CheckpointDamaged(self.step_url(step), verdict.damage)
        if not verdict.intact:
            raise CheckpointError(f"{self.step_url(step)}: no {COMMIT} (not a committed checkpoint)")
        return verdict.commit

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
            commit, verified, error = None, None, err
        errors = [e for e in all_gather_objects(error) if e]
        if errors:
            raise errors[0]
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
        """Newest intact step that passes verification, as (step, train_state, metadata), or (None, {}, {}) when
        there is none. Every damaged step met on the way (by the listing, or by a sha256) is set aside by rank 0,
        so that training saves it anew when it gets there."""
        scan = self.scan()
        for step, verdict in scan.damaged.items():
            if not verdict.set_aside:
                self.set_aside(step, verdict.damage)
        for step in all_gather_objects(list(reversed(scan.committed)))[0]:   # rank 0's listing, on every rank
            try:
                train_state, metadata = self.load(step, engine)
                return step, train_state, metadata
            except CheckpointDamaged as err:
                self.set_aside(step, err.damage)
            except CheckpointError as err:   # not damage (e.g. another engine's format): skipped, left as it is
                warnings.warn(f"checkpoint {self.step_url(step)} skipped: {err}", stacklevel=2)
        return None, {}, {}

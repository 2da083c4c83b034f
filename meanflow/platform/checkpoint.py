"""Checkpoint store: committed step directories under an fsspec URL.

Layout: ``<url>/step-00001234/{name}.pt`` for each component, then ``COMMIT.json`` last (step, sha256 and size of
every file, and free-form metadata). A step counts only once COMMIT.json exists and every file has its recorded
size; ``load`` verifies every sha256 before deserialising anything and loads with ``weights_only=True``.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from typing import Any, Optional

import torch

from .storage import filesystem, join, read_bytes, write_bytes_atomic

STEP_DIR = re.compile(r"step-(\d{8})$")


class CheckpointError(RuntimeError):
    pass


class CheckpointStore:
    def __init__(self, url: str, keep_last: int = 3):
        self.url, self.keep_last = url.rstrip("/"), keep_last
        self.fs, self.path = filesystem(self.url)

    def step_url(self, step: int) -> str:
        return join(self.url, f"step-{step:08d}")

    def save(self, step: int, state: dict[str, Any], metadata: Optional[dict] = None) -> str:
        """Write each component, then COMMIT.json; prune old steps. Returns the committed step URL."""
        files = {}
        for name, component in state.items():
            buffer = io.BytesIO()
            torch.save(component, buffer)
            data = buffer.getvalue()
            write_bytes_atomic(join(self.step_url(step), f"{name}.pt"), data)
            files[f"{name}.pt"] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
        commit = {"step": step, "files": files, "metadata": metadata or {}}
        write_bytes_atomic(join(self.step_url(step), "COMMIT.json"), json.dumps(commit, indent=1).encode())
        self._prune()
        return self.step_url(step)

    def _commit(self, step: int) -> Optional[dict]:
        try:
            return json.loads(read_bytes(join(self.step_url(step), "COMMIT.json")))
        except FileNotFoundError:
            return None

    def steps(self) -> list[int]:
        """Committed steps, oldest first (COMMIT.json present and every file at its recorded size)."""
        if not self.fs.exists(self.path):
            return []
        listing = self.fs.find(self.path, detail=True)   # one listing, sizes included
        sizes = {p[len(self.path):].strip("/"): info["size"] for p, info in listing.items()}
        committed = []
        for key in sizes:
            step_dir, _, name = key.partition("/")
            match = STEP_DIR.match(step_dir)
            if name != "COMMIT.json" or not match:
                continue
            commit = self._commit(int(match.group(1)))
            if commit and all(sizes.get(f"{step_dir}/{f}") == meta["bytes"] for f, meta in commit["files"].items()):
                committed.append(int(match.group(1)))
        return sorted(committed)

    def latest(self) -> Optional[int]:
        steps = self.steps()
        return steps[-1] if steps else None

    def load(self, step: int) -> tuple[dict[str, Any], dict]:
        """(state, metadata) of a committed step; every file's sha256 is checked before torch.load."""
        commit = self._commit(step)
        if commit is None:
            raise CheckpointError(f"{self.step_url(step)}: no COMMIT.json (not a committed checkpoint)")
        state = {}
        for fname, meta in commit["files"].items():
            url = join(self.step_url(step), fname)
            data = read_bytes(url)
            if hashlib.sha256(data).hexdigest() != meta["sha256"]:
                raise CheckpointError(f"{url}: sha256 mismatch with COMMIT.json; refusing to load")
            state[fname[: -len(".pt")]] = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
        return state, commit["metadata"]

    def _prune(self) -> None:
        steps = self.steps()
        for old in steps[: max(0, len(steps) - self.keep_last)]:
            self.fs.rm(self.step_url(old), recursive=True)

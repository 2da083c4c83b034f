"""Where a rollback goes: the newest healthy state, an in-memory snapshot or a healthy committed checkpoint.

Snapshots are taken every ``guard.snapshot_every`` healthy steps on replicated engines (every rank holds the whole
state, so a CPU copy is cheap and local); sharded engines roll back to the newest checkpoint committed with
``healthy: true``. Unhealthy or uncommitted checkpoints are never targets (``CheckpointStore.commits`` lists
committed steps only).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from meanflow.platform.distributed import all_gather_objects
from meanflow.platform.rng import rng_state, set_rng_state


@dataclass
class Snapshot:
    step: int
    engine_state: dict
    data_state: dict
    rng: dict


def _to_cpu(state):
    return {k: (_to_cpu(v) if isinstance(v, dict) else v.detach().to("cpu", copy=True)
                if isinstance(v, torch.Tensor) else copy.deepcopy(v)) for k, v in state.items()}


class RollbackTargets:
    def __init__(self, engine, stream, store):
        self.engine, self.stream, self.store = engine, stream, store
        self.snapshot: Snapshot | None = None

    def take_snapshot(self, step: int) -> None:
        if self.engine.checkpoint_format != "torch":
            return
        self.snapshot = Snapshot(step, _to_cpu(self.engine.state_dict()), copy.deepcopy(self.stream.state_dict()),
                                 rng_state())

    def newest_healthy_commit(self) -> int | None:
        healthy = [s for s, c in self.store.commits().items() if c.get("healthy", True)]
        return max(healthy) if healthy else None

    def restore(self) -> tuple[int, str]:
        """Restore the newest healthy state into the engine, data stream and RNGs; returns (step, source).
        Collective: rank 0 lists the store and its choice is broadcast, so every rank restores the same step."""
        commit = all_gather_objects(self.newest_healthy_commit())[0]
        snap = self.snapshot
        if snap is not None and (commit is None or snap.step >= commit):
            self.engine.load_state_dict(_to_cpu(snap.engine_state))
            self.stream.load_state_dict(copy.deepcopy(snap.data_state))
            set_rng_state(snap.rng)
            return snap.step, "snapshot"
        if commit is None:
            return -1, "none"
        train_state, meta = self.store.load(commit, self.engine)
        self.stream.load_state_dict(meta["data"])
        return commit, f"checkpoint {self.store.step_url(commit)}"

"""What every tracker implements, the fan-out the trainer holds, and the tags they share."""

from __future__ import annotations

import numbers
from typing import Any

import torch

from meanflow.platform.metrics import to_jsonable


def scalars(record: dict[str, Any], prefix: str = "", suffix: str = "") -> dict[str, float]:
    """The numeric values of a metrics record as tracker tags (``train/mse``); bools, strings and ``step`` out."""
    return {f"{prefix}{key}{suffix}": float(value) for key, value in to_jsonable(record).items()
            if key != "step" and isinstance(value, numbers.Real) and not isinstance(value, bool)}


def guard_counts(event: dict[str, Any]) -> dict[str, float]:
    """A guard event's running totals as scalars (``guard/rollbacks``): the event shows on the step axis."""
    return {f"guard/{action}s": float(n) for action, n in event.get("guard_counts", {}).items()}


def evaluation_tag(metrics: dict[str, Any]) -> str:
    """``-w2-t0-1`` for an iMF guidance setting, '' without guidance: tags of one setting line up across steps."""
    from meanflow.evaluation.evaluator import guidance_tag

    return guidance_tag(metrics.get("guidance"))


class Tracker:
    """What the trainer calls. Every method returns without waiting on a store or a network."""

    def log_metrics(self, step: int, values: dict[str, float]) -> None: ...

    def log_event(self, step: int, event: dict[str, Any]) -> None: ...

    def log_evaluation(self, step: int, metrics: dict[str, Any], grid: torch.Tensor | None) -> None: ...

    def rewind(self, step: int) -> None: ...

    def flush(self) -> None: ...

    def close(self, raise_errors: bool = True) -> None: ...


class Trackers(Tracker):
    """The configured trackers as one (none: every call does nothing)."""

    def __init__(self, trackers: list[Tracker] | None = None):
        self.trackers = trackers or []

    def log_metrics(self, step, values):
        for t in self.trackers:
            t.log_metrics(step, values)

    def log_event(self, step, event):
        for t in self.trackers:
            t.log_event(step, event)

    def log_evaluation(self, step, metrics, grid):
        for t in self.trackers:
            t.log_evaluation(step, metrics, grid)

    def rewind(self, step):
        for t in self.trackers:
            t.rewind(step)

    def flush(self):
        for t in self.trackers:
            t.flush()

    def close(self, raise_errors=True):   # once: a failure path closes again what success closed
        trackers, self.trackers = self.trackers, []
        for t in trackers:
            t.close(raise_errors)

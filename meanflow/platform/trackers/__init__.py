"""Experiment trackers, fed by training rank 0 beside metrics.jsonl: TensorBoard and Weights & Biases.

``run.trackers`` names them (none by default). Each gets the same calls from the trainer: the step records, the
events (guard skips and rollbacks, checkpoints), every evaluation (scalars per guidance setting, the sample grid),
and ``rewind(step)`` when the run goes back to ``step`` (a resume or a guard rollback): the steps after it are
trained again, and each tracker forgets their first points, so a curve has one point per step. No call waits on a
store or a network: both libraries queue on their own threads, and a remote run directory's TensorBoard files
go up on a background thread through the bounded writer.
"""

from __future__ import annotations

from omegaconf import DictConfig

from meanflow.platform.checkpoint.upload import BoundedWriter
from meanflow.platform.config import TRACKERS

from .base import Tracker, Trackers

__all__ = ["TRACKERS", "Tracker", "Trackers", "open_trackers"]


def open_trackers(cfg: DictConfig, run_dir: str, writer: BoundedWriter, start_step: int,
                  job: str = "train") -> Trackers:
    """The trackers ``run.trackers`` names, continuing the curves of the run in ``run_dir`` from ``start_step``.
    ``job="eval"``: an evaluation job's (TensorBoard under ``tb/eval``, a W&B run of its own in the run's group)."""
    opened: list[Tracker] = []
    for name in cfg.run.trackers:
        if name == "tensorboard":
            from .tensorboard_tracker import TensorBoardTracker
            opened.append(TensorBoardTracker(run_dir, writer, start_step, job))
        elif name == "wandb":
            from .wandb_tracker import WandbTracker
            opened.append(WandbTracker(cfg, run_dir, writer, start_step, job))
    return Trackers(opened)

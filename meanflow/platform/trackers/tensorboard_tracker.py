"""TensorBoard event files under ``<run_dir>/tb/`` (``tb/eval/`` for evaluation jobs).

A local run directory is written in place. For a remote one (s3://…) the events are written to a local temporary
directory and every file that grew is uploaded on a background thread, so ``tensorboard --logdir`` on a synced copy
shows the run. A rewind opens a new event file with ``purge_step``: TensorBoard then drops the earlier points at
and after that step (its own mechanism for restarted runs), and the re-trained steps have one point each.
"""

from __future__ import annotations

import json
import os
import tempfile

from meanflow.evaluation.images import image_grid
from meanflow.platform.background_upload import PeriodicUpload
from meanflow.platform.checkpoint.upload import BoundedWriter
from meanflow.platform.config import ConfigError
from meanflow.platform.storage import filesystem, is_local, join

from .base import Tracker, evaluation_tag, guard_counts, scalars

try:
    from torch.utils.tensorboard import SummaryWriter
except ImportError as err:   # torch's wrapper needs the tensorboard package
    raise ConfigError("run.trackers: 'tensorboard' needs the tensorboard package "
                      "(pip install -e '.[trackers]')") from err

UPLOAD_EVERY_S = 5.0   # a remote run directory's event files: at most this stale


class TensorBoardTracker(Tracker):
    def __init__(self, run_dir: str, writer: BoundedWriter, start_step: int, job: str = "train"):
        self.url = join(run_dir, "tb", *(["eval"] if job == "eval" else []))
        self.writer, self.job = writer, job
        fs, path = filesystem(self.url)
        self._uploads = None
        if is_local(fs):
            self.local_dir = path
        else:
            self.local_dir = tempfile.mkdtemp(prefix="meanflow-tb-")
            self._uploaded_sizes: dict[str, int] = {}
            self._uploads = PeriodicUpload(self._upload_grown_files, UPLOAD_EVERY_S, "tensorboard-upload", self.url,
                                           writer.longest_call_s)
        self._open(start_step)

    def _open(self, start_step: int) -> None:
        # Evaluations of one step may be redone (--force): no purge there, the steps are not "trained again".
        purge = start_step + 1 if self.job == "train" else None
        self.summary = SummaryWriter(self.local_dir, purge_step=purge, flush_secs=2)

    def log_metrics(self, step, values):
        for tag, value in scalars(values, prefix="train/").items():
            self.summary.add_scalar(tag, value, step)
        self._pending()

    def log_event(self, step, event):
        action = event.get("event")
        self.summary.add_text("events", json.dumps(event), step)
        for name, value in guard_counts(event).items():
            self.summary.add_scalar(name, value, step)
        if action == "checkpoint" and "stall_s" in event:
            self.summary.add_scalar("checkpoint/stall_s", event["stall_s"], step)
        self._pending()

    def log_evaluation(self, step, metrics, grid):
        tag = evaluation_tag(metrics)
        for name, value in scalars(metrics, prefix="eval/", suffix=tag).items():
            self.summary.add_scalar(name, value, step)
        if grid is not None:
            self.summary.add_image(f"eval/samples{tag}", image_grid(grid, nrow=8).numpy(), step, dataformats="HWC")
        self._pending()

    def rewind(self, step):
        self.summary.close()
        self._open(step)

    def flush(self):
        self.summary.flush()
        if self._uploads is not None:
            self._uploads.flush()

    def close(self, raise_errors=True):
        self.summary.close()
        if self._uploads is not None:
            self._uploads.mark_pending()
            self._uploads.close(raise_errors)

    def _pending(self) -> None:
        if self._uploads is not None:
            self._uploads.raise_if_failed()
            self._uploads.mark_pending()

    def _upload_grown_files(self) -> None:   # the writer flushes to local disk every 2 s (flush_secs)
        for name in sorted(os.listdir(self.local_dir)):
            path = os.path.join(self.local_dir, name)
            size = os.path.getsize(path)
            if self._uploaded_sizes.get(name) != size:
                with open(path, "rb") as f:
                    self.writer.write(join(self.url, name), f.read())
                self._uploaded_sizes[name] = size

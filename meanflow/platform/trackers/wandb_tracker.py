"""Weights & Biases, offline unless the environment says otherwise.

The mode is ``WANDB_MODE`` (default ``offline``: a run on a cluster node writes ``wandb/offline-run-*`` files, and
``wandb sync`` uploads them later); credentials come only from the environment (``WANDB_API_KEY``), and nothing
of them is written to the run directory. The W&B run id is kept in ``<run_dir>/trackers/wandb.json``, so a
requeued or resumed job continues the same W&B run: it rewinds it to the step it resumed from (``resume_from``,
W&B's run rewind), and the re-trained steps replace the abandoned ones. A guard rollback rewinds the same way.
The config is logged once, when the W&B run is created. An evaluation job logs to a W&B run of its own
(``job_type=eval``) in the training run's group, its x-axis the training step.
"""

from __future__ import annotations

import json
import os

from omegaconf import DictConfig, OmegaConf

from meanflow.evaluation.images import image_grid
from meanflow.platform.checkpoint.upload import BoundedWriter
from meanflow.platform.config import ConfigError
from meanflow.platform.storage import filesystem, is_local, join, read_bytes

from .base import Tracker, evaluation_tag, guard_counts, scalars

try:
    import wandb
except ImportError as err:
    raise ConfigError("run.trackers: 'wandb' needs the wandb package (pip install -e '.[trackers]')") from err


def _stored_id(url: str, writer: BoundedWriter) -> str | None:
    def read():
        try:
            return json.loads(read_bytes(url))["id"]
        except FileNotFoundError:
            return None
    return writer.call(read, url, "read")


class WandbTracker(Tracker):
    def __init__(self, cfg: DictConfig, run_dir: str, writer: BoundedWriter, start_step: int, job: str = "train"):
        fs, path = filesystem(run_dir)
        self.settings = dict(project=cfg.run.wandb_project, group=cfg.run.name, name=cfg.run.name,
                             mode=os.environ.get("WANDB_MODE", "offline"),
                             dir=path if is_local(fs) else None,   # remote run dir: WANDB_DIR or ./wandb
                             # the job's own log is the console record; W&B must not wrap stdout (the bar's TTY)
                             settings=wandb.Settings(console="off"))
        if is_local(fs):
            os.makedirs(path, exist_ok=True)
        id_url = join(run_dir, "trackers", "wandb.json")
        train_id = _stored_id(id_url, writer)
        self.step_key, self._pending = None, {}   # eval runs: their x-axis; train runs: guard counts for the next row
        if job == "eval":   # one W&B run per evaluated step, beside the training run
            self.run = wandb.init(**self.settings, id=f"{train_id or wandb.util.generate_id()}-eval-{start_step}",
                                  job_type="eval", resume="allow", reinit="create_new")
            self.run.define_metric("train_step")
            self.run.define_metric("eval/*", step_metric="train_step")
            self.step_key = "train_step"
            return
        if train_id is None:
            self.run = wandb.init(**self.settings, job_type="train", reinit="create_new",
                                  config=OmegaConf.to_container(cfg, resolve=True))
            writer.write(id_url, json.dumps({"id": self.run.id}).encode())
        else:
            self.run = self._rewound(train_id, start_step)

    def _rewound(self, run_id: str, step: int):
        return wandb.init(**self.settings, job_type="train", reinit="create_new",
                          resume_from=f"{run_id}?_step={step}")

    def _log(self, step: int, values: dict) -> None:
        if self.step_key is None:
            self.run.log(values, step=step)
        else:
            self.run.log({**values, self.step_key: step})

    def log_metrics(self, step, values):
        self._log(step, {**scalars(values, prefix="train/"), **self._pending})
        self._pending = {}

    def log_event(self, step, event):
        # A guard event comes at the step the run went back to, which W&B's rewound run has already passed:
        # its counts go with the next step's row.
        self._pending.update(guard_counts(event))
        if event.get("event") == "checkpoint" and "stall_s" in event:
            self._log(step, {"checkpoint/stall_s": float(event["stall_s"])})

    def log_evaluation(self, step, metrics, grid):
        tag = evaluation_tag(metrics)
        values = scalars(metrics, prefix="eval/", suffix=tag)
        if grid is not None:
            pixels = image_grid(grid, nrow=8).numpy()   # (H, W, C) uint8; W&B wants (H, W) for grey
            values[f"eval/samples{tag}"] = wandb.Image(pixels[..., 0] if pixels.shape[2] == 1 else pixels)
        self._log(step, values)

    def rewind(self, step):
        run_id = self.run.id
        self.run.finish()
        self.run = self._rewound(run_id, step)

    def close(self, raise_errors=True):
        self.run.finish()

"""The training job. Reads top to bottom: build, resume, loop (guarded steps), save, evaluate.

Single process for now; the engine, checkpoint store, data stream and guard are separate parts so the distributed
engines, the WebDataset stream and the rollback guard slot in without changing this loop's shape.
"""

from __future__ import annotations

import math
import sys
import time

import torch
from omegaconf import DictConfig

from meanflow.data_pipeline import build_stream
from meanflow.data_pipeline.shard_reader import ShardUnreadable
from meanflow.evaluation.run_report import evaluate_run
from meanflow.models import build_model, count_parameters
from meanflow.objectives import ObjectiveContext, build_objective
from meanflow.platform.checkpoint import CheckpointStore
from meanflow.platform.config import ConfigError, save_config
from meanflow.platform.engine import SingleProcessEngine
from meanflow.platform.metrics import MetricsSink, ProgressLine
from meanflow.platform.storage import join, write_bytes_atomic


class TrainingFailed(RuntimeError):
    pass


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("engine.device: cuda requested but no GPU is visible")
    return torch.device(name)


class Trainer:
    def __init__(self, cfg: DictConfig, stdout=sys.stdout):
        self.cfg, self.stdout = cfg, stdout
        self.device = resolve_device(cfg.engine.device)
        self.run_dir = cfg.run.run_dir
        try:
            self.stream = build_stream(cfg.data, cfg.run.seed)
        except (ValueError, OSError) as err:   # no manifest, missing shard, too few shards: bad input, exit 2
            raise ConfigError(f"data: {err}") from err
        if cfg.model.num_classes != self.stream.num_classes:
            raise ConfigError(f"model.num_classes: {cfg.model.num_classes}, but the data ({self.stream.name}) has "
                              f"{self.stream.num_classes} classes")
        model_shape = (cfg.model.in_channels, cfg.model.image_size, cfg.model.image_size)
        if cfg.model.family != "mlp" and tuple(self.stream.sample_shape) != model_shape:
            raise ConfigError(f"model.in_channels/image_size: the model takes {model_shape}, but the data "
                              f"({self.stream.name}) holds samples of shape {tuple(self.stream.sample_shape)}")
        torch.manual_seed(cfg.run.seed)                      # model initialisation
        self.engine = SingleProcessEngine(build_model(cfg.model), cfg.optim, self.device)
        self.objective = build_objective(cfg.objective, cfg.model.num_classes)
        self.store = CheckpointStore(join(self.run_dir, "checkpoints"), keep_last=cfg.checkpoint.keep_last)
        self.metrics = MetricsSink(join(self.run_dir, "metrics.jsonl"))
        self.step = 0
        self.consecutive_skips = 0

    # ------------------------------------------------------------------------------------------------ resume
    def resume_or_start(self) -> None:
        latest = self.store.latest()
        if latest is not None and not self.cfg.run.resume:
            raise ConfigError(f"run.run_dir: {self.run_dir} already holds checkpoints (latest step {latest}); "
                              "pass --resume to continue it or choose another --run-dir")
        if latest is not None:
            state, meta = self.store.load(latest)
            self.engine.load_state_dict(state)
            data_resume = self.stream.load_state_dict(meta["data"])   # before the first batch is read
            self.step = meta["step"]
            self.log(f"resumed from {self.store.step_url(latest)} at step {self.step} (data position: "
                     f"{data_resume})")
        write_bytes_atomic(join(self.run_dir, "config.yaml"), save_config(self.cfg).encode())

    def save(self) -> str:
        meta = {"step": self.step, "healthy": self.consecutive_skips == 0, "data": self.stream.state_dict()}
        return self.store.save(self.step, self.engine.state_dict(), metadata=meta)

    # -------------------------------------------------------------------------------------------------- step
    def train_step(self) -> dict:
        """One optimizer step over grad_accum micro-batches; non-finite steps are skipped, not applied."""
        cfg = self.cfg
        batch = self.stream.next_batch()
        micro = cfg.data.global_batch // cfg.optim.grad_accum
        totals: dict[str, torch.Tensor] = {}
        for k in range(cfg.optim.grad_accum):
            rows = torch.arange(k * micro, (k + 1) * micro)
            mb = {key: (v[rows].to(self.device) if isinstance(v, torch.Tensor) else v) for key, v in batch.items()}
            ctx = ObjectiveContext(seed=cfg.run.seed, global_batch=cfg.data.global_batch, rows=rows,
                                   ema_model=self.engine.ema_model)
            loss, stats = self.objective(self.engine.model, mb, self.step, ctx)
            grad_norm = self.engine.backward(loss / cfg.optim.grad_accum)
            for key, value in stats.items():
                totals[key] = totals.get(key, 0) + value.detach().float().cpu() / cfg.optim.grad_accum
        totals["grad_norm"] = grad_norm.cpu()
        finite = math.isfinite(totals["loss"].item()) and math.isfinite(totals["grad_norm"].item())
        if finite or not cfg.guard.skip_nonfinite:
            totals["lr"] = torch.tensor(self.engine.apply(self.step))
            self.consecutive_skips = 0
        else:
            self.engine.skip()
            self.consecutive_skips += 1
            self.metrics.write({"event": "skip", "step": self.step, "detector": "nonfinite",
                                "loss": totals["loss"].item(), "grad_norm": totals["grad_norm"].item()})
            if self.consecutive_skips >= cfg.guard.max_consecutive_skips:
                raise TrainingFailed(f"step {self.step}: {self.consecutive_skips} consecutive non-finite steps "
                                     f"(loss {totals['loss'].item()}, grad_norm {totals['grad_norm'].item()})")
        self.step += 1
        return totals

    # -------------------------------------------------------------------------------------------------- run
    def run(self) -> dict:
        cfg = self.cfg
        self.resume_or_start()
        self.log(f"run {cfg.run.name}: {cfg.objective.name} on {cfg.data.name}, model {cfg.model.family}/"
                 f"{cfg.model.size} ({count_parameters(self.engine.model) / 1e6:.2f}M params), device "
                 f"{self.device}, run_dir {self.run_dir}")
        progress = ProgressLine(cfg.run.steps, self.step, stream=self.stdout)
        started = time.perf_counter()
        try:
            while self.step < cfg.run.steps:
                stats = self.train_step()
                if self.step % cfg.run.log_every == 0 or self.step == cfg.run.steps:
                    rate = progress.update(self.step, stats)
                    self.metrics.write({"step": self.step, "steps_per_s": rate, **stats, **self.stream.metrics()})
                if cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0 and self.step < cfg.run.steps:
                    self.save()
        except ShardUnreadable as err:   # committed checkpoints stay; --resume continues once the store is back
            raise TrainingFailed(f"step {self.step}: {err}") from err
        finally:
            self.stream.close()   # stops DataLoader workers
        self.save()
        self.log(f"trained to step {self.step} in {time.perf_counter() - started:.1f}s; evaluating")
        model = self.engine.ema_model or self.engine.model
        report = evaluate_run(model, self.stream, cfg, self.run_dir, self.device, self.step)
        self.metrics.write({"event": "eval", **report})
        self.log("final eval: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                            for k, v in report.items()))
        return report

    def log(self, message: str) -> None:
        print(message, file=self.stdout, flush=True)

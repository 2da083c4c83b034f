"""The training job. Reads top to bottom: build, resume, loop (guarded steps), save, evaluate.

Every rank runs this same loop. The world comes from the launcher's environment (``platform.distributed``); each
rank reads its own rows of every global batch, the engine synchronises gradients, stats are averaged over ranks
in one collective, and rank 0 alone writes metrics, logs and the checkpoint COMMIT.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from meanflow.data_pipeline import build_stream, merge_stream_states
from meanflow.data_pipeline.shard_reader import ShardUnreadable
from meanflow.data_pipeline.toys2d import TOY_NAMES, marginal_velocity_oracle
from meanflow.evaluation.evaluator import Evaluator, describe_data
from meanflow.evaluation.outputs import write_results
from meanflow.jobs.preemption import Preempted
from meanflow.jobs.rollback import RollbackTargets
from meanflow.models import build_model, count_parameters
from meanflow.models.attention import set_jvp_backend
from meanflow.models.execution import set_block_execution
from meanflow.objectives import ObjectiveContext, build_objective, guidance_conditions
from meanflow.platform.checkpoint import CheckpointStore, StorageOutage
from meanflow.platform.config import Config, ConfigError, save_config
from meanflow.platform.distributed import (all_gather_objects, all_reduce_mean, barrier, init_distributed,
                                           resolve_env, shutdown)
from meanflow.platform.engines import EngineJVPError, build_engine, jvp_smoke_test
from meanflow.platform.guard import Decision, Guard, injected_loss_factor
from meanflow.platform.metrics import MetricsSink, ProgressLine
from meanflow.platform.rng import rng_state, set_rng_state
from meanflow.platform.storage import join, read_bytes, write_bytes_atomic


class TrainingFailed(RuntimeError):
    pass


def git_sha() -> str | None:
    """The code's commit, recorded in every checkpoint (None outside a git checkout)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def describe_metrics(metrics: dict) -> str:
    keys = ("guidance", "fid", "is_mean", "class_accuracy", "sw1", "sw2", "samples_per_s")
    return ", ".join(f"{k} {metrics[k]:.4g}" if isinstance(metrics[k], float) else f"{k} {metrics[k]}"
                     for k in keys if metrics.get(k) is not None)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("engine.device: cuda requested but no GPU is visible")
    return torch.device(name)


class Trainer:
    """``preemption``: a StopFlag (SLURM jobs) checked at every step boundary; when any rank's flag is set, every
    rank saves and ``run`` raises Preempted. ``on_commit(step)``: called on rank 0 once a checkpoint has committed
    (scheduled evaluations)."""

    def __init__(self, cfg: DictConfig, stdout=None, preemption=None, on_commit=None):
        self.cfg, self.stdout = cfg, stdout or sys.stdout
        self.preemption, self.on_commit = preemption, on_commit
        self.pending_commits: list[int] = []
        self.device = resolve_device(cfg.engine.device)
        self.run_dir = cfg.run.run_dir
        self.env = resolve_env()
        init_distributed(self.env, self.device, cfg.engine.process_group_timeout_s,
                         required=cfg.engine.kind in ("fsdp2", "deepspeed"))
        try:
            self.stream = build_stream(cfg.data, cfg.run.seed, self.env.rank, self.env.world_size)
        except (ValueError, OSError) as err:   # no manifest, missing shard, too few shards: bad input, exit 2
            raise ConfigError(f"data: {err}") from err
        if cfg.model.num_classes != self.stream.num_classes:
            raise ConfigError(f"model.num_classes: {cfg.model.num_classes}, but the data ({self.stream.name}) has "
                              f"{self.stream.num_classes} classes")
        model_shape = (cfg.model.in_channels, cfg.model.image_size, cfg.model.image_size)
        if cfg.model.family != "mlp" and tuple(self.stream.sample_shape) != model_shape:
            raise ConfigError(f"model.in_channels/image_size: the model takes {model_shape}, but the data "
                              f"({self.stream.name}) holds samples of shape {tuple(self.stream.sample_shape)}")

        def model_factory():
            torch.manual_seed(cfg.run.seed)                  # the same initial weights on every rank and rebuild
            return build_model(cfg.model)

        try:
            self.engine = build_engine(cfg.engine, cfg.optim, model_factory, self.device, self.env.world_size)
        except ValueError as err:
            raise ConfigError(f"engine: {err}") from err
        self.objective = build_objective(cfg.objective, cfg.model.num_classes)
        try:
            set_jvp_backend(cfg.objective.jvp_attention)
        except ValueError as err:
            raise ConfigError(str(err)) from err
        set_block_execution(cfg.engine.compile, cfg.engine.activation_checkpointing)
        # tangent_beta's exact β* diagnostic needs the marginal velocity, known (by sampling) for the 2-D toys only
        uses_beta = "tangent_beta" in (cfg.objective.name, cfg.objective.stability.base)
        self.marginal_velocity = (marginal_velocity_oracle(cfg.data.name, seed=cfg.run.seed)
                                  if uses_beta and cfg.data.name in TOY_NAMES else None)
        self.evaluator = None
        if cfg.eval.at_end:   # built now: a missing feature extractor or VAE fails before training, not after
            try:
                self.evaluator = Evaluator(cfg, describe_data(cfg.data, cfg.run.seed), self.device, self.env.rank,
                                           self.env.world_size, require_fid=False)
            except (ValueError, OSError) as err:
                raise ConfigError(f"{err} (or eval.at_end=false to train without the end-of-run evaluation)") from err
        ckpt = cfg.checkpoint
        self.store = CheckpointStore(ckpt.url or join(self.run_dir, "checkpoints"), keep_last=ckpt.keep_last,
                                     keep_every=ckpt.keep_every, rank=self.env.rank,
                                     upload_timeout_s=ckpt.upload_timeout_s, max_outage_s=ckpt.max_outage_s,
                                     async_save=ckpt.async_save)
        self.metrics = MetricsSink(join(self.run_dir, "metrics.jsonl")) if self.env.is_main else None
        self.local_batch = cfg.data.global_batch // self.env.world_size
        if self.local_batch % cfg.optim.grad_accum or cfg.data.global_batch % self.env.world_size:
            raise ConfigError(f"data.global_batch: {cfg.data.global_batch} does not split into {self.env.world_size} "
                              f"ranks × optim.grad_accum={cfg.optim.grad_accum} equal micro-batches")
        self.step = 0
        self.saved_step: int | None = None
        self.guard = Guard(cfg.guard) if cfg.guard.enabled else None
        self.targets = RollbackTargets(self.engine, self.stream, self.store)
        self.attempt = 0                     # training steps attempted, repeats after a rollback included
        self.cooldown_until = -1
        self.unhealthy_since_save = False    # a detector fired since the last checkpoint
        self.git_sha = git_sha()

    # ------------------------------------------------------------------------------------------------ resume
    def _check_same_run(self) -> None:
        """Resuming continues the same experiment: the model, objective and data must match the stored config."""
        try:
            stored = OmegaConf.create(read_bytes(join(self.run_dir, "config.yaml")).decode())
        except FileNotFoundError:
            return
        defaults = OmegaConf.structured(Config)   # fields added since the run started take their defaults
        for section in ("model", "objective", "data"):
            if (OmegaConf.to_container(OmegaConf.merge(defaults[section], stored[section]))
                    != OmegaConf.to_container(self.cfg[section])):
                raise ConfigError(f"run.run_dir: {self.run_dir} holds checkpoints of a run with another '{section}' "
                                  "section; choose another --run-dir to start a new run")

    def resume_or_start(self) -> None:
        """Continue from the newest verified checkpoint when the run directory holds one (a requeued job, or
        --resume), else start. The data position is restored before the first batch is read."""
        commits = self.store.commits()
        if self.cfg.run.resume and not commits:
            raise ConfigError(f"run.resume: {self.run_dir} holds no committed checkpoint to resume from")
        if commits:
            self._check_same_run()
            saved_world = commits[max(commits)]["metadata"].get("world_size")
            if self.engine.name == "deepspeed" and saved_world != self.env.world_size:
                raise ConfigError(f"engine.kind: deepspeed cannot resume the {saved_world}-process checkpoints in "
                                  f"{self.store.url} on {self.env.world_size} (ZeRO partitions are per rank)")
            step, train_state, meta = self.store.load_latest(self.engine)
            if step is None:
                raise TrainingFailed(f"every committed checkpoint in {self.store.url} failed verification; "
                                     "refusing to start over on top of them")
            self.stream.load_state_dict(meta["data"])
            self._restore_rng(train_state["rng"])
            self.attempt = train_state.get("attempt", step)
            self.cooldown_until = train_state.get("cooldown_until", -1)
            self.unhealthy_since_save = not commits.get(step, {}).get("healthy", True)
            if self.guard and train_state.get("guard"):
                self.guard.load_state_dict(train_state["guard"])   # its windows: a resumed run decides alike
            self.step = self.saved_step = step
            self.log(f"resumed from {self.store.step_url(step)} at step {step}")
        if self.env.is_main:
            write_bytes_atomic(join(self.run_dir, "config.yaml"), save_config(self.cfg).encode())

    def _restore_rng(self, per_rank: list[dict]) -> None:
        if len(per_rank) == self.env.world_size:
            set_rng_state(per_rank[self.env.rank])

    def save(self) -> str:
        data_state = merge_stream_states(all_gather_objects(self.stream.state_dict()))
        train_state = {"step": self.step, "rng": all_gather_objects(rng_state()), "attempt": self.attempt,
                       "guard": self.guard.state_dict() if self.guard else None,
                       "cooldown_until": self.cooldown_until, "config": save_config(self.cfg),
                       "git_sha": self.git_sha}
        meta = {"step": self.step, "world_size": self.env.world_size, "engine": self.engine.name,
                "data": data_state}
        started = time.perf_counter()
        self.store.wait()                       # the previous (async) upload has committed: announce it
        self._announce_commits()
        url = self.store.save(self.step, self.engine, train_state, meta, healthy=not self.unhealthy_since_save)
        self.pending_commits.append(self.step)
        if not self.store.async_save:
            self._announce_commits()
        self.unhealthy_since_save = False
        # The time training stood still: the whole save when synchronous; staging (+ waiting for the previous
        # upload) when asynchronous.
        self.write_metrics({"event": "checkpoint", "step": self.step, "url": url,
                            "stall_s": round(time.perf_counter() - started, 4)})
        self.saved_step = self.step
        return url

    def _announce_commits(self) -> None:
        if self.on_commit is not None and self.env.is_main:
            for step in self.pending_commits:
                self.on_commit(step)
        self.pending_commits.clear()

    def _stop_requested(self) -> bool:
        """Whether any rank received the stop signal (one scalar all-reduce per step, only in SLURM jobs)."""
        flag = torch.tensor([1.0 if self.preemption.signalled else 0.0], device=self.device)
        return all_reduce_mean(flag).item() > 0

    # -------------------------------------------------------------------------------------------------- step
    def train_step(self) -> dict | None:
        """One optimizer step over grad_accum micro-batches, as the guard decides: applied (returns the step's
        stats), skipped, rolled back or failed (returns None or raises)."""
        cfg = self.cfg
        batch = self.stream.next_batch()                      # this rank's rows of the global batch
        accum = cfg.optim.grad_accum
        micro = self.local_batch // accum
        first_row = self.env.rank * self.local_batch          # where this rank's rows sit in the global batch
        totals: dict[str, torch.Tensor] = {}
        for k in range(accum):
            local = torch.arange(k * micro, (k + 1) * micro)
            mb = {key: (v[local].to(self.device) if isinstance(v, torch.Tensor) else v) for key, v in batch.items()}
            ctx = ObjectiveContext(seed=cfg.run.seed, global_batch=cfg.data.global_batch, rows=first_row + local,
                                   ema_model=self.engine.ema_model, rank=self.env.rank,
                                   world_size=self.env.world_size, marginal_velocity=self.marginal_velocity)
            with self.engine.autocast():
                loss, stats = self.objective(self.engine.model, mb, self.step, ctx)
            fault = injected_loss_factor(cfg.guard.inject, self.attempt)   # 1.0 outside fault-injection tests
            if fault != 1.0:
                loss = loss * fault
                stats = {**stats, "loss": stats["loss"] * fault,
                         **({"jvp_norm": stats["jvp_norm"] * fault} if "jvp_norm" in stats else {})}
            grad_norm = self.engine.backward(loss.float() / accum, sync=k == accum - 1)
            for key, value in stats.items():
                totals[key] = totals.get(key, 0) + value.detach().float() / accum
        totals = self._mean_over_ranks(totals)
        totals["grad_norm"] = grad_norm.float().cpu()
        values = {k: v.item() for k, v in totals.items()}
        decision = self.guard.decide(self.attempt, values) if self.guard else Decision("apply")
        self.attempt += 1
        if decision.action == "apply":
            self.engine.lr_scale = cfg.guard.cooldown_factor if self.attempt <= self.cooldown_until else 1.0
            totals["lr"] = torch.tensor(self.engine.apply(self.step))
            self.step += 1
            if self.guard and cfg.guard.snapshot_every and self.step % cfg.guard.snapshot_every == 0:
                self.targets.take_snapshot(self.step)
            return totals
        self.engine.skip()
        self.unhealthy_since_save = True
        event = {"event": decision.action, "step": self.step, "detector": decision.detector, **decision.values,
                 "data_batches": self.stream.state_dict().get("batches")}
        if decision.action == "skip":
            self.write_metrics(event)
            self.step += 1
        elif decision.action == "rollback":
            self.rollback(event)
        else:
            self.write_metrics(event)
            raise TrainingFailed(f"guard: {decision.describe(self.step)}")
        return None

    def rollback(self, event: dict) -> None:
        """Every rank restores the same healthy state (rank 0 chooses it), then the data stream jumps past the
        offending window: at least ``guard.skip_batches`` batches, and never back onto batches already read."""
        self.store.wait()                                     # no commit lands while the target is chosen
        consumed = self.stream.state_dict()["batches"]
        target, source = self.targets.restore()
        if target < 0:
            self.write_metrics({**event, "event": "fail", "detector": event["detector"] + ", nothing to roll back to"})
            raise TrainingFailed(f"guard: step {self.step}: {event['detector']} and no healthy state to roll back to")
        restored = self.stream.state_dict()["batches"]
        batches = max(self.cfg.guard.skip_batches, consumed - restored)
        self.stream.skip(batches * self.cfg.data.global_batch)
        if self.env.is_main:   # the abandoned trajectory's checkpoints must not be resumed or overwritten in place
            self.store.discard_after(target)
        barrier()
        self.cooldown_until = self.attempt + self.cfg.guard.cooldown_steps
        self.write_metrics({**event, "rollback_to": target, "source": source,
                            "skipped_samples": batches * self.cfg.data.global_batch,
                            "data_batches_after": self.stream.state_dict()["batches"]})
        self.log(f"guard: rollback at step {self.step} ({event['detector']}) to step {target} from {source}; "
                 f"data stream jumped {batches} batches")
        self.step = target
        self.saved_step = target if source.startswith("checkpoint") else None

    def _mean_over_ranks(self, stats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One all-reduce for every stat (same keys on every rank: objectives report a fixed set)."""
        keys = sorted(stats)
        values = all_reduce_mean(torch.stack([stats[k].reshape(()) for k in keys])).cpu()
        return dict(zip(keys, values))

    # -------------------------------------------------------------------------------------------------- run
    def run(self) -> dict:
        try:
            return self._run()
        finally:
            shutdown()

    def _run(self) -> dict:
        cfg = self.cfg
        self.resume_or_start()
        if cfg.engine.jvp_smoke_test and cfg.objective.name != "fm":
            conditions = guidance_conditions(2, 1.0, device=self.device) if cfg.model.family == "imf_dit" else None
            try:
                error, failure = jvp_smoke_test(self.engine, tuple(self.stream.sample_shape), cfg.model.num_classes,
                                                self.device, seed=cfg.run.seed, conditions=conditions), None
            except EngineJVPError as err:
                error, failure = None, str(err)
            failures = [f for f in all_gather_objects(failure) if f]   # every rank stops, or none does
            if failures:
                raise EngineJVPError(failures[0])
            self.log(f"JVP smoke test ({self.engine.name}): relative error vs finite difference {error:.2e}")
        self.log(f"run {cfg.run.name}: {cfg.objective.name} on {cfg.data.name}, model {cfg.model.family}/"
                 f"{cfg.model.size} ({count_parameters(self.engine.model) / 1e6:.2f}M params), device "
                 f"{self.device}, run_dir {self.run_dir}")
        if self.guard:
            self.targets.take_snapshot(self.step)   # a rollback target before the first periodic snapshot
        progress = ProgressLine(cfg.run.steps, self.step, stream=self.stdout if self.env.is_main else None)
        started = time.perf_counter()
        try:
            while self.step < cfg.run.steps:
                stats = self.train_step()   # None: skipped or rolled back (its event record says so)
                if stats is not None and (self.step % cfg.run.log_every == 0 or self.step == cfg.run.steps):
                    counts = self.guard.counts if self.guard else {}
                    rate = progress.update(self.step, stats, extra=", ".join(f"{k}s {v}" for k, v in counts.items()
                                                                             if v))
                    self.write_metrics({"step": self.step, "steps_per_s": rate, **stats, **self.stream.metrics()})
                if (cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0 and self.step < cfg.run.steps
                        and self.step != self.saved_step):
                    self.save()
                if self.preemption is not None and self._stop_requested():
                    if self.saved_step != self.step:
                        self.save()
                    self.store.wait()
                    self._announce_commits()
                    self.log(f"stop signal: checkpoint of step {self.step} committed; leaving for requeue")
                    raise Preempted(self.step)
            if self.saved_step != self.step:
                self.save()
            self.store.wait()   # the last upload commits before evaluation and exit
            self._announce_commits()
        except (ShardUnreadable, StorageOutage) as err:   # committed checkpoints stay; rerun to continue
            raise TrainingFailed(f"step {self.step}: {err}") from err
        finally:
            self.stream.close()   # stops DataLoader workers
        self.log(f"trained to step {self.step} in {time.perf_counter() - started:.1f}s"
                 + ("; evaluating" if self.evaluator else ""))
        if self.evaluator is None:
            return {}
        # Every rank samples its share (a sharded model's forward is collective too); rank 0 writes.
        results = self.evaluator.run(self.engine.ema_model or self.engine.model, self.step,
                                     show_progress=self.env.is_main)
        if self.env.is_main:
            write_results(self.run_dir, self.step, results)
        for result in results:
            self.write_metrics({"event": "eval", **result.metrics})
            self.log("eval: " + describe_metrics(result.metrics))
        return results[0].metrics

    def log(self, message: str) -> None:
        if self.env.is_main:
            print(message, file=self.stdout, flush=True)

    def write_metrics(self, record: dict) -> None:
        if self.metrics is not None:
            self.metrics.write(record)

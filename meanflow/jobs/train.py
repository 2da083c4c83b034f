"""The training job. Reads top to bottom: build, resume, loop (guarded steps), save, evaluate.

Every rank runs this same loop. The world comes from the launcher's environment (``platform.distributed``); each
rank reads its own rows of every global batch, the engine synchronises gradients, stats are averaged over ranks
in one collective, and rank 0 alone writes metrics, logs and the checkpoint COMMIT. The trainer wires; the
components decide: the guard what to do about a step, ``Recovery`` how, the store what to commit and keep.
"""

from __future__ import annotations

import sys
import time

import torch
from omegaconf import DictConfig

from meanflow.data_pipeline import UNUSABLE_DATA, ShardUnreadable, merge_stream_states
from meanflow.evaluation.outputs import describe_metrics, write_results
from meanflow.platform.checkpoint import StorageOutage
from meanflow.platform.config import ConfigError, save_config
from meanflow.platform.distributed import all_gather_objects, all_reduce_mean, resolve_env, shutdown
from meanflow.platform.metrics import MetricsLog
from meanflow.platform.progress import TrainingProgress
from meanflow.platform.rng import rng_state, set_rng_state
from meanflow.platform.storage import join
from meanflow.platform.trackers import Trackers, open_trackers
from meanflow.platform.train_state import TrainState, git_sha

from . import components
from .outcome import TrainingFailed
from .preemption import Preempted
from .preflight import check_engine_jvp, check_resumable, take_run_lease


def check_stats_device(stats: dict[str, torch.Tensor], loss: torch.Tensor) -> None:
    """Every stat must lie on the loss's device: the stats are stacked into one tensor for the all-reduce, which
    refuses to mix devices. A stat made without a device (``torch.tensor(x)``) is on the CPU, a mismatch only a GPU
    run shows: name it."""
    misplaced = {key: str(value.device) for key, value in stats.items() if value.device != loss.device}
    if misplaced:
        raise RuntimeError(f"objective stats {misplaced} are not on the loss's device ({loss.device}): create every "
                           f"stat on it (torch.tensor(value, device=loss.device))")


class Trainer:
    """``preemption``: a StopFlag (SLURM jobs) checked at every step boundary; when any rank's flag is set, every
    rank saves and ``run`` raises Preempted. ``on_commit(step, store)``: called on rank 0 once a checkpoint has
    committed, with the store holding it (a scheduled evaluation pins the step there). ``progress_bar``: a tqdm
    bar (True), log lines (False), or as stdout is a terminal or not (None)."""

    def __init__(self, cfg: DictConfig, stdout=None, preemption=None, on_commit=None,
                 progress_bar: bool | None = None):
        self.cfg, self.stdout, self.progress_bar = cfg, stdout or sys.stdout, progress_bar
        self.preemption, self.on_commit = preemption, on_commit
        self.pending_commits: list[int] = []
        self.run_dir = cfg.run.run_dir
        self.env = resolve_env()
        self.device = components.resolve_device(cfg.engine.device, self.env)
        components.process_group(cfg, self.env, self.device)
        self.stream = components.data_stream(cfg, self.env)
        self.engine = components.training_engine(cfg, self.device, self.env)
        self.objective, self.context = components.objective_with_context(cfg, self.stream, self.env, self.device)
        self.evaluator = components.end_of_run_evaluator(cfg, self.device, self.env)
        self.store = components.checkpoint_store(cfg, self.env.rank)
        self.guard, self.recovery, self.faults = components.guard_parts(cfg, self.engine, self.stream, self.store,
                                                                        self.env)
        self.targets = self.recovery.targets
        self.metrics = MetricsLog(join(self.run_dir, "metrics.jsonl"), self.store.writer) if self.env.is_main \
            else None
        self.trackers = Trackers()           # opened once the start step is known (rank 0)
        self.lease = None                    # taken when the run starts writing
        self.state = TrainState(git_sha=git_sha())

    @property
    def step(self) -> int:
        return self.state.step

    # ------------------------------------------------------------------------------------------------ resume
    def resume_or_start(self) -> None:
        """Continue from the newest verified checkpoint when the run directory holds one (a requeued job, or
        --resume), else start. The data position is restored before the first batch is read."""
        self.lease = take_run_lease(self.run_dir, self.env.is_main)
        commits = self.store.commits()
        check_resumable(self.cfg, self.engine.name, commits[max(commits)] if commits else None,
                        self.env.world_size, self.store.url)
        if commits:
            step, train_state, meta = self.store.load_latest(self.engine)
            self._record_damage()
            if step is None:
                raise TrainingFailed(f"every committed checkpoint in {self.store.url} failed verification; "
                                     "refusing to start over on top of them")
            self.stream.load_state_dict(meta["data"])
            if len(train_state["rng"]) == self.env.world_size:
                set_rng_state(train_state["rng"][self.env.rank])
            self.state.load_state_dict(train_state, healthy=commits.get(step, {}).get("healthy", True))
            if train_state.get("guard"):
                self.guard.load_state_dict(train_state["guard"])   # its windows: a resumed run decides alike
            self.log(f"resumed from {self.store.step_url(step)} at step {step}")
        if self.metrics is not None:   # records of steps after the resumed one: a dead writer's, trained again
            self.metrics.keep_until(self.step)
        if self.env.is_main:
            self.store.writer.write(join(self.run_dir, "config.yaml"), save_config(self.cfg).encode())
            self.trackers = open_trackers(self.cfg, self.run_dir, self.store.writer, self.step)   # their curves go on from here

    def save(self) -> str:
        """Collective: every rank's RNG and data position, the counters, the guard's windows, then the store's
        commit (announced to ``on_commit`` once it has landed)."""
        train_state = {**self.state.state_dict(), "rng": all_gather_objects(rng_state()),
                       "guard": self.guard.state_dict(), "config": save_config(self.cfg)}
        meta = {"step": self.step, "world_size": self.env.world_size, "engine": self.engine.name,
                "data": merge_stream_states(all_gather_objects(self.stream.state_dict()))}
        started = time.perf_counter()
        if self.metrics is not None:            # a committed step is never trained again: its records go first
            self.metrics.flush()
        self.trackers.flush()
        self.store.wait()                       # the previous (async) upload has committed: announce it
        self._announce_commits()
        url = self.store.save(self.step, self.engine, train_state, meta, healthy=not self.state.unhealthy_since_save)
        self._record_damage()
        self.pending_commits.append(self.step)
        if not self.store.async_save:
            self._announce_commits()
        self.state.unhealthy_since_save = False
        self.state.saved_step = self.step
        # The time training stood still: the whole save when synchronous; staging (+ waiting for the previous
        # upload) when asynchronous.
        self.write_metrics({"event": "checkpoint", "step": self.step, "url": url,
                            "stall_s": round(time.perf_counter() - started, 4)})
        return url

    def _record_damage(self) -> None:
        """Each damaged checkpoint the store met (skipped, set aside, saved anew) becomes an event of the run."""
        for step, reason in self.store.take_damage_reports():
            self.write_metrics({"event": "checkpoint_damaged", "step": step, "url": self.store.step_url(step),
                                "reason": reason})

    def _announce_commits(self) -> None:
        if self.on_commit is not None and self.env.is_main:
            for step in self.pending_commits:
                self.on_commit(step, self.store)
        self.pending_commits.clear()

    # -------------------------------------------------------------------------------------------------- step
    def train_step(self, batch: dict) -> dict | None:
        """One optimizer step on this rank's rows of a global batch, as the guard decides: applied (returns the
        step's stats), skipped or rolled back (returns None; the event record says which), or failed (raises)."""
        stats = self._forward_backward(batch)
        decision = self.guard.decide(self.state.attempt, {k: v.item() for k, v in stats.items()})
        if decision.action != "apply":
            self.engine.skip()                                # before a rollback restores the engine's state
        response = self.recovery.respond(decision, self.state)
        if response.action == "apply":
            stats["lr"] = torch.tensor(self.engine.apply(self.step, lr_scale=response.lr_scale))
            self.state.step += 1
            self.recovery.step_applied(self.step)
            return stats
        if response.action == "rollback" and self.metrics is not None:
            self.metrics.keep_until(self.step)   # the abandoned steps are trained again: one record per step
            self.trackers.rewind(self.step)
        self.write_metrics({**response.event, "guard_counts": dict(self.guard.counts)})
        if response.action == "rollback":
            self.log(response.message)
        if response.action == "fail":
            raise TrainingFailed(response.message)
        return None

    def _forward_backward(self, batch: dict) -> dict[str, torch.Tensor]:
        """The objective and backward over optim.grad_accum micro-batches; their stats averaged over micro-batches
        and ranks, with the global grad norm."""
        accum = self.cfg.optim.grad_accum
        local_batch = self.cfg.data.global_batch // self.env.world_size
        micro = local_batch // accum
        totals: dict[str, torch.Tensor] = {}
        for k in range(accum):
            local = torch.arange(k * micro, (k + 1) * micro)
            mb = {key: (v[local].to(self.device) if isinstance(v, torch.Tensor) else v) for key, v in batch.items()}
            ctx = self.context(self.env.rank * local_batch + local, self.engine.ema_model)   # rows in the global batch
            with self.engine.autocast():
                loss, stats = self.objective(self.engine.model, mb, self.step, ctx)
            check_stats_device(stats, loss)
            if self.faults:
                loss, stats = self.faults.apply_fault(loss, stats, self.state.attempt)
            grad_norm = self.engine.backward(loss.float() / accum, sync=k == accum - 1)
            for key, value in stats.items():
                totals[key] = totals.get(key, 0) + value.detach().float() / accum
        keys = sorted(totals)   # one all-reduce for every stat (objectives report a fixed set of keys)
        totals = dict(zip(keys, all_reduce_mean(torch.stack([totals[k].reshape(()) for k in keys])).cpu()))
        return {**totals, "grad_norm": grad_norm.float().cpu()}

    # -------------------------------------------------------------------------------------------------- run
    def run(self) -> dict:
        try:
            results = self._run()
            if self.metrics is not None:
                self.metrics.close()          # every record is up before the run reports success
            self.trackers.close()
            return results
        except StorageOutage as err:
            raise TrainingFailed(f"step {self.step}: {err}") from err
        finally:
            if self.metrics is not None:      # a failed run: what it can still upload (its last event), bounded
                self.metrics.close(raise_errors=False)
            self.trackers.close(raise_errors=False)
            if self.lease:
                self.lease.release()
            shutdown()

    def _run(self) -> dict:
        self.resume_or_start()
        error = check_engine_jvp(self.engine, self.objective, self.stream, self.cfg, self.device)
        if error is not None:
            self.log(f"JVP smoke test ({self.engine.name}): relative error vs finite difference {error:.2e}")
        cfg = self.cfg
        self.log(components.run_summary(cfg, self.engine, self.device))
        self.recovery.start(self.step)
        progress = TrainingProgress(cfg.run.steps, self.step, self.state.attempt, keys=components.progress_keys(cfg),
                                    stream=self.stdout if self.env.is_main else None, interactive=self.progress_bar)
        started = time.perf_counter()
        try:
            while self.step < cfg.run.steps:
                stats = self.train_step(self.stream.next_batch())   # None: skipped or rolled back
                self._after_step(stats, progress)
            if self.state.saved_step != self.step:
                self.save()
            self.store.close()   # the last upload commits (and retention gets its time) before evaluation and exit
            self._record_damage()
            self._announce_commits()
        except (ShardUnreadable, StorageOutage) as err:   # committed checkpoints stay; rerun to continue
            raise TrainingFailed(f"step {self.step}: {err}") from err
        except UNUSABLE_DATA as err:                       # no rerun helps: bad input
            raise ConfigError(f"data: {err}") from err
        finally:
            progress.close()
            self.stream.close()   # stops DataLoader workers
        self.log(f"trained to step {self.step} in {time.perf_counter() - started:.1f}s"
                 + ("; evaluating" if self.evaluator else ""))
        return self._evaluate()

    def _after_step(self, stats: dict | None, progress: TrainingProgress) -> None:
        """Log at log_every, save at checkpoint.every, and leave for requeue when any rank was signalled."""
        cfg, step = self.cfg, self.step
        progress.tick(step, stats, self.guard.counts)
        if stats is not None and (step % cfg.run.log_every == 0 or step == cfg.run.steps):
            rate = progress.update(step, self.state.attempt, stats, self.guard.counts)
            self.write_metrics({"step": step, "steps_per_s": rate, **stats, **self.stream.metrics()})
        if cfg.checkpoint.every and step % cfg.checkpoint.every == 0 and step < cfg.run.steps \
                and step != self.state.saved_step:
            self.save()
        if self.lease and self.lease.lost:
            raise TrainingFailed(f"another job took over {self.run_dir} (its lease); stopping this one")
        if self.preemption is not None and self._stop_requested():
            if self.state.saved_step != step:
                self.save()
            self.store.wait()
            self._announce_commits()
            self.log(f"stop signal: checkpoint of step {step} committed; leaving for requeue")
            if self.lease:   # the requeued job takes it over; a manual resume meanwhile is refused, naming it
                self.lease.keep_for_requeue()
            raise Preempted(step)

    def _stop_requested(self) -> bool:
        """Whether any rank received the stop signal (one scalar all-reduce per step, only in SLURM jobs)."""
        flag = torch.tensor([1.0 if self.preemption.signalled else 0.0], device=self.device)
        return all_reduce_mean(flag).item() > 0

    def _evaluate(self) -> dict:
        """Every rank samples its share (a sharded model's forward is collective too); rank 0 writes."""
        if self.evaluator is None:
            return {}
        results = self.evaluator.run(self.engine.ema_model or self.engine.model, self.step,
                                     show_progress=self.env.is_main)
        if self.env.is_main:
            write_results(self.run_dir, self.step, results, writer=self.store.writer)
        for result in results:
            self.trackers.log_evaluation(self.step, result.metrics, result.grid)
            self.write_metrics({"event": "eval", **result.metrics})
            self.log("eval: " + describe_metrics(result.metrics))
        return results[0].metrics

    def log(self, message: str) -> None:
        if self.env.is_main:
            print(message, file=self.stdout, flush=True)

    def write_metrics(self, record: dict) -> None:
        """A step record or an event, to metrics.jsonl and the trackers (rank 0)."""
        if self.metrics is not None:
            self.metrics.write(record)
            if "event" in record:
                self.trackers.log_event(self.step, record)
            else:
                self.trackers.log_metrics(record["step"], record)

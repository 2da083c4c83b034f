"""What runs inside a job: the training job, the evaluation job, and the evaluation watcher (picklable callables
that submit_training.py hands to submitit), and training rank 0's scheduler of evaluation jobs.

Each task reads its rank, world size and master address from submitit's job environment (exported as the
torchrun variables the platform reads), so the same code runs under ``--cluster slurm|local|debug``. A callable
returns ``{"exit_code", "message"}`` instead of raising for the outcomes a user must read (outcome.py): the
submitting command prints the message and exits with the code. Imports at the top stay light: unpickling a job
imports this module before the USR2 handler is installed, and that must happen before torch loads.
"""

from __future__ import annotations

import os
import sys
import time
import traceback

from meanflow.platform.config import load_config_text

from .outcome import job_result


def restart_count() -> int:
    """How many times SLURM has requeued this job (0 for its first instance, and off SLURM)."""
    return int(os.environ.get("SLURM_RESTART_COUNT", 0))


def export_distributed_env(network_interface: str | None = None) -> None:
    """RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT from submitit's environment (all tasks, any node), and
    the collectives' own variables (distributed.collective_variables). CUDA_VISIBLE_DEVICES is left alone: the
    platform binds rank r to GPU LOCAL_RANK itself. Each task says who it is in its log, first thing."""
    import submitit

    from meanflow.platform.distributed import collective_variables, describe_task, job_master_port

    job = submitit.JobEnvironment()
    if job.num_tasks > 1 or "RANK" not in os.environ:
        # submitit exports a MASTER_PORT it finds set (the user's, else ours)
        os.environ.setdefault("MASTER_PORT", str(job_master_port(job.job_id, restart_count())))
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
    os.environ.update(collective_variables(network_interface, os.environ))
    print(describe_task(os.environ), flush=True)


def submitted_job_id() -> str | None:
    """This job's id (SLURM's, or submitit's local or debug one); None when not run by submitit."""
    import submitit

    try:
        return submitit.JobEnvironment().job_id
    except RuntimeError:
        return None


class JobFailed(RuntimeError):
    """A SLURM task whose run failed: raised so that the task exits non-zero. SLURM then records the job FAILED,
    drops the evaluation that waits on ``afterok``, and srun (``--kill-on-bad-exit``) ends the other ranks; a
    training task also ends its job itself (preemption.end_failed_job), for when srun cannot hear of its exit."""


def finish(result: dict, cluster_kind: str) -> dict:
    """A job callable's result: returned to the submitting command, or on SLURM, where nobody waits for it,
    raised when the run failed."""
    if result["exit_code"] and cluster_kind == "slurm":
        raise JobFailed(result["message"])
    return result


class TrainJob:
    """``progress_bar``: the submitter echoes the job's log to a terminal (--cluster local), so the log gets the
    tqdm bar a terminal shows, though the job's own stdout is a file."""

    def __init__(self, config_yaml: str, cluster_kind: str, progress_bar: bool = False):
        self.config_yaml, self.cluster_kind, self.progress_bar = config_yaml, cluster_kind, progress_bar

    def __call__(self) -> dict:
        from meanflow.jobs.preemption import Preempted, StopFlag, end_failed_job, exit_for_requeue, failure_line, \
            requeue

        # first, before torch is imported: until then a USR2 would reach submitit's handler, which fails the job
        flag = StopFlag().install() if self.cluster_kind == "slurm" else None
        from meanflow.jobs.cluster import minutes, record_job, store_writer
        from meanflow.jobs.train import Trainer   # torch, at last

        cfg = load_config_text(self.config_yaml, "the submitted config")
        export_distributed_env(cfg.cluster.network_interface)
        scheduler = EvalScheduler(cfg, self.cluster_kind) if cfg.eval.every and cfg.eval.mode == "job" else None
        rank = int(os.environ.get("RANK", 0))
        if rank == 0 and "SLURM_JOB_ID" in os.environ:
            record_job(cfg.run.run_dir, {"event": "start", "job_id": os.environ["SLURM_JOB_ID"], "kind": "train",
                                         "restart": restart_count()},
                       store_writer(cfg))

        def train() -> None:
            Trainer(cfg, preemption=flag, on_commit=scheduler, progress_bar=self.progress_bar or None).run()

        def train_or_requeue() -> dict:
            try:
                return finish(job_result(train), self.cluster_kind)
            except Preempted as stop:
                if rank == 0:
                    requeued = requeue(cfg.run.run_dir, flag, minutes(cfg.cluster.time, "cluster.time"),
                                       cfg.cluster.signal_delay_s, cfg.cluster.max_requeues, stop.step)
                    if not requeued:
                        return finish({"exit_code": 1, "message": f"failed: time limit reached "
                                       f"{cfg.cluster.max_requeues} times (cluster.max_requeues); resubmit with "
                                       "--resume"}, self.cluster_kind)
                exit_for_requeue(rank)

        try:
            return train_or_requeue()
        except Exception as err:   # JobFailed, a lost peer, a bug: on SLURM the task ends its job itself
            if self.cluster_kind == "slurm":
                end_failed_job(cfg.run.run_dir, rank, failure_line(err))
            raise

    def checkpoint(self, *args, **kwargs):   # noqa: D401 - submitit's hook, never used: see preemption.py
        return None


class EvalJob:
    """``evaluate_steps`` on this job's tasks. ``watch``: keep polling the store for committed steps that are
    multiples of ``eval.every`` (and the final one) until the final step is evaluated or nothing new commits for
    ``eval.watch_idle_s``. On SLURM a failed evaluation fails its job (``finish``), and why it failed goes to the
    run's ledger (``status`` shows it). ``pinned_in``: the checkpoint store where ``steps`` were pinned for this
    job; it releases them once it has written their metrics or failed (it is never run again)."""

    def __init__(self, run_dir: str, cluster_kind: str, steps: list[int] | None = None, every_step: bool = False,
                 overrides: list[str] | None = None, watch: bool = False, pinned_in: str | None = None):
        self.run_dir, self.cluster_kind, self.steps, self.every_step = run_dir, cluster_kind, steps, every_step
        self.overrides, self.watch, self.pinned_in = list(overrides or []), watch, pinned_in

    def __call__(self) -> dict:
        from meanflow.jobs.evaluate import evaluate_steps
        from meanflow.jobs.run_dir import load_run_config

        def evaluate() -> None:
            cfg = load_run_config(self.run_dir, self.overrides)
            export_distributed_env(cfg.cluster.network_interface)
            if self.watch:
                self._watch(cfg)
            else:
                evaluate_steps(self.run_dir, self.steps, self.every_step, self.overrides)

        try:
            result = job_result(evaluate)
        except Exception as err:   # a bug: its trace goes to the job's log, its one line to the ledger
            self._finished(f"{type(err).__name__}: {err}")
            raise
        self._finished(result["message"] if result["exit_code"] else None)
        return finish(result, self.cluster_kind)

    def _finished(self, failure: str | None) -> None:
        """Rank 0, once the evaluation is over: record why it failed, then release this job's pins."""
        if int(os.environ.get("RANK", 0)) != 0:
            return
        from meanflow.jobs.cluster import record_job
        from meanflow.platform.checkpoint import BoundedWriter, Pins

        if failure:
            record_job(self.run_dir, {"event": "failed", "kind": "eval", "job_id": submitted_job_id(),
                                      "steps": self.steps, "message": failure})
        if self.pinned_in:
            pins = Pins(self.pinned_in, BoundedWriter("checkpoint"))
            for step in self.steps or []:
                pins.unpin(step)

    def _watch(self, cfg, poll_s: float = 30.0) -> None:
        from meanflow.jobs.evaluate import evaluate_steps
        from meanflow.jobs.run_dir import open_store

        store = open_store(cfg, self.run_dir)
        last_new = time.monotonic()
        seen: set[int] = set()
        while time.monotonic() - last_new < cfg.eval.watch_idle_s:
            wanted = [s for s in store.steps() if s % cfg.eval.every == 0 or s == cfg.run.steps]
            new = [s for s in wanted if s not in seen]
            if new:
                evaluate_steps(self.run_dir, new, overrides=self.overrides)
                seen.update(new)
                last_new = time.monotonic()
                if cfg.run.steps in seen:
                    return
            time.sleep(poll_s)


class EvalScheduler:
    """Training rank 0's ``on_commit``: submit an evaluation job for each committed multiple of ``eval.every``
    (the final step has its own job, submitted with the training job). The step is pinned in the store before the
    job exists, so retention keeps it however long the job waits in the queue (the pin is a file in the store: it
    survives requeues of either job), and a job that starts at once finds the pin it releases."""

    def __init__(self, cfg, cluster_kind: str):
        self.cfg, self.cluster_kind = cfg, cluster_kind

    def __call__(self, step: int, store):
        """The submitted job (submitit's handle), or None."""
        if step % self.cfg.eval.every or step >= self.cfg.run.steps:
            return None
        from meanflow.jobs.cluster import submit_eval

        try:
            store.pin(step, f"evaluation scheduled {time.strftime('%Y-%m-%dT%H:%M:%S')}")
            job = EvalJob(self.cfg.run.run_dir, self.cluster_kind, [step], pinned_in=store.url)
            return submit_eval(self.cfg, self.cluster_kind, job, f"step {step}")
        except Exception:   # a failed submission must not kill training; the step can be evaluated by hand
            print(f"could not submit the evaluation of step {step}:\n{traceback.format_exc()}", file=sys.stderr)
            store.unpin(step)   # no job will release it
            return None

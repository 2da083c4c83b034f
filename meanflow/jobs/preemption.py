"""Preemption and time limits on SLURM: checkpoint collectively, requeue, exit.

SLURM sends USR2 (``--signal=USR2@cluster.signal_delay_s``, or ``scancel --signal=USR2`` on preemption) to every
task. USR1 is never used: NCCL catches it. submitit's own handler would call ``checkpoint()`` on rank 0 alone,
which cannot save a sharded model (the save is collective) and would hang; this handler only sets a flag. At the
next step boundary the trainer all-reduces the flag, every rank saves, and then rank 0 requeues the job
(``scontrol requeue``) and every rank exits. The requeued job reruns the same submission, which resumes from the
newest committed checkpoint with its data position: no step is lost and none repeated.

A signal that arrives within ``signal_delay_s`` (+ SLURM's minute of resolution) of the time limit, measured from
the start of this process, counts as a timeout; timeouts
requeue at most ``cluster.max_requeues`` times (counted in the run's jobs.jsonl). Preemptions always requeue.

A task that fails for any other reason ends its job itself (``end_failed_job``): its non-zero exit alone leaves the
job RUNNING, holding every node, when srun cannot hear of it (a network partition between the hosts).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import psutil


class Preempted(Exception):
    """Raised by the trainer after the collective save that a stop request triggered."""

    def __init__(self, step: int):
        super().__init__(f"stopped for requeue at step {step} (checkpoint committed)")
        self.step = step


class StopFlag:
    """Set by USR2 in any task; read (all-reduced) by the trainer at step boundaries."""

    def __init__(self):
        self.signalled = False
        self.started = psutil.Process().create_time()   # wall clock, so the run time includes the imports

    def install(self) -> "StopFlag":
        signal.signal(signal.SIGUSR2, self._handle)
        return self

    def _handle(self, signum, frame) -> None:   # only a flag: no I/O, no collectives in a signal handler
        self.signalled = True


def requeue(run_dir: str, flag: StopFlag, time_limit_min: int, signal_delay_s: int, max_requeues: int,
            step: int) -> bool:
    """Rank 0, after the save: requeue this SLURM job unless it timed out too often. Returns whether it did."""
    # (not at the top: the flag is installed before torch loads)
    from .cluster import SLURM_SIGNAL_RESOLUTION_S, read_ledger, record_job

    job_id = os.environ.get("SLURM_JOB_ID")
    if not job_id:
        return False
    elapsed = time.time() - flag.started
    # srun starts the task a few seconds into the job: allow for that too
    earliest_timeout_signal = time_limit_min * 60 - signal_delay_s - SLURM_SIGNAL_RESOLUTION_S - 10
    reason = "timeout" if elapsed >= earliest_timeout_signal else "preempted"
    timeouts = sum(1 for r in read_ledger(run_dir)
                   if r.get("event") == "requeue" and r.get("job_id") == job_id and r.get("reason") == "timeout")
    if reason == "timeout" and timeouts >= max_requeues:
        record_job(run_dir, {"event": "not_requeued", "job_id": job_id, "reason": reason, "step": step,
                             "detail": f"cluster.max_requeues={max_requeues} timeouts reached"})
        return False
    record_job(run_dir, {"event": "requeue", "job_id": job_id, "reason": reason, "step": step,
                         "elapsed_s": round(elapsed, 1)})
    subprocess.run(["scontrol", "requeue", job_id], check=True, timeout=60)
    return True


def exit_for_requeue(rank: int) -> None:
    """Leave without a result: submitit then writes no result file, and the requeued job produces the real one.
    (SystemExit passes through submitit's job wrapper, which only catches Exception.) Only rank 0, which has
    requeued the job by now, exits non-zero: srun's --kill-on-bad-exit would end rank 0 mid-requeue if another
    rank's exit were a bad one."""
    sys.stdout.flush()
    sys.exit(-1 if rank == 0 else 0)


def end_failed_job(run_dir: str, rank: int, message: str) -> None:
    """A SLURM task whose run failed, before it exits: rank 0 records why in the run's ledger (SLURM's state says
    only FAILED), then the task makes sure its job ends. Its non-zero exit is not enough: srun ends the other tasks
    only once it hears of it, and a task on a host that srun's host cannot reach (a network partition between the
    hosts) never reports its exit. Killing the job's batch script (through slurmctld, which every host reaches)
    ends the job FAILED, every task with it; only while this task's instance of the job runs: a job that SLURM
    has requeued meanwhile (its node failed) resumes by itself."""
    job_id = os.environ.get("SLURM_JOB_ID")
    if not job_id:
        return
    restart = int(os.environ.get("SLURM_RESTART_COUNT", 0))
    if rank == 0:
        _record_failure(run_dir, {"event": "failed", "kind": "train", "job_id": job_id, "restart": restart,
                                  "host": socket.gethostname(), "message": message})
    if _instance_running(job_id, restart):
        print(f"{message}\nending SLURM job {job_id} (scancel --batch --signal=KILL): this task failed",
              file=sys.stderr, flush=True)
        try:
            subprocess.run(["scancel", "--batch", "--signal=KILL", job_id], timeout=30, capture_output=True)
        except (OSError, subprocess.TimeoutExpired) as err:
            print(f"could not end SLURM job {job_id}: {err}", file=sys.stderr, flush=True)


def _record_failure(run_dir: str, record: dict) -> None:
    """Bounded to seconds: the failure may be the store's own outage, and the job holds its nodes meanwhile."""
    from meanflow.platform.checkpoint.upload import BoundedWriter

    from .cluster import record_job

    try:
        record_job(run_dir, record, BoundedWriter("checkpoint", timeout_s=10.0, max_outage_s=20.0))
    except Exception as err:   # the job must end all the same
        print(f"could not record the failure in the run's ledger: {type(err).__name__}: {err}", file=sys.stderr,
              flush=True)


def _instance_running(job_id: str, restart: int) -> bool:
    """Whether SLURM says the job runs as the instance ``restart`` (not requeued since, not ending)."""
    try:
        out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    fields = dict(item.partition("=")[::2] for item in out.stdout.split())
    return fields.get("JobState") == "RUNNING" and fields.get("Restarts") == str(restart)


def failure_line(err: BaseException) -> str:
    """One line of a failure for the ledger (its whole trace is in the task's log)."""
    text = str(err).strip().splitlines()
    line = text[0] if text else ""
    return (line if line.startswith(("failed:", "error:")) else f"{type(err).__name__}: {line}")[:400]

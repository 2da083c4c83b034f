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
"""

from __future__ import annotations

import os
import signal
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

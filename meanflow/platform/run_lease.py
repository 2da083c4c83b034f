"""One live writer per run directory: a lease file, ``<run_dir>/LEASE.json``, that training rank 0 takes before
it writes anything and renews while it trains.

Without it, a run whose submitting process died (``--cluster local``: the job's processes live on) kept training,
and a rerun trained a second copy into the same directory: interleaved metrics, shared step directories. A lease
is free when it is absent, released, not renewed within its ``ttl_s`` (the holder died on another host), held by
a dead process of this host, held by a SLURM job that SLURM says has ended (a job that srun killed, or that its
failing task ended, never released its lease), or held by an earlier instance of the same SLURM job (a requeued
job restarts after its old instance has ended). Otherwise a second writer is refused with the holder's identity;
a job taking the lease first waits (up to ``ttl_s``) while SLURM cannot say whether the holding job has ended (it
is still COMPLETING, or slurmctld does not answer).

A SLURM job that SLURM requeued (its node failed: NODE_FAIL; or it requeued itself to outlive a preemption or its
time limit) keeps its lease while it waits in the queue, however old the lease: it resumes the run by itself when
it starts again. A manual resume meanwhile is refused, naming the job and how to take over (cancel it first).

Object stores have no compare-and-swap: two writers that start within the same second could both write the lease.
The renewal thread reads it back every ``ttl_s / 4``; a writer that finds another holder there stops at its next
step boundary (``lost``).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
import time
import uuid
import warnings

import psutil

from .checkpoint import call_with_timeout
from .config import ConfigError
from .storage import filesystem, join, read_bytes, write_bytes_atomic

LEASE = "LEASE.json"


class RunDirBusy(ConfigError):
    """Another live job writes this run directory (exit code 2: nothing was written)."""


# squeue's states of a job that will not run again, and of one that SLURM requeued and that will run again
SLURM_ENDED = {"BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL", "OUT_OF_MEMORY",
               "PREEMPTED", "TIMEOUT"}
SLURM_REQUEUED = {"PENDING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD"}


def slurm_job_state(job_id: str) -> tuple[str, str] | None:
    """(state, reason) of a job as squeue reports them; ("", "") when SLURM no longer knows the job; None when
    SLURM cannot be asked (a busy or unreachable slurmctld, no squeue)."""
    try:
        out = subprocess.run(["squeue", "-h", "-t", "all", "-j", str(job_id), "-o", "%T|%r"], capture_output=True,
                             text=True, timeout=15)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return ("", "") if "invalid job id" in out.stderr.lower() else None
    state, _, reason = out.stdout.strip().partition("|")
    return state, reason


def _process_alive(pid: int, started: float) -> bool:
    try:
        return abs(psutil.Process(pid).create_time() - started) < 1.0   # the same process, not a reused pid
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


class RunLease:
    def __init__(self, run_dir: str, ttl_s: float = 120.0):
        self.url, self.ttl_s = join(run_dir, LEASE), ttl_s
        me = psutil.Process()
        self.record = {"holder": uuid.uuid4().hex, "host": socket.gethostname(), "pid": me.pid,
                       "started": me.create_time(), "slurm_job_id": os.environ.get("SLURM_JOB_ID")}
        self.lost = False
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def _read(self) -> dict | None:
        try:
            return json.loads(read_bytes(self.url))
        except (FileNotFoundError, ValueError):   # absent, or torn by a writer killed mid-write: free
            return None

    def _free(self, held: dict | None) -> bool | None:
        """True: free; False: a live holder has it; None: a SLURM job holds it that SLURM cannot yet say ended.
        Raises RunDirBusy, saying so, when the holder is a SLURM job that SLURM requeued."""
        if held is None or held.get("holder") == self.record["holder"]:
            return True
        held_job = held.get("slurm_job_id")
        if held_job and held_job == self.record["slurm_job_id"]:
            return True
        unknown = False
        if held_job:   # asked before the expiry: a requeued job's lease stays held, however old
            state = slurm_job_state(held_job)
            if state is not None and (not state[0] or state[0] in SLURM_ENDED):
                return True
            if state is not None and state[0] in SLURM_REQUEUED:
                raise RunDirBusy(self._requeued_message(held_job, *state))
            unknown = state is None or state[0] == "COMPLETING"
        if time.time() - held.get("renewed", 0) > self.ttl_s:
            return True
        if held.get("host") == self.record["host"]:
            return held.get("pid") == self.record["pid"] or not _process_alive(held["pid"], held.get("started", 0))
        return None if unknown else False

    def _requeued_message(self, job: str, state: str, reason: str) -> str:
        return (f"run.run_dir: {self.url.rsplit('/', 1)[0]} belongs to SLURM job {job}, which SLURM requeued "
                f"({state}{', ' + reason if reason and reason != 'None' else ''}): it resumes this run by itself "
                f"when it starts again. To take over instead, cancel it (scancel {job}), then resubmit with --resume")

    def _write(self) -> None:
        write_bytes_atomic(self.url, json.dumps({**self.record, "renewed": time.time()}).encode())

    def check_free(self, wait_s: float = 0.0) -> None:
        """Raise RunDirBusy naming the holder unless the lease is free (also asked before a job is submitted).
        While SLURM cannot say whether the holding job has ended, ask again for up to ``wait_s``: a slurmctld
        hiccup at a job's start must not fail the job, and the lease expires ``ttl_s`` after its last renewal."""
        deadline = time.monotonic() + wait_s
        while True:
            held = self._read()
            free = self._free(held)
            if free or free is False or time.monotonic() >= deadline:
                break
            time.sleep(min(5.0, self.ttl_s / 10))
        if not free:
            age = time.time() - held.get("renewed", 0)
            unknown = " (SLURM could not say whether that job has ended)" if free is None else ""
            raise RunDirBusy(f"run.run_dir: {self.url.rsplit('/', 1)[0]} is being written by another live job "
                             f"(host {held.get('host')}, pid {held.get('pid')}, SLURM job "
                             f"{held.get('slurm_job_id') or '-'}{unknown}, lease renewed {age:.0f}s ago); stop it, "
                             f"or choose another --run-dir (a dead holder's lease expires {self.ttl_s:g}s after its "
                             "last renewal)")

    def acquire(self) -> None:
        """Take the lease or raise RunDirBusy; then keep renewing it in a daemon thread."""
        self.check_free(wait_s=self.ttl_s)
        self._write()
        self._renewer = threading.Thread(target=self._renew, daemon=True, name="run-lease")
        self._renewer.start()

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl_s / 4):
            try:
                held = self._read()
                if held is not None and held.get("holder") != self.record["holder"]:
                    self.lost = True
                    return
                self._write()
            except Exception as err:   # a store outage: the checkpoint path decides when the run must stop
                warnings.warn(f"could not renew the run lease {self.url}: {type(err).__name__}: {err}", stacklevel=1)

    def _stop_renewing(self) -> bool:
        """Whether it was renewing (held)."""
        self._stop.set()
        if self._renewer is None:
            return False
        self._renewer.join(timeout=5)
        self._renewer = None
        return True

    def keep_for_requeue(self) -> None:
        """Stop renewing but leave the lease: this SLURM job leaves to be requeued, its next instance takes the
        lease over, and until then a manual resume is refused, naming the job (``release`` then does nothing)."""
        self._stop_renewing()

    def release(self) -> None:
        """Stop renewing and delete the lease if it is still ours."""
        if not self._stop_renewing():
            return

        def remove_if_ours():
            held = self._read()
            if held is not None and held.get("holder") == self.record["holder"]:
                fs, path = filesystem(self.url)
                fs.rm(path)

        try:   # bounded and short: a frozen store must not hold the exit (the lease then expires by itself, or
            call_with_timeout(remove_if_ours, 5.0)   # is free once SLURM reports the job ended)
        except Exception as err:
            warnings.warn(f"could not release the run lease {self.url}: {type(err).__name__}: {err}", stacklevel=1)

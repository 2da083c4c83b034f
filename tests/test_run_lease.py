"""One live writer per run directory: the lease that training rank 0 takes before writing."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import psutil
import pytest

from meanflow.jobs.train import Trainer
from meanflow.platform.config import ConfigError, load_config
from meanflow.platform.run_lease import LEASE, RunDirBusy, RunLease

pytestmark = pytest.mark.timeout(120)


def write_lease(run_dir, *, host: str, pid: int, started: float, renewed: float, job: str | None = None) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / LEASE).write_text(json.dumps({"holder": "someone-else", "host": host, "pid": pid, "started": started,
                                             "slurm_job_id": job, "renewed": renewed}))


@pytest.fixture
def live_process():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc.pid, psutil.Process(proc.pid).create_time()
    proc.kill()
    proc.wait(timeout=10)


def toy(run_dir) -> list[str]:
    return [f"run.run_dir={run_dir}", "run.steps=4", "eval.at_end=false"]


def test_a_second_live_writer_is_refused_and_nothing_is_written(tmp_path, live_process):
    pid, started = live_process
    write_lease(tmp_path, host=socket.gethostname(), pid=pid, started=started, renewed=time.time())
    with pytest.raises(ConfigError, match=rf"being written by another live job \(host .*, pid {pid}"):
        Trainer(load_config("toy2d_mf", toy(tmp_path))).run()
    assert sorted(p.name for p in tmp_path.iterdir()) == [LEASE]            # no config, metrics or checkpoint


def test_a_second_live_writer_is_refused_before_a_job_is_submitted(tmp_path, live_process, capsys):
    from meanflow.jobs.submit import main as submit

    pid, started = live_process
    write_lease(tmp_path, host=socket.gethostname(), pid=pid, started=started, renewed=time.time())
    assert submit(["--cluster", "local", "--config", "toy2d_mf", "--run-dir", str(tmp_path), "run.steps=4"]) == 2
    assert f"pid {pid}" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == [LEASE]            # no jobs.jsonl record either


def test_the_lease_of_a_dead_process_on_this_host_is_taken_over(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    started = psutil.Process(proc.pid).create_time()
    proc.wait(timeout=30)
    write_lease(tmp_path, host=socket.gethostname(), pid=proc.pid, started=started, renewed=time.time())
    Trainer(load_config("toy2d_mf", toy(tmp_path))).run()
    assert (tmp_path / "checkpoints" / "step-00000004" / "COMMIT.json").exists()
    assert not (tmp_path / LEASE).exists()                                 # released at the end


@pytest.mark.parametrize("age_s, job, free", [(5, None, False), (500, None, True), (5, "77", True)])
def test_another_hosts_lease_is_free_when_expired_or_held_by_the_same_slurm_job(tmp_path, monkeypatch, age_s, job,
                                                                               free):
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    write_lease(tmp_path, host="node-that-is-not-this-one", pid=1, started=0.0, renewed=time.time() - age_s, job=job)
    lease = RunLease(str(tmp_path), ttl_s=120)
    if free:
        lease.acquire()
        assert json.loads((tmp_path / LEASE).read_text())["holder"] == lease.record["holder"]
        lease.release()
    else:
        with pytest.raises(RunDirBusy, match="node-that-is-not-this-one"):
            lease.acquire()


def test_a_holder_that_finds_another_writer_in_its_lease_marks_it_lost(tmp_path):
    lease = RunLease(str(tmp_path), ttl_s=0.4)
    lease.acquire()
    write_lease(tmp_path, host="elsewhere", pid=1, started=0.0, renewed=time.time())
    deadline = time.monotonic() + 10
    while not lease.lost and time.monotonic() < deadline:
        time.sleep(0.05)
    assert lease.lost
    lease.release()
    assert json.loads((tmp_path / LEASE).read_text())["host"] == "elsewhere"   # not ours: left alone


def test_a_lease_held_by_a_slurm_job_on_another_host_is_free_once_slurm_says_the_job_ended(tmp_path):
    """A job whose node died (or that srun killed) never released its lease; a resubmission need not wait out the
    time-to-live once SLURM reports the job ended. A running job's lease still refuses."""
    from test_slurm import needs_slurm_reason

    if needs_slurm_reason:
        pytest.skip(needs_slurm_reason)

    def sbatch(command: str) -> str:
        return subprocess.run(["sbatch", "--parsable", "-o", "/dev/null", "--wrap", command], check=True,
                              capture_output=True, text=True, timeout=30).stdout.strip()

    def lease_from(job: str) -> None:
        write_lease(tmp_path, host="another-host", pid=1, started=0.0, renewed=time.time(), job=job)

    running, ended = sbatch("sleep 120"), sbatch("true")
    try:
        deadline = time.monotonic() + 60
        while subprocess.run(["squeue", "-h", "-j", ended, "-o", "%T"], capture_output=True, text=True,
                             timeout=30).stdout.strip() not in ("COMPLETED", ""):
            assert time.monotonic() < deadline
            time.sleep(0.5)
        lease_from(ended)
        RunLease(str(tmp_path)).check_free()
        lease_from(running)
        with pytest.raises(RunDirBusy, match=f"SLURM job {running}"):
            RunLease(str(tmp_path)).check_free()
    finally:
        subprocess.run(["scancel", running], timeout=30)


def test_a_job_waits_while_slurm_cannot_say_whether_the_holding_job_ended(tmp_path, monkeypatch):
    """squeue with an empty slurm.conf (or no squeue at all) cannot answer: a submission is refused at once, saying
    why; a starting job asks again until the holder's lease expires, then takes it."""
    (tmp_path / "empty-slurm.conf").touch()
    monkeypatch.setenv("SLURM_CONF", str(tmp_path / "empty-slurm.conf"))   # squeue: "Unable to process", exit 1
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    run_dir = tmp_path / "run"
    write_lease(run_dir, host="another-host", pid=1, started=0.0, renewed=time.time(), job="4242")
    with pytest.raises(RunDirBusy, match="SLURM job 4242 \\(SLURM could not say whether that job has ended\\)"):
        RunLease(str(run_dir), ttl_s=3).check_free()
    lease = RunLease(str(run_dir), ttl_s=3)
    write_lease(run_dir, host="another-host", pid=1, started=0.0, renewed=time.time(), job="4242")
    started = time.monotonic()
    lease.acquire()
    assert json.loads((run_dir / LEASE).read_text())["holder"] == lease.record["holder"]
    assert time.monotonic() - started > 2.0            # it waited for the expiry rather than taking it at once
    lease.release()



def test_a_lease_kept_for_requeue_stays_after_release(tmp_path):
    lease = RunLease(str(tmp_path), ttl_s=120)
    lease.acquire()
    lease.keep_for_requeue()
    lease.release()
    assert json.loads((tmp_path / LEASE).read_text())["holder"] == lease.record["holder"]


def test_a_requeued_slurm_job_keeps_its_lease_however_old_and_a_resume_is_told_how_to_take_over(tmp_path):
    """A job that SLURM requeued (here `scontrol requeuehold`: it waits in the queue) resumes the run by itself: a
    manual resume is refused, naming the job, even after the lease's time-to-live; cancelled, the lease is free."""
    from test_slurm import needs_slurm_reason, squeue_state

    if needs_slurm_reason:
        pytest.skip(needs_slurm_reason)
    job = subprocess.run(["sbatch", "--parsable", "--requeue", "-o", "/dev/null", "--wrap", "sleep 120"], check=True,
                         capture_output=True, text=True, timeout=30).stdout.strip()
    try:
        deadline = time.monotonic() + 60
        while squeue_state(job) != "RUNNING":
            assert time.monotonic() < deadline
            time.sleep(0.2)
        subprocess.run(["scontrol", "requeuehold", job], check=True, timeout=30)
        while squeue_state(job) != "PENDING":
            assert time.monotonic() < deadline
            time.sleep(0.2)
        write_lease(tmp_path, host="a-lost-host", pid=1, started=0.0, renewed=time.time() - 500, job=job)
        with pytest.raises(RunDirBusy) as refused:
            RunLease(str(tmp_path), ttl_s=120).check_free()
        message = str(refused.value)
        assert f"SLURM job {job}, which SLURM requeued (PENDING, job requeued in held state)" in message
        assert "resumes this run by itself" in message and f"scancel {job}" in message and "--resume" in message
    finally:
        subprocess.run(["scancel", job], timeout=30)
    deadline = time.monotonic() + 60
    while squeue_state(job) not in ("CANCELLED", ""):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    RunLease(str(tmp_path), ttl_s=120).check_free()

"""Jobs on a real single-node SLURM cluster (tests/services/slurm.sh, started by .ci/run): submission through
jobs/submit.py, preemption and time-limit requeues with exact resume, evaluation jobs. Skipped, with the reason,
when no slurmctld answers (a laptop). The multi-node dry run needs no cluster."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import fsspec
import pytest

from meanflow.jobs.submit import main as submit

pytestmark = pytest.mark.timeout(420)


def slurm_up() -> bool:
    if shutil.which("scontrol") is None:
        return False
    out = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=20)
    return "is UP" in out.stdout


needs_slurm_reason = "" if slurm_up() else ("no slurmctld answers `scontrol ping` (start one with sudo bash "
                                            "tests/services/slurm.sh up)")
needs_slurm = pytest.mark.skipif(bool(needs_slurm_reason), reason=needs_slurm_reason)


# ------------------------------------------------------------------------------------------------ dry run
def test_dry_run_of_the_multi_node_example_prints_the_sbatch_script_and_config(tmp_path, capsys):
    code = submit(["--cluster", "slurm", "--config", "xl_imf", "--dry-run", "--partition", "gpu", "--account", "ml",
                   "--time", "12:00:00", f"cluster.log_dir={tmp_path}/logs", f"run.run_dir={tmp_path}/run"])
    out = capsys.readouterr().out
    assert code == 0
    script, _, config = out.partition("# ---- resolved config ----")
    for line in ("#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --partition=gpu", "#SBATCH --account=ml", "#SBATCH --time=720",
                 "#SBATCH --signal=USR2@300", "#SBATCH --cpus-per-task=12", "source .venv/bin/activate",
                 "#SBATCH --requeue", "srun --unbuffered", "--kill-on-bad-exit=1"):
        assert line in script, line
    assert "USR1" not in script
    assert "size: XL" in config and "gpus_per_node: 8" in config and "time: '12:00:00'" in config
    assert not (tmp_path / "run").exists() and not (tmp_path / "logs").exists()   # nothing submitted


def test_a_bad_time_is_named(tmp_path, capsys):
    assert submit(["--cluster", "slurm", "--config", "tiny_mf", "--dry-run", "--time", "soon"]) == 2
    assert "cluster.time" in capsys.readouterr().err


def test_a_time_limit_too_short_for_the_signal_is_refused(tmp_path, capsys):
    """SLURM may send USR2 up to 60 s before signal_delay_s: with 1 minute and 30 s it could kill the job at start."""
    assert submit(["--cluster", "slurm", "--config", "tiny_mf", "--dry-run", "--time", "1",
                   "cluster.signal_delay_s=30"]) == 2
    err = capsys.readouterr().err
    assert "cluster.time='1'" in err and "cluster.signal_delay_s=30" in err


def test_a_running_job_whose_metrics_stopped_moving_is_flagged_stalled(tmp_path):
    """20 record intervals (log_every steps at the last speed), at least MIN_STALL_S, without a new record."""
    from meanflow.jobs.status import MIN_STALL_S, stalled

    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text(json.dumps({"step": 10, "loss": 1.0, "steps_per_s": 20.0}) + "\n"
                       + json.dumps({"event": "checkpoint", "step": 10, "stall_s": 0.5}) + "\n")
    now = time.time()
    os.utime(metrics, (now - MIN_STALL_S / 2, now - MIN_STALL_S / 2))
    assert stalled(str(tmp_path), log_every=1, started=None) is None
    os.utime(metrics, (now - 60, now - 60))
    assert stalled(str(tmp_path), log_every=1, started=None).startswith(
        "STALLED: no metrics for 60 s (≈ 1200 step times; last step 10)")
    assert stalled(str(tmp_path), log_every=100, started=None) is None   # 20 records of 100 steps: 100 s
    assert stalled(str(tmp_path), log_every=1, started=now - 30) is None   # this instance is still starting


# ------------------------------------------------------------------------------------------------ real SLURM
def squeue_state(job_id: str) -> str:
    out = subprocess.run(["squeue", "-h", "-t", "all", "-j", job_id, "-o", "%T"], capture_output=True, text=True,
                         timeout=30)
    return out.stdout.strip()


def wait_done(job_id: str, log_dir, *expected: str, timeout_s: float = 300) -> str:
    """The job's final state, asserted to be one of ``expected`` (default COMPLETED). Otherwise the assertion names
    the state and quotes the tails of the job's logs: CI reports show the message, not the captured output."""
    expected = expected or ("COMPLETED",)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        state = squeue_state(job_id)
        if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            break
        time.sleep(1)
    else:
        subprocess.run(["scancel", job_id], timeout=30)
        state = f"still {squeue_state(job_id)!r} after {timeout_s}s"
    tails = [f"---- {log.name}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-15:])
             for log in sorted(Path(log_dir).rglob(f"{job_id}_*_log.*"))]
    assert state in expected, f"job {job_id} ended {state}, expected {' or '.join(expected)}\n" + "\n".join(tails)
    return state


def read_lines(url: str) -> list[dict]:
    """One GET of the whole object: the job appends by rewriting it, so an open-then-read can lose the race
    (s3fs FileExpired: the ETag changed between the two)."""
    fs = fsspec.filesystem("s3")
    fs.invalidate_cache()
    try:
        text = fs.cat(url).decode()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def train_losses(run_dir: str) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_lines(f"{run_dir}/metrics.jsonl") if "event" not in r]


def submit_tiny(run_dir: str, log_dir, *extra) -> dict[str, str]:
    """2-task CPU training of tiny_mf on the cluster; returns the ledger's job ids by kind/what."""
    code = submit(["--cluster", "slurm", "--config", "tiny_mf", "--run-dir", run_dir, "run.steps=40",
                   "run.log_every=1", "data.global_batch=16", "engine.kind=ddp", "engine.process_group_timeout_s=60",
                   "cluster.tasks_per_node=2", "checkpoint.every=20", "eval.num_samples=64", f"cluster.log_dir={log_dir}",
                   *extra])
    assert code == 0
    return {r.get("what") or r["kind"]: r["job_id"] for r in read_lines(f"{run_dir}/jobs.jsonl")
            if r["event"] == "submitted"}


@pytest.fixture(scope="module")
def straight_run(s3_server, tmp_path_factory):
    """The uninterrupted reference, with a scheduled evaluation at step 20 and the final one after training."""
    fsspec.filesystem("s3").mkdir("slurm-runs")
    run_dir = "s3://slurm-runs/straight"
    logs = tmp_path_factory.mktemp("logs")
    jobs = submit_tiny(run_dir, logs, "eval.every=20")
    wait_done(jobs["train"], logs)
    wait_done(jobs["final"], logs)
    return run_dir, jobs, logs


@needs_slurm
def test_a_two_task_job_trains_commits_and_is_evaluated(straight_run):
    run_dir, jobs, logs = straight_run
    fs = fsspec.filesystem("s3")
    fs.invalidate_cache()
    assert [s for s, _ in train_losses(run_dir)] == list(range(1, 41))
    assert fs.exists(f"{run_dir}/checkpoints/step-00000040/COMMIT.json")
    final = json.loads(fs.cat(f"{run_dir}/eval/step-00000040/metrics.json"))["results"][0]
    assert final["world_size"] == 1 and final["num_samples"] == 64 and final["fid"] > 0
    scheduled = [r for r in read_lines(f"{run_dir}/jobs.jsonl") if r.get("what") == "step 20"]
    assert scheduled, "training rank 0 submits an evaluation job for the committed step 20"
    wait_done(scheduled[0]["job_id"], logs)
    fs.invalidate_cache()
    assert fs.exists(f"{run_dir}/eval/step-00000020/metrics.json")


@needs_slurm
def test_a_preempted_job_requeues_and_resumes_exactly(straight_run, tmp_path):
    run_dir = "s3://slurm-runs/preempted"
    jobs = submit_tiny(run_dir, tmp_path, "eval.at_end=false")
    deadline = time.monotonic() + 180
    while len(train_losses(run_dir)) < 5:          # mid-run: past the start, before the end
        assert time.monotonic() < deadline and squeue_state(jobs["train"]) in ("PENDING", "RUNNING", "CONFIGURING")
        time.sleep(0.5)
    subprocess.run(["scancel", "--signal=USR2", jobs["train"]], check=True, timeout=30)
    wait_done(jobs["train"], tmp_path)
    ledger = read_lines(f"{run_dir}/jobs.jsonl")
    requeues = [r for r in ledger if r["event"] == "requeue"]
    assert len(requeues) == 1 and requeues[0]["reason"] == "preempted" and 5 <= requeues[0]["step"] < 40
    assert [r["restart"] for r in ledger if r["event"] == "start"] == [0, 1]
    assert train_losses(run_dir) == train_losses(straight_run[0])   # no step lost, none repeated, same numbers


@needs_slurm
@pytest.mark.timeout(600)
def test_a_time_limit_requeues_resumes_exactly_and_stops_at_max_requeues(s3_server, tmp_path):
    """A 2-minute limit with USR2 30 s before it: the instance saves at the signal and requeues itself, the next
    resumes where it stopped; with cluster.max_requeues=1 the second time limit is not requeued, and the job fails
    saying so. SLURM sends the signal up to 60 s early, so 30–90 s into an instance: two instances, whatever the
    machine's speed (the run is sized never to finish)."""
    fsspec.filesystem("s3").mkdir("slurm-timeout")
    run_dir = "s3://slurm-timeout/run"
    jobs = submit_tiny(run_dir, tmp_path, "--time", "2", "cluster.signal_delay_s=30", "cluster.max_requeues=1",
                       "run.steps=100000", "checkpoint.every=0", "run.log_every=10", "eval.at_end=false")
    wait_done(jobs["train"], tmp_path, "FAILED", timeout_s=480)
    ledger = read_lines(f"{run_dir}/jobs.jsonl")
    requeues = [r for r in ledger if r["event"] == "requeue"]
    stops = [r for r in ledger if r["event"] == "not_requeued"]
    assert [r["reason"] for r in requeues] == ["timeout"] and [r["reason"] for r in stops] == ["timeout"]
    assert [r["restart"] for r in ledger if r["event"] == "start"] == [0, 1]
    steps = [s for s, _ in train_losses(run_dir)]
    assert steps == list(range(10, steps[-1] + 1, 10)) and requeues[0]["step"] < steps[-1] <= stops[0]["step"]
    err = next(Path(tmp_path).rglob(f"{jobs['train']}_0_log.err")).read_text()
    assert "time limit reached 1 times (cluster.max_requeues)" in err


@needs_slurm
def test_an_evaluation_held_in_the_queue_until_training_ended_scores_its_pinned_step(s3_server, tmp_path):
    """checkpoint.every 20, keep_last 2, eval.every 100: the job that evaluates step 100 waits in the queue (the
    training fills the node; `scontrol hold` keeps it there) until training has committed 120 and 140, after which
    retention alone would have deleted step 100 (the job then failed: `--step 100: not a committed step`). The
    pin the training took keeps it; released, the job scores step 100 and unpins it."""
    from meanflow.platform.checkpoint import CheckpointStore

    fsspec.filesystem("s3").mkdir("slurm-held-eval")
    run_dir = "s3://slurm-held-eval/run"
    cpus = subprocess.run(["sinfo", "-h", "-p", "debug", "-o", "%c"], capture_output=True, text=True,
                          timeout=30).stdout.split()[0]   # the training job takes a whole node
    assert submit(["--cluster", "slurm", "--config", "toy2d_mf", "--run-dir", run_dir, "run.steps=140",
                   "run.log_every=20", "data.global_batch=16", f"cluster.cpus_per_task={cpus}", "checkpoint.every=20",
                   "checkpoint.keep_last=2", "eval.every=100", "eval.num_samples=512", "eval.at_end=false",
                   f"cluster.log_dir={tmp_path}"]) == 0
    train = [r["job_id"] for r in read_lines(f"{run_dir}/jobs.jsonl") if r["event"] == "submitted"][0]
    held = []
    try:
        deadline = time.monotonic() + 240
        while not (held := [r["job_id"] for r in read_lines(f"{run_dir}/jobs.jsonl") if r.get("what") == "step 100"]):
            assert time.monotonic() < deadline and squeue_state(train) in ("PENDING", "RUNNING", "CONFIGURING")
            time.sleep(0.2)
        subprocess.run(["scontrol", "hold", held[0]], check=True, timeout=30)
        wait_done(train, tmp_path)
        store = CheckpointStore(f"{run_dir}/checkpoints")
        assert store.steps() == [100, 120, 140] and 100 in store.scan().pinned
        subprocess.run(["scontrol", "release", held[0]], check=True, timeout=30)
        wait_done(held[0], tmp_path)
    finally:
        subprocess.run(["scancel", train, *held], timeout=30)
    fs = fsspec.filesystem("s3")
    fs.invalidate_cache()
    assert fs.exists(f"{run_dir}/eval/step-00000100/metrics.json")
    assert 100 not in CheckpointStore(f"{run_dir}/checkpoints").scan().pinned

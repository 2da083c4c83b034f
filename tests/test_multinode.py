"""Jobs across the hosts of the local multi-host SLURM cluster (tests/services/slurm.sh, started by .ci/run):
partition ``multi``, hosts mf-n1 and mf-n2, each a network namespace with its own address, host name and slurmd.
MASTER_ADDR names the other host, gloo talks over each host's eth0, and the object store (moto) listens on the
bridge's gateway address. Skipped, with the reason, where the cluster has no such hosts.

Every training test compares with one reference: the same config in one process (``--cluster local``).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import fsspec
import pytest
import s3fs
from s3_server import MotoServer
from test_slurm import read_lines, squeue_state, wait_done

from meanflow.jobs.evaluate import evaluate_steps
from meanflow.jobs.submit import main as submit
from meanflow.platform.run_lease import RunLease

SLURM_SH = Path(__file__).parent / "services" / "slurm.sh"

BRIDGE = "mf-br0"


def multi_hosts() -> list[str]:
    try:
        out = subprocess.run(["sinfo", "-h", "-N", "-p", "multi", "-o", "%N"], capture_output=True, text=True,
                             timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return sorted(set(out.stdout.split())) if out.returncode == 0 else []


def gateway_address() -> str | None:
    out = subprocess.run(["ip", "-4", "-o", "addr", "show", BRIDGE], capture_output=True, text=True, timeout=10)
    match = re.search(r"inet ([\d.]+)/", out.stdout)
    return match.group(1) if match else None


HOSTS = multi_hosts()
pytestmark = [pytest.mark.timeout(600), pytest.mark.skipif(
    len(HOSTS) < 2 or gateway_address() is None,
    reason="no multi-host SLURM partition `multi` with 2 hosts (start one with sudo bash tests/services/slurm.sh up)")]


def use_endpoint(env: dict[str, str]) -> None:
    os.environ.update(env)
    s3fs.S3FileSystem.clear_instance_cache()   # cached clients keep the endpoint they were made with


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A moto server on the gateway address, reachable from every host; this module's jobs inherit its endpoint."""
    server = MotoServer(tmp_path_factory.mktemp("moto-gw"), host=gateway_address())
    saved = {k: os.environ.get(k) for k in server.env}
    use_endpoint(server.env)
    fsspec.filesystem("s3").mkdir("multi")
    yield server
    use_endpoint({k: v for k, v in saved.items() if v is not None})
    server.stop()


TOY = ["--config", "toy2d_mf", "run.steps=30", "run.log_every=1", "checkpoint.every=10", "data.global_batch=16",
       "eval.at_end=false", "engine.process_group_timeout_s=30"]
ON_HOSTS = ["--partition", "multi", "cluster.network_interface=eth0"]   # gloo over each host's own interface


def run_toy(run_dir: str, log_dir, *extra, cluster: str = "slurm") -> dict[str, str]:
    code = submit(["--cluster", cluster, "--run-dir", run_dir, *TOY, f"cluster.log_dir={log_dir}",
                   *(ON_HOSTS if cluster == "slurm" else []), *extra])
    assert code == 0
    return {r.get("what") or r["kind"]: r["job_id"] for r in read_lines(f"{run_dir}/jobs.jsonl")
            if r["event"] == "submitted"}


def losses(run_dir: str) -> dict[int, float]:
    """Step -> loss; a step trained twice (before a crash and after the resume) counts with its last record."""
    return {r["step"]: r["loss"] for r in read_lines(f"{run_dir}/metrics.jsonl") if "event" not in r}


def step_dirs(run_dir: str) -> dict[int, set[str]]:
    """Step -> the files in its directory (COMMIT.json included when committed)."""
    fs = fsspec.filesystem("s3")
    fs.invalidate_cache()
    out: dict[int, set[str]] = {}
    for path in fs.find(f"{run_dir}/checkpoints"):
        match = re.search(r"/step-(\d+)/(.+)$", path)
        if match:
            out.setdefault(int(match.group(1)), set()).add(match.group(2))
    return out


def committed(run_dir: str) -> list[int]:
    return sorted(s for s, files in step_dirs(run_dir).items() if "COMMIT.json" in files)


def assert_same_losses(run_dir: str, reference: dict[int, float]) -> None:
    got = losses(run_dir)
    assert sorted(got) == sorted(reference)
    for step, loss in reference.items():
        assert got[step] == pytest.approx(loss, rel=1e-4, abs=1e-6), step


def task_lines(log_dir, job_id: str) -> list[str]:
    """What each task said about itself (job_callables.export_distributed_env), read from its own log."""
    lines = []
    for log in sorted(Path(log_dir).rglob(f"{job_id}_*_log.out")):
        lines += [line for line in log.read_text().splitlines() if line.startswith("task: rank")]
    return lines


def wait_for_step_line(log_dir, job_id: str, timeout_s: float = 240) -> None:
    """Until rank 0's log (a local file, unlike the metrics in the store) shows the first training step."""
    deadline = time.monotonic() + timeout_s
    while not any("step 1/" in log.read_text(errors="replace") for log in Path(log_dir).rglob(f"{job_id}_0_log.out")):
        assert time.monotonic() < deadline and squeue_state(job_id) in ("PENDING", "RUNNING", "CONFIGURING")
        time.sleep(0.1)


def task_pids(host: str) -> list[int]:
    """The job tasks (submitit's runner) inside one host's network namespace."""
    out = subprocess.run(["ip", "netns", "pids", host], capture_output=True, text=True, timeout=10)
    pids = []
    for pid in out.stdout.split():
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
        except FileNotFoundError:
            continue
        if b"submitit.core._submit" in cmdline:
            pids.append(int(pid))
    return pids


@pytest.fixture(scope="module")
def reference(store, tmp_path_factory):
    """The uninterrupted single-process run every multi-host run must reproduce."""
    run_dir = "s3://multi/reference"
    run_toy(run_dir, tmp_path_factory.mktemp("logs"), "engine.kind=ddp", cluster="local")
    return losses(run_dir)


def test_ddp_on_two_hosts_reproduces_one_process_and_each_task_knows_its_place(store, reference, tmp_path):
    """2 hosts × 2 tasks: the environment inside every task, the losses, one commit per save, accounting."""
    run_dir = "s3://multi/ddp"
    jobs = run_toy(run_dir, tmp_path, "engine.kind=ddp", "--nodes", "2", "cluster.tasks_per_node=2")
    wait_done(jobs["train"], tmp_path)
    script = next(Path(tmp_path).rglob(f"{jobs['train']}_submission.sh")).read_text()
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=2", "#SBATCH --partition=multi",
                 "--kill-on-bad-exit=1"):
        assert line in script, line
    seen = {}
    for line in task_lines(tmp_path, jobs["train"]):
        match = re.match(r"task: rank (\d+) of (\d+), local rank (\d+) on host (\S+), master (\S+):(\d+)", line)
        rank, world, local, host, master, port = match.groups()
        seen[int(rank)] = (int(world), int(local), host, master, port)
    ports = {v[4] for v in seen.values()}
    assert sorted(seen) == [0, 1, 2, 3] and len(ports) == 1
    assert {r: v[:4] for r, v in seen.items()} == {0: (4, 0, "mf-n1", "mf-n1"), 1: (4, 1, "mf-n1", "mf-n1"),
                                                   2: (4, 0, "mf-n2", "mf-n1"), 3: (4, 1, "mf-n2", "mf-n1")}
    assert_same_losses(run_dir, reference)
    assert step_dirs(run_dir).keys() == {10, 20, 30} and committed(run_dir) == [10, 20, 30]
    sacct = subprocess.run(["sacct", "-n", "-X", "-P", "-o", "State,NodeList", "-j", jobs["train"]],
                           capture_output=True, text=True, timeout=30).stdout.split()
    assert sacct == ["COMPLETED|mf-n[1-2]"]


def test_a_preempted_two_host_job_saves_on_every_host_requeues_and_resumes_exactly(store, reference, tmp_path,
                                                                                   capsys):
    run_dir = "s3://multi/preempted"
    jobs = run_toy(run_dir, tmp_path, "engine.kind=ddp", "--nodes", "2", "checkpoint.keep_last=10")
    wait_for_step_line(tmp_path, jobs["train"])
    subprocess.run(["scancel", "--signal=USR2", jobs["train"]], check=True, timeout=30)
    wait_done(jobs["train"], tmp_path)
    ledger = read_lines(f"{run_dir}/jobs.jsonl")
    requeues = [r for r in ledger if r["event"] == "requeue"]
    assert len(requeues) == 1 and requeues[0]["reason"] == "preempted" and 1 <= requeues[0]["step"] < 30
    assert [r["restart"] for r in ledger if r["event"] == "start"] == [0, 1]
    assert requeues[0]["step"] in committed(run_dir)   # saved by both hosts before the requeue
    assert_same_losses(run_dir, reference)
    capsys.readouterr()
    assert submit(["status", "--run-dir", run_dir]) == 0
    status = capsys.readouterr().out
    assert re.search(rf"{jobs['train']}\s+train\s+COMPLETED, requeued 1×", status), status


def test_a_host_lost_mid_save_fails_the_job_and_the_run_resumes_on_the_other_host(store, reference, tmp_path,
                                                                                  monkeypatch):
    """fsdp2 on 2 hosts; rank 1 (mf-n2) dies right after writing its shard of step 20. The job fails, step 20 stays
    uncommitted and is never read; the run goes on with --nodes 1 --resume from step 10 (DCP reshards 2 → 1)."""
    run_dir = "s3://multi/host-lost"
    monkeypatch.setenv("MEANFLOW_CHECKPOINT_KILL_AT", "wrote:engine/__1_0.distcp@2")
    jobs = run_toy(run_dir, tmp_path, "engine.kind=fsdp2", "--nodes", "2")
    wait_done(jobs["train"], tmp_path, "FAILED", "NODE_FAIL")
    monkeypatch.delenv("MEANFLOW_CHECKPOINT_KILL_AT")
    assert committed(run_dir) == [10]
    assert "engine/__1_0.distcp" in step_dirs(run_dir)[20] and "COMMIT.json" not in step_dirs(run_dir)[20]
    assert max(losses(run_dir)) == 20   # the dead job's last steps are in the log; the resumed job redoes them

    logs = tmp_path / "resumed"
    assert submit(["--cluster", "slurm", "--run-dir", run_dir, *TOY, *ON_HOSTS, f"cluster.log_dir={logs}",
                   "engine.kind=fsdp2", "--nodes", "1", "--resume"]) == 0
    resumed = [r["job_id"] for r in read_lines(f"{run_dir}/jobs.jsonl") if r["event"] == "submitted"][-1]
    wait_done(resumed, logs)
    assert committed(run_dir) == [10, 20, 30]
    assert step_dirs(run_dir)[20] == step_dirs(run_dir)[30]   # one rank's files: the dead host's shard is gone
    assert_same_losses(run_dir, reference)
    log = next(Path(logs).rglob(f"{resumed}_0_log.out")).read_text()
    assert "step-00000010 at step 10" in log


def test_a_stopped_rank_does_not_hold_the_cluster(store, tmp_path):
    """SIGSTOP one host's rank mid-run: the other rank's collective times out, it exits non-zero, and srun
    (--kill-on-bad-exit) ends the step — the job fails within the timeout instead of running to its time limit."""
    run_dir = "s3://multi/stopped"
    jobs = run_toy(run_dir, tmp_path, "engine.kind=ddp", "--nodes", "2", "run.steps=100000",
                   "checkpoint.every=0", "engine.process_group_timeout_s=15")
    deadline = time.monotonic() + 240
    while len(losses(run_dir)) < 3:
        assert time.monotonic() < deadline and squeue_state(jobs["train"]) in ("PENDING", "RUNNING", "CONFIGURING")
        time.sleep(0.5)
    stopped = task_pids("mf-n2")
    assert len(stopped) == 1
    os.kill(stopped[0], signal.SIGSTOP)
    at = time.monotonic()
    try:
        wait_done(jobs["train"], tmp_path, "FAILED", timeout_s=150)
        assert time.monotonic() - at < 120
        assert not Path(f"/proc/{stopped[0]}").exists() or task_pids("mf-n2") == []
    finally:
        if Path(f"/proc/{stopped[0]}").exists():
            os.kill(stopped[0], signal.SIGKILL)


def test_an_evaluation_job_over_two_hosts_scores_as_one_process_does(store, tmp_path):
    """tiny_mf trains 4 steps on one host; the job it schedules for step 2 (eval.tasks=2 over eval.nodes=2) runs a
    rank on each host; the same step scored in this one process gives the same FID."""
    run_dir = "s3://multi/eval"
    assert submit(["--cluster", "slurm", "--config", "tiny_mf", "--run-dir", run_dir, *ON_HOSTS, "run.steps=4",
                   "checkpoint.every=2", "eval.every=2", "eval.tasks=2", "eval.nodes=2", "eval.num_samples=64",
                   "eval.at_end=false", "engine.process_group_timeout_s=60", f"cluster.log_dir={tmp_path}"]) == 0
    train = [r["job_id"] for r in read_lines(f"{run_dir}/jobs.jsonl") if r["event"] == "submitted"][0]
    wait_done(train, tmp_path)
    scheduled = [r for r in read_lines(f"{run_dir}/jobs.jsonl") if r.get("what") == "step 2"]
    assert len(scheduled) == 1
    wait_done(scheduled[0]["job_id"], tmp_path)
    hosts = {line.split(" on host ")[1].split(",")[0] for line in task_lines(tmp_path, scheduled[0]["job_id"])}
    assert hosts == {"mf-n1", "mf-n2"}
    fs = fsspec.filesystem("s3")
    fs.invalidate_cache()
    two = json.loads(fs.cat(f"{run_dir}/eval/step-00000002/metrics.json"))["results"][0]
    one = evaluate_steps(run_dir, [2], overrides=["eval.num_samples=64"], force=True)[0]
    assert two["world_size"] == 2 and one["world_size"] == 1
    assert two["fid"] == pytest.approx(one["fid"], rel=1e-6) and two["fid"] > 0


def drill(*args: str) -> None:
    """A drill of tests/services/slurm.sh on the hosts (cut-links, heal-links, lose-host, revive-host)."""
    subprocess.run(["bash", str(SLURM_SH), *args], check=True, timeout=60)


def status_of(run_dir: str, capsys) -> str:
    capsys.readouterr()
    assert submit(["status", "--run-dir", run_dir]) == 0
    return capsys.readouterr().out


def wait_for_losses(run_dir: str, job_id: str, count: int) -> None:
    deadline = time.monotonic() + 240
    while len(losses(run_dir)) < count:
        assert time.monotonic() < deadline and squeue_state(job_id) in ("PENDING", "RUNNING", "CONFIGURING")
        time.sleep(0.5)


def test_a_partition_between_the_hosts_ends_the_job_within_the_collective_timeout(store, tmp_path, capsys):
    """Traffic between the hosts dropped, each still reaching slurmctld and S3: both ranks' collectives time out,
    srun never hears of the remote task's exit, and without more the job stayed RUNNING, holding both nodes, until
    its time limit. The failing task records why and ends its job. Meanwhile status flags the job stalled."""
    run_dir, timeout_s = "s3://multi/partitioned", 30
    jobs = run_toy(run_dir, tmp_path, "engine.kind=ddp", "--nodes", "2", "run.steps=100000", "checkpoint.every=0",
                   f"engine.process_group_timeout_s={timeout_s}")
    try:
        wait_for_losses(run_dir, jobs["train"], 3)
        drill("cut-links")
        cut, flagged = time.monotonic(), ""
        while not flagged and time.monotonic() - cut < timeout_s and squeue_state(jobs["train"]) == "RUNNING":
            flagged = re.search(rf"{jobs['train']}\s+train\s+RUNNING, STALLED: no metrics for \d+ s",
                                status_of(run_dir, capsys))
        wait_done(jobs["train"], tmp_path, "FAILED", timeout_s=timeout_s + 90)
        ended_s = time.monotonic() - cut
    finally:
        drill("heal-links")
        subprocess.run(["scancel", jobs["train"]], timeout=30)
    assert flagged, "a job whose metrics stopped moving is flagged stalled"
    assert ended_s < timeout_s + 45
    status = status_of(run_dir, capsys)
    assert re.search(rf"{jobs['train']}\s+train\s+FAILED", status), status
    assert re.search(r"failed \(instance 0, on mf-n1\): \w+: .*[Tt]imed out", status), status


def test_a_lost_host_requeues_the_job_which_keeps_the_run_until_cancelled(store, tmp_path, capsys):
    """The host of rank 0 (and of the batch script) dies: SLURM records NODE_FAIL and requeues the job, which
    waits for two nodes. Its lease stays held: a manual resume on the other host is refused, naming the job, how
    it resumes and how to take over; status shows both instances. Cancelled, the job frees the run at once."""
    run_dir = "s3://multi/lost-host"
    jobs = run_toy(run_dir, tmp_path, "engine.kind=ddp", "--nodes", "2", "run.steps=100000", "checkpoint.every=0",
                   "engine.process_group_timeout_s=120")
    try:
        wait_for_losses(run_dir, jobs["train"], 3)
        drill("lose-host", "mf-n1")
        deadline = time.monotonic() + 90
        while squeue_state(jobs["train"]) != "PENDING":
            assert time.monotonic() < deadline, squeue_state(jobs["train"])
            time.sleep(0.5)
        capsys.readouterr()
        assert submit(["--cluster", "slurm", "--run-dir", run_dir, *TOY, *ON_HOSTS, f"cluster.log_dir={tmp_path}",
                       "engine.kind=ddp", "--nodes", "1", "--resume"]) == 2
        refusal = capsys.readouterr().err
        assert f"SLURM job {jobs['train']}, which SLURM requeued (PENDING" in refusal, refusal
        assert "resumes this run by itself" in refusal and f"scancel {jobs['train']}" in refusal
        deadline = time.monotonic() + 30
        while "instances:" not in (status := status_of(run_dir, capsys)) and time.monotonic() < deadline:
            time.sleep(1)   # accounting (slurmdbd) records the ended instance a moment later
        assert re.search(rf"{jobs['train']}\s+train\s+PENDING \(.*\), requeued 1×", status), status
        assert re.search(r"instances: NODE_FAIL \(mf-n\[1-2\], [\d:]+-[\d:]+\), PENDING", status), status
        subprocess.run(["scancel", jobs["train"]], check=True, timeout=30)
        wait_done(jobs["train"], tmp_path, "CANCELLED", timeout_s=60)
        RunLease(run_dir).check_free()   # at once, not after the lease's time-to-live
    finally:
        subprocess.run(["scancel", jobs["train"]], timeout=30)
        drill("revive-host", "mf-n1")

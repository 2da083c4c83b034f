"""``jobs/submit.py status --run-dir URL``: what a run is doing — its jobs and their states (squeue for live jobs;
sacct when the cluster keeps accounting: every instance of a requeued job, with how each ended), why a training
job failed (as its task recorded), a running training job whose metrics stopped moving, committed steps, the last
training metrics, guard events, evaluations."""

from __future__ import annotations

import argparse
import shutil
import subprocess
import time
from collections import defaultdict

from meanflow.evaluation.evaluator import suspect_reason
from meanflow.evaluation.outputs import fid_series
from meanflow.platform.storage import filesystem, join

from .cluster import read_ledger
from .plot import read_jsonl
from .run_dir import load_run_config, open_store


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run-dir", required=True, help="the run directory (any fsspec URL)")


def _rows(cmd: list[str], fields: int) -> list[list[str]]:
    """A SLURM command's ``|``-separated rows ([] where the command is missing or fails)."""
    if shutil.which(cmd[0]) is None:
        return []
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    rows = [line.split("|") for line in out.stdout.splitlines()] if out.returncode == 0 else []
    return [[f.strip() for f in row] for row in rows if len(row) == fields]


def slurm_jobs(job_ids: list[str]) -> dict[str, dict]:
    """Job id -> ``state``, ``reason`` (a pending job's), ``start`` (a running one's) and ``instances``: squeue's
    live view over sacct's record, where the cluster keeps accounting, of every instance SLURM ran the job as
    (``sacct -D``: a requeued job's earlier runs too, each with how it ended: NODE_FAIL, PREEMPTED, TIMEOUT, ...)."""
    jobs: dict[str, dict] = {}
    if not job_ids:
        return jobs
    ids = ",".join(job_ids)
    for job, state, start, end, nodes in _rows(["sacct", "-n", "-X", "-D", "-P", "-o", "JobID,State,Start,End,NodeList",
                                                "-j", ids], 5):
        entry = jobs.setdefault(job, {"instances": []})
        entry["instances"].append({"state": state, "start": start, "end": end, "nodes": nodes})
        entry["state"] = state
    for job, state, reason, start in _rows(["squeue", "-h", "-t", "all", "-o", "%i|%T|%r|%S", "-j", ids], 4):
        jobs.setdefault(job, {"instances": []}).update(state=state, reason=reason, start=start)
    return jobs


def describe_instance(instance: dict) -> str:
    """``NODE_FAIL (mf-n[1-2], 23:31:28-23:31:32)``; a pending one is its state."""
    if instance["start"] in ("", "Unknown", "None"):
        return instance["state"]
    end = instance["end"][11:] if instance["end"] not in ("", "Unknown") else "…"
    return f"{instance['state']} ({instance['nodes']}, {instance['start'][11:]}-{end})"


# A running training job is stalled once its metrics have not moved for this many record intervals (log_every
# steps at its last speed), for at least MIN_STALL_S (metrics are uploaded every 2 s) and twice its last save's stall.
STALL_RECORDS = 20
MIN_STALL_S = 10.0


def modified_at(url: str) -> float | None:
    fs, path = filesystem(url)
    fs.invalidate_cache()
    try:
        return fs.modified(path).timestamp()
    except (FileNotFoundError, NotImplementedError):
        return None


def slurm_time(text: str) -> float | None:
    """squeue's and sacct's local ``2026-05-04T12:00:00`` as seconds since the epoch; None for N/A, Unknown."""
    try:
        return time.mktime(time.strptime(text, "%Y-%m-%dT%H:%M:%S"))
    except ValueError:
        return None


def stalled(run_dir: str, log_every: int, started: float | None) -> str | None:
    """Why a RUNNING training job looks stalled (its tasks may be gone while SLURM still holds its nodes), or None:
    its metrics move, or it has written none since its instance ``started`` (still starting)."""
    url = join(run_dir, "metrics.jsonl")
    modified = modified_at(url)
    if modified is None or (started is not None and modified < started):
        return None
    records = read_jsonl(url)
    steps = [r for r in records if "event" not in r and r.get("steps_per_s")]
    if not steps:
        return None
    last, saves = steps[-1], [r.get("stall_s", 0.0) for r in records if r.get("event") == "checkpoint"]
    step_s = 1.0 / last["steps_per_s"]
    age = time.time() - modified
    if age <= max(STALL_RECORDS * log_every * step_s, MIN_STALL_S, 2 * (saves[-1] if saves else 0.0)):
        return None
    return (f"STALLED: no metrics for {age:.0f} s (≈ {age / step_s:.0f} step times; last step {last['step']}): its "
            f"tasks may be gone")


def print_jobs(cfg, run_dir: str, ledger: list[dict]) -> None:
    """Each job with its state: every instance of a requeued one, why a training job failed (its rank 0 recorded
    it), and a running training job whose metrics stopped moving."""
    submitted = [r for r in ledger if r.get("event") == "submitted"]
    jobs = slurm_jobs([r["job_id"] for r in submitted if r.get("cluster") == "slurm"])
    print("jobs:" if submitted else "jobs: none recorded (trained in-process?)")
    for r in submitted:
        job = jobs.get(r["job_id"], {"instances": []})
        requeues = max(len(job["instances"]) - 1,
                       sum(1 for e in ledger if e.get("event") == "requeue" and e.get("job_id") == r["job_id"]))
        state = job.get("state") or ("finished or unknown (no accounting)" if r.get("cluster") == "slurm"
                                     else r.get("cluster"))
        if state == "PENDING" and job.get("reason") not in (None, "", "None"):
            state += f" ({job['reason']})"
        if state == "RUNNING" and r["kind"] == "train":
            stall = stalled(run_dir, cfg.run.log_every, slurm_time(job.get("start", "")))
            state += f", {stall}" if stall else ""
        print(f"  {r['job_id']:>8}  {r['kind']:<5} {r.get('what', ''):<8} {state}"
              + (f", requeued {requeues}×" if requeues else "") + f"  (submitted {r['time']})")
        if len(job["instances"]) > 1:
            print(f"{'':>12}instances: " + ", ".join(describe_instance(i) for i in job["instances"]))
        for f in ledger:
            if f.get("event") == "failed" and f.get("kind") == "train" and f.get("job_id") == r["job_id"]:
                print(f"{'':>12}failed (instance {f.get('restart', 0)}, on {f.get('host')}): {f['message']}")


def print_failed_evaluations(ledger: list[dict]) -> None:
    """Why each failed evaluation job failed, as it recorded (SLURM's state says only FAILED)."""
    for r in ledger:
        if r.get("event") == "failed" and r.get("kind") == "eval":
            print(f"  evaluation {r.get('job_id')} of step(s) {r.get('steps')} failed: {r['message']}")


def print_checkpoints(store) -> None:
    """Committed steps, pinned steps with why, and damaged steps with what is wrong: one listing."""
    scan = store.scan()
    shown = ", ".join(f"{s}{'' if c.get('healthy', True) else ' (unhealthy)'}" for s, c in scan.committed.items())
    print(f"committed steps: {shown or 'none'}")
    if scan.pinned:
        print("pinned steps: " + ", ".join(f"{s} ({store.pins.reason(s)})" for s in sorted(scan.pinned)))
    if scan.damaged:
        print("damaged steps: " + ", ".join(f"{s} ({v.damage})" for s, v in scan.damaged.items()))


def run(args) -> int:
    cfg = load_run_config(args.run_dir)
    ledger = read_ledger(args.run_dir)
    print(f"run {cfg.run.name} at {args.run_dir}: {cfg.objective.name} on {cfg.data.name}, "
          f"{cfg.model.family}/{cfg.model.size}, {cfg.run.steps} steps")
    print_jobs(cfg, args.run_dir, ledger)
    print_failed_evaluations(ledger)
    print_checkpoints(open_store(cfg, args.run_dir))
    train = read_jsonl(f"{args.run_dir.rstrip('/')}/metrics.jsonl")
    steps = [r for r in train if "event" not in r]
    if steps:
        last = steps[-1]
        print("last metrics: " + ", ".join(f"{k} {last[k]:.4g}" for k in ("step", "loss", "jvp_norm", "grad_norm",
                                                                         "steps_per_s") if k in last))
    events = [r for r in train if r.get("event") in ("skip", "rollback", "fail")]
    print(f"guard events: {len(events)}" + "".join(f"\n  step {e['step']}: {e['event']} ({e.get('detector')})"
                                                    for e in events[-5:]))
    print_evaluations(read_jsonl(f"{args.run_dir.rstrip('/')}/eval/metrics.jsonl"))
    return 0


def print_evaluations(evals: list[dict]) -> None:
    """The last evaluations of each FID series (feature extractor, weights, reference statistics: FIDs of two
    series do not compare), suspect ones named."""
    series = defaultdict(list)
    for r in evals:
        series[fid_series(r)].append(r)
    for (name, sha, reference), rows in series.items():
        if name:
            print(f"evaluations with {name} (weights sha256 {sha[:12]}…) against {reference or 'no reference'}:")
        for r in rows[-5:]:
            score = ", ".join(f"{k} {r[k]:.4g}" for k in ("fid", "is_mean", "class_accuracy", "sw1") if k in r)
            suspect = suspect_reason(r)
            print(f"  eval step {r['step']}" + (f" {r['guidance']}" if r.get("guidance") else "") + f": {score}"
                  + (f"  SUSPECT: {suspect}" if suspect else ""))

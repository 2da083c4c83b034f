"""``jobs/submit.py status --run-dir URL``: what a run is doing — its jobs and their states (squeue for live jobs;
sacct when the cluster keeps accounting), committed steps, the last training metrics, guard events, evaluations."""

from __future__ import annotations

import argparse
import shutil
import subprocess

from .cluster import read_ledger
from .plot import read_jsonl
from .run_dir import load_run_config, open_store


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run-dir", required=True, help="the run directory (any fsspec URL)")


def slurm_states(job_ids: list[str]) -> dict[str, str]:
    """Job id -> state from squeue (queued/running) and, where accounting exists, sacct (finished ones too)."""
    states: dict[str, str] = {}
    if not job_ids:
        return states
    ids = ",".join(job_ids)
    for cmd in (["sacct", "-n", "-X", "-P", "-o", "JobID,State", "-j", ids],
                ["squeue", "-h", "-t", "all", "-o", "%i|%T", "-j", ids]):   # squeue last: it is the live view
        if shutil.which(cmd[0]) is None:
            continue
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        if out.returncode == 0:
            for line in out.stdout.splitlines():
                job, _, state = line.partition("|")
                if job and state:
                    states[job.strip()] = state.strip()
    return states


def run(args) -> int:
    cfg = load_run_config(args.run_dir)
    ledger = read_ledger(args.run_dir)
    submitted = [r for r in ledger if r.get("event") == "submitted"]
    states = slurm_states([r["job_id"] for r in submitted if r.get("cluster") == "slurm"])
    print(f"run {cfg.run.name} at {args.run_dir}: {cfg.objective.name} on {cfg.data.name}, "
          f"{cfg.model.family}/{cfg.model.size}, {cfg.run.steps} steps")
    print("jobs:" if submitted else "jobs: none recorded (trained in-process?)")
    for r in submitted:
        requeues = sum(1 for e in ledger if e.get("event") == "requeue" and e.get("job_id") == r["job_id"])
        state = states.get(r["job_id"], "finished or unknown (no accounting)" if r.get("cluster") == "slurm"
                           else r.get("cluster"))
        print(f"  {r['job_id']:>8}  {r['kind']:<5} {r.get('what', ''):<8} {state}"
              + (f", requeued {requeues}×" if requeues else "") + f"  (submitted {r['time']})")
    commits = open_store(cfg, args.run_dir).commits()
    shown = ", ".join(f"{s}{'' if c.get('healthy', True) else ' (unhealthy)'}" for s, c in commits.items())
    print(f"committed steps: {shown or 'none'}")
    train = read_jsonl(f"{args.run_dir.rstrip('/')}/metrics.jsonl")
    steps = [r for r in train if "event" not in r]
    if steps:
        last = steps[-1]
        print("last metrics: " + ", ".join(f"{k} {last[k]:.4g}" for k in ("step", "loss", "jvp_norm", "grad_norm",
                                                                         "steps_per_s") if k in last))
    events = [r for r in train if r.get("event") in ("skip", "rollback", "fail")]
    print(f"guard events: {len(events)}" + "".join(f"\n  step {e['step']}: {e['event']} ({e.get('detector')})"
                                                    for e in events[-5:]))
    evals = read_jsonl(f"{args.run_dir.rstrip('/')}/eval/metrics.jsonl")
    for r in evals[-5:]:
        score = ", ".join(f"{k} {r[k]:.4g}" for k in ("fid", "is_mean", "class_accuracy", "sw1") if k in r)
        print(f"eval step {r['step']}" + (f" {r['guidance']}" if r.get("guidance") else "") + f": {score}")
    return 0

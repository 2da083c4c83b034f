"""Submitting a training run (on the login node, or wherever ``jobs/submit.py`` runs): the training job, its final
evaluation (``afterok`` on SLURM), an evaluation watcher if asked for; ``--dry-run`` prints the sbatch script and the
resolved config instead. Whatever can refuse the run is checked before the first job is submitted and recorded in
``<run>/jobs.jsonl``. On ``local`` and ``debug`` the command waits for the job and shows rank 0's output as it comes.
What runs inside the jobs is in job_callables.py."""

from __future__ import annotations

import copy
import sys
import time
from pathlib import Path

from omegaconf import DictConfig

from meanflow.platform.config import save_config
from meanflow.platform.storage import probe_writable
from meanflow.platform.train_state import git_sha

from .cluster import make_executor, record_job, sbatch_script, store_writer, submission_folder, submit_eval, \
    tasks_per_node, time_limit_min
from .components import check_buildable
from .job_callables import EvalJob, TrainJob
from .run_dir import check_training_run_dir


def submit_training(cfg: DictConfig, kind: str, dry_run: bool = False, stdout=None) -> int:
    """Submit ``cfg`` (left as it is: the jobs get adjusted copies) to ``kind``'s cluster."""
    stdout = stdout or sys.stdout
    cluster, run_dir = cfg.cluster, cfg.run.run_dir
    tasks = tasks_per_node(cluster)
    final_eval_job = kind == "slurm" and cfg.eval.at_end
    watcher = kind == "slurm" and bool(cfg.eval.every) and cfg.eval.mode == "watcher"
    train_cfg = copy.deepcopy(cfg)
    if final_eval_job:   # on SLURM the final evaluation is its own job, run after training succeeds
        train_cfg.eval.at_end = False
    watcher_cfg = copy.deepcopy(cfg)
    # one poller: ranks polling on their own could disagree on the steps to evaluate
    watcher_cfg.eval.tasks = watcher_cfg.eval.nodes = 1
    # Refusals first: nothing is created, submitted or recorded for a run that would be refused.
    time_limit_min(cluster, kind, cluster.time, "cluster.time")
    if final_eval_job or cfg.eval.every:   # and not once training is queued, by the first evaluation's submission
        time_limit_min(cluster, kind, cfg.eval.time, "eval.time")
    if not dry_run:   # (a dry run reads no storage)
        check_training_run_dir(cfg, cluster.nodes * tasks)
        check_buildable(cfg, cluster.nodes * tasks)
        for url in filter(None, (cfg.checkpoint.url, run_dir)):   # full, read-only, a file in the way: refused now
            probe_writable(url)
    folder = submission_folder(cluster, cfg.run.name, "train")
    executor = make_executor(cluster, kind, folder, f"train-{cfg.run.name}", nodes=cluster.nodes, tasks=tasks,
                             gpus=cluster.gpus_per_node, time=cluster.time, time_key="cluster.time")
    if dry_run:
        script = sbatch_script(executor) if kind == "slurm" else (
            f"# --cluster {kind}: no sbatch script; {cluster.nodes * tasks} process(es) on this machine")
        print(f"{script}\n# ---- resolved config ----\n{save_config(train_cfg)}", file=stdout, end="")
        return 0
    echoed_to_terminal = kind != "slurm" and callable(getattr(stdout, "isatty", None)) and stdout.isatty()
    job = executor.submit(TrainJob(save_config(train_cfg), kind, progress_bar=echoed_to_terminal))
    record_job(run_dir, {"event": "submitted", "job_id": job.job_id, "kind": "train", "cluster": kind,
                         "nodes": cluster.nodes, "tasks_per_node": tasks, "folder": str(folder),
                         "git_sha": git_sha()}, store_writer(cfg))
    if kind != "slurm":
        return follow(job, stdout)
    print(f"submitted training job {job.job_id}: {cluster.nodes} node(s) × {tasks} task(s), logs in {folder}",
          file=stdout)
    if final_eval_job:
        final = submit_eval(cfg, kind, EvalJob(run_dir, kind, [cfg.run.steps]), "final",
                            dependency=f"afterok:{job.job_id}")
        print(f"submitted final evaluation job {final.job_id} (after training succeeds)", file=stdout)
    if watcher:
        watcher_job = submit_eval(watcher_cfg, kind, EvalJob(run_dir, kind, watch=True), "watcher", nice=100)
        print(f"submitted evaluation watcher job {watcher_job.job_id}", file=stdout)
    print(f"follow it with: python jobs/submit.py status --run-dir {run_dir}", file=stdout)
    return 0


def _print_new(path: Path, offset: int, stdout) -> int:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read()
    except FileNotFoundError:
        return offset
    if data:
        stdout.write(data.decode(errors="replace"))
        stdout.flush()
    return offset + len(data)


def follow(job, stdout) -> int:
    """Wait for a local/debug job, echoing rank 0's stdout; the job's outcome becomes the exit code."""
    if job.__class__.__name__ == "DebugJob":   # runs in this process when its result is asked for
        return _finish(job, stdout)
    offset = 0
    while not job.done():
        offset = _print_new(job.paths.stdout, offset, stdout)
        time.sleep(0.5)
    _print_new(job.paths.stdout, offset, stdout)
    return _finish(job, stdout)


def _finish(job, stdout) -> int:
    try:
        result = job.results()[0]
    except Exception as err:   # the job crashed (a bug, or killed): its own log has the trace
        tail = _tail(job.paths.stderr)
        print(f"job {job.job_id} failed: {type(err).__name__}\n{tail}", file=sys.stderr)
        return 1
    if result["message"]:
        print(result["message"], file=sys.stderr)
    return result["exit_code"]


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return f"(no log at {path})"

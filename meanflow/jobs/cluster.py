"""Submitting jobs through submitit (the training job's executor, evaluation jobs), and the run's ledger of them.

One executor per job: ``slurm`` (sbatch on a SLURM cluster), ``local`` (submitit's local executor: real
subprocesses on this machine, one per task) or ``debug`` (in-process, for breakpoints). Tasks: one per GPU
(``tasks_per_node = gpus_per_node``), or ``cluster.tasks_per_node`` CPU processes. Every submission gets its own
folder under ``cluster.log_dir`` (job ids restart when a SLURM state directory is wiped; a reused folder would
then hand back an old job's result). Every job submitted for a run is appended to ``<run>/jobs.jsonl``.
"""

from __future__ import annotations

import datetime
import json
import math
import re
import uuid
from pathlib import Path

import submitit

from meanflow.platform.config import ConfigError
from meanflow.platform.checkpoint.upload import BoundedWriter, StoragePermanentError
from meanflow.platform.metrics import append_records
from meanflow.platform.storage import UnusableURL, join, read_bytes

KINDS = ("slurm", "local", "debug")
# sbatch --signal: "the signal may be sent up to 60 seconds earlier than specified"
SLURM_SIGNAL_RESOLUTION_S = 60


def minutes(text: str, key: str) -> int:
    """``[D-]HH:MM:SS``, ``MM:SS`` or plain minutes -> whole minutes (rounded up)."""
    text = str(text).strip()
    match = re.fullmatch(r"(?:(\d+)-)?(?:(\d+):)?(\d+):(\d+)", text)
    if match:
        days, hours, mins, secs = (int(g or 0) for g in match.groups())
        if match.group(2) is None:   # MM:SS
            hours, mins, secs = 0, int(match.group(3)), int(match.group(4))
        return max(1, math.ceil(days * 1440 + hours * 60 + mins + secs / 60))
    if text.isdigit():
        return max(1, int(text))
    raise ConfigError(f"{key}: {text!r} is not a time ([D-]HH:MM:SS, MM:SS or minutes)")


def tasks_per_node(cluster) -> int:
    return cluster.gpus_per_node or cluster.tasks_per_node


def submission_folder(cluster, run_name: str, job: str) -> Path:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path(cluster.log_dir).resolve() / run_name / f"{job}-{stamp}-{uuid.uuid4().hex[:6]}"


def time_limit_min(cluster, kind: str, time: str, time_key: str) -> int:
    """A job's time limit in minutes, refused (with ``--cluster``) where the job could not run: checked by
    make_executor, and before anything is submitted for the jobs submitted later."""
    if kind not in KINDS:
        raise ConfigError(f"--cluster: {kind!r} is not one of {', '.join(KINDS)}")
    limit = minutes(time, time_key)
    if kind == "slurm" and limit * 60 <= cluster.signal_delay_s + SLURM_SIGNAL_RESOLUTION_S:
        # else USR2 can arrive before the job has started, and kill it before any handler is installed
        raise ConfigError(f"{time_key}={time!r} is too short for the USR2 that SLURM sends cluster.signal_delay_s="
                          f"{cluster.signal_delay_s} s before the limit (and up to {SLURM_SIGNAL_RESOLUTION_S} s "
                          f"earlier still): raise {time_key} or lower cluster.signal_delay_s")
    return limit


def make_executor(cluster, kind: str, folder: Path, name: str, *, nodes: int, tasks: int, gpus: int, time: str,
                  time_key: str, dependency: str | None = None, nice: int | None = None) -> submitit.AutoExecutor:
    """An executor for one job. SLURM settings come from the ``cluster:`` section; on ``local``/``debug`` only
    the task count matters."""
    timeout_min = time_limit_min(cluster, kind, time, time_key)
    # submitit's own timeout counter is off (0): the job requeues itself after a collective save (preemption.py)
    executor = submitit.AutoExecutor(folder=str(folder / "%j"), cluster=kind,
                                     **({"slurm_max_num_timeout": 0} if kind == "slurm" else {}))
    params = {"name": name, "nodes": nodes, "tasks_per_node": tasks, "timeout_min": timeout_min}
    if gpus:
        params["gpus_per_node"] = gpus
    if cluster.cpus_per_task:
        params["cpus_per_task"] = cluster.cpus_per_task
    if cluster.mem_gb:
        params["mem_gb"] = cluster.mem_gb
    if kind == "slurm":
        # requeueable whatever the site's default (JobRequeue): a job whose node fails is requeued by SLURM
        # (NODE_FAIL) and resumes by itself, as a preempted job requeues itself
        extra = {"requeue": True, **{str(k): ("" if v is None else str(v)) for k, v in cluster.sbatch.items()}}
        if dependency:   # and drop the job if training fails, rather than leave it pending forever
            extra.update({"dependency": dependency, "kill-on-invalid-dep": "yes"})
        if nice is not None:
            extra["nice"] = str(nice)
        # --kill-on-bad-exit: a rank that fails (a timed-out collective, a lost peer) ends the whole step, so a
        # hung or stopped rank cannot hold every node until the time limit
        params.update(slurm_signal_delay_s=cluster.signal_delay_s, slurm_setup=list(cluster.setup),
                      slurm_additional_parameters=extra, slurm_srun_args=["--kill-on-bad-exit=1"])
        for key in ("partition", "account", "qos", "constraint"):
            if cluster[key]:
                params[f"slurm_{key}"] = cluster[key]
    executor.update_parameters(**params)
    return executor


def sbatch_script(executor: submitit.AutoExecutor) -> str:
    """The sbatch script ``submit`` would write (submitit's own renderer; no job is created)."""
    inner = executor._executor   # submitit's SlurmExecutor: renders with the exact submit command
    return inner._make_submission_file_text(inner._submitit_command_str, "dry-run")


def eval_executor(cfg, kind: str, dependency: str | None = None, nice: int | None = None) -> submitit.AutoExecutor:
    """An evaluation job's executor: ``eval.tasks`` tasks spread evenly over ``eval.nodes``, ``eval.time``."""
    cluster = cfg.cluster
    tasks = cfg.eval.tasks // cfg.eval.nodes
    gpus = min(tasks, cluster.gpus_per_node) if cluster.gpus_per_node else 0
    return make_executor(cluster, kind, submission_folder(cluster, cfg.run.name, "eval"), f"eval-{cfg.run.name}",
                         nodes=cfg.eval.nodes, tasks=tasks, gpus=gpus, time=cfg.eval.time, time_key="eval.time",
                         dependency=dependency, nice=nice)


def submit_eval(cfg, kind: str, job, what: str, dependency: str | None = None, nice: int | None = None):
    """Submit an evaluation job (a job_callables.EvalJob) for a run, from a login node or from inside a training
    job: submitit's clean_env drops the training job's SLURM variables so they do not leak into the new job."""
    executor = eval_executor(cfg, kind, dependency, nice)
    with submitit.helpers.clean_env():
        submitted = executor.submit(job)
    record_job(cfg.run.run_dir, {"event": "submitted", "job_id": submitted.job_id, "kind": "eval", "what": what,
                                 "cluster": kind, "folder": str(submitted.paths.folder),
                                 **({"dependency": dependency} if dependency else {})}, store_writer(cfg))
    return submitted


# ----------------------------------------------------------------------------------------------- ledger
def ledger_url(run_dir: str) -> str:
    return join(run_dir, "jobs.jsonl")


def store_writer(cfg) -> BoundedWriter:
    """Bounded access to the run directory with the run's limits (checkpoint.upload_timeout_s, max_outage_s)."""
    return BoundedWriter("checkpoint", cfg.checkpoint.upload_timeout_s, cfg.checkpoint.max_outage_s)


def record_job(run_dir: str, record: dict, writer: BoundedWriter | None = None) -> None:
    """Append to the ledger; bounded by ``writer`` (store_writer(cfg) where the config is at hand). A run directory
    that refuses the write (read-only, full, no permission) is bad input: UnusableURL, at once."""
    try:
        append_records(ledger_url(run_dir), [{"time": datetime.datetime.now().isoformat(timespec="seconds"),
                                              **record}], writer or BoundedWriter("checkpoint"))
    except StoragePermanentError as err:
        raise UnusableURL(str(err)) from err


def read_ledger(run_dir: str) -> list[dict]:
    try:
        text = read_bytes(ledger_url(run_dir)).decode()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.splitlines() if line.strip()]

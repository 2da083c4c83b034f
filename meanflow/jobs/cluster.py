"""Submitting jobs through submitit, and the run's ledger of them.

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
from meanflow.platform.metrics import MetricsSink
from meanflow.platform.storage import join, read_bytes

from .preemption import SLURM_SIGNAL_RESOLUTION_S

KINDS = ("slurm", "local", "debug")


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


def make_executor(cluster, kind: str, folder: Path, name: str, *, nodes: int, tasks: int, gpus: int, time: str,
                  time_key: str, dependency: str | None = None, nice: int | None = None) -> submitit.AutoExecutor:
    """An executor for one job. SLURM settings come from the ``cluster:`` section; on ``local``/``debug`` only
    the task count matters."""
    if kind not in KINDS:
        raise ConfigError(f"--cluster: {kind!r} is not one of {', '.join(KINDS)}")
    # submitit's own timeout counter is off (0): the job requeues itself after a collective save (preemption.py)
    executor = submitit.AutoExecutor(folder=str(folder / "%j"), cluster=kind,
                                     **({"slurm_max_num_timeout": 0} if kind == "slurm" else {}))
    params = {"name": name, "nodes": nodes, "tasks_per_node": tasks, "timeout_min": minutes(time, time_key)}
    if kind == "slurm" and params["timeout_min"] * 60 <= cluster.signal_delay_s + SLURM_SIGNAL_RESOLUTION_S:
        # else USR2 can arrive before the job has started, and kill it before any handler is installed
        raise ConfigError(f"{time_key}={time!r} is too short for the USR2 that SLURM sends cluster.signal_delay_s="
                          f"{cluster.signal_delay_s} s before the limit (and up to {SLURM_SIGNAL_RESOLUTION_S} s "
                          f"earlier still): raise {time_key} or lower cluster.signal_delay_s")
    if gpus:
        params["gpus_per_node"] = gpus
    if cluster.cpus_per_task:
        params["cpus_per_task"] = cluster.cpus_per_task
    if cluster.mem_gb:
        params["mem_gb"] = cluster.mem_gb
    if kind == "slurm":
        extra = {str(k): ("" if v is None else str(v)) for k, v in cluster.sbatch.items()}
        if dependency:   # and drop the job if training fails, rather than leave it pending forever
            extra.update({"dependency": dependency, "kill-on-invalid-dep": "yes"})
        if nice is not None:
            extra["nice"] = str(nice)
        params.update(slurm_signal_delay_s=cluster.signal_delay_s, slurm_setup=list(cluster.setup),
                      slurm_additional_parameters=extra)
        for key in ("partition", "account", "qos", "constraint"):
            if cluster[key]:
                params[f"slurm_{key}"] = cluster[key]
    executor.update_parameters(**params)
    return executor


def sbatch_script(executor: submitit.AutoExecutor) -> str:
    """The sbatch script ``submit`` would write (submitit's own renderer; no job is created)."""
    inner = executor._executor   # submitit's SlurmExecutor: renders with the exact submit command
    return inner._make_submission_file_text(inner._submitit_command_str, "dry-run")


# ----------------------------------------------------------------------------------------------- ledger
def ledger_url(run_dir: str) -> str:
    return join(run_dir, "jobs.jsonl")


def record_job(run_dir: str, record: dict) -> None:
    MetricsSink(ledger_url(run_dir)).write({"time": datetime.datetime.now().isoformat(timespec="seconds"),
                                            **record})


def read_ledger(run_dir: str) -> list[dict]:
    try:
        text = read_bytes(ledger_url(run_dir)).decode()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.splitlines() if line.strip()]

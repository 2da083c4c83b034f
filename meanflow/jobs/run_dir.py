"""A run directory, as the commands that read it (eval, sample, export, status) and the training submission see it:
its stored config, its checkpoint store, a committed step, the model with that step's weights. A ``--run-dir``
that is not a run directory (a file, a path under a file, a directory without config.yaml) is bad input (exit 2),
named in the message.
"""

from __future__ import annotations

import posixpath

import torch
from omegaconf import DictConfig

from meanflow.models import build_model
from meanflow.models.execution import set_block_execution
from meanflow.platform.checkpoint import CheckpointError, CheckpointStore
from meanflow.platform.config import ConfigError, load_config_text
from meanflow.platform.run_lease import RunLease
from meanflow.platform.storage import UnusableURL, filesystem, join, probe_writable, read_bytes

from .preflight import check_resumable


def is_file(url: str) -> bool:
    fs, path = filesystem(url)
    try:
        return fs.isfile(path)
    except OSError:   # a path under a file, an unreachable store: not a file we can name
        return False


def read_stored_config(run_dir: str, flag: str = "--run-dir") -> str | None:
    """``<run>/config.yaml`` as text, or None where the directory holds none (a new run)."""
    if is_file(run_dir):
        raise ConfigError(f"{flag} {run_dir}: is a file, not a run directory")
    try:
        return read_bytes(join(run_dir, "config.yaml")).decode()
    except FileNotFoundError:
        return None
    except NotADirectoryError:
        raise ConfigError(f"{flag} {run_dir}: not a directory (a file stands in its path)") from None


def check_output_writable(url: str, flag: str) -> None:
    """The folder that file ``url`` goes in takes writes: a command refuses a read-only, full or missing place
    (``flag`` named, exit 2) before its work, not after it."""
    fs, path = filesystem(url)
    try:
        probe_writable(fs.unstrip_protocol(posixpath.dirname(path)))
    except UnusableURL as err:
        raise ConfigError(f"{flag} {url}: {err}") from err


def load_run_config(run_dir: str, overrides: list[str] | None = None) -> DictConfig:
    text = read_stored_config(run_dir)
    if text is None:
        raise ConfigError(f"--run-dir {run_dir}: no config.yaml there (not a run directory)")
    return load_config_text(text, join(run_dir, "config.yaml"), overrides)


def open_store(cfg: DictConfig, run_dir: str, rank: int = 0) -> CheckpointStore:
    return CheckpointStore(cfg.checkpoint.url or join(run_dir, "checkpoints"), rank=rank)


def resolve_step(store: CheckpointStore, step: int | None) -> int:
    """``step``, or the newest committed one; an error names the store when it holds no such commit."""
    steps = store.steps()
    if not steps:
        raise ConfigError(f"--run-dir: {store.url} holds no committed checkpoint")
    if step is None:
        return steps[-1]
    if step not in steps:
        raise ConfigError(f"--step {step}: not a committed step in {store.url} (committed: {steps})")
    return step


def load_sampling_model(cfg: DictConfig, store: CheckpointStore, step: int, device) -> tuple[torch.nn.Module, str]:
    """The model the config describes with a committed step's EMA weights (or the model's, without EMA)."""
    # sampling is compiled as training's plain forwards are
    set_block_execution(cfg.engine.compile, compile_backend=cfg.engine.compile_backend)
    model = build_model(cfg.model)
    try:
        state, which = store.load_weights(step, model.state_dict())
    except CheckpointError as err:
        raise ConfigError(f"--step {step}: {err}") from err
    model.load_state_dict(state)
    return model.to(device).eval().requires_grad_(False), which


def check_training_run_dir(cfg: DictConfig, world_size: int) -> None:
    """What the trainer would refuse about ``run.run_dir``, checked before a training job is submitted (and
    recorded in the run's jobs.jsonl): not a directory; ``run.resume`` with nothing to resume; checkpoints of a
    run with another model, objective or data section (or DeepSpeed's, of another world size); another live job
    writing it."""
    read_stored_config(cfg.run.run_dir, flag="run.run_dir:")
    RunLease(cfg.run.run_dir).check_free()
    store = open_store(cfg, cfg.run.run_dir)
    commits = store.commits()
    check_resumable(cfg, cfg.engine.kind, commits[max(commits)] if commits else None, world_size, store.url)

"""Run the trainer on N real processes (gloo on CPU), the way a launcher would: torchrun-style environment
variables per rank, a short process-group timeout, spawned processes (no fork after torch threads exist)."""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
import torch.multiprocessing as mp

from s3_server import free_port

PG_TIMEOUT = "engine.process_group_timeout_s=60"


def _rank_main(rank: int, world: int, port: int, config: str, overrides: list[str], env: dict) -> None:
    os.environ.update(env)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    from meanflow.jobs.train import Trainer
    from meanflow.platform.config import load_config

    Trainer(load_config(config, [*overrides, PG_TIMEOUT]), stdout=open(os.devnull, "w")).run()


def run_world(world: int, config: str, overrides: list[str], env: dict | None = None) -> None:
    """Train on ``world`` processes; raises if any rank fails."""
    mp.start_processes(_rank_main, args=(world, free_port(), config, list(overrides), dict(env or {})),
                       nprocs=world, start_method="spawn", join=True)


def losses(run_dir: Path) -> list[float]:
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines if '"event"' not in line]


def model_state(run_dir: Path, step: int, component: str = "model") -> dict[str, torch.Tensor]:
    """A committed step's full (unsharded) ``component`` state dict, whatever engine wrote it."""
    step_dir = Path(run_dir) / "checkpoints" / f"step-{step:08d}"
    commit = json.loads((step_dir / "COMMIT.json").read_text())
    if commit["format"] == "torch":
        return torch.load(step_dir / f"{component}.pt", weights_only=True)
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "full.pt"
        dcp_to_torch_save(step_dir / "dcp", out)
        return torch.load(out, weights_only=True)[component]

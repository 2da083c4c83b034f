"""``jobs/submit.py export --run-dir URL [--step N] --out model.safetensors``: a committed step's EMA weights (read
from any engine's checkpoint, sharded ones included) and the model config, as one file ``load_exported`` reads."""

from __future__ import annotations

import argparse

from omegaconf import OmegaConf

from meanflow.models.export import export_bytes
from meanflow.platform.storage import write_bytes_atomic

from .evaluate import load_run_config, load_sampling_model, open_store, resolve_step


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run-dir", required=True, help="the run directory (any fsspec URL)")
    p.add_argument("--step", type=int, help="a committed step (default: the newest)")
    p.add_argument("--out", required=True, help="where to write the .safetensors file (any fsspec URL)")


def run(args) -> int:
    cfg = load_run_config(args.run_dir)
    store = open_store(cfg, args.run_dir)
    step = resolve_step(store, args.step)
    model, which = load_sampling_model(cfg, store, step, "cpu")
    info = {"run_dir": args.run_dir, "step": step, "weights": which, "objective": cfg.objective.name}
    write_bytes_atomic(args.out, export_bytes(model.state_dict(), OmegaConf.to_container(cfg.model), info))
    print(f"wrote {args.out}: {which} weights of step {step} ({cfg.model.family}/{cfg.model.size})")
    return 0

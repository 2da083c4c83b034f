"""``jobs/submit.py export --run-dir URL [--step N] --out model.safetensors``: a committed step's EMA weights (read
from any engine's checkpoint, sharded ones included) and the model config, as one file ``load_exported`` reads."""

from __future__ import annotations

import argparse

from omegaconf import OmegaConf

from meanflow.models.export import export_bytes
from meanflow.platform.config import ConfigError
from meanflow.platform.storage import filesystem, write_bytes_atomic

from .run_dir import load_run_config, load_sampling_model, open_store, resolve_step


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run-dir", required=True, help="the run directory (any fsspec URL)")
    p.add_argument("--step", type=int, help="a committed step (default: the newest)")
    p.add_argument("--out", required=True, help="where to write the .safetensors file (any fsspec URL)")


def write_out(url: str, data: bytes) -> None:
    """``data`` to ``--out``; where it cannot go is bad input, named (exit 2)."""
    try:
        write_bytes_atomic(url, data)
    except (FileExistsError, NotADirectoryError) as err:   # makedirs or open under a regular file
        raise ConfigError(f"--out {url}: cannot write there ({err.filename or 'a parent'} is a file, not a "
                          "directory)") from None
    except OSError as err:   # unwritable, no such bucket, ...
        raise ConfigError(f"--out {url}: cannot write there ({err.strerror or err})") from None


def run(args) -> int:
    fs, path = filesystem(args.out)
    if fs.isdir(path):   # checked before the weights load; the rename would put the file inside it
        raise ConfigError(f"--out {args.out}: is a directory; name the .safetensors file to write")
    cfg = load_run_config(args.run_dir)
    store = open_store(cfg, args.run_dir)
    step = resolve_step(store, args.step)
    model, which = load_sampling_model(cfg, store, step, "cpu")
    info = {"run_dir": args.run_dir, "step": step, "weights": which, "objective": cfg.objective.name}
    write_out(args.out, export_bytes(model.state_dict(), OmegaConf.to_container(cfg.model), info))
    print(f"wrote {args.out}: {which} weights of step {step} ({cfg.model.family}/{cfg.model.size})")
    return 0

"""Checkpoint save and load cost: time and bytes for a model size, local disk and an S3 server, sync vs async.

    .venv/bin/python bench/checkpoint_cost.py [--sizes tiny,B] [--s3-endpoint URL]

For each model (MF-DiT, patch 2, 32×32×4 latents as on ImageNet 256) it builds the single-process engine with
optimizer state (one AdamW step) and EMA, then measures ``CheckpointStore.save`` (serialise + sha256 + upload +
COMMIT), ``load`` (download + verify + deserialise) and, with ``async_save``, the stall: how long ``save`` holds
the training thread before the upload continues in the background. Without ``--s3-endpoint`` it starts moto's
server on loopback (as the tests do).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import fsspec
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from meanflow.models import build_model, count_parameters  # noqa: E402
from meanflow.platform.checkpoint import CheckpointStore  # noqa: E402
from meanflow.platform.config import load_config  # noqa: E402
from meanflow.platform.engines import build_engine  # noqa: E402
from s3_server import s3_environment  # noqa: E402


def make_engine(size: str):
    overrides = [f"model.size={size}", "model.width=0", "model.image_size=32", "model.in_channels=4",
                 "model.num_classes=1000"]
    if size == "tiny":
        overrides = ["model.image_size=8", "model.in_channels=1", "model.num_classes=10"]
    cfg = load_config("tiny_mf", overrides)
    engine = build_engine(cfg.engine, cfg.optim, lambda: build_model(cfg.model), torch.device("cpu"), 1)
    for p in engine.model.parameters():   # one optimizer step so Adam's moments exist
        p.grad = torch.zeros_like(p)
    engine.apply(0)
    return engine


def measure(engine, url: str) -> dict:
    store = CheckpointStore(url, keep_last=10)
    start = time.perf_counter()
    store.save(1, engine, {"step": 1}, {})
    save_s = time.perf_counter() - start
    nbytes = sum(f["bytes"] for f in store.commits()[1]["files"].values())
    start = time.perf_counter()
    store.load(1, engine)
    load_s = time.perf_counter() - start
    async_store = CheckpointStore(url, keep_last=10, async_save=True)
    start = time.perf_counter()
    async_store.save(2, engine, {"step": 2}, {})
    stall_s = time.perf_counter() - start
    async_store.wait()
    return {"bytes": nbytes, "save_s": save_s, "load_s": load_s, "async_stall_s": stall_s}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", default="tiny,B")
    p.add_argument("--s3-endpoint")
    args = p.parse_args()
    with s3_environment(args.s3_endpoint):
        fsspec.filesystem("s3").mkdir("bench-ckpt")
        print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}")
        print("| model | params | store | bytes | save s | load s | async stall s | stall ÷ sync save |")
        print("|---|---:|---|---:|---:|---:|---:|---:|")
        for size in args.sizes.split(","):
            engine = make_engine(size)
            params = count_parameters(engine.model) / 1e6
            with tempfile.TemporaryDirectory() as tmp:
                for store_name, url in (("local", f"{tmp}/ckpt"), ("S3 (moto)", f"s3://bench-ckpt/{size}")):
                    r = measure(engine, url)
                    print(f"| MF-DiT {size}/2 | {params:.2f}M | {store_name} | {r['bytes'] / 1e6:.1f} MB | "
                          f"{r['save_s']:.2f} | {r['load_s']:.2f} | {r['async_stall_s']:.2f} | "
                          f"{r['async_stall_s'] / r['save_s']:.2f} |", flush=True)


if __name__ == "__main__":
    main()

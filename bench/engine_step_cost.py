"""Step time of each engine on 2 processes (gloo, CPU) relative to one process on the same global batch.

    .venv/bin/python bench/engine_step_cost.py [--config tiny_mf] [--steps 40] [--batch 32]

Runs the real trainer (``run_world`` from tests/distributed_run.py: spawned ranks with torchrun-style variables)
and reads steps/s over the second half of each run from its metrics.jsonl (the first half absorbs start-up).
On a 2-core CPU box two ranks share the cores, so the ratios show each engine's overhead, not a speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from distributed_run import run_world  # noqa: E402


def steps_per_s(run_dir: Path) -> float:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "event" not in r][-1]["steps_per_s"]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--config", default="tiny_mf")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch", type=int, default=32)
    args = p.parse_args()
    common = [f"run.steps={args.steps}", f"run.log_every={args.steps // 2}", f"data.global_batch={args.batch}",
              "eval.num_samples=10", "checkpoint.every=0", "engine.jvp_smoke_test=false"]
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}; {args.config}, "
          f"global batch {args.batch}, {args.steps} steps")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for world, kind in ((1, "single"), (2, "ddp"), (2, "fsdp2"), (2, "deepspeed")):
            run_dir = Path(tmp) / kind
            run_world(world, args.config, [*common, f"run.run_dir={run_dir}", f"engine.kind={kind}"])
            rows.append((kind, world, steps_per_s(run_dir)))
    base = rows[0][2]
    print("| engine | processes | steps/s | step time ÷ single |")
    print("|---|---:|---:|---:|")
    for kind, world, rate in rows:
        print(f"| {kind} | {world} | {rate:.2f} | {base / rate:.2f} |")


if __name__ == "__main__":
    main()

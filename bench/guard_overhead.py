"""The guard's per-step cost: steps/s of the same run with the guard on and off (tiny model, one process).

    .venv/bin/python bench/guard_overhead.py [--config tiny_mf] [--steps 200] [--repeats 3]

The guard reads the step's rank-reduced stats (already on the host for logging), keeps rolling windows, and takes
an in-memory snapshot every ``guard.snapshot_every`` steps; steps/s is read over the second half of each run from
metrics.jsonl, best of ``--repeats`` runs per setting.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
from pathlib import Path

import torch

from engine_step_cost import steps_per_s
from meanflow.jobs.train import Trainer
from meanflow.platform.config import load_config


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--config", default="tiny_mf")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    rates = {}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for enabled in (False, True):
                run_dir = Path(tmp) / f"{enabled}-{repeat}"
                cfg = load_config(args.config, [f"run.run_dir={run_dir}", f"run.steps={args.steps}",
                                                f"run.log_every={args.steps // 2}", "eval.num_samples=10",
                                                "engine.jvp_smoke_test=false", f"guard.enabled={enabled}"])
                Trainer(cfg, stdout=open(os.devnull, "w")).run()
                rates[enabled] = max(rates.get(enabled, 0.0), steps_per_s(run_dir))
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; {args.config}, {args.steps} steps, best of {args.repeats}")
    print("| guard | steps/s | step time ÷ without |")
    print("|---|---:|---:|")
    for enabled in (False, True):
        print(f"| {'on' if enabled else 'off'} | {rates[enabled]:.2f} | {rates[False] / rates[enabled]:.3f} |")


if __name__ == "__main__":
    main()

"""The issue-8 benchmarks still run (one short pass each; their figures are in bench/RESULTS.md, not asserted)."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(240)

BENCH = Path(__file__).resolve().parents[1] / "bench"


def run_bench(script: str, *args: str) -> list[list[str]]:
    out = subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True, timeout=220)
    assert out.returncode == 0, out.stderr[-3000:]
    return [line.split() for line in out.stdout.splitlines() if line and not line.startswith("#")]


def test_step_cost_prints_finite_rows_for_each_variant():
    rows = run_bench("step_cost.py", "--steps", "1", "--warmup", "1", "--rounds", "1",
                     "--objectives", "fm,mf,mf+naive,mf+ckpt", "data.global_batch=8")
    table = {r[0]: r for r in rows if r[0] in ("fm", "mf", "mf+naive", "mf+ckpt")}
    assert set(table) == {"fm", "mf", "mf+naive", "mf+ckpt"}
    for row in table.values():   # ms, ÷ fm, floor F, floor ms, ÷ floor, saved MB, (peak MB: '-' on CPU), TFLOP/s
        assert all(math.isfinite(float(v)) for v in [*row[1:7], row[8]]), row
    assert float(table["mf+ckpt"][6]) < float(table["mf"][6])      # kept activations: checkpointing keeps less


def test_scaling_estimate_covers_8_64_256_gpus_for_each_engine():
    rows = run_bench("scaling_estimate.py", "--size", "B")
    fm = [" ".join(r) for r in rows if r[0] == "fm"]
    for gpus in ("8", "64", "256"):
        for engine in ("ddp", "fsdp2 full", "fsdp2 grad_op"):
            assert any(line.startswith(f"fm {gpus} ") and f" {engine} " in line for line in fm), (gpus, engine)

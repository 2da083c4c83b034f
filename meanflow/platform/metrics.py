"""Metrics sink and progress line.

Metrics are JSON lines (one record per ``log_every`` steps, plus events) a person can load and plot; the progress
line shows step, loss, jvp_norm, steps/s and ETA.
"""

from __future__ import annotations

import json
import math
import sys
import time
from typing import Any

import fsspec
import torch

from .storage import filesystem


def to_jsonable(stats: dict[str, Any]) -> dict[str, Any]:
    return {k: (v.item() if isinstance(v, torch.Tensor) else v) for k, v in stats.items()}


class MetricsSink:
    """Appends JSON records to ``<run_dir>/metrics.jsonl``."""

    def __init__(self, url: str):
        self.url = url
        fs, path = filesystem(url)
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)

    def write(self, record: dict[str, Any]) -> None:
        with fsspec.open(self.url, "a") as f:
            f.write(json.dumps(to_jsonable(record)) + "\n")


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class ProgressLine:
    """Prints ``step 100/3000 | loss 0.41 | mse 12.3 | jvp_norm 2.3 | 41.2 steps/s | ETA 1m10s`` lines (log-file
    friendly). The rate counts attempted steps (a rollback moves the step back, never the work done), and the ETA
    divides the steps still to go by it."""

    KEYS = ("loss", "mse", "jvp_norm", "grad_norm")

    def __init__(self, total_steps: int, start_attempt: int = 0, stream=sys.stdout):
        self.total, self.stream = total_steps, stream
        self.last_time, self.last_attempt = time.perf_counter(), start_attempt

    def update(self, step: int, attempt: int, stats: dict[str, Any], extra: str = "") -> float:
        now = time.perf_counter()
        rate = (attempt - self.last_attempt) / max(now - self.last_time, 1e-9)
        self.last_time, self.last_attempt = now, attempt
        values = to_jsonable(stats)
        parts = [f"step {step}/{self.total}"]
        parts += [f"{k} {values[k]:.4g}" for k in self.KEYS if k in values]
        parts += [f"{rate:.1f} steps/s", f"ETA {format_duration((self.total - step) / rate if rate else math.inf)}"]
        if extra:
            parts.append(extra)
        if self.stream is not None:   # ranks other than 0 keep time but print nothing
            print(" | ".join(parts), file=self.stream, flush=True)
        return rate

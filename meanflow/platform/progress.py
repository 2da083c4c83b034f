"""Shows how far training has got: a tqdm bar on an interactive terminal, plain log lines anywhere else."""

from __future__ import annotations

import math
import sys
import time
from typing import Any

from tqdm import tqdm


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class TrainingProgress:
    """Training progress for rank 0: step of total, the latest ``keys`` stats (in that order), steps/s, ETA, and
    the guard's non-zero ``counts`` (by action, ``{"skip": 2}`` shows as ``skips 2``).

    On an interactive terminal a tqdm bar follows every attempt (``tick``) and ``update`` prints nothing. Anywhere
    else (a SLURM log, a pipe) ``tick`` does nothing and ``update`` prints one line per call::

        step 100/3000 | mse 12.3 | jvp_norm 2.3 | grad_norm 0.41 | 41.2 steps/s | ETA 1m10s | skips 2

    ``stream=None`` (ranks other than 0) prints nothing. ``update`` always returns the rate: attempts since the
    previous ``update`` per second (a rollback moves the step back, never the work done); the line's ETA divides
    the steps still to go by it."""

    def __init__(self, total_steps: int, start_step: int, start_attempt: int = 0, stream=sys.stdout,
                 keys: tuple[str, ...] = ("mse", "jvp_norm", "grad_norm"), interactive: bool | None = None):
        if interactive is None:
            isatty = getattr(stream, "isatty", None)
            interactive = callable(isatty) and isatty()
        self.total, self.stream, self.keys = total_steps, stream, keys
        self.last_time, self.last_attempt = time.perf_counter(), start_attempt
        self.interactive = bool(interactive) and stream is not None
        self.latest: list[str] = []   # the last attempt's stats, kept on the bar through skips and rollbacks
        self.bar = None
        if self.interactive:
            # rate_noinv_fmt: steps/s even below one step per second (tqdm would switch to s/step)
            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", file=stream, dynamic_ncols=True,
                            bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} "
                                       "[{elapsed}<{remaining}, {rate_noinv_fmt}{postfix}]")

    def tick(self, step: int, stats: dict[str, Any] | None, counts: dict[str, int]) -> None:
        """After every optimizer attempt; ``stats`` is None when the step was skipped or rolled back."""
        bar = self.bar
        if bar is None:
            return
        if stats is not None:
            self.latest = self._stats(stats, "=")
        bar.set_postfix_str(", ".join(self.latest + _counts(counts, "=")), refresh=False)
        if step >= bar.n:
            bar.update(step - bar.n)   # tqdm throttles the redraw and keeps its own smoothed rate and ETA
        else:   # a rollback: move the bar back by hand, redrawn no more often than tqdm would
            bar.n = bar.last_print_n = step
            now = time.time()   # tqdm's own clock for last_print_t
            if now - bar.last_print_t >= bar.mininterval:
                bar.refresh()
                bar.last_print_t = now

    def update(self, step: int, attempt: int, stats: dict[str, Any], counts: dict[str, int]) -> float:
        """At each ``log_every`` step (and the last): the rate, and the line when not interactive."""
        now = time.perf_counter()
        rate = (attempt - self.last_attempt) / max(now - self.last_time, 1e-9)
        self.last_time, self.last_attempt = now, attempt
        if self.stream is not None and not self.interactive:
            eta = format_duration((self.total - step) / rate if rate > 0 else math.inf)
            parts = [f"step {step}/{self.total}", *self._stats(stats, " "), f"{rate:.1f} steps/s", f"ETA {eta}"]
            if any(counts.values()):
                parts.append(", ".join(_counts(counts, " ")))
            print(" | ".join(parts), file=self.stream, flush=True)
        return rate

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def _stats(self, stats: dict[str, Any], sep: str) -> list[str]:
        return [f"{k}{sep}{float(stats[k]):.4g}" for k in self.keys if k in stats]


def _counts(counts: dict[str, int], sep: str) -> list[str]:
    return [f"{action}s{sep}{n}" for action, n in counts.items() if n]

"""The guard's detectors: decide, from one step's (already rank-reduced) stats, whether to apply, skip, roll back or
fail. Pure logic, no tensors or collectives: every rank sees the same reduced values and so decides the same.

Detectors (on the stats an objective reports; there is no ``jvp_norm`` for ``fm``):
- non-finite: any of ``loss``, ``grad_norm``, ``jvp_norm`` is NaN/Inf;
- spike: after ``warmup`` healthy values, a z-score above ``z_threshold`` against the last ``window`` healthy
  values (for the norms, of their logarithms: norms vary multiplicatively, and on a linear scale a quiet window's
  small spread made the 5× regime change at the end of LR warm-up score 6.5σ; in log space it scores 3.4σ
  while a 100× spike still scores ~9σ), or, after ``ratio_warmup`` healthy values, a value above ``ratio`` × the maximum of the healthy values
  older than the window (a slow ramp widens the window's own spread and escapes the z-score; the early phase of
  training, where norms grow by orders of magnitude from a zero-initialised output, is exempt).
Responses, in tiers: a spike skips the step; ``max_skips`` skips within ``skip_window`` steps, or any non-finite
value, roll back; ``max_rollbacks`` rollbacks within ``rollback_window`` steps fail the run.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

WATCHED = ("loss", "grad_norm", "jvp_norm")
LOG_SCALE = ("grad_norm", "jvp_norm")   # non-negative norms, z-scored as logarithms
PHASE = "branch"                         # an objective's regime (alphaflow); a change restarts the windows


@dataclass
class Decision:
    action: str                          # apply | skip | rollback | fail
    detector: str = ""                   # nonfinite:<stat> | zscore:<stat> | ratio:<stat> | repeated_skips | ...
    values: dict[str, float] = field(default_factory=dict)

    def describe(self, step: int) -> str:
        shown = ", ".join(f"{k} {v:.4g}" for k, v in self.values.items())
        return f"step {step}: {self.action} ({self.detector}; {shown})"


class RollingStat:
    """Window of healthy values of one stat, and the maximum of the values older than the window. The ratio test
    compares with that lagged maximum: an all-time maximum rises along with a slow ramp and never fires, while a
    value ``ratio`` × above everything seen a window ago is a ramp that grew too far."""

    def __init__(self, window: int, log_scale: bool = False):
        self.values: deque[float] = deque(maxlen=window)
        self.count, self.max = 0, -math.inf
        self.log_scale = log_scale

    def _scale(self, value: float) -> float:
        return math.log(max(value, 1e-30)) if self.log_scale else value

    def add(self, value: float) -> None:
        if len(self.values) == self.values.maxlen:
            self.max = max(self.max, self.values[0])   # the value leaving the window
        self.values.append(value)
        self.count += 1

    def zscore(self, value: float) -> float:
        scaled = [self._scale(v) for v in self.values]
        n = len(scaled)
        mean = sum(scaled) / n
        std = math.sqrt(sum((v - mean) ** 2 for v in scaled) / max(n - 1, 1))
        return (self._scale(value) - mean) / max(std, 1e-12 * max(abs(mean), 1.0))


class Guard:
    """``cfg``: the guard section. With ``enabled: false`` every step applies (and nothing is watched)."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.stats = self._fresh_windows()
        self.skip_steps: deque[int] = deque()
        self.rollback_steps: deque[int] = deque()
        self.counts = {"skip": 0, "rollback": 0}
        self.phase: float | None = None

    def _enter_phase(self, stats: dict) -> None:
        """An objective that switches regime (α-Flow's branch: trajectory FM → interval → MeanFlow) reports
        ``branch``; its loss and norms jump by design there, so the windows start again instead of reading the
        switch as a spike."""
        phase = float(stats[PHASE]) if PHASE in stats else None
        if phase != self.phase:
            if self.phase is not None:
                self.stats = self._fresh_windows()
            self.phase = phase

    def _fresh_windows(self) -> dict[str, RollingStat]:
        return {name: RollingStat(self.cfg.window, log_scale=name in LOG_SCALE) for name in WATCHED}

    def _spike(self, values: dict[str, float]) -> Decision | None:
        for name, value in values.items():
            history = self.stats[name]
            if history.count < self.cfg.warmup:
                continue
            if self.cfg.z_threshold and history.zscore(value) > self.cfg.z_threshold:
                return Decision("skip", f"zscore:{name}", values)
            if (self.cfg.ratio and history.count >= self.cfg.ratio_warmup and history.max > 0
                    and value > self.cfg.ratio * history.max):
                return Decision("skip", f"ratio:{name}", values)
        return None

    def decide(self, step: int, stats: dict[str, float]) -> Decision:
        values = {k: float(stats[k]) for k in WATCHED if k in stats}
        if not self.cfg.enabled:
            return Decision("apply", values=values)
        self._enter_phase(stats)
        bad = [k for k, v in values.items() if not math.isfinite(v)]
        decision = Decision("rollback", f"nonfinite:{bad[0]}", values) if bad else self._spike(values)
        if decision is None:
            for name, value in values.items():
                self.stats[name].add(value)
            return Decision("apply", values=values)
        if decision.action == "skip":
            self.skip_steps.append(step)
            while self.skip_steps and self.skip_steps[0] <= step - self.cfg.skip_window:
                self.skip_steps.popleft()
            if len(self.skip_steps) >= self.cfg.max_skips:
                decision = Decision("rollback", f"repeated_skips({len(self.skip_steps)} in "
                                                f"{self.cfg.skip_window} steps, last {decision.detector})", values)
        if decision.action == "rollback":
            self.skip_steps.clear()
            self.rollback_steps.append(step)
            while self.rollback_steps and self.rollback_steps[0] <= step - self.cfg.rollback_window:
                self.rollback_steps.popleft()
            if len(self.rollback_steps) > self.cfg.max_rollbacks:
                return Decision("fail", f"{decision.detector}, after {self.cfg.max_rollbacks} rollbacks in "
                                        f"{self.cfg.rollback_window} steps", values)
        self.counts[decision.action] += 1
        return decision

    def state_dict(self) -> dict:
        return {"stats": {k: {"values": list(s.values), "count": s.count, "max": s.max}
                          for k, s in self.stats.items()},
                "skip_steps": list(self.skip_steps), "rollback_steps": list(self.rollback_steps),
                "counts": dict(self.counts), "phase": self.phase}

    def load_state_dict(self, state: dict) -> None:
        for k, saved in state["stats"].items():
            stat = self.stats[k]
            stat.values.clear()
            stat.values.extend(saved["values"])
            stat.count, stat.max = saved["count"], saved["max"]
        self.skip_steps = deque(state["skip_steps"])
        self.rollback_steps = deque(state["rollback_steps"])
        self.counts = dict(state["counts"])
        self.phase = state.get("phase")   # checkpoints written before phases were tracked have none


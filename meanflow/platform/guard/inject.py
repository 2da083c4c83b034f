"""Fault injection for the guard's tests and drills (``guard.inject``; refused unless ``guard.allow_inject``).

The loss of chosen training attempts is multiplied by a factor: NaN (an overflowing JVP makes the gradients and
every stat NaN), a spike, or a growing ramp. Attempts count repeats after a rollback, so a drill replays alike.
"""

from __future__ import annotations

import math

import torch


class FaultInjector:
    def __init__(self, inject_cfg):
        self.cfg = inject_cfg

    def factor(self, attempt: int) -> float:
        """The loss multiplier at this attempt (1.0 outside the injected window)."""
        cfg = self.cfg
        if not cfg.start <= attempt < cfg.start + cfg.count:
            return 1.0
        if cfg.kind == "jvp_nan":
            return math.nan
        if cfg.kind == "loss_spike":
            return cfg.factor
        return (1.0 + cfg.rate) ** (attempt - cfg.start + 1)   # grad_ramp

    def apply_fault(self, loss: torch.Tensor, stats: dict[str, torch.Tensor],
                    attempt: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss and the stats the guard watches (loss, jvp_norm), scaled as the fault would scale them."""
        factor = self.factor(attempt)
        if factor == 1.0:
            return loss, stats
        scaled = {k: stats[k] * factor for k in ("loss", "jvp_norm") if k in stats}
        return loss * factor, {**stats, **scaled}


def build_fault_injector(guard_cfg) -> FaultInjector | None:
    return FaultInjector(guard_cfg.inject) if guard_cfg.inject.kind != "none" else None

"""Non-expansivity regulariser — Stable MeanFlow (docs/objectives.md, stability), composable with any base objective.

One-step map ``φ(z) = z − (t − r)·u_θ(z, r, t)``; perturbation ``Δz = δ·ξ/‖ξ‖``;
``ℓ_stab = max(0, ‖Δz − (t − r)·Δu‖ − ‖Δz‖)²``; ``L = L_base + μ(step)·ℓ_stab``. Zero wherever φ does not expand.
The base objective's u(z) is reused, so the term costs one more forward + backward while μ > 0.

δ: the paper's numbers use an absolute δ = 0.01 (``relative_delta: false``). With it the penalty is ~1e-4 ×
(ratio − 1)², tiny next to an adaptively weighted base loss of ~1; ``relative_delta: true`` reads δ as a fraction
of ‖z‖ per sample instead.
"""

from __future__ import annotations

import math

import torch

from .base import Objective, expand_like, masked_mean, model_u, per_sample_norm


class NonExpansivity(Objective):
    def __init__(self, base: Objective, cfg):
        self.base, self.cfg = base, cfg
        self.uses_jvp, self.needs_marginal_velocity = base.uses_jvp, base.needs_marginal_velocity

    def mu_at(self, step: int) -> float:
        """μ(step): constant, or decayed linearly / by cosine to 0 at ``active_until_step`` (0 after it)."""
        c = self.cfg
        if c.active_until_step is None:
            return c.mu
        if step >= c.active_until_step:
            return 0.0
        frac = step / c.active_until_step
        if c.decay == "none":
            return c.mu
        if c.decay == "linear":
            return c.mu * (1 - frac)
        if c.decay == "cosine":
            return c.mu * 0.5 * (1 + math.cos(math.pi * frac))
        raise ValueError(f"objective.stability.decay: unknown {c.decay!r}; known: none, linear, cosine")

    def compute(self, model, batch, step, ctx):
        out = self.base.compute(model, batch, step, ctx)
        mu = self.mu_at(step)
        out.stats["stab_mu"] = torch.tensor(float(mu), device=out.loss.device)
        if mu == 0 and not self.cfg.measure_when_off:
            return out
        z, u = out.z, out.u
        xi = ctx.random(step, z.device).normal("stability_xi", *z.shape[1:], dtype=z.dtype)
        scale = self.cfg.delta * (per_sample_norm(z.detach()) if self.cfg.relative_delta else 1.0)
        dz = expand_like(scale / per_sample_norm(xi), xi) * xi
        with torch.set_grad_enabled(torch.is_grad_enabled() and mu > 0):   # off: a measurement only
            u_moved = model_u(model(z + dz, t=out.t, r=out.r, **out.model_kwargs))
        h = expand_like(out.t - out.r, z)
        moved = per_sample_norm(dz - h * (u_moved - u))       # ‖φ(z + Δz) − φ(z)‖
        base_norm = per_sample_norm(dz)
        penalty = torch.relu(moved - base_norm).pow(2).mean()
        ratio = (moved / base_norm).detach()
        active = out.t != out.r                                # at r = t, φ is the identity: ratio 1
        if mu:
            out.loss = out.loss + mu * penalty
        out.stats.update(loss=out.loss.detach(), stab=penalty.detach(),
                         expansion_mean=masked_mean(ratio, active),
                         expansion_max=torch.where(active, ratio, torch.zeros_like(ratio)).max())
        return out

"""MeanFlow (``mf``) and the objectives that change one piece of it.

MF (docs/objectives.md, mf): ``(u, du/dt) = jvp(u_θ(z, r, t), dz = ṽ, dt = 1, dr = 0)``,
``L = sg(w)·‖u − sg(ṽ − (t − r)·du/dt)‖²``.

Two seams let the variants stay one class each, not copies:
- ``jvp_grad_weight(step)`` — λ of SG_λ (Modular MeanFlow); 0 for MF, where the JVP term is fully stopped.
- ``tangent(...)`` — the JVP tangent for dz; ṽ for MF, the control-variate mix for ``tangent_beta``.
"""

from __future__ import annotations

import math

import torch

from .base import (Objective, ObjectiveOutput, adaptive_weighted_loss, expand_like, masked_mean, model_u,
                   noise_batch, per_sample_norm)
from .guidance import mf_guided_velocity
from .jvp import jvp


class MeanFlow(Objective):
    logs_lambda = False

    def __init__(self, cfg, num_classes: int = 0):
        self.cfg, self.num_classes = cfg, num_classes

    # --- seams --------------------------------------------------------------------------------------------
    def jvp_grad_weight(self, step: int) -> float:
        """λ in SG_λ[a] = λ·a + (1 − λ)·sg(a); MF is λ = 0."""
        return 0.0

    def tangent(self, model, z, t, r, v_tilde, y, step, ctx, stats) -> torch.Tensor:
        return v_tilde

    # --- the objective -------------------------------------------------------------------------------------
    def compute(self, model, batch, step, ctx):
        nb = noise_batch(batch, step, ctx, self.cfg, self.num_classes)
        z, t, r, y_model = nb.z, nb.t, nb.r, nb.y_model
        h_x = expand_like(t - r, z)
        v_tilde = mf_guided_velocity(model, z, t, nb.v_c, nb.y, nb.dropped, self.cfg.guidance, self.num_classes)

        stats: dict[str, torch.Tensor] = {}
        dz = self.tangent(model, z, t, r, v_tilde, y_model, step, ctx, stats)
        lam = self.jvp_grad_weight(step)
        dt, dr = self.cfg.time_tangents
        u, dudt = jvp(lambda z, t, r, y: model_u(model(z, t=t, r=r, y=y)),
                      primals=dict(z=z, t=t, r=r, y=y_model), tangents=dict(z=dz, t=dt, r=dr),
                      rows=None if self.cfg.jvp_all_rows else t != r, differentiable=lam != 0)

        # SG_λ[du/dt]; at λ = 0 the JVP leaves the graph entirely (MF's stop-gradient on the target).
        jvp_term = dudt.detach() if lam == 0 else lam * dudt + (1 - lam) * dudt.detach()
        delta = u + h_x * jvp_term - v_tilde
        loss, sq = adaptive_weighted_loss(delta, self.cfg.weight_p, self.cfg.weight_c)

        has_jvp = t != r
        stats.update(loss=loss.detach(), mse=sq.mean().detach(), u_norm=per_sample_norm(u).mean().detach(),
                     jvp_norm=masked_mean(per_sample_norm(dudt.detach()), has_jvp))
        if self.logs_lambda:
            stats["lambda"] = torch.tensor(float(lam), device=loss.device)
        return ObjectiveOutput(loss, stats, z=z, t=t, r=r, u=u, model_kwargs={"y": y_model}, v_c=nb.v_c)


class SGLambda(MeanFlow):
    """Modular MeanFlow: λ(step) from 0 to 1 by a linear or cosine curriculum (docs/objectives.md, sg_lambda)."""

    logs_lambda = True

    def jvp_grad_weight(self, step: int) -> float:
        s = self.cfg.sg_lambda
        frac = 1.0 if s.warmup_steps <= 0 else min(1.0, step / s.warmup_steps)
        if s.shape == "cosine":
            frac = 0.5 - 0.5 * math.cos(math.pi * frac)
        elif s.shape != "linear":
            raise ValueError(f"objective.sg_lambda.shape: unknown {s.shape!r}; known: linear, cosine")
        return s.start + (s.end - s.start) * frac

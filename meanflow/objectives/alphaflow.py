"""α-Flow (``alphaflow``, docs/objectives.md; arXiv 2510.20771): a curriculum from trajectory flow matching (α = 1) to MeanFlow (α = 0).

Rows: ``share_fm`` of the global batch (spread over it) have r = t and regress ``u_θ(z, t, t)`` on ṽ (MF's training-CFG
velocity); the others draw r < t from ``objective.time``. On those, for 0 < α ≤ 1,

    s = α·r + (1 − α)·t,   z_s = z_t − α·(t − r)·ṽ,   u_tgt = sg(α·ṽ + (1 − α)·u_θ(z_s, r, s)),

the second term from the online weights under no_grad (not taken at α = 1), clipped elementwise to ±clamp_target
when that is set. Expanding u_θ(z_s, r, s) = u − α·(t − r)·du/dt + O(α²) gives (u_tgt − u)/α → ṽ − (t − r)·du/dt − u,
MF's target error: at α = 0 these rows take MF's exact path, ``jvp(u_θ, dz = ṽ, dt = 1, dr = 0)``, the only phase
with a JVP. Loss = batch mean of ``sg(a/(‖Δ‖² + c))·‖Δ‖²`` with a = α on the rows with 0 < α < 1 (so the gradient
tends to MF's as α → 0) and a = 1 elsewhere; c = eps·D (D elements per sample) maps the official per-element eps
onto our sum-over-elements loss. ``objective.weight_p``/``weight_c`` and ``time.share_r_eq_t`` are not read.

Schedule: α = 1 − σ(γ·p), p = (step − (s0 + s1)/2)/(s1 − s0) on [s0, s1], 1 before s0 and 0 after s1, snapped to
0 below 0.005 and to 1 above 0.995.
"""

from __future__ import annotations

import math

import torch

from .base import (Objective, ObjectiveOutput, expand_like, masked_mean, model_u, noise_batch, per_sample_norm,
                   per_sample_sq, with_r_eq_t_share)
from .guidance import mf_guided_velocity
from .jvp import jvp

SNAP = 0.005   # α below snaps to 0 (MF), above 1 − SNAP to 1 (trajectory flow matching), as the official code

BRANCH_TRAJECTORY_FM, BRANCH_INTERVAL, BRANCH_MEANFLOW = 0, 1, 2   # the `branch` stat


def alpha_schedule(step: int, start: int, end: int, gamma: float) -> float:
    """α(step) of the sigmoid curriculum; ``end <= start`` is a step from 1 to 0 at ``start``."""
    if step < start:
        return 1.0
    if step >= end:
        return 0.0
    p = (step - (start + end) / 2) / (end - start)
    alpha = 1.0 - 1.0 / (1.0 + math.exp(-gamma * p))
    return 0.0 if alpha < SNAP else 1.0 if alpha > 1 - SNAP else alpha


class AlphaFlow(Objective):
    uses_jvp = True   # the α = 0 phase takes MF's JVP (the trainer's startup check must cover it)

    def __init__(self, cfg, num_classes: int = 0):
        self.cfg, self.num_classes = cfg, num_classes
        # The shared (t, r) sampler, its r = t share being share_fm: a fixed count spread over the global batch.
        self.draw_cfg = with_r_eq_t_share(cfg, cfg.alphaflow.share_fm)

    def alpha(self, step: int) -> float:
        a = self.cfg.alphaflow
        return alpha_schedule(step, a.start_step, a.end_step, a.gamma)

    def prediction_and_target(self, model, z, t, r, y, v_tilde, alpha: float):
        """``(u_θ(z, r, t), sg(u_tgt), du/dt or None)``; ``du/dt`` (along dz = ṽ, dt = 1, dr = 0) only at α = 0."""
        fn = lambda z, t, r, y: model_u(model(z, t=t, r=r, y=y))   # noqa: E731
        interval = t != r
        if alpha == 0:
            u, dudt = jvp(fn, primals=dict(z=z, t=t, r=r, y=y), tangents=dict(z=v_tilde, t=1.0, r=0.0),
                          rows=None if self.cfg.jvp_all_rows else interval, differentiable=False)
            return u, v_tilde - expand_like(t - r, z) * dudt, dudt
        u = fn(z, t, r, y)
        with torch.no_grad():
            target = alpha * v_tilde
            if alpha < 1:
                # Only the rows with r < t, and always the call (even on 0 rows): FSDP2 gathers parameters in
                # every forward, so every rank must make the same calls whatever its (t, r) draws.
                idx = interval.nonzero().squeeze(1)
                t_i, r_i, v_i = t[idx], r[idx], v_tilde[idx]
                s = alpha * r_i + (1 - alpha) * t_i
                z_s = z[idx] - expand_like(alpha * (t_i - r_i), v_i) * v_i
                u_mid = fn(z_s, s, r_i, None if y is None else y[idx])
                target = target.index_add(0, idx, (1 - alpha) * u_mid.to(target.dtype))
            clamp = self.cfg.alphaflow.clamp_target
            if clamp:
                target = target.clamp(-clamp, clamp)
            target = torch.where(expand_like(interval, z), target, v_tilde)   # r = t rows: plain flow matching
        return u, target, None

    def compute(self, model, batch, step, ctx):
        alpha = self.alpha(step)
        nb = noise_batch(batch, step, ctx, self.draw_cfg, self.num_classes)
        z, t, r, y_model = nb.z, nb.t, nb.r, nb.y_model
        v_tilde = mf_guided_velocity(model, z, t, nb.v_c, nb.y, nb.dropped, self.cfg.guidance, self.num_classes)
        u, target, dudt = self.prediction_and_target(model, z, t, r, y_model, v_tilde, alpha)

        interval = t != r
        sq = per_sample_sq(u - target)
        c = self.cfg.alphaflow.eps * z[0].numel()
        a = torch.where(interval, alpha, 1.0) if 0 < alpha < 1 else torch.ones_like(sq)
        loss = (a / (sq.detach() + c) * sq).mean()

        branch = BRANCH_MEANFLOW if alpha == 0 else BRANCH_TRAJECTORY_FM if alpha == 1 else BRANCH_INTERVAL
        stats = dict(loss=loss.detach(), mse=sq.mean().detach(), u_norm=per_sample_norm(u).mean().detach(),
                     alpha=torch.tensor(float(alpha), device=loss.device),
                     branch=torch.tensor(float(branch), device=loss.device))
        if dudt is not None:
            # Only where a JVP was taken (as every objective reports it); the guard restarts its
            # windows when `branch` changes, so the new statistic starts a window of its own.
            stats["jvp_norm"] = masked_mean(per_sample_norm(dudt), interval)
        return ObjectiveOutput(loss, stats, z=z, t=t, r=r, u=u, model_kwargs={"y": y_model}, v_c=nb.v_c)

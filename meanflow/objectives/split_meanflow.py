"""SplitMeanFlow (``split_mf``, docs/objectives.md; arXiv 2507.16884): average velocities by interval splitting, no JVP.

For r ≤ s ≤ t, ``(t − r)·u(z_t, r, t) = (s − r)·u(z_s, r, s) + (t − s)·u(z_t, s, t)``. With ``s = (1 − λ)·t + λ·r``
(so t − s = λ·(t − r), s − r = (1 − λ)·(t − r)) this reads ``u(z_t, r, t) = (1 − λ)·u(z_s, r, s) + λ·u(z_t, s, t)``.
- Interval rows (r < t), λ ~ U(0, 1) per sample: ``u2 = u_θ(z_t, s, t)``, ``z_s = z_t − (t − s)·u2``,
  ``u1 = u_θ(z_s, r, s)`` (online weights, no grad), ``u_tgt = sg((1 − λ)·u1 + λ·u2)``.
- Boundary rows (``share_boundary`` of the global batch spread over it, r = t): ``u_tgt = ṽ``, MF's training-CFG
  velocity built on v_c (``v_source: conditional``) or on a frozen teacher's velocity (``v_source: teacher``).
- ``L = mean(sg(w)·‖u_θ(z_t, r, t) − u_tgt‖²)``, MF's adaptive weight on every row (as MF weighs its r = t rows).
  The interval targets carry no v_c noise, so p > 0 weighs them far above the boundary rows: on the 2-D toys that
  collapses and then diverges, and only p = 0 trains (configs/toy2d_split_mf.yaml).
"""

from __future__ import annotations

import torch

from .base import (Objective, ObjectiveOutput, adaptive_weighted_loss, expand_like, model_u, noise_batch,
                   per_sample_norm, with_r_eq_t_share)
from .guidance import mf_guided_velocity

V_SOURCES = ("conditional", "teacher")


def _take(x, rows):
    return None if x is None else x[rows]


class SplitMeanFlow(Objective):
    uses_jvp = False

    def __init__(self, cfg, num_classes: int = 0):
        self.cfg, self.num_classes = cfg, num_classes
        self.split = cfg.split_mf
        if self.split.v_source not in V_SOURCES:
            raise ValueError(f"objective.split_mf.v_source: unknown {self.split.v_source!r}; known: "
                             f"{', '.join(V_SOURCES)}")
        # The time sampler's r = t share is the boundary share: (t, r) drawn as every objective draws them.
        self.noise_cfg = with_r_eq_t_share(cfg, self.split.share_boundary)

    def split_target(self, model, z, t, r, lam, y) -> torch.Tensor:
        """``(1 − λ)·u_θ(z_s, r, s) + λ·u_θ(z_t, s, t)`` with ``z_s`` one step of ``u_θ(z_t, s, t)``, no grad."""
        s = (1 - lam) * t + lam * r
        with torch.no_grad():
            u2 = model_u(model(z, t=t, r=s, y=y))
            z_s = z - expand_like(t - s, z) * u2
            u1 = model_u(model(z_s, t=s, r=r, y=y))
        lam_x = expand_like(lam, z)
        return (1 - lam_x) * u1 + lam_x * u2

    def boundary_velocity(self, model, z, t, v_c, y, y_model, dropped, teacher) -> torch.Tensor:
        """ṽ: MF's training CFG around v_c, or around the teacher's velocity (no grad) for ``v_source: teacher``."""
        if self.split.v_source == "teacher":
            if teacher is None:
                raise ValueError("objective.split_mf.v_source=teacher needs a teacher model, but the objective context "
                                 "has none (ctx.teacher is None; set objective.split_mf.teacher)")
            with torch.no_grad():
                v_c = model_u(teacher(z, t=t, r=t, y=y_model))
        return mf_guided_velocity(model, z, t, v_c, y, dropped, self.cfg.guidance, self.num_classes)

    def compute(self, model, batch, step, ctx):
        nb = noise_batch(batch, step, ctx, self.noise_cfg, self.num_classes)
        z, t, r, y_model = nb.z, nb.t, nb.r, nb.y_model
        is_boundary = nb.rand.spread_share(self.split.share_boundary)    # the sampler's r = t rows
        lam = nb.rand.uniform("split_lambda", dtype=t.dtype)
        b_rows, i_rows = is_boundary.nonzero().squeeze(1), (~is_boundary).nonzero().squeeze(1)

        u = model_u(model(z, t=t, r=r, y=y_model))
        # Both parts always, even with no rows: sharded engines (FSDP2) gather parameters in every forward, so every
        # rank makes the same calls whatever its rows.
        v_tilde = self.boundary_velocity(model, z[b_rows], t[b_rows], nb.v_c[b_rows], _take(nb.y, b_rows),
                                         _take(y_model, b_rows), _take(nb.dropped, b_rows), ctx.teacher)
        u_split = self.split_target(model, z[i_rows], t[i_rows], r[i_rows], lam[i_rows], _take(y_model, i_rows))
        target = torch.zeros_like(z).index_copy(0, b_rows, v_tilde.to(z.dtype))
        target = target.index_copy(0, i_rows, u_split.to(z.dtype))

        loss, sq = adaptive_weighted_loss(u - target.detach(), self.cfg.weight_p, self.cfg.weight_c)
        stats = {"loss": loss.detach(), "mse": sq.mean().detach(), "u_norm": per_sample_norm(u).mean().detach()}
        return ObjectiveOutput(loss, stats, z=z, t=t, r=r, u=u, model_kwargs={"y": y_model}, v_c=nb.v_c)

"""Control-variate tangent (``tangent_beta``, docs/objectives.md; arXiv 2605.09235).

The conditional velocity is both the regression target (unbiased) and the JVP tangent, where its noise is
amplified by the Jacobian. Use the tangent ``(1 − β)·ṽ + β·v̂`` with a deterministic proxy v̂ (EMA model's
u(z, t, t), the boundary output, or the v-head) and keep the target. β = 0 is MF; β = 1 is the iMF corner.
Every ``beta_star_every`` steps the β* diagnostic is logged (exact where the trainer provides the marginal
velocity — the 2-D toys — else the no-bias upper bound). Optional flow-matching anchor
``λ_fm·‖u_θ(z, t − δ, t) − v_c‖²``, δ ~ U[0, anchor_delta].
"""

from __future__ import annotations

import torch

from .base import model_u, per_sample_sq
from .beta_star import beta_star_exact, beta_star_upper_bound, jacobian_scale
from .meanflow import MeanFlow


class TangentBeta(MeanFlow):
    needs_marginal_velocity = True   # the exact β* diagnostic, where the data knows its marginal velocity

    def proxy_velocity(self, model, z, t, y, ctx) -> torch.Tensor:
        kind = self.cfg.tangent_beta.proxy
        with torch.no_grad():
            if kind == "ema":
                if ctx.ema_model is None:
                    raise ValueError("objective.tangent_beta.proxy: ema needs an EMA model (optim.ema_decay > 0)")
                return model_u(ctx.ema_model(z, t=t, r=t, y=y))
            out = model(z, t=t, r=t, y=y)
            if kind == "boundary":
                return model_u(out)
            if kind == "v_head":
                if not isinstance(out, (tuple, list)):
                    raise ValueError("objective.tangent_beta.proxy: v_head needs model.v_head: true")
                return out[1]
        raise ValueError(f"objective.tangent_beta.proxy: unknown {kind!r}; known: ema, boundary, v_head")

    def tangent(self, model, z, t, r, v_tilde, y, step, ctx, stats):
        beta = self.cfg.tangent_beta.beta
        stats["beta"] = torch.tensor(float(beta), device=z.device)
        every = self.cfg.tangent_beta.beta_star_every
        need_proxy = beta != 0 or (every and step % every == 0)
        if not need_proxy:
            return v_tilde
        v_hat = self.proxy_velocity(model, z, t, y, ctx)
        if every and step % every == 0:
            stats.update(self._beta_star(model, z, t, r, y, v_tilde, v_hat, step, ctx))
        return (1 - beta) * v_tilde + beta * v_hat

    def _beta_star(self, model, z, t, r, y, v_c, v_hat, step, ctx) -> dict[str, torch.Tensor]:
        """β* over the rows with r ≠ t. Taken even when there are none (the JVPs then run on 0 rows): sharded
        engines (FSDP2) gather parameters in every forward, so every rank must make the same calls and report the
        same stats whatever its (t, r) draws; such a rank reports 0, as ``jvp_norm`` does."""
        rows = t != r
        zr, tr, rr = z[rows], t[rows], r[rows]
        yr = None if y is None else y[rows]
        u_of_z = lambda zz: model_u(model(zz, t=tr, r=rr, y=yr))
        h = tr - rr
        out = {"beta_star_bound": beta_star_upper_bound(u_of_z, zr, h, v_c[rows] - v_hat[rows])}
        if ctx.marginal_velocity is not None:
            probe = ctx.random(step, z.device).normal("beta_star_probe", *z.shape[1:], dtype=z.dtype)[rows]
            a = jacobian_scale(u_of_z, zr, h, probe)
            out["beta_star"] = beta_star_exact(a, v_c[rows], v_hat[rows], ctx.marginal_velocity(zr, tr))
        any_row = rows.any()
        return {key: torch.where(any_row, value, torch.zeros_like(value)) for key, value in out.items()}

    def compute(self, model, batch, step, ctx):
        out = super().compute(model, batch, step, ctx)
        weight = self.cfg.tangent_beta.fm_anchor
        if weight:
            delta = ctx.random(step, out.z.device).uniform("fm_anchor_delta") * self.cfg.tangent_beta.anchor_delta
            u = model_u(model(out.z, t=out.t, r=(out.t - delta).clamp(min=0), **out.model_kwargs))
            anchor = per_sample_sq(u - out.v_c).mean()        # the main term's own v_c = e − x
            out.loss = out.loss + weight * anchor
            out.stats.update(loss=out.loss.detach(), fm_anchor=anchor.detach())
        return out

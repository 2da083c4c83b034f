"""Decoupled MeanFlow (``dmf``, docs/objectives.md; arXiv 2510.24474; official code kyungmnlee/dmf ``loss.py``).

Every sample feeds two branches, each with its own noise and times:
- flow matching: r = t, t ~ LN(fm_mu, fm_sigma), target ṽ;
- MeanFlow: t = max, r = min of draws from LN(mf_mu[0], mf_sigma) and LN(mf_mu[1], mf_sigma);
  ``(u, du/dt) = jvp(u_θ, dz = ṽ, dt = 1, dr = 0)``, target ``sg(ṽ − (t − r)·du/dt)``.
Each branch's per-sample loss is ``log(m + c·e^l)``: m the per-sample *mean* squared error, l the model's learned
log-variance l_φ(t, r), c = logvar_scale. Its θ-gradient is ``∇m / (m + c·e^l)``, MF's adaptive weight with p = 1
and a learned constant. ``L = ½(mean ℓ_fm + mean ℓ_mf)``. ṽ is MF's training-CFG velocity, in both branches (as the
official code); the label drop is shared by the branches.
"""

from __future__ import annotations

import torch

from .base import (Objective, ObjectiveOutput, drop_labels, expand_like, masked_mean, per_sample_norm,
                   per_sample_sq)
from .guidance import mf_guided_velocity
from .jvp import jvp


class DecoupledMeanFlow(Objective):
    def __init__(self, cfg, num_classes: int = 0):
        self.cfg, self.num_classes = cfg, num_classes

    def compute(self, model, batch, step, ctx):
        if not getattr(model, "decoupled", False):
            raise ValueError("objective.name=dmf needs model.family=mf_dit with model.conditioning=decoupled "
                             "(a model with a log-variance head)")
        cfg, d = self.cfg, self.cfg.dmf
        x, y = batch["x"], batch.get("y")
        rand = ctx.random(step, x.device)
        y_model, dropped = drop_labels(y, rand, cfg.label_drop, self.num_classes, cfg.guidance.drop_layout)
        time_dtype = torch.promote_types(x.dtype, torch.float32)

        def noised(branch, mu):
            """(z_t, t, r, v_c, ṽ) from this branch's own streams; ``mu``: one logit-normal mean per time drawn
            (t = max, r = min). The sigmoid runs on the global draw: bitwise the same however the batch is split."""
            mu_k = torch.tensor(mu, dtype=time_dtype, device=x.device)
            sigma = getattr(d, f"{branch}_sigma")
            times = rand.normal(f"dmf_{branch}_t", len(mu), dtype=time_dtype,
                                transform=lambda n: torch.sigmoid(mu_k + sigma * n))
            t = times.max(dim=1).values
            e = rand.normal(f"dmf_{branch}_e", *x.shape[1:], dtype=x.dtype)
            z = (1 - expand_like(t, x)) * x + expand_like(t, x) * e
            v_tilde = mf_guided_velocity(model, z, t, e - x, y, dropped, cfg.guidance, self.num_classes)
            return z, t, times.min(dim=1).values, e - x, v_tilde

        # Flow-matching branch: r = t, target ṽ.
        z_fm, t_fm, _, _, v_fm = noised("fm", [d.fm_mu])
        u_fm, l_fm = model(z_fm, t=t_fm, r=t_fm, y=y_model, return_logvar=True)

        # MeanFlow branch: one JVP gives u, l and du/dt; the target stops the gradient.
        z, t, r, v_c, v_tilde = noised("mf", list(d.mf_mu))
        dt, dr = cfg.time_tangents
        (u, l_mf), (dudt, _) = jvp(lambda z, t, r, y: model(z, t=t, r=r, y=y, return_logvar=True),
                                   primals=dict(z=z, t=t, r=r, y=y_model), tangents=dict(z=v_tilde, t=dt, r=dr),
                                   rows=None if cfg.jvp_all_rows else t != r, differentiable=False)
        u_tgt = (v_tilde - expand_like(t - r, z) * dudt).detach()

        sq_fm, sq_mf = per_sample_sq(u_fm - v_fm), per_sample_sq(u - u_tgt)
        elements = x[0].numel()   # m is the per-sample mean over elements, as the official log_lv_loss
        loss_fm = torch.log(sq_fm / elements + d.logvar_scale * l_fm.exp()).mean()
        loss_mf = torch.log(sq_mf / elements + d.logvar_scale * l_mf.exp()).mean()
        loss = 0.5 * (loss_fm + loss_mf)

        stats = dict(loss=loss.detach(), loss_fm=loss_fm.detach(), loss_mf=loss_mf.detach(),
                     mse=0.5 * (sq_fm.mean() + sq_mf.mean()).detach(),
                     u_norm=per_sample_norm(u).mean().detach(),   # the MF branch's (the flow map's) u
                     jvp_norm=masked_mean(per_sample_norm(dudt), t != r),
                     logvar=0.5 * (l_fm.mean() + l_mf.mean()).detach())
        return ObjectiveOutput(loss, stats, z=z, t=t, r=r, u=u, model_kwargs={"y": y_model}, v_c=v_c)

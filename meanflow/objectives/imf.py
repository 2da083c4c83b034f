"""Improved MeanFlow (``imf``, docs/objectives.md; arXiv 2512.02012).

``V_θ = u_θ(z, r, t) + (t − r)·sg(du/dt)`` with tangents dz = v_θ, dt = 1, dr = 0; ``L_u = sg(w)·‖V_θ − v_g‖²``;
with a v-head also ``L_v = sg(w)·‖v_head − v_g‖²``. Guidance Ω = (ω, t_min, t_max) is a model condition drawn per
sample; the guided target ``v_g = v_c + (1 − 1/ω̃)·(v_θ(z,t|y,ω̃) − v_θ(z,t|∅,1))`` has expectation
``ω̃·v(z|y) + (1 − ω̃)·v(z|∅)``.

``tangent``: ``v_head`` (default, needs a model built with a v-head), ``boundary`` (u_θ(z, t, t)), or ``v_c``
(the conditional velocity: with ω ≡ 1 this is exactly MF — the equivalence iMF proves; kept as an ablation).

The conditional no-grad forward uses the *undropped* label and doubles as the tangent on kept-label rows. For rows
whose label was dropped, u is the unconditional model, so its characteristic is v(z|∅): the unconditional forward
is the tangent on those rows (their target is v_c either way).
"""

from __future__ import annotations

import torch

from .base import (Objective, ObjectiveOutput, adaptive_weighted_loss, expand_like, masked_mean, noise_batch,
                   per_sample_norm)
from .jvp import jvp


def sample_guidance(rand, cfg, t, r) -> torch.Tensor:
    """Ω per sample, (B, 3) = [ω, t_min, t_max]. ω has density ∝ ω^−β on [1, 1 + s_max] (β = 1: log-uniform)."""
    u = rand.uniform("imf_omega", dtype=t.dtype)
    top = 1.0 + cfg.s_max
    if cfg.beta_cfg == 1.0:
        omega = top ** u
    else:
        k = 1.0 - cfg.beta_cfg
        omega = (1.0 + u * (top ** k - 1.0)) ** (1.0 / k)
    t_min = rand.uniform("imf_t_min", dtype=t.dtype) * cfg.t_min_high
    t_max = cfg.t_max_low + rand.uniform("imf_t_max", dtype=t.dtype) * (1.0 - cfg.t_max_low)
    boundary = t == r                     # rows with r = t get the full window
    t_min = torch.where(boundary, torch.zeros_like(t_min), t_min)
    t_max = torch.where(boundary, torch.ones_like(t_max), t_max)
    return torch.stack([omega, t_min, t_max], dim=1)


def effective_omega(omega_B3: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """ω̃ = ω inside [t_min, t_max], else 1."""
    omega, t_min, t_max = omega_B3.unbind(1)
    return torch.where((t >= t_min) & (t <= t_max), omega, torch.ones_like(omega))


def guided_target(v_c, v_cond, v_uncond, omega_tilde, dropped) -> torch.Tensor:
    """v_g = v_c + (1 − 1/ω̃)·(v_cond − v_uncond); dropped labels get v_c."""
    v_g = v_c + expand_like(1.0 - 1.0 / omega_tilde, v_c) * (v_cond - v_uncond)
    return v_g if dropped is None else torch.where(expand_like(dropped, v_c), v_c, v_g)


class ImprovedMeanFlow(Objective):
    def __init__(self, cfg, num_classes: int = 0):
        self.cfg, self.num_classes = cfg, num_classes
        if cfg.imf.tangent not in ("v_head", "boundary", "v_c"):
            raise ValueError(f"objective.imf.tangent: unknown {cfg.imf.tangent!r}; known: v_head, boundary, v_c")

    def _velocity(self, out) -> torch.Tensor:
        """v_θ from one forward: the v-head where configured, else the boundary output u(z, t, t)."""
        if self.cfg.imf.tangent == "v_head":
            if not isinstance(out, (tuple, list)):
                raise ValueError("objective.imf.tangent: v_head needs a model built with model.v_head: true")
            return out[1]
        return out[0] if isinstance(out, (tuple, list)) else out

    def uses_unconditional(self, labelled: bool) -> bool:
        """Whether the unconditional forward can weigh anything: ω̃ ≠ 1 needs s_max > 0, a dropped label needs
        label_drop > 0. Decided by the config, not by the rows drawn: sharded engines (FSDP2) gather parameters in
        every forward, so every rank must make the same calls; where a micro-batch has no such row, its weight is
        0 and the target is v_c exactly."""
        return self.cfg.imf.s_max > 0 or (labelled and self.cfg.label_drop > 0)

    def no_grad_velocities(self, model, z, t, y, dropped, omega_tilde):
        """The two no-grad forwards at h = 0: conditional (undropped y, ω̃, window [0, 1]) and unconditional."""
        ones, zeros = torch.ones_like(t), torch.zeros_like(t)
        with torch.no_grad():
            v_cond = self._velocity(model(z, t=t, r=t, y=y, omega=torch.stack([omega_tilde, zeros, ones], 1)))
            v_uncond = v_cond
            if self.uses_unconditional(labelled=y is not None):
                null = None if y is None else torch.full_like(y, self.num_classes)
                v_uncond = self._velocity(model(z, t=t, r=t, y=null, omega=torch.stack([ones, zeros, ones], 1)))
        return v_cond, v_uncond

    def compute(self, model, batch, step, ctx):
        c = self.cfg
        nb = noise_batch(batch, step, ctx, c, self.num_classes)
        z, t, r, v_c, y, y_model, dropped = nb.z, nb.t, nb.r, nb.v_c, nb.y, nb.y_model, nb.dropped
        h_x = expand_like(t - r, z)
        omega = sample_guidance(nb.rand, c.imf, t, r)
        omega_tilde = effective_omega(omega, t)

        v_cond, v_uncond = self.no_grad_velocities(model, z, t, y, dropped, omega_tilde)
        v_g = guided_target(v_c, v_cond, v_uncond, omega_tilde, dropped)
        if c.imf.tangent == "v_c":
            tangent = v_c
        else:
            tangent = v_cond if dropped is None else torch.where(expand_like(dropped, v_c), v_uncond, v_cond)

        out, d_out = jvp(lambda z, t, r, y, omega: model(z, t=t, r=r, y=y, omega=omega),
                         primals=dict(z=z, t=t, r=r, y=y_model, omega=omega),
                         tangents=dict(z=tangent, t=1.0, r=0.0), rows=None if c.jvp_all_rows else t != r,
                         differentiable=False)
        has_v_head = isinstance(out, (tuple, list))
        u, dudt = (out[0], d_out[0]) if has_v_head else (out, d_out)
        V = u + h_x * dudt.detach()
        loss_u, sq = adaptive_weighted_loss(V - v_g, c.weight_p, c.weight_c)
        loss = loss_u
        stats = {"loss_u": loss_u.detach(), "mse": sq.mean().detach(),
                 "u_norm": per_sample_norm(u).mean().detach(),
                 "jvp_norm": masked_mean(per_sample_norm(dudt.detach()), t != r),
                 "omega_mean": omega[:, 0].mean()}
        if has_v_head:
            loss_v, _ = adaptive_weighted_loss(out[1] - v_g, c.weight_p, c.weight_c)
            loss = loss_u + loss_v
            stats["loss_v"] = loss_v.detach()
        stats["loss"] = loss.detach()
        return ObjectiveOutput(loss, stats, z=z, t=t, r=r, u=u, model_kwargs={"y": y_model, "omega": omega},
                               v_c=v_c)

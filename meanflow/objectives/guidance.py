"""Training-time classifier-free guidance targets.

MF (docs/objectives.md, "Training-time guidance"): inside ``t ∈ [t_start, t_end]`` and for kept labels,
``ṽ = ω·v_c + κ·u_θ(z,t,t|y) + (1 − ω − κ)·u_θ(z,t,t|∅)``, else ``ṽ = v_c``; the two extra forwards take no grad.
"""

from __future__ import annotations

import torch

from .base import expand_like, model_u


def mf_guided_velocity(model, z, t, v_c, y, dropped, cfg, num_classes: int) -> torch.Tensor:
    if y is None or (cfg.omega == 1.0 and cfg.kappa == 0.0):
        return v_c
    with torch.no_grad():   # κ = 0 weighs the conditional forward by 0: skip it (the same on every rank)
        u_cond = model_u(model(z, t=t, r=t, y=y)) if cfg.kappa else 0.0
        u_uncond = model_u(model(z, t=t, r=t, y=torch.full_like(y, num_classes)))
    guided = cfg.omega * v_c + cfg.kappa * u_cond + (1 - cfg.omega - cfg.kappa) * u_uncond
    inside = (t >= cfg.t_start) & (t <= cfg.t_end) & ~dropped
    return torch.where(expand_like(inside, v_c), guided, v_c)

"""The β* diagnostic of the control-variate tangent (docs/objectives.md, tangent_beta).

With ``J = (t − r)·∂_z u − I``: exact (isotropic) ``β* = a/(a+1) · σ²_d/(σ²_d + ‖b‖²)``, where a is J's isotropic
scale (Hutchinson: ``a ≈ ⟨ε, Jε⟩/‖ε‖²``), σ²_d the conditional-velocity noise ``E‖v_c − v‖²`` and b = v̂ − v the
proxy bias. Without the marginal velocity v (real data) only the no-bias upper bound
``Tr(JΣ(J+I)ᵀ)/Tr((J+I)Σ(J+I)ᵀ)`` is observable; probing with d = v_c − v̂ (covariance Σ) estimates it with one JVP.
Rows with r = t are excluded (there a = −1 and β* is undefined).
"""

from __future__ import annotations

import torch

from .base import expand_like, per_sample_sq
from .jvp import jvp


def _dudz_along(u_of_z, z, direction) -> torch.Tensor:
    with torch.no_grad():
        return jvp(lambda z: u_of_z(z), dict(z=z), dict(z=direction))[1]


def jacobian_scale(u_of_z, z, h, probe) -> torch.Tensor:
    """Per-row Hutchinson estimate of a, the isotropic scale of J = h·∂_z u − I (exact when J is isotropic)."""
    j_probe = expand_like(h, z) * _dudz_along(u_of_z, z, probe) - probe
    return (probe * j_probe).flatten(1).sum(1) / per_sample_sq(probe)


def beta_star_exact(a, v_c, v_hat, v_true) -> torch.Tensor:
    """β* from batch means of a, σ²_d = ‖v_c − v‖², ‖b‖² = ‖v̂ − v‖², clamped to [0, 1]."""
    a_mean = a.mean()
    noise = per_sample_sq(v_c - v_true).mean()
    bias = per_sample_sq(v_hat - v_true).mean()
    return (a_mean / (a_mean + 1) * noise / (noise + bias)).clamp(0, 1)


def beta_star_upper_bound(u_of_z, z, h, d) -> torch.Tensor:
    """Σ⟨Jd, (J+I)d⟩ / Σ‖(J+I)d‖² with d = v_c − v̂ (no-bias bound), clamped to [0, 1]."""
    jpi_d = expand_like(h, z) * _dudz_along(u_of_z, z, d)    # (J + I)·d
    j_d = jpi_d - d
    return ((j_d * jpi_d).sum() / jpi_d.pow(2).sum().clamp(min=1e-30)).clamp(0, 1)

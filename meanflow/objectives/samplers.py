"""1-NFE and k-NFE samplers (OBJECTIVES.md conventions).

1-NFE: ``x̂ = z_1 − u(z_1, r=0, t=1)``. k-NFE on ``linspace(1, 0, k+1)``: ``z ← z − (t_i − t_{i+1})·u(z, r=t_{i+1}, t=t_i)``.
The noise of sample i depends only on (seed, i), so a set of samples is the same for any batch size or world size.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from .base import expand_like, model_u
from .randomness import stream_seed


def sample_noise(indices: Sequence[int], shape: Sequence[int], seed: int, device="cpu") -> torch.Tensor:
    """Noise for global sample indices, (N, *shape); row i is a pure function of (seed, indices[i])."""
    rows = []
    for i in indices:
        gen = torch.Generator().manual_seed(stream_seed(seed, "sample_noise", int(i)))
        rows.append(torch.randn(*shape, generator=gen))
    return torch.stack(rows).to(device)


def guidance_conditions(n: int, omega: float, t_min: float = 0.0, t_max: float = 1.0, device="cpu"):
    """iMF's Ω at inference, (n, 3) = [ω, t_min, t_max] (XL/2 1-NFE: ω = 8.0, window [0.42, 0.62])."""
    return torch.tensor([omega, t_min, t_max], device=device).expand(n, 3).contiguous()


@torch.no_grad()
def sample(model, noise: torch.Tensor, steps: int = 1, y: Optional[torch.Tensor] = None,
           omega: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Integrate from t = 1 (noise) to t = 0 (data) in ``steps`` average-velocity jumps."""
    ts = torch.linspace(1.0, 0.0, steps + 1, device=noise.device, dtype=noise.dtype)
    z = noise
    ones = torch.ones(noise.shape[0], device=noise.device, dtype=noise.dtype)
    for t_i, t_next in zip(ts[:-1], ts[1:]):
        u = model_u(model(z, t=t_i * ones, r=t_next * ones, y=y, omega=omega))
        z = z - expand_like((t_i - t_next) * ones, z) * u
    return z

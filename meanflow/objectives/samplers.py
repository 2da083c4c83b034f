"""Flow-map and consistency samplers (docs/objectives.md, conventions), on a grid of times from 1 (noise) down to 0 (data).

flow_map: ``z ← z − (t_i − t_{i+1})·u(z, r=t_{i+1}, t=t_i)``; with one step the 1-NFE ``x̂ = z_1 − u(z_1, r=0, t=1)``.
consistency (α-Flow's multi-step sampler): ``x̂ = z − t_i·u(z, r=0, t=t_i)``, then re-noise to the next time,
``z ← (1 − t_{i+1})·x̂ + t_{i+1}·ε_i``, and repeat; the last step returns x̂. With one step it is the 1-NFE sampler.
The noise of sample i (initial and every re-noise) depends only on (seed, i), so a set of samples is the same for
any batch size or world size.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from .base import expand_like, model_u
from .randomness import stream_seed

SAMPLERS = ("flow_map", "consistency")


def sample_noise(indices: Sequence[int], shape: Sequence[int], seed: int, device="cpu",
                 stream: str = "sample_noise") -> torch.Tensor:
    """Noise for global sample indices, (N, *shape); row i is a pure function of (seed, stream, indices[i])."""
    rows = []
    for i in indices:
        gen = torch.Generator().manual_seed(stream_seed(seed, stream, int(i)))
        rows.append(torch.randn(*shape, generator=gen))
    return torch.stack(rows).to(device)


def renoise_noise(indices: Sequence[int], shape: Sequence[int], seed: int, count: int,
                  device="cpu") -> list[torch.Tensor]:
    """The consistency sampler's ε_1 … ε_count, each (N, *shape): a stream per re-noise step, none of them the
    initial noise's, so no step reuses another's noise."""
    return [sample_noise(indices, shape, seed, device, stream=f"renoise/{k}") for k in range(1, count + 1)]


def renoise_count(steps: Union[int, Sequence[float]]) -> int:
    """How many re-noise draws the consistency sampler needs on this grid: one per intermediate time."""
    return (steps if isinstance(steps, int) else len(steps) - 1) - 1


def guidance_conditions(n: int, omega: float, t_min: float = 0.0, t_max: float = 1.0, device="cpu"):
    """iMF's Ω at inference, (n, 3) = [ω, t_min, t_max] (XL/2 1-NFE: ω = 8.0, window [0.42, 0.62])."""
    return torch.tensor([omega, t_min, t_max], device=device).expand(n, 3).contiguous()


def _jump(model, z: torch.Tensor, t: torch.Tensor, r: torch.Tensor, y, omega) -> torch.Tensor:
    """The flow map from time t to time r ≤ t (both (B,)): ``z − (t − r)·u(z, r, t)``."""
    u = model_u(model(z, t=t, r=r, y=y, omega=omega))
    return z - expand_like(t - r, z) * u


@torch.no_grad()
def sample(model, noise: torch.Tensor, steps: Union[int, Sequence[float]] = 1, y: Optional[torch.Tensor] = None,
           omega: Optional[torch.Tensor] = None, *, sampler: str = "flow_map",
           renoise: Optional[Sequence[torch.Tensor]] = None) -> torch.Tensor:
    """Generate from ``noise`` (z_1). ``steps``: a number of steps on ``linspace(1, 0, steps + 1)``, or the time
    points themselves (1 down to 0). ``y``/``omega``: labels and iMF guidance conditions, passed to every call.
    ``sampler="consistency"`` needs ``renoise``: one noise tensor like ``noise`` per intermediate time
    (``renoise_noise``)."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler: unknown {sampler!r}; known: {', '.join(SAMPLERS)}")
    if isinstance(steps, int):
        ts = torch.linspace(1.0, 0.0, steps + 1, device=noise.device, dtype=noise.dtype)
    else:
        ts = torch.tensor([float(s) for s in steps], device=noise.device, dtype=noise.dtype)
    if sampler == "consistency" and (renoise is None or len(renoise) != len(ts) - 2):
        raise ValueError(f"consistency sampler: {len(ts) - 2} re-noise tensor(s) needed for {len(ts) - 1} steps, "
                         f"got {0 if renoise is None else len(renoise)}")
    z = noise
    ones = torch.ones(noise.shape[0], device=noise.device, dtype=noise.dtype)
    for i, (t_i, t_next) in enumerate(zip(ts[:-1], ts[1:])):
        if sampler == "flow_map":
            z = _jump(model, z, t_i * ones, t_next * ones, y, omega)
        else:
            z = _jump(model, z, t_i * ones, 0 * ones, y, omega)       # x̂: straight to the data
            if i < len(ts) - 2:                                       # the last step keeps x̂ itself
                z = (1 - t_next) * z + t_next * renoise[i]
    return z

"""Sliced Wasserstein distance between two equal-size point sets (the 2-D toy metric, docs/objectives.md "2-D toys").

SW_p(a, b) = ( mean_theta  W_p^p(<a, theta>, <b, theta>) )^(1/p), theta uniform on the unit sphere. In 1-D the
optimal coupling of two equal-size sets pairs the sorted projections, so W_p^p = mean |sort(a.theta) - sort(b.theta)|^p.
Reports use 4096 samples, 500 directions and seed 0, so numbers are comparable across runs.

Unequal sizes raise ValueError rather than being interpolated: the reporting protocol fixes equal sample counts,
and a silent quantile interpolation would hide a caller passing the wrong set.
"""

from __future__ import annotations

import torch


def random_directions(num_directions: int, dim: int, seed: int = 0) -> torch.Tensor:
    """(num_directions, dim) float64 unit vectors, uniform on the sphere (normalised Gaussians), fixed by seed."""
    g = torch.Generator()
    g.manual_seed(seed)
    theta = torch.randn(num_directions, dim, generator=g, dtype=torch.float64)
    return theta / theta.norm(dim=1, keepdim=True)


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, num_directions: int = 500, p: int = 1,
                       seed: int = 0) -> float:
    """SW_p between point sets a, b of shape (N, D) with the same N (float64 on the CPU, so results are exact)."""
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"expected two (N, D) point sets with the same D, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"sliced_wasserstein needs equal sample counts, got {a.shape[0]} and {b.shape[0]}")
    if p < 1:
        raise ValueError(f"p must be >= 1, got {p}")
    theta = random_directions(num_directions, a.shape[1], seed)  # (K, D)
    proj_a = (a.detach().cpu().double() @ theta.T).sort(dim=0).values  # (N, K)
    proj_b = (b.detach().cpu().double() @ theta.T).sort(dim=0).values
    per_direction = (proj_a - proj_b).abs().pow(p).mean(dim=0)  # (K,) W_p^p along each direction
    return float(per_direction.mean() ** (1.0 / p))

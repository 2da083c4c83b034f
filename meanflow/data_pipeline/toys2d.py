"""2-D toy distributions for tests and small-scale fidelity runs (docs/objectives.md, "2-D toys").

All six lie roughly in [-4, 4]^2 so one model, one plot range and one sliced-Wasserstein scale fit every toy.
Pure torch; every random number comes from the caller's ``torch.Generator``, so a sample is a pure function of
the generator's seed (the embedded stream seeds one generator per (run seed, step)).
"""

from __future__ import annotations

import math
from typing import Callable

import torch


def _checkerboard(n: int, g: torch.Generator) -> torch.Tensor:
    # 4x4 grid of side-2 cells on [-4, 4]^2; cell (col, row) is filled when col + row is even (8 filled cells).
    # Draw x uniformly, then a row of the same parity as the column, so every filled cell has mass 1/8.
    x = torch.rand(n, generator=g) * 8 - 4
    col = torch.div(x + 4, 2, rounding_mode="floor").clamp(0, 3)
    row = 2 * torch.randint(0, 2, (n,), generator=g) + col.long() % 2
    y = -4 + 2 * row + 2 * torch.rand(n, generator=g)
    return torch.stack([x, y], dim=1)


def _eight_gaussians(n: int, g: torch.Generator) -> torch.Tensor:
    # 8 modes at radius 3 with isotropic sigma 0.25.
    k = torch.randint(0, 8, (n,), generator=g).float()
    angle = 2 * math.pi * k / 8
    centers = 3.0 * torch.stack([torch.cos(angle), torch.sin(angle)], dim=1)
    return centers + 0.25 * torch.randn(n, 2, generator=g)


def _two_moons(n: int, g: torch.Generator) -> torch.Tensor:
    # scikit-learn's make_moons geometry (x in [-1, 2], y in [-0.5, 1]), noise 0.1, centred and scaled by 2.5.
    theta = math.pi * torch.rand(n, generator=g)
    inner = torch.rand(n, generator=g) < 0.5
    x = torch.where(inner, 1 - torch.cos(theta), torch.cos(theta))
    y = torch.where(inner, 0.5 - torch.sin(theta), torch.sin(theta))
    pts = torch.stack([x - 0.5, y - 0.25], dim=1) + 0.1 * torch.randn(n, 2, generator=g)
    return 2.5 * pts


def _swiss_roll(n: int, g: torch.Generator) -> torch.Tensor:
    # scikit-learn's 2-D swiss roll t in [1.5pi, 4.5pi]; radius 4.5pi ~ 14.1 scaled to 3.8.
    t = 1.5 * math.pi * (1 + 2 * torch.rand(n, generator=g))
    pts = torch.stack([t * torch.cos(t), t * torch.sin(t)], dim=1) * (3.8 / (4.5 * math.pi))
    return pts + 0.1 * torch.randn(n, 2, generator=g)


def _two_spirals(n: int, g: torch.Generator) -> torch.Tensor:
    # FFJORD's "2spirals": angle sqrt(u)*3pi (uniform density along the arc), the second spiral is the first
    # rotated by pi; scaled by 1/3 so the outer turn reaches radius ~3.1.
    a = torch.sqrt(torch.rand(n, generator=g)) * 3 * math.pi
    sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0).unsqueeze(1)
    pts = sign * torch.stack([-torch.cos(a) * a, torch.sin(a) * a], dim=1) / 3
    return pts + 0.1 * torch.randn(n, 2, generator=g)


def _pinwheel(n: int, g: torch.Generator) -> torch.Tensor:
    # FFJORD's pinwheel: 5 arms, radial std 0.3, tangential std 0.1, twist rate 0.25, scaled by 2.
    arms, rate = 5, 0.25
    feats = torch.randn(n, 2, generator=g) * torch.tensor([0.3, 0.1])
    feats[:, 0] += 1.0
    arm = torch.randint(0, arms, (n,), generator=g).float()
    angle = 2 * math.pi * arm / arms + rate * torch.exp(feats[:, 0])
    cos, sin = torch.cos(angle), torch.sin(angle)
    rotated = torch.stack([cos * feats[:, 0] - sin * feats[:, 1], sin * feats[:, 0] + cos * feats[:, 1]], dim=1)
    return 2.0 * rotated


_TOYS: dict[str, Callable[[int, torch.Generator], torch.Tensor]] = {
    "checkerboard": _checkerboard,
    "eight_gaussians": _eight_gaussians,
    "two_moons": _two_moons,
    "swiss_roll": _swiss_roll,
    "two_spirals": _two_spirals,
    "pinwheel": _pinwheel,
}
TOY_NAMES: tuple[str, ...] = tuple(_TOYS)


def sample_toy(name: str, n: int, generator: torch.Generator) -> torch.Tensor:
    """Draw n points of toy ``name``; returns a float32 tensor (n, 2) on the CPU."""
    if name not in _TOYS:
        raise ValueError(f"unknown data.name {name!r}; known 2-D toys: {', '.join(TOY_NAMES)}")
    return _TOYS[name](int(n), generator).float()


def marginal_velocity_oracle(name: str, n: int = 8192, seed: int = 0) -> Callable[[torch.Tensor, torch.Tensor],
                                                                                  torch.Tensor]:
    """v(z, t) = E[e − x | z_t = z] for z_t = (1 − t)·x + t·e, e ~ N(0, I): the marginal velocity of toy ``name``,
    by self-normalised weights p(z | x_i) over ``n`` of its samples (exact for the n-point distribution; in 2-D
    close to the toy's own). Feeds the exact β* diagnostic of tangent_beta (docs/objectives.md, tangent_beta). Needs t > 0."""
    points = sample_toy(name, n, torch.Generator().manual_seed(seed))

    def velocity(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        xs = points.to(z.device, z.dtype)
        tt = t.to(z.dtype).reshape(-1, 1, 1)
        noise = (z[:, None, :] - (1 - tt) * xs[None]) / tt                    # (B, n, 2): e_i that gives z
        weights = torch.softmax(-0.5 * noise.square().sum(-1), dim=1)        # ∝ N(z; (1 − t) x_i, t² I)
        return (weights[..., None] * (noise - xs[None])).sum(1)

    return velocity

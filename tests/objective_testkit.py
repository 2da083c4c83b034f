"""Test-only helpers for tests/test_objectives.py and tests/test_samplers.py.

Small models with the model call signature ``forward(x, *, t, r, y=None, omega=None)`` whose outputs are known in
closed form (linear maps, exact average velocities, a Gaussian-mixture velocity oracle), a call-recording spy, tiny
perturbed DiTs / MLPs, config builders, and independent (finite-difference) reference computations.
"""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import nn

from meanflow.models import build_model
from meanflow.objectives import ObjectiveContext
from meanflow.platform.config import ObjectiveConfig

NUM_CLASSES = 3
IMAGE_SHAPE = (1, 4, 4)


# ------------------------------------------------------------------------------------------------------ configs


def objective_cfg(name: str, **overrides: Any):
    """``ObjectiveConfig`` with ``name`` and dotted-key overrides, e.g. ``objective_cfg("mf", **{"time.mu": 0.})``."""
    cfg = OmegaConf.structured(ObjectiveConfig)
    cfg.name = name
    for key, value in overrides.items():
        OmegaConf.update(cfg, key, value, merge=False)
    return cfg


# ------------------------------------------------------------------------------------------------------- models


def perturb(model: nn.Module, scale: float, seed: int = 0) -> nn.Module:
    """Add seeded N(0, scale²) noise to every parameter (the DiTs are zero-initialised at the output)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model


def tiny_dit(family: str = "mf_dit", *, num_classes: int = NUM_CLASSES, v_head: bool = False,
             dtype=torch.float64, scale: float = 0.3, seed: int = 0) -> nn.Module:
    """A 2-block, width-32 DiT on 1×4×4 inputs with every parameter perturbed (non-zero output and time path)."""
    torch.manual_seed(seed)
    cfg = SimpleNamespace(family=family, size="tiny", depth=2, width=32, heads=2, image_size=4, patch_size=2,
                          in_channels=1, num_classes=num_classes, v_head=v_head, v_head_depth=1)
    return perturb(build_model(cfg).to(dtype), scale, seed)


def tiny_decoupled_dit(*, dtype=torch.float64, scale: float = 0.3, seed: int = 0) -> nn.Module:
    """A 3-block MF-DiT with decoupled conditioning (Decoupled MeanFlow's model: 2 t-blocks, 1 r-block and a
    log-variance head), every parameter perturbed."""
    torch.manual_seed(seed)
    cfg = SimpleNamespace(family="mf_dit", size="tiny", depth=3, width=32, heads=2, image_size=4, patch_size=2,
                          in_channels=1, num_classes=NUM_CLASSES, conditioning="decoupled", dmf_depth=0)
    return perturb(build_model(cfg).to(dtype), scale, seed)


def tiny_mlp(*, dtype=torch.float64, scale: float = 0.5, seed: int = 0, data_dim: int = 2) -> nn.Module:
    torch.manual_seed(seed)
    cfg = SimpleNamespace(family="mlp", data_dim=data_dim, mlp_hidden=16, mlp_layers=2)
    return perturb(build_model(cfg).to(dtype), scale, seed)


def tiny_model(family: str, **kw) -> nn.Module:
    return tiny_mlp(**kw) if family == "mlp" else tiny_dit(family, **kw)


class LinearVelocity(nn.Module):
    """u(z, r, t) = A z for z of shape (B, d); A is a parameter. Ignores t, r, y, omega."""

    def __init__(self, A: torch.Tensor):
        super().__init__()
        self.A = nn.Parameter(A.clone().to(torch.float64))

    def forward(self, x, *, t, r, y=None, omega=None):
        return x @ self.A.T


class ScaledIdentity(nn.Module):
    """u(z, r, t) = a·z with a scalar parameter a (an isotropic linear map)."""

    def __init__(self, a: float):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(float(a), dtype=torch.float64))

    def forward(self, x, *, t, r, y=None, omega=None):
        return self.a * x


class PointMassVelocity(nn.Module):
    """The exact average velocity when all data sit at x0: z_t = (1 − t)·x0 + t·e is a straight line, so
    u(z, r, t) = (z − x0)/t for every r (and 1-NFE maps any z_1 to x0)."""

    def __init__(self, x0: torch.Tensor):
        super().__init__()
        self.register_buffer("x0", x0)

    def forward(self, x, *, t, r, y=None, omega=None):
        return (x - self.x0) / t.reshape(-1, *([1] * (x.dim() - 1)))


class Spy(nn.Module):
    """Wraps a model and records every call's keyword conditions (cloned)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.calls: list[dict[str, Any]] = []

    def forward(self, x, *, t, r, y=None, omega=None):
        self.calls.append(dict(x=x.detach().clone(), t=t.detach().clone(), r=r.detach().clone(),
                               y=None if y is None else y.clone(),
                               omega=None if omega is None else omega.detach().clone()))
        return self.inner(x, t=t, r=r, y=y, omega=omega)


# ----------------------------------------------------------------------------------------------------- batches


def image_batch(batch: int, seed: int = 0, labels: bool = True, dtype=torch.float64) -> dict:
    gen = torch.Generator().manual_seed(seed)
    out = {"x": torch.randn(batch, *IMAGE_SHAPE, generator=gen, dtype=dtype)}
    if labels:
        out["y"] = torch.randint(0, NUM_CLASSES, (batch,), generator=gen)
    return out


def toy_batch(batch: int, seed: int = 0, dim: int = 2, dtype=torch.float64) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(batch, dim, generator=gen, dtype=dtype)}


def sub_batch(batch: dict, rows: torch.Tensor) -> dict:
    return {key: value[rows] for key, value in batch.items()}


def micro_context(seed: int, global_batch: int, rows: torch.Tensor, **kw) -> ObjectiveContext:
    return ObjectiveContext(seed=seed, global_batch=global_batch, rows=rows, **kw)


# -------------------------------------------------------------------------------------- independent references


def bcast(s: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return s.reshape(-1, *([1] * (x.dim() - 1)))


def conditional_velocity(out, x: torch.Tensor) -> torch.Tensor:
    """v_c = e − x recovered from the objective's z = (1 − t)·x + t·e without knowing its noise stream."""
    t = out.t.to(x.dtype)
    return (out.z - x) / bcast(t, x)


def fd_time_derivative(u_fn, z, t, r, dz, dt: float = 1.0, dr: float = 0.0, eps: float = 1e-6) -> torch.Tensor:
    """Central finite difference of u_fn(z, t, r) along (dz, dt, dr), in float64."""
    t, r = t.to(torch.float64), r.to(torch.float64)
    with torch.no_grad():
        plus = u_fn(z + eps * dz, t + eps * dt, r + eps * dr)
        minus = u_fn(z - eps * dz, t - eps * dt, r - eps * dr)
    return (plus - minus) / (2 * eps)


def target_from_gradient(out, batch_size: int) -> torch.Tensor:
    """For a p = 0 loss ``mean_i ‖u_i − T_i‖²`` (T independent of u): T = u − (B/2)·∂L/∂u."""
    (grad_u,) = torch.autograd.grad(out.loss, out.u, retain_graph=True)
    return (out.u - batch_size / 2 * grad_u).detach()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp(min=1e-300))


def flat_grad(loss: torch.Tensor, model: nn.Module) -> torch.Tensor:
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).flatten() for p, g in zip(params, grads)])


# -------------------------------------------------------------------------------------- Gaussian-mixture oracle


class GaussianMixtureOracle(nn.Module):
    """Class y selects x ~ N(m_y, s²·I); unconditional data = the equal-weight mixture.

    With z_t = (1 − t)·x + t·e: w = z − (1 − t)·m ~ N(0, c·I), c = (1 − t)²s² + t², and
    v(z | y) = E[e − x | z, y] = (t − (1 − t)·s²)/c · w − m_y. The unconditional velocity is the posterior-weighted
    mixture of the class velocities. As a "model" it returns the guided velocity ω̃·v(z|y) + (1 − ω̃)·v(z|∅) for the
    ω̃ its omega condition (ω, t_min, t_max) gives at t, and v(z|∅) for the null label (ignores r: used at h = 0).
    """

    def __init__(self, means: torch.Tensor, s: float, num_classes: int):
        super().__init__()
        self.register_buffer("means", means.to(torch.float64))
        self.s, self.num_classes = s, num_classes

    def _c(self, t):
        return (1 - t) ** 2 * self.s**2 + t**2

    def v_class(self, z, t, y):
        t_ = t.to(z.dtype)[:, None]
        m = self.means[y]
        return (t_ - (1 - t_) * self.s**2) / self._c(t_) * (z - (1 - t_) * m) - m

    def v_uncond(self, z, t):
        t_ = t.to(z.dtype)[:, None]
        c = self._c(t_)
        centres = (1 - t_)[:, None, :] * self.means[None]                      # (B, K, d)
        logits = -((z[:, None, :] - centres) ** 2).sum(-1) / (2 * c)            # (B, K)
        post = torch.softmax(logits, dim=1)
        per_class = torch.stack([self.v_class(z, t, torch.full_like(t, k, dtype=torch.long))
                                 for k in range(self.num_classes)], dim=1)     # (B, K, d)
        return (post[..., None] * per_class).sum(1)

    def guided(self, z, t, y, omega_tilde):
        w = omega_tilde.to(z.dtype)[:, None]
        return w * self.v_class(z, t, y) + (1 - w) * self.v_uncond(z, t)

    def forward(self, x, *, t, r, y=None, omega=None):
        from meanflow.objectives.imf import effective_omega

        v_null = self.v_uncond(x, t)
        if y is None:
            return v_null
        w = torch.ones_like(t) if omega is None else effective_omega(omega, t)
        is_null = y == self.num_classes
        y_safe = torch.where(is_null, torch.zeros_like(y), y)
        guided = self.guided(x, t, y_safe, w)
        return torch.where(is_null[:, None], v_null, guided)


# ------------------------------------------------------------------------------------ isotropic Gaussian data


def gaussian_marginal_velocity(s: float):
    """v(z, t) = E[e − x | z_t = z] for x ~ N(0, s²·I): z·(t − (1 − t)s²)/((1 − t)²s² + t²)."""

    def v(z, t):
        t_ = t.to(z.dtype).reshape(-1, *([1] * (z.dim() - 1)))
        return z * (t_ - (1 - t_) * s**2) / ((1 - t_) ** 2 * s**2 + t_**2)

    return v


def gaussian_noise_variance(s: float, t: float, d: int) -> float:
    """σ²_d = E‖v_c − v‖² = d·(s² + 1) − E‖v‖², with E‖v‖² = d·(t − (1 − t)s²)²/((1 − t)²s² + t²)."""
    c = (1 - t) ** 2 * s**2 + t**2
    return d * (s**2 + 1) - d * (t - (1 - t) * s**2) ** 2 / c


def mc_mean_and_se(values: torch.Tensor) -> tuple[float, float]:
    values = values.to(torch.float64)
    return float(values.mean()), float(values.std() / math.sqrt(values.numel()))

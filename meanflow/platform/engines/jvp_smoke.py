"""Startup check: the engine's forward-mode JVP through its (wrapped, sharded) model agrees with a central finite
difference of the same model, on one batch, before any training step. An unsupported engine × model × precision
combination then fails in seconds with a message naming it, instead of training on a wrong target.

A freshly initialised DiT outputs exactly zero (zero-initialised output layer), where every JVP "agrees"; the
check therefore perturbs the parameters (this rank's shards) by a seeded 2% and restores them bit for bit after.
"""

from __future__ import annotations

import torch

from meanflow.objectives.base import model_u
from meanflow.objectives.jvp import jvp
from meanflow.objectives.samplers import guidance_conditions

from .base import local_tensor

# Relative L2 error allowed: fp32 JVPs sit near 1e-4 of an fp32 central difference (eps 1e-3); a bf16-autocast JVP
# carries bf16's 8-bit mantissa (~1e-2). A broken JVP is off by O(1).
TOLERANCE = {"fp32": 2e-2, "bf16": 1e-1}


class EngineJVPError(RuntimeError):
    pass


@torch.no_grad()
def _perturb(model: torch.nn.Module, seed: int) -> list[torch.Tensor]:
    saved, g = [], torch.Generator().manual_seed(seed)
    for p in model.parameters():
        t = local_tensor(p)
        saved.append(t.clone())
        t.add_(0.02 * torch.randn(t.shape, generator=g).to(t.device, t.dtype))
    return saved


@torch.no_grad()
def _restore(model: torch.nn.Module, saved: list[torch.Tensor]) -> None:
    for module in model.modules():   # FSDP2 shard_grad_op keeps parameters gathered after a forward until a
        if hasattr(module, "reshard"):   # backward; shard them again so the saved shards line up
            module.reshard()
    for p, s in zip(model.parameters(), saved):
        local_tensor(p).copy_(s)


def jvp_smoke_test(engine, sample_shape: tuple[int, ...], num_classes: int, device: torch.device,
                   seed: int = 0, batch: int = 2) -> float:
    """Returns the relative error; raises EngineJVPError if the JVP fails or disagrees. A model that takes
    sampling guidance (``takes_guidance``: iMF-DiT) gets ω = 1 over the whole interval."""
    model = engine.model
    g = torch.Generator().manual_seed(seed)
    z, v = (torch.randn(batch, *sample_shape, generator=g).to(device) for _ in range(2))
    t = (0.2 + 0.6 * torch.rand(batch, generator=g)).to(device)
    r = t * 0.5
    y = torch.randint(num_classes, (batch,), generator=g).to(device) if num_classes else None
    kwargs = {"y": y}
    if getattr(model, "takes_guidance", False):
        kwargs["omega"] = guidance_conditions(batch, 1.0, device=device)

    def u(z, t, r):
        return model_u(model(z, t=t, r=r, **kwargs))

    was_training = model.training
    model.eval()
    saved = _perturb(model, seed)
    try:
        try:
            with torch.enable_grad(), engine.autocast():   # the JVP as training will take it
                _, tangent = jvp(u, {"z": z, "t": t, "r": r}, {"z": v, "t": 1.0, "r": 0.0})
        except Exception as err:
            raise EngineJVPError(f"engine {engine.name}: forward-mode JVP through the model failed "
                                 f"({type(err).__name__}: {err}); this engine/model/precision combination is "
                                 "not supported") from err
        eps = 1e-3
        with torch.no_grad():   # the reference in fp32
            fd = (u(z + eps * v, t + eps, r) - u(z - eps * v, t - eps, r)) / (2 * eps)
        error = (torch.linalg.vector_norm(tangent.detach().float() - fd.float())
                 / torch.linalg.vector_norm(fd.float()).clamp_min(1e-8)).item()
    finally:
        _restore(model, saved)
        model.train(was_training)
    tolerance = TOLERANCE[engine.precision]
    if not error < tolerance:
        raise EngineJVPError(f"engine {engine.name} ({engine.precision}): JVP disagrees with a finite difference of "
                             f"the same model (relative error {error:.3g} > {tolerance}); refusing to train on a "
                             "wrong target")
    return error

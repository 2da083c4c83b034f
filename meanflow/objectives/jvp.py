"""The one JVP helper every objective uses.

Built on ``torch.autograd.forward_ad`` (DESIGN.md: the one mechanism every engine can support). Tangents are
given *by name* — ``jvp(fn, dict(z=z, t=t, r=r), dict(z=v, t=1, r=0))`` — because a positional (t, r) vs (r, t)
mix-up is the classic MeanFlow bug (OBJECTIVES.md, MF ablation: wrong tangents give FID 268-329 instead of 61).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
import torch.autograd.forward_ad as fwAD


def jvp(fn: Callable[..., Any], primals: Mapping[str, torch.Tensor],
        tangents: Mapping[str, torch.Tensor | float]) -> tuple[Any, Any]:
    """Return ``(fn(**primals), d fn(**primals) along tangents)``.

    A primal without a tangent is held constant (tangent 0). A float tangent is broadcast to its primal's
    shape. The tangent output stays in the autograd graph: SG_λ differentiates through it.
    """
    unknown = set(tangents) - set(primals)
    if unknown:
        raise KeyError(f"jvp: tangents {sorted(unknown)} name no primal; primals are {sorted(primals)}")
    with fwAD.dual_level():
        duals = {name: fwAD.make_dual(value, _as_tangent(tangents[name], value)) if name in tangents else value
                 for name, value in primals.items()}
        out = fn(**duals)
        return _unpack(out, "primal"), _unpack(out, "tangent")


def _as_tangent(tangent: torch.Tensor | float, primal: torch.Tensor) -> torch.Tensor:
    if isinstance(tangent, torch.Tensor):
        if tangent.shape != primal.shape:
            raise ValueError(f"jvp: tangent shape {tuple(tangent.shape)} != primal shape {tuple(primal.shape)}")
        return tangent.to(primal.dtype)
    return torch.full_like(primal, float(tangent))


def _unpack(out: Any, part: str) -> Any:
    if isinstance(out, (tuple, list)):
        return type(out)(_unpack(o, part) for o in out)
    value = getattr(fwAD.unpack_dual(out), part)
    if value is None:  # output does not depend on any dual input
        value = torch.zeros_like(out) if part == "tangent" else out
    return value

"""The one JVP helper every objective uses.

Built on ``torch.autograd.forward_ad`` (the one mechanism every engine can support). Tangents are
given *by name* — ``jvp(fn, dict(z=z, t=t, r=r), dict(z=v, t=1, r=0))`` — because a positional (t, r) vs (r, t)
mix-up is the classic MeanFlow bug (the MF paper's ablation: wrong tangents give FID 268-329 instead of 61).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
import torch.autograd.forward_ad as fwAD

from meanflow.models.attention import detached_tangents


def jvp(fn: Callable[..., Any], primals: Mapping[str, torch.Tensor | None],
        tangents: Mapping[str, torch.Tensor | float], rows: torch.Tensor | None = None,
        differentiable: bool = True) -> tuple[Any, Any]:
    """Return ``(fn(**primals), d fn(**primals) along tangents)``.

    A primal without a tangent is held constant (tangent 0); a None primal is passed through. A float tangent is
    broadcast to its primal's shape. The tangent output stays in the autograd graph: SG_λ differentiates through it.
    With ``differentiable=False`` (MF, iMF: the target stops the gradient) it is returned detached, and attention
    may use a fused kernel whose tangent has no backward (models/attention.py).

    ``rows`` (bool, (B,)): only these rows need the tangent. The others get a plain forward and a tangent of 0 —
    what every objective multiplies it by there (t − r = 0) — so the tangent pass costs only the rows with r ≠ t
    (~1F × share of such rows instead of 1F). Every tensor primal and tangent is then split along dim 0;
    ``fn`` must accept a batch of 0 rows.
    """
    unknown = set(tangents) - set(primals)
    if unknown:
        raise KeyError(f"jvp: tangents {sorted(unknown)} name no primal; primals are {sorted(primals)}")
    if not differentiable:
        with detached_tangents():
            out, tangent = jvp(fn, primals, tangents, rows)
        return out, _map(tangent, torch.Tensor.detach)
    if rows is None:
        return _jvp(fn, primals, tangents)
    # Always both calls, even with an empty part: sharded engines (FSDP2) gather parameters in every forward, so
    # every rank must make the same number of calls whatever its rows' (t, r) draws.
    needed, rest = rows.nonzero().squeeze(1), (~rows).nonzero().squeeze(1)
    out_needed, tangent_needed = _jvp(fn, _take(primals, needed), _take(tangents, needed))
    out_rest = fn(**_take(primals, rest))
    return (_merge(out_needed, out_rest, needed, rest),
            _merge(tangent_needed, _map(out_rest, torch.zeros_like), needed, rest))


def _jvp(fn, primals, tangents):
    with fwAD.dual_level():
        duals = {name: fwAD.make_dual(value, _as_tangent(tangents[name], value)) if name in tangents else value
                 for name, value in primals.items()}
        out = fn(**duals)
        return _unpack(out, "primal"), _unpack(out, "tangent")


def _take(values: Mapping[str, Any], index: torch.Tensor) -> dict[str, Any]:
    return {k: (v[index] if isinstance(v, torch.Tensor) else v) for k, v in values.items()}


def _map(out: Any, fn) -> Any:
    return type(out)(_map(o, fn) for o in out) if isinstance(out, (tuple, list)) else fn(out)


def _merge(a: Any, b: Any, index_a: torch.Tensor, index_b: torch.Tensor) -> Any:
    """Rows of ``a`` at ``index_a`` and of ``b`` at ``index_b``, in one tensor (differentiable in both)."""
    if isinstance(a, (tuple, list)):
        return type(a)(_merge(x, y, index_a, index_b) for x, y in zip(a, b))
    out = a.new_zeros((len(index_a) + len(index_b), *a.shape[1:]))
    return out.index_copy(0, index_a, a).index_copy(0, index_b, b.to(a.dtype))


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

"""Run as a script (by tests/test_fused_attention.py, in a subprocess so that TRITON_INTERPRET=1 applies to Triton
from its first import): the fused JVP attention against the math one.

``attention DTYPE...``: through `meanflow.models.attention`, primal, tangent and the gradients of the primal, at
head dims 64 and 72 (padded) and lengths 64 and 68 (padded, hidden keys). ``objectives``: loss and parameter
gradients of MF, iMF and SG_λ (λ = 1) on a DiT with 64 tokens, and how many attention calls the fused kernel
served. ``checkpointing``: MF and iMF with the fused kernel and activation checkpointing against math attention
without it. One JSON line per case; errors are the largest absolute error relative to the reference's largest
value."""

from __future__ import annotations

import importlib
import json
import sys
from types import SimpleNamespace

import torch
from torch.autograd import forward_ad as fwAD

from meanflow.models import build_model
from meanflow.models.attention import attention, detached_tangents, set_jvp_backend
from meanflow.models.execution import set_block_execution
from meanflow.objectives import ObjectiveContext, build_objective
from objective_testkit import flat_grad, objective_cfg, perturb

# (meanflow.models re-exports the function `attention`, which hides the module of that name as an attribute)
attention_module = importlib.import_module("meanflow.models.attention")


def run(backend: str, q, k, v, tq, tk, tv, weight):
    """(primal, tangent, dq, dk, dv) of `attention` with the JVP taken inside `detached_tangents()`."""
    set_jvp_backend(backend)
    leaves = [x.detach().clone().requires_grad_(True) for x in (q, k, v)]
    with detached_tangents(), fwAD.dual_level():
        out = attention(*(fwAD.make_dual(x, t) for x, t in zip(leaves, (tq, tk, tv))))
        primal, tangent = fwAD.unpack_dual(out)
        tangent = tangent.detach()
    (primal.float() * weight).sum().backward()
    return [primal.detach(), tangent] + [x.grad for x in leaves]


def case(head_dim: int, dtype: torch.dtype, device: str, length: int = 64) -> dict:
    gen = torch.Generator().manual_seed(head_dim)
    shape = (2, 3, length, head_dim)
    q, k, v, tq, tk, tv = (torch.randn(shape, generator=gen).to(device, dtype) for _ in range(6))
    weight = torch.randn(shape, generator=gen).to(device)
    ref = run("math", *(x.double() for x in (q, k, v, tq, tk, tv)), weight.double())
    got = run("fused", q, k, v, tq, tk, tv, weight)
    names = ("primal", "tangent", "grad_q", "grad_k", "grad_v")
    errors = {n: relative_error(g, r) for n, g, r in zip(names, got, ref)}
    return {"head_dim": head_dim, "length": length, "dtype": str(dtype).removeprefix("torch."), **errors}


def relative_error(got, ref) -> float:
    return ((got.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


def objective_case(name: str, family: str, extra: dict, device: str, checkpointing: bool = False) -> dict:
    """One objective's loss and gradients with each backend (fp32; the fused one activation-checkpointed if asked),
    and the count of fused calls (the backward's recomputations included)."""
    fused_calls = []
    fused = attention_module._fused_attention

    def counting(*args):
        fused_calls.append(1)
        return fused(*args)

    attention_module._fused_attention = counting
    gen = torch.Generator().manual_seed(1)
    batch = {"x": torch.randn(8, 1, 16, 16, generator=gen).to(device), "y": torch.randint(0, 3, (8,), generator=gen)
             .to(device)}
    results = []
    for backend in ("math", "fused"):
        set_jvp_backend(backend)
        set_block_execution(checkpointing=checkpointing and backend == "fused")
        torch.manual_seed(0)
        model_cfg = SimpleNamespace(family=family, size="tiny", depth=2, width=64, heads=1, image_size=16,
                                    patch_size=2, in_channels=1, num_classes=3, v_head=family == "imf_dit",
                                    v_head_depth=1)
        model = perturb(build_model(model_cfg), 0.1).to(device)
        cfg = objective_cfg(name, **{"time.share_r_eq_t": 0.5, **extra})
        out = build_objective(cfg, 3).compute(model, batch, 3, ObjectiveContext.single_process(8, 0))
        results.append((out.loss, flat_grad(out.loss, model)))
    set_block_execution()
    (loss_math, grad_math), (loss_fused, grad_fused) = results
    return {"objective": name, **extra, "loss": relative_error(loss_fused, loss_math),
            "grad": relative_error(grad_fused, grad_math), "fused_calls": len(fused_calls)}


if __name__ == "__main__":
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if sys.argv[1] == "objectives":
        for name, family, extra in (("mf", "mf_dit", {}), ("imf", "imf_dit", {}),
                                    ("sg_lambda", "mf_dit", {"sg_lambda.start": 1.0, "sg_lambda.end": 1.0})):
            print(json.dumps(objective_case(name, family, extra, device)), flush=True)
    elif sys.argv[1] == "checkpointing":
        for name, family in (("mf", "mf_dit"), ("imf", "imf_dit")):
            print(json.dumps(objective_case(name, family, {}, device, checkpointing=True)), flush=True)
    else:
        for head_dim in (64, 72):
            for length in (64, 68):   # 68: not a multiple of 32, padded keys hidden
                for dtype in sys.argv[2:]:
                    print(json.dumps(case(head_dim, getattr(torch, dtype), device, length)), flush=True)

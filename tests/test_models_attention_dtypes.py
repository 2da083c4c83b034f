"""Under bf16 autocast every model family hands the fused JVP attention kernel q, k, v (primals and tangents) of
one dtype: Triton's `tl.dot` in the kernel's backward refuses operands of two dtypes. CPU autocast stands in for
the GPU's; the kernel itself is replaced by a recorder that answers with math attention."""

from __future__ import annotations

import importlib

import pytest
import torch
from torch.autograd import forward_ad as fwAD

from meanflow.models.registry import FAMILIES
from objective_testkit import image_batch, tiny_model

jvp_attention = pytest.importorskip("jvp_flash_attention.jvp_attention")
# (meanflow.models re-exports the function `attention`, which hides the module of that name as an attribute)
attention_module = importlib.import_module("meanflow.models.attention")

ATTENTION_FAMILIES = {"mf_dit", "imf_dit"}


@pytest.fixture
def kernel_calls(monkeypatch):
    """The dtypes of every call's q, k, v primals and tangents, with the fused backend forced on."""
    calls = []

    def record(q, k, v, sm_scale=None, **_):
        parts = [fwAD.unpack_dual(x) for x in (q, k, v)]
        calls.append({str(p.dtype) for pair in parts for p in pair})
        return attention_module._softmax_attention(q, k, v)

    monkeypatch.setattr(jvp_attention.JVPAttn, "fwd_dual", staticmethod(record))
    monkeypatch.setattr(attention_module, "_jvp_backend", "fused")
    return calls


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_hands_the_fused_kernel_one_dtype_under_bf16_autocast(family, kernel_calls):
    model = tiny_model(family, dtype=torch.float32)
    if family == "mlp":
        x, y = torch.randn(4, 2), None
    else:
        batch = image_batch(4, dtype=torch.float32)
        x, y = batch["x"], batch["y"]
    t, r = torch.full((4,), 0.7), torch.full((4,), 0.2)
    with (attention_module.detached_tangents(), torch.autocast("cpu", dtype=torch.bfloat16), fwAD.dual_level()):
        out = model(fwAD.make_dual(x, torch.randn_like(x)), t=fwAD.make_dual(t, torch.ones_like(t)), r=r, y=y)
        assert fwAD.unpack_dual(out).tangent is not None
    assert (len(kernel_calls) > 0) == (family in ATTENTION_FAMILIES), (family, kernel_calls)
    assert all(dtypes == {"torch.bfloat16"} for dtypes in kernel_calls), kernel_calls

"""``engine.compile: all`` compiles the JVP itself: each block with dual inputs runs as a compiled function of
primals and tangents (models/execution.py). Dynamo's counters show every frame compiled, no graph break and no
"Attempted to wrap a dual tensor input" fallback to eager; the block's JVP function holds compiled code; losses
and gradients (SG_λ's through the tangent included, with activation checkpointing too) equal eager execution."""

from __future__ import annotations

import importlib

import pytest
import torch
from torch._dynamo.utils import counters

from meanflow.models import execution
from meanflow.models.dit import DiTBlock
from meanflow.models.execution import configure_execution, set_block_execution
from meanflow.models.imf_dit import IMFBlock
from meanflow.objectives import ObjectiveContext, build_objective
from objective_testkit import NUM_CLASSES, flat_grad, image_batch, objective_cfg, tiny_dit

pytestmark = pytest.mark.timeout(300)

# (meanflow.models re-exports the function `attention`, which hides the module of that name as an attribute)
attention_module = importlib.import_module("meanflow.models.attention")

SG_LAMBDA_1 = {"sg_lambda.start": 1.0, "sg_lambda.end": 1.0}   # the backward runs through the tangent
CASES = [   # (objective, family, extra config, compile backend, activation checkpointing)
    pytest.param("mf", "mf_dit", {}, "aot_eager", False, id="mf"),
    pytest.param("imf", "imf_dit", {"imf.tangent": "v_head"}, "aot_eager", True, id="imf-checkpointed"),
    pytest.param("sg_lambda", "mf_dit", SG_LAMBDA_1, "aot_eager", True, id="sg_lambda-checkpointed"),
    # inductor's C++ compiles take ~90 s on 2 cores with a cold cache
    pytest.param("mf", "mf_dit", {}, "inductor", False, id="mf-inductor", marks=pytest.mark.timeout(600)),
]
BLOCKS = {"mf_dit": DiTBlock, "imf_dit": IMFBlock}


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    set_block_execution("none")
    torch._dynamo.reset()


@pytest.fixture
def fused_calls(monkeypatch):
    """The fused backend, its kernel replaced by math attention that counts its calls (the kernel itself needs a
    GPU or Triton's interpreter)."""
    calls = []

    def counting(q, k, v):
        calls.append(1)
        return attention_module._softmax_attention(q, k, v)

    monkeypatch.setattr(attention_module, "_jvp_backend", "fused")
    monkeypatch.setattr(attention_module, "_fused_attention", counting)
    return calls


def loss_and_grad(name, family, extra):
    model = tiny_dit(family, v_head=family == "imf_dit", dtype=torch.float32)
    cfg = objective_cfg(name, **{"time.share_r_eq_t": 0.5, **extra})
    out = build_objective(cfg, NUM_CLASSES).compute(model, image_batch(8, dtype=torch.float32), 3,
                                                   ObjectiveContext.single_process(8, 0))
    return out.loss.detach(), flat_grad(out.loss, model)


def jvp_is_compiled(block_class) -> bool:
    """Dynamo holds compiled code for the block's function of (primals, tangents)."""
    block_jvp = execution._jvp_of(block_class.forward.__wrapped__)
    return len(torch._dynamo.eval_frame._debug_get_cache_entry_list(block_jvp)) > 0


@pytest.mark.parametrize("name,family,extra,backend,checkpointing", CASES)
def test_compiled_jvp_has_no_graph_break_and_matches_eager(name, family, extra, backend, checkpointing,
                                                           fused_calls):
    eager_loss, eager_grad = loss_and_grad(name, family, extra)
    eager_fused_calls = len(fused_calls)
    set_block_execution("all", checkpointing=checkpointing, compile_backend=backend)
    loss, grad = loss_and_grad(name, family, extra)

    assert jvp_is_compiled(BLOCKS[family]), name
    frames = dict(counters["frames"])
    assert frames["ok"] == frames["total"] >= 2, frames   # the JVP and the plain forward of the rows with r = t
    assert not counters["graph_break"] and not counters["unimplemented"], dict(counters["unimplemented"])
    # MF and iMF stop the tangent's gradient, so eagerly the fused kernel serves them; a compiled graph traces
    # math attention instead (the kernel's compiled path has no backward).
    assert (eager_fused_calls > 0) == (name != "sg_lambda") and len(fused_calls) == eager_fused_calls
    # float32 with another summation order: compare against the largest value (gradients reach ~1e4 here)
    assert relative_error(loss, eager_loss) < 1e-5, name
    assert relative_error(grad, eager_grad) < 1e-4, name


def test_the_fused_backend_is_refused_for_a_compiled_jvp():
    with pytest.raises(ValueError, match="objective.jvp_attention: 'fused' cannot serve a compiled JVP"):
        configure_execution("fused", "all")


def relative_error(got, want) -> float:
    return ((got - want).abs().max() / want.abs().max()).item()

"""Block execution (models/execution.py): activation checkpointing that is correct under the JVP's forward AD,
and torch.compile of the blocks outside the JVP (and through it), each against plain eager execution."""

from __future__ import annotations

import pytest
import torch
from torch.utils.checkpoint import CheckpointError

from meanflow.models.execution import set_block_execution
from meanflow.objectives import ObjectiveContext, build_objective, sample
from objective_testkit import NUM_CLASSES, flat_grad, image_batch, objective_cfg, tiny_dit

pytestmark = pytest.mark.timeout(300)

OBJECTIVES = [   # (objective, model family, extra config): every way the JVP's tangent is used
    ("mf", "mf_dit", {}),
    ("imf", "imf_dit", {"imf.tangent": "v_head"}),
    ("sg_lambda", "mf_dit", {"sg_lambda.start": 1.0, "sg_lambda.end": 1.0}),   # backward through the tangent
    ("stability", "mf_dit", {"stability.base": "mf"}),
]


@pytest.fixture(autouse=True)
def eager_afterwards():
    yield
    set_block_execution("none", False)
    torch._dynamo.reset()


def loss_grad_and_saved_bytes(name, family, extra, dtype=torch.float64):
    """The objective's loss and gradients, and the bytes autograd kept for the backward (parameters excluded)."""
    model = tiny_dit(family, v_head=family == "imf_dit", dtype=dtype)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(t):
        try:
            storage = t.untyped_storage()
            pointer = storage.data_ptr()
        except (RuntimeError, NotImplementedError):   # forward AD's efficient zero tensors hold no memory
            return t
        if pointer not in params:
            kept[pointer] = storage.nbytes()
        return t

    cfg = objective_cfg(name, **{"time.share_r_eq_t": 0.5, **extra})
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = build_objective(cfg, NUM_CLASSES).compute(model, image_batch(8, dtype=dtype), 3,
                                                       ObjectiveContext.single_process(8, 0))
    return out.loss.detach(), flat_grad(out.loss, model), sum(kept.values())


@pytest.mark.parametrize("name,family,extra", OBJECTIVES, ids=[o[0] for o in OBJECTIVES])
def test_checkpointing_under_the_jvp_gives_the_same_loss_and_gradients_and_keeps_less(name, family, extra):
    loss, grad, kept = loss_grad_and_saved_bytes(name, family, extra)
    set_block_execution("none", checkpointing=True)
    loss_ck, grad_ck, kept_ck = loss_grad_and_saved_bytes(name, family, extra)
    torch.testing.assert_close(loss_ck, loss, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad_ck, grad, rtol=1e-10, atol=1e-13)
    assert kept_ck < 0.7 * kept, (kept_ck, kept)


def test_torch_checkpoint_alone_cannot_replay_a_tangent():
    """Why execution.py checkpoints primals and tangents itself: torch's non-reentrant checkpoint recomputes in the
    backward, outside the dual level, and finds fewer saved tensors (torch 2.14.1). If this starts passing,
    upstream handles forward AD and our wrapper may go."""
    from meanflow.models import execution

    set_block_execution("none", checkpointing=True)
    plain = execution._run_with_tangents
    execution._run_with_tangents = lambda forward, module, inputs: torch.utils.checkpoint.checkpoint(
        forward, module, *inputs, use_reentrant=False)
    try:
        with pytest.raises(CheckpointError, match="different number of tensors"):
            loss_grad_and_saved_bytes("mf", "mf_dit", {})
    finally:
        execution._run_with_tangents = plain


def compiled_graphs() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


@pytest.mark.parametrize("mode,backend", [("outside_jvp", "inductor"), ("all", "aot_eager")])
def test_compiled_blocks_match_eager_for_fm_mf_imf_and_sampling(mode, backend):
    """``outside_jvp``: the fm step, the guidance forwards, the rows with r = t and sampling are compiled, the JVP
    eager. ``all`` compiles the JVP too (tests/test_compiled_jvp.py shows it compiled, and with inductor); aot_eager
    (the GPU suite's CPU smoke) traces the same graphs and runs them with eager kernels."""
    cases = [("fm", "mf_dit", {}), ("mf", "mf_dit", {"guidance.omega": 2.0, "guidance.kappa": 0.5}),
             ("imf", "imf_dit", {"imf.tangent": "v_head"})]
    for name, family, extra in cases:
        eager_loss, eager_grad, _ = loss_grad_and_saved_bytes(name, family, extra, torch.float32)
        set_block_execution(mode, compile_backend=backend)
        before = compiled_graphs()
        loss, grad, _ = loss_grad_and_saved_bytes(name, family, extra, torch.float32)
        set_block_execution("none")
        assert compiled_graphs() > before, f"{name}: nothing was compiled"
        # float32 with another summation order: compare against the largest value (gradients reach ~1e4 here)
        assert relative_error(loss, eager_loss) < 1e-5 and relative_error(grad, eager_grad) < 1e-4, name

    model = tiny_dit(dtype=torch.float32).eval()
    noise, labels = torch.randn(5, 1, 4, 4), torch.tensor([0, 1, 2, 0, 1])
    with torch.no_grad():
        eager = sample(model, noise, steps=2, y=labels)
        set_block_execution(mode, compile_backend=backend)
        compiled = sample(model, noise, steps=2, y=labels)
    assert relative_error(compiled, eager) < 1e-5


def relative_error(got, want) -> float:
    return ((got - want).abs().max() / want.abs().max()).item()

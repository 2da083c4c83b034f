"""The JVP's tangent pass runs only on rows with r ≠ t: every objective's loss, stats and gradients
equal those of the JVP over every row (``objective.jvp_all_rows``), for MF-DiT, iMF-DiT (v-head and boundary) and
the MLP, in float64."""

from __future__ import annotations

import pytest
import torch

from meanflow.objectives import ObjectiveContext, build_objective, jvp
from objective_testkit import NUM_CLASSES, flat_grad, image_batch, objective_cfg, tiny_model, toy_batch

pytestmark = pytest.mark.timeout(120)

CASES = [   # (objective, model family, v_head, extra config)
    ("mf", "mf_dit", False, {}),
    ("sg_lambda", "mf_dit", False, {"sg_lambda.start": 1.0, "sg_lambda.end": 1.0}),   # gradient through the JVP
    ("tangent_beta", "mf_dit", False, {"tangent_beta.beta": 0.5, "tangent_beta.proxy": "boundary"}),
    ("stability", "mf_dit", False, {"stability.base": "mf"}),
    ("imf", "imf_dit", True, {"imf.tangent": "v_head"}),
    ("imf", "imf_dit", False, {"imf.tangent": "boundary"}),
    ("mf", "mlp", False, {}),
]


@pytest.mark.parametrize("name,family,v_head,extra", CASES, ids=[f"{c[0]}-{c[1]}-{c[3] or ''}" for c in CASES])
def test_jvp_on_the_needed_rows_equals_jvp_on_every_row(name, family, v_head, extra):
    B = 12
    batch = toy_batch(B) if family == "mlp" else image_batch(B)
    classes = 0 if family == "mlp" else NUM_CLASSES
    results = []
    for all_rows in (True, False):
        model = tiny_model(family, v_head=v_head) if family != "mlp" else tiny_model(family)
        cfg = objective_cfg(name, **{"time.share_r_eq_t": 0.5, "jvp_all_rows": all_rows, **extra})
        out = build_objective(cfg, classes).compute(model, batch, 3, ObjectiveContext.single_process(B, 0))
        results.append((out.loss, out.stats, flat_grad(out.loss, model)))
    (loss_all, stats_all, grad_all), (loss_split, stats_split, grad_split) = results
    assert 0 < int((out.t != out.r).sum()) < B          # both kinds of rows present
    torch.testing.assert_close(loss_split, loss_all, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad_split, grad_all, rtol=1e-9, atol=1e-12)
    for key, value in stats_all.items():
        torch.testing.assert_close(stats_split[key], value, rtol=1e-9, atol=1e-12, msg=key)


@pytest.mark.parametrize("family,v_head", [("mf_dit", False), ("imf_dit", True), ("mlp", False)])
@pytest.mark.parametrize("share_r_eq_t", [0.0, 1.0])
def test_a_batch_of_one_kind_of_rows_still_makes_both_calls(family, v_head, share_r_eq_t):
    """Every row r ≠ t (or every row r = t): one part is empty, and the model runs on 0 rows (FSDP2 needs the same
    number of forwards on every rank); the loss equals the JVP over every row."""
    B = 6
    batch = toy_batch(B) if family == "mlp" else image_batch(B)
    classes = 0 if family == "mlp" else NUM_CLASSES
    name = "imf" if family == "imf_dit" else "mf"
    losses = []
    for all_rows in (True, False):
        model = tiny_model(family, v_head=v_head) if family != "mlp" else tiny_model(family)
        cfg = objective_cfg(name, **{"time.share_r_eq_t": share_r_eq_t, "jvp_all_rows": all_rows})
        ctx = ObjectiveContext.single_process(B, 0)
        losses.append(build_objective(cfg, classes).compute(model, batch, 1, ctx).loss)
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-10, atol=1e-12)


def test_rows_give_zero_tangent_and_the_full_primal():
    """jvp(rows=mask): the primal on every row, the tangent on the masked rows, 0 elsewhere; a tuple output too."""
    A = torch.randn(3, 3, dtype=torch.float64)

    def fn(z, s):
        return (z @ A.T) * s[:, None], z.sum(1)

    z, s, dz = torch.randn(5, 3, dtype=torch.float64), torch.rand(5, dtype=torch.float64), torch.randn(5, 3)
    mask = torch.tensor([True, False, True, False, False])
    (out, total), (tangent, total_tangent) = jvp(fn, dict(z=z, s=s), dict(z=dz.double()), rows=mask)
    torch.testing.assert_close(out, (z @ A.T) * s[:, None])
    torch.testing.assert_close(total, z.sum(1))
    expected = (dz.double() @ A.T) * s[:, None]
    torch.testing.assert_close(tangent[mask], expected[mask])
    assert torch.all(tangent[~mask] == 0) and torch.all(total_tangent[~mask] == 0)

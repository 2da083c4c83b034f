"""Which rows lose their label: the official layout (Bin(B, p) rows, the first ones of the r = t set, as both
official codes drop the first rows of a batch whose r = t rows come first) by default, an independent draw per
row on request; and MF's training CFG skips the conditional forward that κ = 0 weighs by zero."""

from __future__ import annotations

import pytest
import torch

from meanflow.objectives import ObjectiveContext, build_objective
from meanflow.objectives.base import noise_batch
from meanflow.objectives.randomness import StepRandom
from objective_testkit import NUM_CLASSES, Spy, image_batch, objective_cfg, tiny_model

# Every objective with a label drop, at its own default (t, r) sampler: MF's r = t share 0.75, iMF's 0.5.
DROPPING = {"mf": {}, "sg_lambda": {}, "tangent_beta": {}, "imf": {"time.share_r_eq_t": 0.5}}


def drawn(name: str, layout: str, step: int, batch: int = 256, rows: torch.Tensor | None = None, **overrides):
    cfg = objective_cfg(name, **{"guidance.drop_layout": layout, **DROPPING[name], **overrides})
    ctx = ObjectiveContext(seed=0, global_batch=batch, rows=torch.arange(batch) if rows is None else rows)
    data = image_batch(batch, seed=step)
    data = {k: v[ctx.rows] for k, v in data.items()}
    return noise_batch(data, step, ctx, cfg, NUM_CLASSES)


@pytest.mark.parametrize("name", DROPPING)
def test_official_layout_drops_the_first_rows_of_the_r_eq_t_set(name):
    counts = []
    for step in range(20):
        nb = drawn(name, "official", step)
        n = int(nb.dropped.sum())
        counts.append(n)
        r_eq_t_rows = (nb.t == nb.r).nonzero().squeeze(1)
        assert n <= len(r_eq_t_rows)
        assert torch.equal(nb.dropped.nonzero().squeeze(1), r_eq_t_rows[:n])   # a prefix of the r = t set
        assert torch.equal(nb.y_model[nb.dropped], torch.full((n,), NUM_CLASSES))
    # Bin(256, 0.1): mean 25.6, sd 4.8; a count that varies from step to step, not a fixed share
    assert 15 < sum(counts) / len(counts) < 36 and len(set(counts)) > 3


def test_independent_layout_drops_rows_with_r_ne_t_too():
    nb = drawn("mf", "independent", step=0)
    assert (nb.dropped & (nb.t != nb.r)).any() and not nb.dropped[: int(nb.dropped.sum())].all()


def test_official_layout_is_the_same_whatever_the_split_over_ranks():
    whole = drawn("mf", "official", step=3).dropped
    halves = [drawn("mf", "official", step=3, rows=torch.arange(k * 128, (k + 1) * 128)).dropped for k in (0, 1)]
    assert torch.equal(torch.cat(halves), whole)


def test_an_unknown_layout_is_an_error_naming_the_key():
    with pytest.raises(ValueError, match="drop_layout"):
        drawn("mf", "sideways", step=0)


@pytest.mark.parametrize("kappa, forwards", [(0.0, 1), (0.5, 2)])
def test_mf_training_cfg_takes_the_conditional_forward_only_when_kappa_weighs_it(kappa, forwards):
    """Besides the JVP's own calls, training CFG at ω ≠ 1 takes the unconditional no-grad forward, and the
    conditional one only when κ > 0 (κ = 0 multiplies it by zero)."""
    cfg = objective_cfg("mf", **{"guidance.omega": 1.5, "guidance.kappa": kappa})
    spy = Spy(tiny_model("mf_dit"))
    batch = image_batch(16)
    build_objective(cfg, NUM_CLASSES)(spy, batch, 0, ObjectiveContext.single_process(16))
    no_grad_at_r_eq_t = [c for c in spy.calls if len(c["t"]) == 16 and torch.equal(c["t"], c["r"])]
    assert len(no_grad_at_r_eq_t) == forwards


def test_binomial_count_is_drawn_over_the_global_batch():
    counts = {StepRandom(0, step, 1000, torch.arange(10), torch.device("cpu")).binomial_count("label_drop", 0.1)
              for step in range(5)}
    assert all(60 < c < 140 for c in counts) and len(counts) > 1

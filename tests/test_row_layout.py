"""Which rows of the global batch have r = t: a fixed count spread evenly over the global index, so a rank's
contiguous slice holds its fair part of the JVP rows whatever the world size, and the split over ranks changes no
draw."""

from __future__ import annotations

import pytest
import torch

from meanflow.objectives import NAMES, ObjectiveContext, build_objective
from meanflow.objectives.randomness import StepRandom
from objective_testkit import NUM_CLASSES, image_batch, objective_cfg, tiny_dit

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("one_thread")]

GLOBAL_BATCH = 840          # divisible by every world size 1..8
# fm has r = t on every row; dmf draws its own (t, r) per branch and has no r = t share.
WITH_R_EQ_T_SHARE = [name for name in NAMES if name not in ("fm", "dmf")]


def _whole_batch_times(name: str, step: int = 3):
    """(t, r) of the whole global batch, drawn by the objective at its default settings."""
    model = tiny_dit("imf_dit", v_head=True) if name == "imf" else tiny_dit("mf_dit")
    overrides = {"tangent_beta.proxy": "boundary"} if name == "tangent_beta" else {}   # its default needs an EMA
    objective = build_objective(objective_cfg(name, **overrides), NUM_CLASSES)
    out = objective.compute(model, image_batch(GLOBAL_BATCH, seed=1), step,
                            ObjectiveContext.single_process(GLOBAL_BATCH, 0))
    return out.t, out.r


@pytest.mark.parametrize("name", WITH_R_EQ_T_SHARE)
def test_every_rank_holds_its_fair_part_of_the_jvp_rows_at_every_world_size(name):
    t, r = _whole_batch_times(name)
    jvp_rows = t != r
    assert 0 < int(jvp_rows.sum()) < GLOBAL_BATCH, "the default share leaves both kinds of rows"
    for world in range(1, 9):
        per_rank = [int(part.sum()) for part in jvp_rows.chunk(world)]
        assert max(per_rank) - min(per_rank) <= 1, (world, per_rank)


@pytest.mark.parametrize("share", [0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0])
@pytest.mark.parametrize("global_batch", [1, 7, 64, 1000])
def test_the_share_is_a_fixed_count_that_no_split_over_ranks_changes(share, global_batch):
    whole = StepRandom(0, 0, global_batch, torch.arange(global_batch), torch.device("cpu")).spread_share(share)
    assert int(whole.sum()) == int(share * global_batch)
    for world in (2, 3, 8):
        parts = [StepRandom(0, 0, global_batch, rows, torch.device("cpu")).spread_share(share)
                 for rows in torch.arange(global_batch).chunk(world)]
        assert torch.equal(torch.cat(parts), whole)


def test_a_rank_with_few_rows_can_still_hold_only_r_eq_t_rows():
    """Spreading bounds the imbalance by one row, not to zero: with 2 rows a rank at share 0.75 may hold none of
    the JVP rows, so objectives may not skip a model call on such a rank (FSDP2 gathers in every forward)."""
    rand = StepRandom(0, 0, 4, torch.arange(4), torch.device("cpu"))
    assert rand.spread_share(0.75).tolist() == [False, True, True, True]


def test_first_of_spread_orders_the_set_first_then_the_other_rows():
    rand = StepRandom(0, 0, 8, torch.arange(8), torch.device("cpu"))
    in_set = rand.spread_share(0.5)                       # rows 1, 3, 5, 7
    assert in_set.nonzero().squeeze(1).tolist() == [1, 3, 5, 7]
    assert rand.first_of_spread(0.5, 3).nonzero().squeeze(1).tolist() == [1, 3, 5]
    assert rand.first_of_spread(0.5, 6).nonzero().squeeze(1).tolist() == [0, 1, 2, 3, 5, 7]
    assert rand.first_of_spread(0.0, 2).nonzero().squeeze(1).tolist() == [0, 1]

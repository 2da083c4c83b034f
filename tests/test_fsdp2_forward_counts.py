"""FSDP2 all-gathers a unit's parameters in every forward, so every rank must call the model as often as the others
whatever its rows drew, and report the same stats. In one process: every objective makes the same calls into every
module, and reports the same stat keys, on one-row micro-batches of every kind. On two ranks (fsdp2, gloo) that
train a step on which their rows differ in kind, with a short process-group timeout: a forward that one rank skips
leaves the other waiting in a collective (a hang until the timeout, or a collective mismatch), and a stat reported
by one rank only breaks the metrics all-reduce."""

from __future__ import annotations

import json
import math
from collections import Counter

import pytest
import torch

from distributed_run import run_world
from meanflow.objectives import NAMES, build_objective
from meanflow.objectives.base import drop_labels
from meanflow.objectives.imf import effective_omega, sample_guidance
from meanflow.objectives.randomness import StepRandom
from meanflow.objectives.time_sampling import sample_time_pairs
from meanflow.platform.config import load_config
from objective_testkit import (NUM_CLASSES, gaussian_marginal_velocity, image_batch, micro_context, objective_cfg,
                               sub_batch, tiny_decoupled_dit, tiny_dit)

pytestmark = [pytest.mark.timeout(240), pytest.mark.usefixtures("one_thread")]

WORLD = 2

# ---------------------------------------------------------------------------------------- one process, every row


DRAWS = {"time.share_r_eq_t": 0.5, "label_drop": 0.5, "alphaflow.share_fm": 0.5, "split_mf.share_boundary": 0.5,
         "alphaflow.start_step": 2, "alphaflow.end_step": 6, "alphaflow.gamma": 1.0}
CASES = {   # id: (model, objective config, step)
    "fm": (tiny_dit, {"name": "fm"}, 3),
    "mf": (tiny_dit, {"name": "mf", "guidance.omega": 2.0, "guidance.kappa": 0.5, "guidance.t_end": 0.6}, 3),
    "sg_lambda": (tiny_dit, {"name": "sg_lambda"}, 3),
    "imf": (lambda: tiny_dit("imf_dit", v_head=True), {"name": "imf"}, 3),
    "tangent_beta": (tiny_dit, {"name": "tangent_beta", "tangent_beta.proxy": "boundary",
                                "tangent_beta.beta_star_every": 1}, 3),
    "split_mf": (tiny_dit, {"name": "split_mf"}, 3),
    "alphaflow-interval": (tiny_dit, {"name": "alphaflow"}, 4),
    "alphaflow-meanflow": (tiny_dit, {"name": "alphaflow"}, 6),
    "stability-imf": (lambda: tiny_dit("imf_dit", v_head=True), {"name": "stability", "stability.base": "imf"}, 3),
    "dmf": (tiny_decoupled_dit, {"name": "dmf"}, 3),
}


def test_every_registered_objective_has_a_case():
    assert {cfg["name"] for _, cfg, _ in CASES.values()} == set(NAMES)


def row_kind(out) -> tuple[bool, ...]:
    """What a data-dependent branch could read off a row: r = t, a dropped label, and (iMF) ω̃ = 1."""
    y = out.model_kwargs.get("y")
    omega = out.model_kwargs.get("omega")
    return (bool(out.t == out.r), y is not None and bool(y == NUM_CLASSES),
            omega is not None and bool(effective_omega(omega, out.t) == 1))


@pytest.mark.parametrize("case", list(CASES))
def test_a_micro_batch_calls_every_module_as_often_whatever_its_rows(case):
    make_model, overrides, step = CASES[case]
    B = 8
    model, batch = make_model(), image_batch(B)
    calls: Counter = Counter()
    for name, module in model.named_modules():
        module.register_forward_pre_hook(lambda module, args, name=name: calls.update([name]))
    objective = build_objective(objective_cfg(**{**DRAWS, **overrides}), NUM_CLASSES)
    per_row, kinds = [], set()
    for i in range(B):
        rows = torch.tensor([i])
        calls.clear()
        ctx = micro_context(0, B, rows, marginal_velocity=gaussian_marginal_velocity(1.0))
        out = objective.compute(model, sub_batch(batch, rows), step, ctx)
        per_row.append((dict(calls), sorted(out.stats)))
        kinds.add(row_kind(out))
    assert len(kinds) > 1, kinds
    if case not in ("fm", "dmf"):   # (fm: r = t on every row; dmf: on none)
        assert {kind[0] for kind in kinds} == {True, False}, kinds
    if case == "imf":
        assert (False, False, True) in kinds, kinds   # a row whose unconditional forward is weighed by 0
    assert all(calls_and_keys == per_row[0] for calls_and_keys in per_row), per_row


# ------------------------------------------------------------------------------------------------ two ranks, fsdp2

PG_TIMEOUT = "engine.process_group_timeout_s=30"   # a rank left waiting fails in 30 s, not the default 10 min


def overrides(run_dir, global_batch: int, seed: int) -> list[str]:
    return [f"run.run_dir={run_dir}", "run.steps=1", "run.log_every=1", f"run.seed={seed}",
            f"data.global_batch={global_batch}", "engine.kind=fsdp2", PG_TIMEOUT, "eval.at_end=false",
            "checkpoint.every=0"]


def rank_draws(cfg, seed: int) -> list[dict[str, torch.Tensor]]:
    """Each rank's step-0 draws, as its objective makes them: (t, r), ω̃ and the dropped labels."""
    local = cfg.data.global_batch // WORLD
    out = []
    for rank in range(WORLD):
        rand = StepRandom(seed, 0, cfg.data.global_batch, torch.arange(rank * local, (rank + 1) * local),
                          torch.device("cpu"))
        t, r = sample_time_pairs(rand, cfg.objective.time)
        _, dropped = drop_labels(torch.zeros(local, dtype=torch.long), rand, cfg.objective.label_drop,
                                 cfg.model.num_classes, cfg.objective.guidance.drop_layout,
                                 cfg.objective.time.share_r_eq_t)
        omega_tilde = effective_omega(sample_guidance(rand, cfg.objective.imf, t, r), t)
        out.append(dict(t=t, r=r, dropped=dropped, omega_tilde=omega_tilde))
    return out


def first_seed(cfg, precondition) -> int:
    """The first run seed whose step-0 draws meet ``precondition`` (a function of every rank's draws)."""
    for seed in range(200):
        if precondition(rank_draws(cfg, seed)):
            return seed
    raise AssertionError("no seed below 200 meets the precondition")


def metrics(run_dir) -> dict:
    (record,) = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
                 if '"event"' not in line]
    return record


def test_tangent_beta_diagnostic_on_a_rank_whose_rows_are_all_r_eq_t(tmp_path):
    """β* is taken on the rows with r ≠ t: a rank with none still makes its JVP (on 0 rows) and reports the stat."""
    extra = ["objective.name=tangent_beta", "objective.tangent_beta.beta_star_every=1",
             "objective.time.share_r_eq_t=0.75"]
    cfg = load_config("tiny_mf", [*overrides(tmp_path, 4, 0), *extra])

    def one_rank_all_r_eq_t(draws):
        all_boundary = [bool((d["t"] == d["r"]).all()) for d in draws]
        return any(all_boundary) and not all(all_boundary)

    seed = first_seed(cfg, one_rank_all_r_eq_t)
    run_world(WORLD, "tiny_mf", [*overrides(tmp_path, 4, seed), *extra])
    record = metrics(tmp_path)
    assert record["step"] == 1 and "beta_star_bound" in record
    assert all(math.isfinite(v) for v in record.values() if isinstance(v, float)), record


def test_imf_on_a_rank_with_no_guided_row_and_no_dropped_label(tmp_path):
    """The unconditional forward is weighed by 0 on a rank whose every ω̃ is 1 and no label was dropped; it still
    runs there, since the other rank needs it."""
    cfg = load_config("tiny_imf", overrides(tmp_path, 2, 0))

    def one_rank_unguided(draws):
        unguided = [bool((d["omega_tilde"] == 1).all()) and not bool(d["dropped"].any()) for d in draws]
        return any(unguided) and not all(unguided)

    seed = first_seed(cfg, one_rank_unguided)
    run_world(WORLD, "tiny_imf", overrides(tmp_path, 2, seed))
    assert metrics(tmp_path)["step"] == 1

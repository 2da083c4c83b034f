"""Specification of the consistency sampler (α-Flow's multi-step sampler, docs/objectives.md):
``x̂ = z − t·u(z, r=0, t)``, then re-noise ``z ← (1 − t')·x̂ + t'·ε`` and repeat down the time grid;
``eval.sampler`` / ``eval.steps`` choose it in evaluation, and its results are recorded (and kept) apart from the
flow map's."""

from __future__ import annotations

import json
import math

import pytest
import torch

from meanflow.evaluation.evaluator import Evaluator, describe_data
from meanflow.evaluation.outputs import setting_key, write_results
from meanflow.evaluation.sampling import generate, sampling_setting
from meanflow.models import build_model
from meanflow.objectives import guidance_conditions, sample, sample_noise
from meanflow.objectives.samplers import renoise_noise
from meanflow.platform.config import load_config

from objective_testkit import PointMassVelocity, Spy, tiny_model

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("one_thread")]

F64 = torch.float64


def conditions(family: str, n: int):
    """(shape, labels, guidance conditions) a model of this family is sampled with."""
    if family == "mlp":
        return (2,), None, None
    omega = guidance_conditions(n, 8.0, 0.42, 0.62).to(F64) if family == "imf_dit" else None
    return (1, 4, 4), torch.arange(n) % 3, omega


@pytest.mark.parametrize("family", ["mlp", "mf_dit", "imf_dit"])
def test_one_consistency_step_is_the_one_nfe_sampler_exactly(family):
    model = tiny_model(family).eval()
    shape, y, omega = conditions(family, 4)
    noise = sample_noise(range(4), shape, seed=3).to(F64)
    one_nfe = sample(model, noise, steps=1, y=y, omega=omega)
    for steps in ([1.0, 0.0], 1):
        out = sample(model, noise, steps=steps, y=y, omega=omega, sampler="consistency", renoise=[])
        torch.testing.assert_close(out, one_nfe, rtol=0, atol=0)


@pytest.mark.parametrize("family", ["mlp", "imf_dit"])
def test_each_step_jumps_to_r_0_and_renoises_to_the_next_time(family):
    model = Spy(tiny_model(family)).eval()
    shape, y, omega = conditions(family, 5)
    noise = sample_noise(range(5), shape, seed=0).to(F64)
    grid = [1.0, 0.55, 0.2, 0.0]
    eps = [e.to(F64) for e in renoise_noise(range(5), shape, seed=0, count=2)]
    out = sample(model, noise, steps=grid, y=y, omega=omega, sampler="consistency", renoise=eps)
    assert len(model.calls) == 3
    z = noise
    for i, call in enumerate(model.calls):
        torch.testing.assert_close(call["t"], torch.full((5,), grid[i], dtype=F64), rtol=0, atol=0)
        torch.testing.assert_close(call["r"], torch.zeros(5, dtype=F64), rtol=0, atol=0)
        torch.testing.assert_close(call["x"], z, rtol=0, atol=1e-14)
        assert (y is None or torch.equal(call["y"], y)) and (omega is None or torch.equal(call["omega"], omega))
        with torch.no_grad():
            x_hat = z - grid[i] * model.inner(z, t=call["t"], r=call["r"], y=y, omega=omega)
        z = (1 - grid[i + 1]) * x_hat + grid[i + 1] * eps[i] if i < 2 else x_hat
    torch.testing.assert_close(out, z, rtol=0, atol=1e-14)


@pytest.mark.parametrize("steps", [2, 5, [1.0, 0.55, 0.0], [1.0, 0.9, 0.3, 0.01, 0.0]])
def test_exact_flow_map_of_a_point_mass_lands_on_it_for_any_number_of_steps(steps):
    """u*(z, r, t) = (z − x0)/t: every x̂ is x0, so re-noising never moves the end point."""
    x0 = torch.tensor([1.5, -0.5], dtype=F64)
    noise = sample_noise(range(6), (2,), seed=2).to(F64)
    count = (steps if isinstance(steps, int) else len(steps) - 1) - 1
    eps = [e.to(F64) for e in renoise_noise(range(6), (2,), seed=2, count=count)]
    out = sample(PointMassVelocity(x0), noise, steps=steps, sampler="consistency", renoise=eps)
    torch.testing.assert_close(out, x0.expand(6, 2), rtol=0, atol=1e-12)


def test_consistency_needs_one_renoise_per_intermediate_time():
    noise = sample_noise(range(2), (2,), seed=0).to(F64)
    with pytest.raises(ValueError, match="re-noise"):
        sample(PointMassVelocity(torch.zeros(2, dtype=F64)), noise, steps=3, sampler="consistency", renoise=[])


def test_renoise_is_fresh_per_step_and_a_function_of_seed_and_index():
    shape = (1, 4, 4)
    initial = sample_noise(range(8), shape, seed=5)
    whole = renoise_noise(range(8), shape, seed=5, count=2)
    halves = [renoise_noise(range(s, s + 4), shape, seed=5, count=2) for s in (0, 4)]
    for k in range(2):
        torch.testing.assert_close(torch.cat([h[k] for h in halves]), whole[k], rtol=0, atol=0)
        for i in range(8):
            assert not torch.equal(whole[k][i], initial[i])
    assert not torch.equal(whole[0], whole[1])
    # And so generation: sample i is the same in one batch of 8 or two of 4.
    model = tiny_model("mf_dit", dtype=torch.float32)
    runs = [torch.cat([x for _, x, _ in generate(model, range(8), shape, 3, seed=5, sampler="consistency",
                                                 steps=[1.0, 0.55, 0.2, 0.0], batch_size=b)]) for b in (8, 4)]
    torch.testing.assert_close(runs[1], runs[0], rtol=0, atol=0)


def toy_config(*overrides: str):
    return load_config("toy2d_mf", ["eval.num_samples=64", "eval.batch_size=32", *overrides])


@pytest.mark.parametrize("steps", ["[1,0.5]", "[0.5,0]", "[1,0.5,0.5,0]", "[1]"])
def test_a_bad_time_grid_is_a_clear_error(steps):
    cfg = toy_config("eval.sampler=consistency", f"eval.steps={steps}")
    with pytest.raises(ValueError, match=r"eval\.steps.*from 1 down to 0"):
        sampling_setting(cfg.eval)
    with pytest.raises(ValueError, match=r"eval\.steps"):
        Evaluator(cfg, describe_data(cfg.data, cfg.run.seed), "cpu")


def test_the_grid_sets_the_nfe_and_empty_is_uniform():
    assert sampling_setting(toy_config("eval.sampler=consistency", "eval.steps=[1,0.55,0]").eval) == \
        {"sampler": "consistency", "steps": [1.0, 0.55, 0.0], "nfe": 2}
    assert sampling_setting(toy_config("eval.sampler=consistency", "eval.nfe=3").eval) == \
        {"sampler": "consistency", "steps": [], "nfe": 3}
    assert sampling_setting(toy_config().eval) == {"sampler": "flow_map", "steps": [], "nfe": 1}


def test_toy_evaluation_records_the_sampler_and_keeps_both_samplers_results(tmp_path):
    torch.manual_seed(0)
    flow = toy_config()
    model = build_model(flow.model)
    data = describe_data(flow.data, flow.run.seed)
    rows = []
    for cfg in (flow, toy_config("eval.sampler=consistency", "eval.steps=[1,0.5,0]")):
        [result] = Evaluator(cfg, data, "cpu").run(model, step=7)
        write_results(str(tmp_path), 7, [result])
        rows.append(result.metrics)
    assert rows[1]["sampler"] == "consistency" and rows[1]["nfe"] == 2 and rows[1]["steps"] == [1.0, 0.5, 0.0]
    assert rows[0]["sampler"] == "flow_map" and rows[0]["nfe"] == 1
    assert all(math.isfinite(r["sw1"]) and math.isfinite(r["sw2"]) for r in rows)
    assert setting_key(rows[0]) != setting_key(rows[1])
    # rows written before the sampler was recorded are flow-map rows on the uniform grid
    legacy = {k: v for k, v in rows[0].items() if k not in ("sampler", "steps")}
    assert setting_key(legacy) == setting_key(rows[0])
    stored = json.loads((tmp_path / "eval" / "step-00000007" / "metrics.json").read_text())["results"]
    assert [r["sampler"] for r in stored] == ["flow_map", "consistency"]
    assert len({r["picture"] for r in stored}) == 2

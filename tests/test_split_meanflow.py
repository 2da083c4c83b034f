"""SplitMeanFlow (``split_mf``, docs/objectives.md) and the pretrained-weights loader its teacher comes from.

The exactness check uses Gaussian data N(μ, σ_d²·I), whose flow map is known in closed form and curved (so a target
mixing the two sub-interval velocities with the wrong weights is wrong by far more than rounding).
"""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from meanflow.models.export import export_bytes
from meanflow.models.pretrained import load_flow_weights, load_teacher
from meanflow.objectives import ObjectiveContext, SplitMeanFlow, build_objective
from meanflow.objectives.base import adaptive_weighted_loss
from meanflow.objectives.randomness import StepRandom

from objective_testkit import (NUM_CLASSES, Spy, bcast, conditional_velocity, flat_grad, image_batch,
                               micro_context, objective_cfg, sub_batch, target_from_gradient, tiny_dit, tiny_mlp,
                               toy_batch)

MU, SIGMA_D = torch.tensor([1.5, -0.5], dtype=torch.float64), 0.6


def split_cfg(**overrides):
    return objective_cfg("split_mf", **{"time.kind": "uniform", **overrides})


class GaussianFlowMap(nn.Module):
    """The exact average velocity for x ~ N(μ, σ_d²·I): z_r = m_r + (σ_r/σ_t)(z_t − m_t), m_t = (1 − t)μ,
    σ_t = √((1 − t)²σ_d² + t²), u* = (z_t − z_r)/(t − r); at r = t its limit, the velocity
    −μ + (σ_t'/σ_t)(z − m_t) with σ_t σ_t' = t − (1 − t)σ_d². Float64 throughout. ``gain`` (1) puts the output in
    the autograd graph, so a loss on it has a gradient."""

    def __init__(self):
        super().__init__()
        self.gain = nn.Parameter(torch.ones((), dtype=torch.float64))

    def forward(self, x, *, t, r, y=None, omega=None):
        t, r = bcast(t.double(), x), bcast(r.double(), x)
        m_t, m_r = (1 - t) * MU, (1 - r) * MU
        var_t, sigma_r = (1 - t) ** 2 * SIGMA_D**2 + t**2, ((1 - r) ** 2 * SIGMA_D**2 + r**2).sqrt()
        h = t - r
        interval = (x - m_r - sigma_r / var_t.sqrt() * (x - m_t)) / torch.where(h > 0, h, 1.0)
        boundary = -MU + (t - (1 - t) * SIGMA_D**2) / var_t * (x - m_t)
        return self.gain * torch.where(h > 0, interval, boundary)


def gaussian_draws(B: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    t = 0.05 + 0.95 * torch.rand(B, generator=gen, dtype=torch.float64)
    r = t * torch.rand(B, generator=gen, dtype=torch.float64)
    x = MU + SIGMA_D * torch.randn(B, 2, generator=gen, dtype=torch.float64)
    z = (1 - bcast(t, x)) * x + bcast(t, x) * torch.randn(B, 2, generator=gen, dtype=torch.float64)
    return z, t, r


# ==============================================================================================================
# The interval-splitting target
# ==============================================================================================================


@pytest.mark.parametrize("lam", [0.0, 0.1, 0.3, 0.5, 0.8, 1.0])
def test_split_target_is_the_exact_average_velocity_for_gaussian_data(lam):
    B, model = 64, GaussianFlowMap()
    z, t, r = gaussian_draws(B)
    lam_B = torch.full((B,), lam, dtype=torch.float64)
    target = SplitMeanFlow(split_cfg()).split_target(model, z, t, r, lam_B, None)
    exact = model(z, t=t, r=r).detach()
    assert float((target - exact).abs().max()) < 1e-10


def test_swapping_lambda_and_one_minus_lambda_in_the_target_is_caught():
    B, model = 256, GaussianFlowMap()
    z, t, r = gaussian_draws(B, seed=1)
    lam = torch.rand(B, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    s = (1 - lam) * t + lam * r
    u2 = model(z, t=t, r=s)
    u1 = model(z - bcast(t - s, z) * u2, t=s, r=r)
    swapped = bcast(lam, z) * u1 + bcast(1 - lam, z) * u2
    err = (swapped - model(z, t=t, r=r)).detach().norm(dim=1)
    assert float(err.max()) > 1e-2 and float(err.median()) > 1e-4   # the expected spread: 1e-3 … 0.4
    # ... while the objective's own mixture of the same draws is exact
    target = SplitMeanFlow(split_cfg()).split_target(model, z, t, r, lam, None)
    assert float((target - model(z, t=t, r=r).detach()).abs().max()) < 1e-10


def test_loss_is_zero_for_the_exact_model_and_its_target_equals_the_exact_average_velocity():
    B, step, seed = 64, 3, 5
    x = MU + SIGMA_D * torch.randn(B, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    obj = SplitMeanFlow(split_cfg(**{"split_mf.share_boundary": 0.0, "weight_p": 0.0}))
    model = GaussianFlowMap()
    out = obj.compute(model, {"x": x}, step, ObjectiveContext.single_process(B, seed))
    assert bool((out.r < out.t).all())
    assert float(out.stats["mse"]) < 1e-20 and float(out.stats["loss"]) < 1e-20
    exact = model(out.z, t=out.t, r=out.r).detach()
    assert float((target_from_gradient(out, B) - exact).abs().max()) < 1e-10


def test_the_objective_draws_lambda_per_sample_and_calls_the_model_at_s_and_z_s_by_keyword():
    B, step, seed = 8, 4, 9
    cfg = split_cfg(**{"split_mf.share_boundary": 0.25})
    model = Spy(tiny_mlp())
    out = SplitMeanFlow(cfg).compute(model, toy_batch(B), step, ObjectiveContext.single_process(B, seed))
    lam = StepRandom(seed, step, B, torch.arange(B), torch.device("cpu")).uniform("split_lambda", dtype=out.t.dtype)
    interval = (out.t != out.r).nonzero().squeeze(1)      # 6 of 8 rows, the boundary's 2 spread among them
    assert len(interval) == 6
    train, u2_call, u1_call = model.calls          # no guidance, no labels: exactly three calls
    assert torch.equal(train["t"], out.t) and torch.equal(train["r"], out.r)
    t, r, lam = out.t[interval], out.r[interval], lam[interval]
    s = (1 - lam) * t + lam * r
    torch.testing.assert_close(u2_call["t"], t, rtol=0, atol=0)
    torch.testing.assert_close(u2_call["r"], s, rtol=0, atol=0)
    torch.testing.assert_close(u1_call["t"], s, rtol=0, atol=0)
    torch.testing.assert_close(u1_call["r"], r, rtol=0, atol=0)
    with torch.no_grad():
        u2 = model.inner(out.z[interval], t=t, r=s)
    torch.testing.assert_close(u1_call["x"], out.z[interval] - bcast(t - s, u2) * u2, rtol=0, atol=1e-12)


# ==============================================================================================================
# The loss: gradient only through u_θ(z_t, r, t); boundary rows; teacher
# ==============================================================================================================


def _reference_target(model, out, x, lam, is_boundary, v_boundary):
    """An independent target: ṽ on boundary rows, (1 − λ)·u(z_s, r, s) + λ·u(z_t, s, t) on the others."""
    z, t, r = out.z, out.t, out.r
    s = (1 - lam) * t + lam * r
    with torch.no_grad():
        u2 = model(z, t=t, r=s)
        u1 = model(z - bcast(t - s, z) * u2, t=s, r=r)
    split = bcast(1 - lam, z) * u1 + bcast(lam, z) * u2
    return torch.where(bcast(is_boundary, z), v_boundary, split)


@pytest.mark.parametrize("p", [0.0, 1.0])
def test_loss_and_gradient_equal_those_of_a_constant_target(p):
    B, step, seed = 16, 7, 3
    cfg = split_cfg(**{"split_mf.share_boundary": 0.5, "weight_p": p})
    model, batch = tiny_mlp(), toy_batch(B, seed=4)
    out = SplitMeanFlow(cfg).compute(model, batch, step, ObjectiveContext.single_process(B, seed))
    lam = StepRandom(seed, step, B, torch.arange(B), torch.device("cpu")).uniform("split_lambda", dtype=out.t.dtype)
    is_boundary = torch.arange(B) % 2 == 1           # share 0.5 spread: ⌊(i + 1)/2⌋ > ⌊i/2⌋
    assert torch.equal(out.t == out.r, is_boundary)
    target = _reference_target(model, out, batch["x"], lam, is_boundary, conditional_velocity(out, batch["x"]))
    ref_loss, _ = adaptive_weighted_loss(model(out.z, t=out.t, r=out.r) - target, p, cfg.weight_c)
    torch.testing.assert_close(out.loss, ref_loss, rtol=1e-10, atol=0)
    torch.testing.assert_close(flat_grad(out.loss, model), flat_grad(ref_loss, model), rtol=1e-9, atol=1e-12)


class ConstantVelocity(nn.Module):
    def __init__(self, value: float):
        super().__init__()
        self.value = value
        self.calls: list[dict] = []

    def forward(self, x, *, t, r, y=None, omega=None):
        self.calls.append(dict(t=t, r=r, y=y))
        return torch.full_like(x, self.value)


def test_teacher_velocity_is_the_boundary_target_and_a_missing_teacher_is_an_error():
    B, step, seed = 8, 2, 6
    cfg = split_cfg(**{"split_mf.share_boundary": 0.5, "split_mf.v_source": "teacher", "weight_p": 0.0})
    model, batch, teacher = tiny_dit(), image_batch(B, seed=1), ConstantVelocity(0.37)
    obj = build_objective(cfg, NUM_CLASSES)
    out = obj.compute(model, batch, step, ObjectiveContext.single_process(B, seed, teacher=teacher))
    target = target_from_gradient(out, B)
    boundary = torch.arange(1, B, 2)               # share 0.5 spread: the odd rows
    interval = torch.arange(0, B, 2)
    torch.testing.assert_close(target[boundary], torch.full_like(target[boundary], 0.37), rtol=0, atol=1e-12)
    assert not torch.allclose(target[interval], torch.full_like(target[interval], 0.37))
    (call,) = teacher.calls                       # on the boundary rows only, at r = t, with the model's labels
    assert torch.equal(call["t"], out.t[boundary]) and torch.equal(call["r"], call["t"])
    torch.testing.assert_close(call["y"], out.model_kwargs["y"][boundary], rtol=0, atol=0)
    with pytest.raises(ValueError, match="teacher"):
        obj.compute(model, batch, step, ObjectiveContext.single_process(B, seed))


def test_conditional_boundary_target_uses_mf_training_cfg():
    B, step, seed = 8, 2, 6
    cfg = split_cfg(**{"split_mf.share_boundary": 1.0, "weight_p": 0.0, "guidance.kappa": 0.5,
                       "guidance.omega": 0.7, "label_drop": 0.0})
    model, batch = tiny_dit(), image_batch(B, seed=1)
    out = build_objective(cfg, NUM_CLASSES).compute(model, batch, step, ObjectiveContext.single_process(B, seed))
    with torch.no_grad():
        u_cond = model(out.z, t=out.t, r=out.t, y=batch["y"])
        u_null = model(out.z, t=out.t, r=out.t, y=torch.full_like(batch["y"], NUM_CLASSES))
    expected = 0.7 * conditional_velocity(out, batch["x"]) + 0.5 * u_cond + (1 - 0.7 - 0.5) * u_null
    torch.testing.assert_close(target_from_gradient(out, B), expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize("split", ["halves", "interleaved"])
def test_global_batch_loss_equals_mean_of_micro_batch_losses(split):
    B, step, seed = 8, 4, 21
    cfg = split_cfg(**{"split_mf.share_boundary": 0.25, "guidance.kappa": 0.5})
    model, batch = tiny_dit(), image_batch(B, seed=5)
    obj = build_objective(cfg, NUM_CLASSES)
    whole = obj.compute(model, batch, step, ObjectiveContext.single_process(B, seed))
    parts = [torch.arange(0, B // 2), torch.arange(B // 2, B)] if split == "halves" else \
        [torch.arange(0, B, 2), torch.arange(1, B, 2)]
    losses = [obj.compute(model, sub_batch(batch, rows), step, micro_context(seed, B, rows)).loss for rows in parts]
    torch.testing.assert_close(torch.stack(losses).mean(), whole.loss, rtol=1e-10, atol=0)


def test_every_micro_batch_makes_the_same_model_calls_whatever_its_rows():
    B, step, seed = 8, 4, 21
    cfg = split_cfg(**{"split_mf.share_boundary": 0.5, "guidance.kappa": 0.5})
    batch, obj = image_batch(B, seed=5), build_objective(cfg, NUM_CLASSES)
    counts = []
    for rows in (torch.arange(0, 4), torch.arange(4, 8)):     # all boundary rows, then all interval rows
        spy = Spy(tiny_dit())
        obj.compute(spy, sub_batch(batch, rows), step, micro_context(seed, B, rows))
        counts.append(len(spy.calls))
    assert counts[0] == counts[1] == 5   # trained forward, two guidance forwards, two split forwards


def test_stats_are_finite_detached_scalars_without_jvp_norm():
    B = 8
    loss, stats = build_objective(split_cfg(), NUM_CLASSES)(tiny_dit(), image_batch(B), 3,
                                                            ObjectiveContext.single_process(B, 1))
    assert set(stats) == {"loss", "mse", "u_norm"}
    for value in stats.values():
        assert value.dim() == 0 and bool(torch.isfinite(value)) and not value.requires_grad
    assert SplitMeanFlow.uses_jvp is False


def test_unknown_v_source_is_rejected():
    with pytest.raises(ValueError, match="v_source"):
        SplitMeanFlow(split_cfg(**{"split_mf.v_source": "ema"}))


# ==============================================================================================================
# Pretrained weights (export / run directory) and a real training run
# ==============================================================================================================


MLP_CONFIG = dict(family="mlp", data_dim=2, mlp_hidden=16, mlp_layers=2)


def test_load_flow_weights_and_teacher_round_trip_an_export(tmp_path):
    model = tiny_mlp(dtype=torch.float32, seed=3)
    path = tmp_path / "model.safetensors"
    path.write_bytes(export_bytes(model.state_dict(), MLP_CONFIG, {"step": 0}))
    state = load_flow_weights(str(path))
    assert state.keys() == model.state_dict().keys()
    for key, value in model.state_dict().items():
        assert torch.equal(state[key], value), key
    teacher = load_teacher(SimpleNamespace(**MLP_CONFIG), str(path), "cpu")
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    z, t = torch.randn(4, 2), torch.rand(4)
    torch.testing.assert_close(teacher(z, t=t, r=t), model(z, t=t, r=t), rtol=0, atol=0)


def test_load_flow_weights_rejects_what_is_not_an_export_or_a_run(tmp_path):
    bogus = tmp_path / "model.safetensors"
    bogus.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a safetensors export"):
        load_flow_weights(str(bogus))
    with pytest.raises(ValueError, match="no URL"):
        load_flow_weights("")
    with pytest.raises(ValueError, match="not a run directory"):    # ConfigError is a ValueError
        load_flow_weights(str(tmp_path))


def test_toy_training_run_is_finite_and_its_run_dir_and_export_load_as_a_teacher(tmp_path):
    from meanflow.jobs import export
    from meanflow.jobs.run_dir import load_run_config, open_store
    from meanflow.jobs.train import Trainer
    from meanflow.platform.config import load_config

    run_dir = tmp_path / "run"
    Trainer(load_config("toy2d_split_mf", [f"run.run_dir={run_dir}", "run.steps=40", "eval.num_samples=64"])).run()
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [row["loss"] for row in logged if "loss" in row and "event" not in row]
    assert losses and all(math.isfinite(v) for v in losses)
    assert not [row for row in logged if row.get("event") == "fail"]

    cfg = load_run_config(str(run_dir))
    store = open_store(cfg, str(run_dir))
    expected, which = store.load_weights(store.steps()[-1], {})
    assert which == "ema"
    from_run = load_flow_weights(str(run_dir))
    out = tmp_path / "model.safetensors"
    export.run(SimpleNamespace(run_dir=str(run_dir), step=None, out=str(out)))
    from_export = load_flow_weights(str(out))
    for key, value in expected.items():
        assert torch.equal(from_run[key], value) and torch.equal(from_export[key], value), key
    teacher = load_teacher(cfg.model, str(run_dir), "cpu")
    assert not any(p.requires_grad for p in teacher.parameters())


@pytest.mark.timeout(120)
def test_distillation_from_a_teacher_run_through_the_trainer(tmp_path):
    """v_source=teacher end to end: the trainer loads the teacher (a flow run's directory) frozen into the
    objective's context, and the student starts from the same weights (model.init_from); a missing teacher is a
    config error naming the key."""
    from meanflow.jobs.train import Trainer
    from meanflow.platform.config import ConfigError, load_config

    teacher = tmp_path / "teacher"
    Trainer(load_config("toy2d_mf", [f"run.run_dir={teacher}", "objective.name=fm", "run.steps=20",
                                     "eval.at_end=false"])).run()
    student = Trainer(load_config("toy2d_split_mf", [
        f"run.run_dir={tmp_path / 'student'}", "run.steps=10", "eval.at_end=false",
        "objective.split_mf.v_source=teacher", f"objective.split_mf.teacher={teacher}",
        f"model.init_from={teacher}"]))
    frozen = student.context(torch.arange(4), None).teacher
    assert frozen is not None and not any(p.requires_grad for p in frozen.parameters())
    for (name, p), q in zip(frozen.state_dict().items(), student.engine.model.state_dict().values()):
        assert torch.equal(p, q), name            # init_from: the student starts as its teacher
    student.run()
    with pytest.raises(ConfigError, match="objective.split_mf.teacher"):
        Trainer(load_config("toy2d_split_mf", [f"run.run_dir={tmp_path / 'none'}",
                                               "objective.split_mf.v_source=teacher",
                                               f"objective.split_mf.teacher={tmp_path / 'missing'}"]))

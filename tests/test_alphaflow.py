"""Specification of α-Flow (`alphaflow`, docs/objectives.md).

References are computed independently of the objective: central finite differences in float64 for MF's du/dt, the
exact average velocity of point-mass data, and the α-Flow formulas written out by hand against the model.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from meanflow.objectives import AlphaFlow, MeanFlow, ObjectiveContext, build_objective
from meanflow.objectives.alphaflow import alpha_schedule
from meanflow.objectives.base import per_sample_sq

from objective_testkit import (NUM_CLASSES, PointMassVelocity, Spy, bcast, conditional_velocity,
                               fd_time_derivative, flat_grad, image_batch, objective_cfg, rel_err, tiny_dit,
                               tiny_mlp, toy_batch)

pytestmark = [pytest.mark.timeout(60), pytest.mark.usefixtures("one_thread")]

F64 = torch.float64


def af_cfg(share_fm=0.25, s0=0, s1=100, **kw):
    """α = 1 before s0, 0.5 at (s0 + s1)/2, 0 from s1 on (γ = 25)."""
    return objective_cfg("alphaflow", **{"alphaflow.share_fm": share_fm, "alphaflow.start_step": s0,
                                         "alphaflow.end_step": s1, **kw})


def step_for(alpha, s0=0, s1=100, gamma=25.0):
    """A (fractional) step where the schedule gives this α (the inverse of the sigmoid)."""
    return (s0 + s1) / 2 + (s1 - s0) * math.log((1 - alpha) / alpha) / gamma


def interval_draw(B=8, dim=2, seed=0):
    """z_t of Gaussian data, its conditional velocity, and times with r < t (float64)."""
    gen = torch.Generator().manual_seed(seed)
    x, e = torch.randn(B, dim, generator=gen, dtype=F64), torch.randn(B, dim, generator=gen, dtype=F64)
    t = 0.3 + 0.6 * torch.rand(B, generator=gen, dtype=F64)
    r = t * torch.rand(B, generator=gen, dtype=F64)
    return (1 - bcast(t, x)) * x + bcast(t, x) * e, e - x, t, r


def hand_target(model, z, t, r, v, alpha, y=None, s_of=lambda a, t, r: a * r + (1 - a) * t,
                zs_of=lambda a, z, t, r, v: z - bcast(a * (t - r), z) * v):
    """α-Flow's training velocity written out: α·ṽ + (1 − α)·u(z_s, r, s); s and z_s replaceable by wrong formulas."""
    s = s_of(alpha, t, r)
    with torch.no_grad():
        return alpha * v + (1 - alpha) * model(zs_of(alpha, z, t, r, v), t=s, r=r, y=y)


# ============================================================================================================ schedule


def test_alpha_schedule_values_snapping_and_degenerate_window():
    s0, s1, g = 1000, 5000, 25.0
    assert alpha_schedule(0, s0, s1, g) == 1.0 and alpha_schedule(999, s0, s1, g) == 1.0
    assert alpha_schedule(s0, s0, s1, g) == 1.0          # 1 − σ(−12.5) ≈ 1 − 4e-6 snaps to 1
    assert alpha_schedule(3000, s0, s1, g) == 0.5         # midpoint
    assert alpha_schedule(s1, s0, s1, g) == 0.0 and alpha_schedule(10 ** 6, s0, s1, g) == 0.0
    step = 3400
    assert alpha_schedule(step, s0, s1, g) == pytest.approx(1 - 1 / (1 + math.exp(-g * (step - 3000) / 4000)))
    # Snapping: raw α 0.006 / 0.994 are kept, 0.004 / 0.996 snap to 0 / 1.
    for raw, expected in ((0.006, 0.006), (0.004, 0.0), (0.994, 0.994), (0.996, 1.0)):
        assert alpha_schedule(step_for(raw, s0, s1, g), s0, s1, g) == pytest.approx(expected, abs=1e-12)
    # s1 ≤ s0: a step from 1 to 0 at s0.
    assert [alpha_schedule(s, 10, 10, g) for s in (9, 10, 11)] == [1.0, 0.0, 0.0]
    assert [alpha_schedule(s, 10, 5, g) for s in (4, 9, 10)] == [1.0, 1.0, 0.0]


# ============================================================================================================= targets


def test_interval_target_tends_to_the_mf_jvp_target_with_error_O_alpha():
    """(u_tgt^α − u)/α → u_tgt^MF − u, with u_tgt^MF = ṽ − (t − r)·du/dt from a finite difference (dz = ṽ, dt = 1)."""
    model, obj = tiny_mlp(), AlphaFlow(af_cfg(), 0)
    z, v, t, r = interval_draw()
    dudt = fd_time_derivative(lambda z, t, r: model(z, t=t, r=r), z, t, r, v, dt=1.0, dr=0.0)
    mf_target = v - bcast(t - r, z) * dudt
    u, target0, _ = obj.prediction_and_target(model, z, t, r, None, v, 0.0)
    assert rel_err(target0, mf_target) < 1e-7                    # α = 0 is MF's exact (JVP) target
    u = u.detach()
    assert (mf_target - u).norm() > 0.1 * v.norm()
    errors = []
    for alpha in (0.04, 0.02, 0.01, 0.005):
        _, target, dudt_alpha = obj.prediction_and_target(model, z, t, r, None, v, alpha)
        assert dudt_alpha is None                                 # no JVP for α > 0
        errors.append(float(((target - u) / alpha - (mf_target - u)).norm()))
    ratios = [a / b for a, b in zip(errors, errors[1:])]
    assert all(1.7 < q < 2.3 for q in ratios), (errors, ratios)   # first order in α
    assert errors[-1] < 0.02 * float((mf_target - u).norm())


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.7, 1.0])
def test_point_mass_exact_field_is_its_own_target_for_every_alpha(alpha):
    """All data at x₀: u*(z, r, t) = (z − x₀)/t is exact, so u_tgt = u* (float64), MF's JVP path included."""
    x0 = torch.tensor([0.7, -1.3], dtype=F64)
    model, obj = PointMassVelocity(x0), AlphaFlow(af_cfg(), 0)
    z, _, t, r = interval_draw()
    z = z - z.mean(0) + x0 + 0.5 * (z - z.mean(0))               # any z: the field is exact everywhere
    v = (z - x0) / bcast(t, z)                                   # ṽ = v_c for point-mass data
    u, target, _ = obj.prediction_and_target(model, z, t, r, None, v, alpha)
    torch.testing.assert_close(target, u, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(target, hand_target(model, z, t, r, v, alpha), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("wrong", ["swapped_s", "z_s_with_1_minus_alpha"])
def test_point_mass_check_catches_a_wrong_s_or_z_s(wrong):
    x0 = torch.tensor([0.7, -1.3], dtype=F64)
    model, alpha = PointMassVelocity(x0), 0.3
    z, _, t, r = interval_draw()
    v = (z - x0) / bcast(t, z)
    bad = (dict(s_of=lambda a, t, r: a * t + (1 - a) * r) if wrong == "swapped_s" else
           dict(zs_of=lambda a, z, t, r, v: z - bcast((1 - a) * (t - r), z) * v))
    assert rel_err(hand_target(model, z, t, r, v, alpha, **bad), v) > 0.05


def test_point_mass_data_gives_zero_loss_through_the_objective():
    x0 = torch.tensor([0.7, -1.3], dtype=F64)
    B, model = 8, PointMassVelocity(x0)
    obj = build_objective(af_cfg(), 0)
    for step in (0, 40, 50, 60, 100):                            # α = 1, interval, 0.5, interval, 0 (MF)
        out = obj.compute(model, {"x": x0.expand(B, 2).clone()}, step, ObjectiveContext.single_process(B, 3))
        assert float(out.stats["mse"]) < 1e-20, step


# ============================================================================================= α = 0 is MeanFlow


@pytest.mark.parametrize("family", ["mlp", "mf_dit"])
def test_alpha_zero_equals_mf_loss_and_gradient(family):
    B, step, seed = 8, 7, 11
    model = tiny_mlp() if family == "mlp" else tiny_dit()
    batch = toy_batch(B) if family == "mlp" else image_batch(B)
    D = batch["x"][0].numel()
    guidance = {} if family == "mlp" else {"guidance.omega": 0.8, "guidance.kappa": 0.3, "label_drop": 0.2}
    mf = MeanFlow(objective_cfg("mf", **{"time.share_r_eq_t": 0.25, **guidance}), NUM_CLASSES)
    af = AlphaFlow(af_cfg(share_fm=0.25, s0=0, s1=5, **{"alphaflow.eps": 0.01 / D, **guidance}), NUM_CLASSES)
    assert af.alpha(step) == 0.0
    ctx = ObjectiveContext.single_process(B, seed)
    out_mf, out_af = mf.compute(model, batch, step, ctx), af.compute(model, batch, step, ctx)
    assert torch.equal(out_af.t, out_mf.t) and torch.equal(out_af.r, out_mf.r) and (out_af.t != out_af.r).any()
    torch.testing.assert_close(out_af.loss, out_mf.loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(flat_grad(out_af.loss, model), flat_grad(out_mf.loss, model), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(out_af.stats["jvp_norm"], out_mf.stats["jvp_norm"], rtol=1e-6, atol=0)
    assert float(out_af.stats["branch"]) == 2 and float(out_af.stats["alpha"]) == 0


# ============================================================================================== weight and loss


@pytest.mark.parametrize("clamp", [0.0, 0.4])
def test_loss_weights_interval_rows_by_alpha_and_flow_matching_rows_by_one(clamp):
    B, step, alpha = 8, 50, 0.5
    model, batch = tiny_dit(), image_batch(B)
    cfg = af_cfg(share_fm=0.25, **{"alphaflow.clamp_target": clamp})
    obj = AlphaFlow(cfg, NUM_CLASSES)
    assert obj.alpha(step) == alpha
    out = obj.compute(model, batch, step, ObjectiveContext.single_process(B, 5))
    x, y = batch["x"], out.model_kwargs["y"]
    fm_rows = torch.arange(B) % 4 == 3                          # share 0.25 spread: ⌊(i + 1)/4⌋ > ⌊i/4⌋
    assert torch.equal(out.t == out.r, fm_rows)
    v = conditional_velocity(out, x)
    target = hand_target(model, out.z, out.t, out.r, v, alpha, y=y)
    if clamp:
        assert (target.abs() > clamp).any()
        target = target.clamp(-clamp, clamp)
    target = torch.where(bcast(fm_rows, x), v, target)
    sq = per_sample_sq(out.u.detach() - target)
    c = cfg.alphaflow.eps * x[0].numel()
    a = torch.where(fm_rows, 1.0, alpha).to(F64)
    torch.testing.assert_close(out.loss.detach(), (a * sq / (sq + c)).mean(), rtol=1e-10, atol=0)
    (grad_u,) = torch.autograd.grad(out.loss, out.u)            # sg(w): dL/du = 2·a/(‖Δ‖² + c)·Δ/B
    torch.testing.assert_close(grad_u, 2 * bcast(a / (sq + c), x) * (out.u.detach() - target) / B,
                               rtol=1e-8, atol=1e-12)
    assert float(out.stats["branch"]) == 1 and "jvp_norm" not in out.stats


def test_alpha_one_is_trajectory_flow_matching_with_one_forward():
    B = 8
    model, batch = Spy(tiny_dit()), image_batch(B)
    obj = AlphaFlow(af_cfg(s0=10, s1=100), NUM_CLASSES)
    out = obj.compute(model, batch, 5, ObjectiveContext.single_process(B, 2))
    assert len(model.calls) == 1 and float(out.stats["branch"]) == 0
    v = conditional_velocity(out, batch["x"])
    sq = per_sample_sq(out.u.detach() - v)
    c = obj.cfg.alphaflow.eps * batch["x"][0].numel()
    torch.testing.assert_close(out.loss.detach(), (sq / (sq + c)).mean(), rtol=1e-10, atol=0)


@pytest.mark.parametrize("rows", [torch.arange(8), torch.arange(0, 2), torch.arange(2, 8)])
def test_every_rank_makes_the_same_model_calls_whatever_its_rows(rows):
    """0 < α < 1: the no-grad forward runs even on a micro-batch without r < t rows (FSDP2 gathers per forward)."""
    B = 8
    model, batch = Spy(tiny_dit()), image_batch(B)
    obj = AlphaFlow(af_cfg(share_fm=0.25), NUM_CLASSES)
    sub = {k: v[rows] for k, v in batch.items()}
    loss, _ = obj(model, sub, 50, ObjectiveContext(seed=0, global_batch=B, rows=rows))
    assert len(model.calls) == 2 and torch.isfinite(loss)


# ========================================================================================================= CFG


def test_training_cfg_velocity_in_the_interval_target_and_dropped_rows_are_flow_matching_rows():
    omega, kappa, t_end, B, step, alpha = 0.8, 0.5, 0.6, 16, 50, 0.5
    cfg = af_cfg(share_fm=0.5, label_drop=0.3, **{"guidance.omega": omega, "guidance.kappa": kappa,
                                                  "guidance.t_end": t_end})
    model, batch = tiny_dit(), image_batch(B, seed=3)
    out = AlphaFlow(cfg, NUM_CLASSES).compute(model, batch, step, ObjectiveContext.single_process(B, 3))
    x, y, y_model = batch["x"], batch["y"], out.model_kwargs["y"]
    dropped, interval = y_model == NUM_CLASSES, out.t != out.r
    inside = (out.t <= t_end) & ~dropped
    assert dropped.any() and not (dropped & interval).any()      # official layout: dropped rows have r = t
    assert (inside & interval).any() and (~inside & interval).any()
    v = conditional_velocity(out, x)
    with torch.no_grad():
        u_cond = model(out.z, t=out.t, r=out.t, y=y)
        u_null = model(out.z, t=out.t, r=out.t, y=torch.full_like(y, NUM_CLASSES))
    v_tilde = torch.where(bcast(inside, x), omega * v + kappa * u_cond + (1 - omega - kappa) * u_null, v)
    c = cfg.alphaflow.eps * x[0].numel()

    a = torch.where(interval, alpha, 1.0).to(F64)

    def loss_and_grad_u(vel):
        """The α-Flow loss against this training velocity, and its gradient in u (2·a/(‖Δ‖² + c)·Δ/B)."""
        target = torch.where(bcast(interval, x), hand_target(model, out.z, out.t, out.r, vel, alpha, y=y_model), vel)
        delta = out.u.detach() - target
        sq = per_sample_sq(delta)
        return (a * sq / (sq + c)).mean(), 2 * bcast(a / (sq + c), x) * delta / B

    expected_loss, expected_grad = loss_and_grad_u(v_tilde)
    (grad_u,) = torch.autograd.grad(out.loss, out.u)
    torch.testing.assert_close(out.loss.detach(), expected_loss, rtol=1e-10, atol=0)
    assert rel_err(grad_u, expected_grad) < 1e-8
    assert rel_err(grad_u, loss_and_grad_u(v)[1]) > 1e-2        # the unguided target is visibly different


# ============================================================================================== stats and trainer


def test_stats_are_finite_scalars_in_every_branch():
    B = 8
    model, batch = tiny_dit(), image_batch(B)
    obj, late_start = AlphaFlow(af_cfg(), NUM_CLASSES), AlphaFlow(af_cfg(s0=10), NUM_CLASSES)
    for objective, step, branch in ((late_start, 0, 0), (obj, 50, 1), (obj, 100, 2)):
        loss, stats = objective(model, batch, step, ObjectiveContext.single_process(B, 1))
        assert {"loss", "mse", "u_norm", "alpha", "branch"} <= set(stats)
        assert ("jvp_norm" in stats) == (branch == 2)
        assert float(stats["branch"]) == branch
        for key, value in stats.items():
            assert value.dim() == 0 and bool(torch.isfinite(value)) and not value.requires_grad, key
        torch.testing.assert_close(stats["loss"], loss.detach(), rtol=0, atol=0)


@pytest.mark.timeout(120)
def test_short_run_through_the_trainer(tmp_path):
    from meanflow.jobs.train import Trainer
    from meanflow.platform.config import load_config

    # A schedule that crosses all three branches in 40 steps (α = 0, with the JVP, from step ~25).
    cfg = load_config("toy2d_alphaflow", [f"run.run_dir={tmp_path}", "run.steps=40", "eval.num_samples=64",
                                          "objective.alphaflow.end_step=30", "run.log_every=1"])
    results = Trainer(cfg).run()
    assert results                                              # the end-of-run evaluation ran
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [rec for rec in records if "loss" in rec and "event" not in rec]
    assert steps[-1]["step"] == 40 and all(math.isfinite(rec["loss"]) for rec in steps)
    assert {rec["branch"] for rec in steps} == {0.0, 1.0, 2.0}


@pytest.mark.timeout(120)
def test_a_resume_across_the_switch_to_meanflow_is_exact(tmp_path):
    """Stopped at step 20 (interval branch) and resumed to 40 (α = 0 from ~25): the same losses as one run, the
    guard's phase carried in the checkpoint."""
    from meanflow.jobs.train import Trainer
    from meanflow.platform.config import load_config

    def run(run_dir, steps):
        Trainer(load_config("toy2d_alphaflow", [f"run.run_dir={run_dir}", f"run.steps={steps}", "run.log_every=1",
                                                "objective.alphaflow.end_step=30", "eval.at_end=false"])).run()

    def losses(run_dir):
        return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
                if '"event"' not in line]

    run(tmp_path / "straight", 40)
    run(tmp_path / "split", 20)
    run(tmp_path / "split", 40)
    assert losses(tmp_path / "split") == losses(tmp_path / "straight") and len(losses(tmp_path / "split")) == 40

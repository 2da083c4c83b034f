"""Specification of `meanflow.objectives`: the JVP helper, MF / SG_λ / stability / iMF / control-variate tangent,
seeded randomness and the stats contract (docs/objectives.md states every formula checked here).

Reference values are computed independently of the library: central finite differences in float64 for du/dt and
for parameter gradients, closed forms for linear maps and Gaussian data. The objectives draw (t, r) in float32,
so the model's time path runs in float32 inside the objective; the finite-difference comparisons therefore use a
relative tolerance of 1e-4 on the JVP correction h·du/dt, which wrong tangents miss by O(1).
"""

from __future__ import annotations

import math

import pytest
import torch

from meanflow.objectives import (FlowMatching, ImprovedMeanFlow, MeanFlow, NonExpansivity, ObjectiveContext,
                                 SGLambda, TangentBeta, build_objective, jvp)
from meanflow.objectives.base import model_u, per_sample_norm, per_sample_sq
from meanflow.objectives.beta_star import beta_star_exact, beta_star_upper_bound, jacobian_scale
from meanflow.objectives.imf import effective_omega, guided_target, sample_guidance
from meanflow.objectives.randomness import StepRandom
from meanflow.objectives.time_sampling import sample_time_pairs

from objective_testkit import (NUM_CLASSES, GaussianMixtureOracle, LinearVelocity, ScaledIdentity, Spy, bcast,
                               conditional_velocity, fd_time_derivative, flat_grad, gaussian_marginal_velocity,
                               gaussian_noise_variance, image_batch, mc_mean_and_se, micro_context, objective_cfg,
                               rel_err, sub_batch, target_from_gradient, tiny_dit, tiny_mlp, tiny_model, toy_batch)

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("one_thread")]

F64 = torch.float64
FD_RTOL = 1e-4  # float32 (t, r) inside the objective limit agreement with float64 finite differences to ~3e-6




def batch_for(family: str, batch: int, seed: int = 0) -> dict:
    return toy_batch(batch, seed) if family == "mlp" else image_batch(batch, seed)


def u_of(model, y=None, omega=None):
    """(z, t, r) -> u, the average-velocity output (first element when the model also returns a v-head)."""
    return lambda z, t, r: model_u(model(z, t=t, r=r, y=y, omega=omega))


# ==============================================================================================================
# The JVP helper
# ==============================================================================================================


def _f(z, t, r):
    return torch.sin(z) * t[:, None] ** 2 + torch.exp(r)[:, None] * z**2


def _primals(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return dict(z=torch.randn(3, 2, generator=gen, dtype=F64), t=torch.rand(3, generator=gen, dtype=F64),
                r=torch.rand(3, generator=gen, dtype=F64))


def test_jvp_matches_tangents_to_primals_by_name():
    p = _primals()
    z, t, r = p["z"], p["t"], p["r"]
    value, d_t = jvp(_f, p, dict(t=torch.ones(3, dtype=F64)))
    torch.testing.assert_close(value, _f(z, t, r))
    torch.testing.assert_close(d_t, torch.sin(z) * 2 * t[:, None])
    _, d_r = jvp(_f, p, dict(r=torch.ones(3, dtype=F64)))
    torch.testing.assert_close(d_r, torch.exp(r)[:, None] * z**2)
    # The order in which the mappings list names is irrelevant: only names count.
    v = torch.randn(3, 2, dtype=F64, generator=torch.Generator().manual_seed(1))
    _, forward = jvp(_f, dict(z=z, t=t, r=r), dict(z=v, t=1.0, r=0.0))
    _, backward = jvp(_f, dict(r=r, t=t, z=z), dict(r=0.0, t=1.0, z=v))
    torch.testing.assert_close(forward, backward, rtol=0, atol=0)


def test_jvp_primal_without_tangent_is_held_constant():
    p = _primals()
    _, d = jvp(_f, p, dict(t=1.0))
    _, d_explicit = jvp(_f, p, dict(t=1.0, z=0.0, r=0.0))
    torch.testing.assert_close(d, d_explicit, rtol=0, atol=0)


def test_jvp_unknown_tangent_name_raises():
    p = _primals()
    with pytest.raises(KeyError, match="h"):
        jvp(_f, p, dict(z=torch.ones(3, 2, dtype=F64), t=1.0, h=1.0))


def test_jvp_tangent_of_wrong_shape_raises():
    p = _primals()
    with pytest.raises(ValueError, match="shape"):
        jvp(_f, p, dict(z=torch.ones(3, dtype=F64)))


def test_jvp_float_tangent_broadcasts_to_the_primal_shape():
    p = _primals()
    _, from_float = jvp(_f, p, dict(t=2.5, r=-0.5))
    _, from_tensor = jvp(_f, p, dict(t=torch.full((3,), 2.5, dtype=F64), r=torch.full((3,), -0.5, dtype=F64)))
    torch.testing.assert_close(from_float, from_tensor, rtol=0, atol=0)
    assert from_float.abs().min() > 0


def test_jvp_output_tangent_equals_central_finite_difference():
    p = _primals(2)
    dz = torch.randn(3, 2, dtype=F64, generator=torch.Generator().manual_seed(3))
    dt, dr, eps = 1.0, 0.3, 1e-6
    _, d = jvp(_f, p, dict(z=dz, t=dt, r=dr))
    fd = (_f(p["z"] + eps * dz, p["t"] + eps * dt, p["r"] + eps * dr)
          - _f(p["z"] - eps * dz, p["t"] - eps * dt, p["r"] - eps * dr)) / (2 * eps)
    torch.testing.assert_close(d, fd, rtol=1e-8, atol=1e-9)


def test_jvp_tuple_outputs_and_constant_outputs():
    p = _primals()
    (a, b), (da, db) = jvp(lambda z, t, r: (z * t[:, None], torch.ones(3, dtype=F64)), p, dict(t=1.0))
    torch.testing.assert_close(da, p["z"])
    assert torch.equal(db, torch.zeros(3, dtype=F64)) and torch.equal(b, torch.ones(3, dtype=F64))


def test_jvp_tangent_output_stays_differentiable():
    """SG_λ back-propagates through du/dt: the helper's tangent output must stay in the autograd graph."""
    w = torch.tensor(0.7, dtype=F64, requires_grad=True)
    z = torch.linspace(-1, 1, 5, dtype=F64)
    v = torch.linspace(0.5, 2, 5, dtype=F64)
    _, d = jvp(lambda z: torch.tanh(w * z), dict(z=z), dict(z=v))
    (grad,) = torch.autograd.grad(d.sum(), w)
    (expected,) = torch.autograd.grad((w * (1 - torch.tanh(w * z) ** 2) * v).sum(), w)
    torch.testing.assert_close(grad, expected)


# ==============================================================================================================
# MeanFlow: the JVP target
# ==============================================================================================================


def _mf_run(family, cfg, batch_size=8, step=5, seed=11, objective=None):
    model = tiny_model(family)
    batch = batch_for(family, batch_size)
    obj = objective or build_objective(cfg, NUM_CLASSES)
    out = obj.compute(model, batch, step, ObjectiveContext.single_process(batch_size, seed))
    return model, batch, out


@pytest.mark.parametrize("family", ["mf_dit", "mlp"])
def test_mf_target_equals_finite_difference_along_dz_v_dt_1_dr_0(family):
    cfg = objective_cfg("mf", weight_p=0.0, **{"time.share_r_eq_t": 0.25})
    model, batch, out = _mf_run(family, cfg)
    x, B = batch["x"], batch["x"].shape[0]
    v = conditional_velocity(out, x)
    h = bcast((out.t - out.r).to(F64), x)
    target = target_from_gradient(out, B)
    dudt = fd_time_derivative(u_of(model, out.model_kwargs["y"]), out.z, out.t, out.r, v, dt=1.0, dr=0.0)
    correction = h * dudt
    assert correction.norm() > 0.1 * v.norm()  # the JVP term matters in this set-up
    assert rel_err(v - target, correction) < FD_RTOL
    # ... and the loss value is the batch mean of per-sample *sums* of squared errors against that target.
    expected = per_sample_sq(out.u.detach() - (v - correction)).mean()
    torch.testing.assert_close(out.loss.detach(), expected, rtol=FD_RTOL, atol=0)


@pytest.mark.parametrize("family", ["mf_dit", "mlp"])
@pytest.mark.parametrize("dt, dr", [(0.0, 0.0), (0.0, 1.0), (1.0, 1.0)])
def test_mf_target_differs_from_wrong_tangent_targets(family, dt, dr):
    """The MF ablation's wrong tangents (dt=0; dt=0, dr=1; dt=1, dr=1) give visibly different targets."""
    cfg = objective_cfg("mf", weight_p=0.0, **{"time.share_r_eq_t": 0.25})
    model, batch, out = _mf_run(family, cfg)
    x = batch["x"]
    v = conditional_velocity(out, x)
    h = bcast((out.t - out.r).to(F64), x)
    target = target_from_gradient(out, x.shape[0])
    u_fn = u_of(model, out.model_kwargs["y"])
    right = h * fd_time_derivative(u_fn, out.z, out.t, out.r, v, dt=1.0, dr=0.0)
    wrong = h * fd_time_derivative(u_fn, out.z, out.t, out.r, v, dt=dt, dr=dr)
    assert rel_err(v - target, right) < FD_RTOL
    assert rel_err(v - target, wrong) > 100 * FD_RTOL


@pytest.mark.parametrize("p, c", [(1.0, 0.01), (0.75, 1e-3)])
def test_adaptive_weight_is_per_sample_and_stop_gradient(p, c):
    cfg = objective_cfg("mf", weight_p=p, weight_c=c, **{"time.share_r_eq_t": 0.25})
    model, batch, out = _mf_run("mf_dit", cfg)
    x, B = batch["x"], batch["x"].shape[0]
    v = conditional_velocity(out, x)
    h = bcast((out.t - out.r).to(F64), x)
    dudt = fd_time_derivative(u_of(model, out.model_kwargs["y"]), out.z, out.t, out.r, v)
    delta = out.u.detach() - (v - h * dudt)
    sq = per_sample_sq(delta)
    w = 1.0 / (sq + c) ** p
    torch.testing.assert_close(out.loss.detach(), (w * sq).mean(), rtol=FD_RTOL, atol=0)
    # sg(w): d loss / d u = 2·w·Δ/B, with no derivative of the weight.
    (grad_u,) = torch.autograd.grad(out.loss, out.u)
    assert rel_err(grad_u, 2 * bcast(w, x) * delta / B) < FD_RTOL


def test_mf_jvp_norm_is_mean_du_dt_norm_over_rows_with_r_ne_t():
    cfg = objective_cfg("mf", **{"time.share_r_eq_t": 0.5})
    model, batch, out = _mf_run("mf_dit", cfg)
    v = conditional_velocity(out, batch["x"])
    dudt = fd_time_derivative(u_of(model, out.model_kwargs["y"]), out.z, out.t, out.r, v)
    rows = out.t != out.r
    assert 0 < int(rows.sum()) < rows.numel()
    expected = per_sample_norm(dudt)[rows].mean()
    torch.testing.assert_close(out.stats["jvp_norm"], expected, rtol=FD_RTOL, atol=0)


def test_mf_training_cfg_target_inside_window_and_for_kept_labels_only():
    omega, kappa, t_end = 0.8, 0.5, 0.45
    cfg = objective_cfg("mf", weight_p=0.0, label_drop=0.3,
                        **{"time.share_r_eq_t": 0.25, "guidance.omega": omega, "guidance.kappa": kappa,
                           "guidance.t_end": t_end})
    model, batch, out = _mf_run("mf_dit", cfg, batch_size=16, seed=3)
    x, y, B = batch["x"], batch["y"], batch["x"].shape[0]
    y_model = out.model_kwargs["y"]
    dropped = y_model == NUM_CLASSES
    inside = (out.t <= t_end) & ~dropped
    assert dropped.any() and inside.any() and (~inside & ~dropped).any()
    v = conditional_velocity(out, x)
    with torch.no_grad():
        u_cond = model(out.z, t=out.t, r=out.t, y=y)                 # undropped label
        u_null = model(out.z, t=out.t, r=out.t, y=torch.full_like(y, NUM_CLASSES))
    guided = omega * v + kappa * u_cond + (1 - omega - kappa) * u_null
    v_tilde = torch.where(bcast(inside, x), guided, v)
    h = bcast((out.t - out.r).to(F64), x)
    dudt = fd_time_derivative(u_of(model, y_model), out.z, out.t, out.r, v_tilde)  # tangent dz = ṽ
    expected = v_tilde - h * dudt
    target = target_from_gradient(out, B)
    assert rel_err(target, expected) < FD_RTOL
    assert rel_err(target, v - h * fd_time_derivative(u_of(model, y_model), out.z, out.t, out.r, v)) > 1e-2


def test_fm_regresses_u_at_r_eq_t_on_the_conditional_velocity_with_plain_l2():
    cfg = objective_cfg("fm", weight_p=1.0)  # fm always uses plain L2
    model, batch, out = _mf_run("mf_dit", cfg)
    assert torch.equal(out.r, out.t)
    v = conditional_velocity(out, batch["x"])
    with torch.no_grad():
        u = model(out.z, t=out.t, r=out.t, y=out.model_kwargs["y"])
    torch.testing.assert_close(out.loss.detach(), per_sample_sq(u - v).mean(), rtol=1e-8, atol=0)


# ==============================================================================================================
# SG_λ
# ==============================================================================================================


def _sg_cfg(lam, **kw):
    return objective_cfg("sg_lambda", **{"sg_lambda.start": lam, "sg_lambda.end": lam,
                                         "time.share_r_eq_t": 0.25, **kw})


def _loss_and_grad(objective, model, batch, step=5, seed=11):
    B = batch["x"].shape[0]
    out = objective.compute(model, batch, step, ObjectiveContext.single_process(B, seed))
    return out, flat_grad(out.loss, model)


@pytest.mark.parametrize("family", ["mlp", "mf_dit"])
def test_sg_lambda_zero_gives_exactly_mf_gradient(family):
    model, batch = tiny_model(family), batch_for(family, 8)
    out_mf, g_mf = _loss_and_grad(MeanFlow(_sg_cfg(0.0), NUM_CLASSES), model, batch)
    out_sg, g_sg = _loss_and_grad(SGLambda(_sg_cfg(0.0), NUM_CLASSES), model, batch)
    torch.testing.assert_close(out_sg.loss, out_mf.loss, rtol=0, atol=0)
    torch.testing.assert_close(g_sg, g_mf, rtol=0, atol=0)


def _perturbed_eval(model, direction, eps, fn):
    with torch.no_grad():
        for p, d in zip(model.parameters(), direction):
            p.add_(eps * d)
    try:
        return fn().detach()
    finally:
        with torch.no_grad():
            for p, d in zip(model.parameters(), direction):
                p.sub_(eps * d)


def test_sg_lambda_one_gradient_is_the_full_gradient_through_the_jvp():
    """λ = 1: ∇ mean‖u + (t−r)·du/dt − v‖² (du/dt by torch.func.jvp, ∇ by finite differences in the parameters);
    λ = 0: ∇ mean‖u − sg(target)‖². Both checked along random parameter directions; they differ."""
    model, batch = tiny_mlp(), toy_batch(16)
    cfg = _sg_cfg(1.0, weight_p=0.0)
    out, g1 = _loss_and_grad(SGLambda(cfg), model, batch)
    _, g0 = _loss_and_grad(SGLambda(_sg_cfg(0.0, weight_p=0.0)), model, batch)
    z, t, r = out.z, out.t, out.r
    v = conditional_velocity(out, batch["x"])
    h = bcast((t - r).to(F64), v)

    def u_and_dudt():
        return torch.func.jvp(lambda z, t, r: model(z, t=t, r=r), (z, t, r),
                              (v, torch.ones_like(t), torch.zeros_like(r)))

    u0, dudt0 = u_and_dudt()
    frozen_target = (v - h * dudt0).detach()

    def loss_lambda_1():
        u, dudt = u_and_dudt()
        return per_sample_sq(u + h * dudt - v).mean()

    def loss_lambda_0():
        return per_sample_sq(model(z, t=t, r=r) - frozen_target).mean()

    gen = torch.Generator().manual_seed(5)
    eps = 1e-5
    for _ in range(3):
        direction = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in model.parameters()]
        flat = torch.cat([d.flatten() for d in direction])
        fd1 = (_perturbed_eval(model, direction, eps, loss_lambda_1)
               - _perturbed_eval(model, direction, -eps, loss_lambda_1)) / (2 * eps)
        fd0 = (_perturbed_eval(model, direction, eps, loss_lambda_0)
               - _perturbed_eval(model, direction, -eps, loss_lambda_0)) / (2 * eps)
        torch.testing.assert_close(g1 @ flat, fd1, rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(g0 @ flat, fd0, rtol=1e-6, atol=1e-9)
    assert rel_err(g1, g0) > 0.05


@pytest.mark.parametrize("family", ["mlp", "mf_dit"])
@pytest.mark.parametrize("lam", [0.3, 0.75])
def test_sg_lambda_gradient_is_affine_in_lambda(family, lam):
    model, batch = tiny_model(family), batch_for(family, 8)
    out0, g0 = _loss_and_grad(SGLambda(_sg_cfg(0.0), NUM_CLASSES), model, batch)
    out1, g1 = _loss_and_grad(SGLambda(_sg_cfg(1.0), NUM_CLASSES), model, batch)
    out_l, g_l = _loss_and_grad(SGLambda(_sg_cfg(lam), NUM_CLASSES), model, batch)
    assert rel_err(g1, g0) > 1e-2
    torch.testing.assert_close(out_l.loss, out0.loss, rtol=1e-12, atol=0)  # SG_λ changes gradients only
    torch.testing.assert_close(g_l, lam * g1 + (1 - lam) * g0, rtol=1e-9, atol=1e-12)
    assert float(out_l.stats["lambda"]) == pytest.approx(lam)


@pytest.mark.parametrize("shape, step, expected", [
    ("linear", 0, 0.0), ("linear", 50, 0.5), ("linear", 100, 1.0), ("linear", 1000, 1.0),
    ("cosine", 25, 0.5 - 0.5 * math.cos(math.pi / 4)), ("cosine", 50, 0.5), ("cosine", 100, 1.0),
])
def test_sg_lambda_curriculum(shape, step, expected):
    cfg = objective_cfg("sg_lambda", **{"sg_lambda.warmup_steps": 100, "sg_lambda.shape": shape})
    assert SGLambda(cfg).jvp_grad_weight(step) == pytest.approx(expected, abs=1e-12)


def test_sg_lambda_default_curriculum_is_linear_over_5000_steps():
    obj = SGLambda(objective_cfg("sg_lambda"))
    assert obj.jvp_grad_weight(0) == 0.0
    assert obj.jvp_grad_weight(2500) == pytest.approx(0.5)
    assert obj.jvp_grad_weight(5000) == 1.0 and obj.jvp_grad_weight(9000) == 1.0


# ==============================================================================================================
# Non-expansivity (Stable MeanFlow)
# ==============================================================================================================


def _stability_cfg(**kw):
    base = {"time.share_r_eq_t": 0.25, "time.kind": "uniform", "stability.base": "mf", "stability.mu": 0.1}
    return objective_cfg("stability", **{**base, **kw})


def _stability_run(model, cfg, B=16, step=3, seed=2):
    batch = toy_batch(B, seed=seed)
    ctx = ObjectiveContext.single_process(B, seed)
    obj = build_objective(cfg)
    out = obj.compute(model, batch, step, ctx)
    base = build_objective(objective_cfg(cfg.stability.base, **{"time.share_r_eq_t": cfg.time.share_r_eq_t,
                                                                "time.kind": cfg.time.kind}))
    base_out = base.compute(model, batch, step, ctx)
    return obj, out, base_out, batch, ctx


def test_stability_penalty_is_zero_for_a_contractive_linear_map():
    A = torch.tensor([[0.8, 0.3], [0.3, 0.6]])  # symmetric, eigenvalues in (0, 2): ‖I − hA‖ < 1 for h ∈ (0, 1]
    _, out, base_out, _, _ = _stability_run(LinearVelocity(A), _stability_cfg(**{"stability.delta": 0.5}))
    assert float(out.stats["stab"]) == 0.0
    torch.testing.assert_close(out.loss, base_out.loss, rtol=0, atol=0)
    assert float(out.stats["expansion_max"]) < 1.0
    assert 0.0 < float(out.stats["expansion_mean"]) < 1.0


def test_stability_penalty_matches_closed_form_for_an_expansive_linear_map():
    A = torch.tensor([[-1.5, 0.7], [0.3, -0.8]], dtype=F64)
    delta, mu, step, seed = 0.3, 0.1, 3, 2
    _, out, base_out, _, ctx = _stability_run(LinearVelocity(A), _stability_cfg(**{"stability.delta": delta}),
                                              step=step, seed=seed)
    xi = ctx.random(step, torch.device("cpu")).normal("stability_xi", 2, dtype=F64)
    dz = delta * xi / xi.norm(dim=1, keepdim=True)
    h = (out.t - out.r).to(F64)
    moved = torch.stack([(torch.eye(2, dtype=F64) - h_i * A) @ dz_i for h_i, dz_i in zip(h, dz)])
    expected = torch.relu(moved.norm(dim=1) - dz.norm(dim=1)).pow(2).mean()
    assert expected > 0
    torch.testing.assert_close(out.stats["stab"], expected, rtol=1e-10, atol=0)
    torch.testing.assert_close(out.loss.detach(), base_out.loss.detach() + mu * expected, rtol=1e-10, atol=0)


@pytest.mark.parametrize("relative", [False, True])
def test_stability_isotropic_expansion_closed_form(relative):
    """u = a·z with a < 0: ‖(1 − h·a)·Δz‖ − ‖Δz‖ = −h·a·‖Δz‖ in every direction; ‖Δz‖ = δ or δ·‖z‖."""
    a, delta = -2.0, 0.05
    _, out, _, _, _ = _stability_run(ScaledIdentity(a),
                                     _stability_cfg(**{"stability.delta": delta, "stability.relative_delta": relative}))
    h = (out.t - out.r).to(F64)
    size = delta * (out.z.norm(dim=1) if relative else torch.ones_like(h))
    expected = ((-h * a) * size).pow(2).mean()
    torch.testing.assert_close(out.stats["stab"], expected, rtol=1e-10, atol=0)


def test_stability_gradient_flows_through_both_evaluations():
    """d/da of mean((−h·a·δ)²) = mean(2·h²·a·δ²); a gradient through only one of u(z+Δz), u(z) picks up z terms."""
    a, delta, mu = -2.0, 0.5, 0.1
    model = ScaledIdentity(a)
    _, out, base_out, _, _ = _stability_run(model, _stability_cfg(**{"stability.delta": delta,
                                                                      "stability.mu": mu}))
    (g_total,) = torch.autograd.grad(out.loss, model.a)
    (g_base,) = torch.autograd.grad(base_out.loss, model.a)
    h = (out.t - out.r).to(F64)
    expected = mu * (2 * h**2 * a * delta**2).mean()
    assert expected.abs() > 1e-3
    torch.testing.assert_close(g_total - g_base, expected, rtol=1e-8, atol=0)


@pytest.mark.parametrize("a", [-2.0, 0.5])
def test_stability_expansion_stats(a):
    """expansion ratio ‖φ(z+Δz) − φ(z)‖/‖Δz‖ = |1 − h·a| for u = a·z: mean and max over rows with r ≠ t."""
    _, out, _, _, _ = _stability_run(ScaledIdentity(a), _stability_cfg())
    rows = out.t != out.r
    assert 0 < int(rows.sum()) < rows.numel()
    ratio = (1 - (out.t - out.r).to(F64) * a).abs()[rows]
    torch.testing.assert_close(out.stats["expansion_mean"].to(F64), ratio.mean(), rtol=1e-10, atol=0)
    torch.testing.assert_close(out.stats["expansion_max"].to(F64), ratio.max(), rtol=1e-10, atol=0)


@pytest.mark.parametrize("decay, until, step, expected", [
    ("none", None, 10**6, 0.2),
    ("none", 100, 50, 0.2), ("none", 100, 100, 0.0), ("none", 100, 150, 0.0),
    ("linear", 100, 0, 0.2), ("linear", 100, 25, 0.15), ("linear", 100, 100, 0.0),
    ("cosine", 100, 25, 0.2 * 0.5 * (1 + math.cos(math.pi / 4))), ("cosine", 100, 50, 0.1),
    ("cosine", 100, 120, 0.0),
])
def test_stability_mu_schedule(decay, until, step, expected):
    cfg = _stability_cfg(**{"stability.mu": 0.2, "stability.decay": decay, "stability.active_until_step": until,
                            "stability.delta": 0.5})
    obj = build_objective(cfg)
    assert isinstance(obj, NonExpansivity)
    assert obj.mu_at(step) == pytest.approx(expected, abs=1e-12)
    _, out, base_out, _, _ = _stability_run(ScaledIdentity(-2.0), cfg, step=step)
    assert float(out.stats["stab_mu"]) == pytest.approx(expected, abs=1e-7)
    if expected == 0.0:
        torch.testing.assert_close(out.loss, base_out.loss, rtol=0, atol=0)
    else:
        assert float(out.stats["stab"]) > 0
        torch.testing.assert_close(out.loss.detach(), base_out.loss.detach() + expected * out.stats["stab"],
                                   rtol=1e-10, atol=0)


# ==============================================================================================================
# Improved MeanFlow
# ==============================================================================================================


@pytest.mark.parametrize("family", ["mlp", "mf_dit"])
def test_imf_with_vc_tangent_and_unit_omega_reproduces_mf_loss_and_gradient(family):
    overrides = {"time.share_r_eq_t": 0.5, "imf.tangent": "v_c", "imf.s_max": 0.0}
    model, batch = tiny_model(family), batch_for(family, 8)
    out_mf, g_mf = _loss_and_grad(MeanFlow(objective_cfg("mf", **overrides), NUM_CLASSES), model, batch)
    out_imf, g_imf = _loss_and_grad(ImprovedMeanFlow(objective_cfg("imf", **overrides), NUM_CLASSES), model, batch)
    assert torch.equal(out_imf.t, out_mf.t) and torch.equal(out_imf.r, out_mf.r)
    assert (out_mf.t != out_mf.r).any()
    torch.testing.assert_close(out_imf.loss, out_mf.loss, rtol=1e-12, atol=0)
    torch.testing.assert_close(g_imf, g_mf, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(out_imf.stats["jvp_norm"], out_mf.stats["jvp_norm"], rtol=1e-12, atol=0)


def test_imf_guided_target_expectation_on_a_gaussian_mixture():
    """E[v_g | z, y] = ω̃·v(z|y) + (1 − ω̃)·v(z|∅): checked as E[v_g·g(z, t)] = E[target·g(z, t)] for several test
    functions g, with an oracle model returning the closed-form guided velocity of its (y, Ω) condition."""
    N, s = 100_000, 0.5
    means = torch.tensor([[2.0, 0.0], [-1.0, 1.7], [-1.0, -1.7]], dtype=F64)
    oracle = GaussianMixtureOracle(means, s, NUM_CLASSES)
    gen = torch.Generator().manual_seed(0)
    y = torch.randint(0, NUM_CLASSES, (N,), generator=gen)
    x = means[y] + s * torch.randn(N, 2, generator=gen, dtype=F64)
    e = torch.randn(N, 2, generator=gen, dtype=F64)
    t = 0.05 + 0.9 * torch.rand(N, generator=gen, dtype=F64)
    r = torch.where(torch.rand(N, generator=gen, dtype=F64) < 0.3, t, t * torch.rand(N, generator=gen, dtype=F64))
    z = (1 - t[:, None]) * x + t[:, None] * e
    v_c = e - x
    rand = StepRandom(seed=1, step=0, global_batch=N, rows=torch.arange(N), device=torch.device("cpu"))
    omega_tilde = effective_omega(sample_guidance(rand, objective_cfg("imf").imf, t, r).to(F64), t)
    assert (omega_tilde > 1).float().mean() > 0.3

    obj = ImprovedMeanFlow(objective_cfg("imf", **{"imf.tangent": "boundary"}), NUM_CLASSES)
    v_cond, v_uncond = obj.no_grad_velocities(oracle, z, t, y, None, omega_tilde)
    v_g = guided_target(v_c, v_cond, v_uncond, omega_tilde, None)
    target = oracle.guided(z, t, y, omega_tilde)

    # Functions of (z, t, ω̃) alone cannot see guidance (E[v(z|y) | z] = v(z|∅)); the y-dependent ones can.
    tests = [torch.ones_like(t), z[:, 0], z[:, 1], torch.tanh(z[:, 0] * z[:, 1]), t, omega_tilde / 8,
             (y == 0).to(F64), (y == 1).to(F64), means[y, 0] * omega_tilde, means[y, 1] * z[:, 1]]
    guidance_visible = False
    for g in tests:
        for j in range(2):
            mean, se = mc_mean_and_se((v_g[:, j] - target[:, j]) * g)
            assert abs(mean) < 5 * se, f"E[(v_g − target)·g] = {mean:.4g} ± {se:.2g}"
            mean_c, se_c = mc_mean_and_se((v_c[:, j] - target[:, j]) * g)
            guidance_visible |= abs(mean_c) > 20 * se_c
    assert guidance_visible  # the unguided v_c fails the same check: the test can tell guidance apart


def test_guided_target_formula_and_dropped_rows():
    v_c = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], dtype=F64)
    v_cond = torch.tensor([[0.5, 0.0], [1.0, 1.0], [2.0, -1.0]], dtype=F64)
    v_uncond = torch.tensor([[0.0, 0.5], [0.0, 2.0], [1.0, 1.0]], dtype=F64)
    omega_tilde = torch.tensor([4.0, 1.0, 2.0], dtype=F64)
    expected = v_c + (1 - 1 / omega_tilde)[:, None] * (v_cond - v_uncond)
    torch.testing.assert_close(guided_target(v_c, v_cond, v_uncond, omega_tilde, None), expected)
    dropped = torch.tensor([True, False, False])
    out = guided_target(v_c, v_cond, v_uncond, omega_tilde, dropped)
    torch.testing.assert_close(out[0], v_c[0])
    torch.testing.assert_close(out[1:], expected[1:])


def test_effective_omega_is_omega_inside_the_window_and_one_outside():
    omega = torch.tensor([[4.0, 0.2, 0.6]] * 5)
    t = torch.tensor([0.1, 0.2, 0.4, 0.6, 0.7])
    torch.testing.assert_close(effective_omega(omega, t), torch.tensor([1.0, 4.0, 4.0, 4.0, 1.0]))


def test_imf_no_grad_velocities_are_taken_at_h_0_with_undropped_label_and_null_label_at_omega_1():
    B = 8
    model = Spy(tiny_dit("imf_dit"))
    # every row in one JVP forward, so the trained forward is one call to inspect (test_jvp_rows.py checks that the
    # split into rows with and without r ≠ t changes nothing)
    cfg = objective_cfg("imf", label_drop=0.5, **{"imf.tangent": "boundary", "time.share_r_eq_t": 0.25,
                                                   "jvp_all_rows": True})
    batch = image_batch(B, seed=4)
    out = ImprovedMeanFlow(cfg, NUM_CLASSES).compute(model, batch, 2, ObjectiveContext.single_process(B, 4))
    dropped = out.model_kwargs["y"] == NUM_CLASSES
    assert dropped.any() and (~dropped).any()
    omega_tilde = effective_omega(out.model_kwargs["omega"], out.t)
    assert (omega_tilde != 1).any()
    h0_calls = [c for c in model.calls if torch.equal(c["r"], c["t"])]
    cond = [c for c in h0_calls if torch.equal(c["y"], batch["y"])]
    null = [c for c in h0_calls if bool((c["y"] == NUM_CLASSES).all())]
    assert len(cond) == 1 and len(null) == 1, [c["y"] for c in model.calls]
    ones, zeros = torch.ones_like(out.t), torch.zeros_like(out.t)
    torch.testing.assert_close(cond[0]["omega"], torch.stack([omega_tilde, zeros, ones], 1))
    torch.testing.assert_close(null[0]["omega"], torch.stack([ones, zeros, ones], 1))
    # The trained forward sees the dropped labels and the sampled Ω, at the sampled (t, r).
    main = [c for c in model.calls if torch.equal(c["r"], out.r)]
    assert len(main) == 1
    assert torch.equal(main[0]["y"], out.model_kwargs["y"])
    torch.testing.assert_close(main[0]["omega"], out.model_kwargs["omega"])


@pytest.mark.parametrize("tangent, v_head", [("boundary", False), ("v_head", True)])
def test_imf_loss_uses_the_models_own_velocity_as_tangent_and_the_guided_target(tangent, v_head):
    B, step, seed = 8, 6, 9
    model = tiny_dit("imf_dit", v_head=v_head)
    model.train()
    cfg = objective_cfg("imf", weight_p=0.0, label_drop=0.0,
                        **{"imf.tangent": tangent, "time.share_r_eq_t": 0.25})
    batch = image_batch(B, seed=seed)
    x, y = batch["x"], batch["y"]
    out = ImprovedMeanFlow(cfg, NUM_CLASSES).compute(model, batch, step, ObjectiveContext.single_process(B, seed))
    t, r, z, omega = out.t, out.r, out.z, out.model_kwargs["omega"]
    omega_tilde = effective_omega(omega, t)
    assert (omega_tilde != 1).any()
    velocity = (lambda o: o[1]) if v_head else model_u
    ones, zeros = torch.ones_like(t), torch.zeros_like(t)
    with torch.no_grad():
        v_cond = velocity(model(z, t=t, r=t, y=y, omega=torch.stack([omega_tilde, zeros, ones], 1)))
        v_uncond = velocity(model(z, t=t, r=t, y=torch.full_like(y, NUM_CLASSES),
                                  omega=torch.stack([ones, zeros, ones], 1)))
    v_c = conditional_velocity(out, x)
    v_g = v_c + bcast(1 - 1 / omega_tilde.to(F64), x) * (v_cond - v_uncond)
    h = bcast((t - r).to(F64), x)
    u_fn = u_of(model, y, omega)
    correction = h * fd_time_derivative(u_fn, z, t, r, v_cond)     # tangent dz = v_θ(z, t | y, ω̃)
    (grad_u,) = torch.autograd.grad(out.loss, out.u, retain_graph=True)
    correction_used = B / 2 * grad_u + v_g - out.u.detach()          # V − v_g = (B/2)·∂L/∂u, V = u + h·du/dt
    assert correction.norm() > 0.1 * v_g.norm()
    assert rel_err(correction_used, correction) < FD_RTOL
    assert rel_err(correction_used, h * fd_time_derivative(u_fn, z, t, r, v_c)) > 1e-2
    if v_head:  # L = L_u + L_v, L_v = mean‖v_head − v_g‖²
        with torch.no_grad():
            v_pred = model(z, t=t, r=r, y=y, omega=omega)[1]
        torch.testing.assert_close(out.stats["loss_v"], per_sample_sq(v_pred - v_g).mean(), rtol=1e-8, atol=0)
        torch.testing.assert_close(out.loss.detach(), out.stats["loss_u"] + out.stats["loss_v"], rtol=1e-12,
                                   atol=0)


def test_imf_guidance_conditions_are_sampled_in_their_ranges():
    B = 1024
    cfg = objective_cfg("imf", **{"imf.tangent": "v_c", "time.share_r_eq_t": 0.5})
    out = ImprovedMeanFlow(cfg).compute(tiny_mlp(), toy_batch(B), 1, ObjectiveContext.single_process(B, 0))
    omega, t_min, t_max = out.model_kwargs["omega"].unbind(1)
    assert float(omega.min()) >= 1.0 and float(omega.max()) <= 8.0
    # ω = 8^U: log ω / log 8 is uniform on [0, 1).
    mean, _ = mc_mean_and_se(torch.log(omega) / math.log(8.0))
    assert abs(mean - 0.5) < 4 * math.sqrt(1 / 12 / B)
    boundary = out.t == out.r
    assert int(boundary.sum()) == B // 2
    assert torch.equal(t_min[boundary], torch.zeros(B // 2)) and torch.equal(t_max[boundary], torch.ones(B // 2))
    inner_min, inner_max = t_min[~boundary], t_max[~boundary]
    assert float(inner_min.min()) >= 0.0 and float(inner_min.max()) < 0.5
    assert float(inner_max.min()) >= 0.5 and float(inner_max.max()) < 1.0
    assert abs(float(inner_min.mean()) - 0.25) < 4 * 0.5 * math.sqrt(1 / 12 / (B // 2))
    assert abs(float(inner_max.mean()) - 0.75) < 4 * 0.5 * math.sqrt(1 / 12 / (B // 2))
    # s_max = 0 disables guidance conditioning: ω ≡ 1.
    cfg.imf.s_max = 0.0
    out = ImprovedMeanFlow(cfg).compute(tiny_mlp(), toy_batch(B), 1, ObjectiveContext.single_process(B, 0))
    assert torch.equal(out.model_kwargs["omega"][:, 0], torch.ones(B))


# ==============================================================================================================
# Control-variate tangent and β*
# ==============================================================================================================


def _tb_cfg(beta, **kw):
    return objective_cfg("tangent_beta", **{"tangent_beta.beta": beta, "tangent_beta.proxy": "boundary",
                                            "tangent_beta.beta_star_every": 1, "time.share_r_eq_t": 0.25, **kw})


@pytest.mark.parametrize("family", ["mlp", "mf_dit"])
def test_tangent_beta_zero_equals_mf_loss_and_gradient(family):
    model, batch = tiny_model(family), batch_for(family, 8)
    out_mf, g_mf = _loss_and_grad(MeanFlow(_tb_cfg(0.0), NUM_CLASSES), model, batch)
    out_tb, g_tb = _loss_and_grad(TangentBeta(_tb_cfg(0.0), NUM_CLASSES), model, batch)
    assert "beta_star_bound" in out_tb.stats  # the diagnostic ran and did not disturb the step
    torch.testing.assert_close(out_tb.loss, out_mf.loss, rtol=1e-13, atol=0)
    torch.testing.assert_close(g_tb, g_mf, rtol=1e-12, atol=1e-15)


def test_tangent_beta_mixes_the_tangent_and_keeps_the_target():
    """β = 1: dz = v̂ = u_θ(z, t, t) (boundary proxy); the target keeps v_c; β in between is the affine mix."""
    model, batch, B = tiny_dit(), image_batch(8), 8
    targets = {}
    for beta in (0.0, 0.3, 1.0):
        obj = TangentBeta(_tb_cfg(beta, weight_p=0.0), NUM_CLASSES)
        out = obj.compute(model, batch, 5, ObjectiveContext.single_process(B, 11))
        targets[beta] = target_from_gradient(out, B)
    y_model = out.model_kwargs["y"]
    with torch.no_grad():
        v_hat = model(out.z, t=out.t, r=out.t, y=y_model)
    v = conditional_velocity(out, batch["x"])
    h = bcast((out.t - out.r).to(F64), v)
    expected_1 = v - h * fd_time_derivative(u_of(model, y_model), out.z, out.t, out.r, v_hat)
    assert rel_err(v - targets[1.0], v - expected_1) < FD_RTOL
    assert rel_err(targets[1.0], targets[0.0]) > 1e-2
    torch.testing.assert_close(targets[0.3], 0.7 * targets[0.0] + 0.3 * targets[1.0], rtol=1e-9, atol=1e-10)


def test_beta_star_matches_the_closed_form_on_a_linear_model():
    """x ~ N(0, s²I), u = α·z: a = h·α − 1, σ²_d = d(s² + 1) − E‖v‖², proxy v̂ = v + b₀:
    β* = a/(a+1) · σ²_d/(σ²_d + ‖b₀‖²)."""
    N, d, s, t, r, alpha = 20_000, 4, 0.7, 0.6, 0.2, 6.0
    b0 = torch.tensor([0.3, -0.2, 0.1, 0.4], dtype=F64)
    gen = torch.Generator().manual_seed(0)
    x = s * torch.randn(N, d, generator=gen, dtype=F64)
    e = torch.randn(N, d, generator=gen, dtype=F64)
    z = (1 - t) * x + t * e
    v_c = e - x
    v = gaussian_marginal_velocity(s)(z, torch.full((N,), t, dtype=F64))
    v_hat = v + b0
    h = torch.full((N,), t - r, dtype=F64)
    probe = torch.randn(N, d, generator=gen, dtype=F64)
    a = jacobian_scale(lambda zz: alpha * zz, z, h, probe)
    a_true = (t - r) * alpha - 1
    torch.testing.assert_close(a, torch.full_like(a, a_true), rtol=1e-12, atol=1e-12)
    beta = beta_star_exact(a, v_c, v_hat, v)
    # Exact on the sample's own noise estimate ...
    sigma2_hat = per_sample_sq(v_c - v).mean()
    sample_form = a_true / (a_true + 1) * sigma2_hat / (sigma2_hat + b0.pow(2).sum())
    torch.testing.assert_close(beta, sample_form, rtol=1e-10, atol=0)
    # ... and within Monte-Carlo error of the population closed form.
    sigma2 = gaussian_noise_variance(s, t, d)
    expected = a_true / (a_true + 1) * sigma2 / (sigma2 + float(b0.pow(2).sum()))
    _, se_sigma2 = mc_mean_and_se(per_sample_sq(v_c - v))
    d_beta = a_true / (a_true + 1) * float(b0.pow(2).sum()) / (sigma2 + float(b0.pow(2).sum())) ** 2
    assert abs(float(beta) - expected) < 4 * d_beta * se_sigma2 + 1e-12
    assert abs(float(sigma2_hat) - sigma2) < 4 * se_sigma2


def test_beta_star_upper_bound_equals_a_over_a_plus_1_without_bias():
    N, d, s, t, r, alpha = 4096, 3, 0.7, 0.8, 0.3, 5.0
    gen = torch.Generator().manual_seed(1)
    x = s * torch.randn(N, d, generator=gen, dtype=F64)
    e = torch.randn(N, d, generator=gen, dtype=F64)
    z = (1 - t) * x + t * e
    v = gaussian_marginal_velocity(s)(z, torch.full((N,), t, dtype=F64))
    h = torch.full((N,), t - r, dtype=F64)
    a = (t - r) * alpha - 1
    bound = beta_star_upper_bound(lambda zz: alpha * zz, z, h, (e - x) - v)  # b₀ = 0: d = v_c − v
    torch.testing.assert_close(bound, torch.tensor(a / (a + 1), dtype=F64), rtol=1e-12, atol=0)
    # Anisotropic J = h·diag(α_i) − I: Tr(JΣ(J+I)ᵀ)/Tr((J+I)Σ(J+I)ᵀ) with the sample covariance of d.
    alphas = torch.tensor([5.0, 3.0, 8.0], dtype=F64)
    dd = (e - x) - v
    J = (t - r) * torch.diag(alphas) - torch.eye(d, dtype=F64)
    Sigma = dd.T @ dd
    expected = torch.trace(J @ Sigma @ (J + torch.eye(d, dtype=F64)).T) / torch.trace(
        (J + torch.eye(d, dtype=F64)) @ Sigma @ (J + torch.eye(d, dtype=F64)).T)
    bound = beta_star_upper_bound(lambda zz: zz * alphas, z, h, dd)
    torch.testing.assert_close(bound, expected.clamp(0, 1), rtol=1e-10, atol=0)


class _KnownBetaStarModel(torch.nn.Module):
    """u(z, r, t) = c ⊙ z/(t − r) for r < t (so h·∂_z u = diag(c): a = c − 1 on every row when c is isotropic) and
    the biased marginal velocity v(z, t) + b₀ at r = t (the boundary proxy v̂)."""

    def __init__(self, c, s, b0):
        super().__init__()
        self.c, self.v, self.b0 = c, gaussian_marginal_velocity(s), b0

    def forward(self, x, *, t, r, y=None, omega=None):
        h = (t - r).to(x.dtype)[:, None]
        inner = self.c * x / h.clamp(min=1e-6)
        return torch.where(h > 0, inner, self.v(x, t) + self.b0)


def _beta_star_run(c, beta, step, B=512, s=0.7, seed=3):
    b0 = torch.tensor([0.5, -0.4], dtype=F64)
    model = _KnownBetaStarModel(torch.as_tensor(c, dtype=F64), s, b0)
    cfg = _tb_cfg(beta, **{"time.kind": "uniform", "time.share_r_eq_t": 0.0, "tangent_beta.beta_star_every": 7})
    batch = {"x": s * toy_batch(B, seed=seed)["x"]}
    ctx = ObjectiveContext.single_process(B, seed, marginal_velocity=gaussian_marginal_velocity(s))
    out = TangentBeta(cfg).compute(model, batch, step, ctx)
    v_c = conditional_velocity(out, batch["x"])
    v = gaussian_marginal_velocity(s)(out.z, out.t)
    return out, v_c, v, b0


def test_tangent_beta_logs_exact_beta_star_with_a_marginal_velocity_oracle():
    c = 3.0
    out, v_c, v, b0 = _beta_star_run([c, c], beta=0.0, step=7)
    assert bool((out.t > out.r).all())
    sigma2 = per_sample_sq(v_c - v).mean()
    a = c - 1
    expected = a / (a + 1) * sigma2 / (sigma2 + b0.pow(2).sum())
    torch.testing.assert_close(out.stats["beta_star"], expected, rtol=1e-8, atol=0)
    torch.testing.assert_close(out.stats["beta_star_bound"], torch.tensor(a / (a + 1), dtype=F64), rtol=1e-8,
                               atol=0)


def test_tangent_beta_upper_bound_probes_with_v_c_minus_proxy():
    """Anisotropic h·∂_z u = diag(c): bound = Σ⟨(diag(c) − I)d, diag(c)d⟩/Σ‖diag(c)d‖², d = v_c − v̂."""
    c = torch.tensor([3.0, 6.0], dtype=F64)
    out, v_c, v, b0 = _beta_star_run(c, beta=0.0, step=14)
    d = v_c - (v + b0)
    expected = ((c - 1) * c * d**2).sum() / (c**2 * d**2).sum()
    torch.testing.assert_close(out.stats["beta_star_bound"], expected, rtol=1e-8, atol=0)


@pytest.mark.parametrize("beta", [0.0, 0.5])
def test_tangent_beta_diagnostic_is_logged_only_every_n_steps(beta):
    out, *_ = _beta_star_run([3.0, 3.0], beta=beta, step=8)
    assert "beta_star" not in out.stats and "beta_star_bound" not in out.stats
    assert float(out.stats["beta"]) == beta


# ==============================================================================================================
# Randomness: 1 process == N processes
# ==============================================================================================================


def _objective_cases():
    return {
        "fm": ("mf_dit", objective_cfg("fm")),
        "mf": ("mf_dit", objective_cfg("mf", **{"time.share_r_eq_t": 0.25, "guidance.kappa": 0.5,
                                                "guidance.t_end": 0.6})),
        "sg_lambda": ("mf_dit", objective_cfg("sg_lambda", **{"sg_lambda.start": 0.5, "sg_lambda.end": 0.5,
                                                              "time.share_r_eq_t": 0.25})),
        "imf": ("imf_dit_v_head", objective_cfg("imf", **{"time.share_r_eq_t": 0.5})),
        "tangent_beta": ("mf_dit", _tb_cfg(0.5)),
        "stability_mf": ("mf_dit", objective_cfg("stability", **{"stability.base": "mf", "stability.delta": 0.5,
                                                                 "time.share_r_eq_t": 0.25})),
        "stability_fm": ("mf_dit", objective_cfg("stability", **{"stability.base": "fm"})),
        "stability_imf": ("imf_dit_v_head", objective_cfg("stability", **{"stability.base": "imf",
                                                                          "stability.delta": 0.5})),
    }


def _case_model(kind):
    return tiny_dit("imf_dit", v_head=True) if kind == "imf_dit_v_head" else tiny_dit(kind)


@pytest.mark.parametrize("name", list(_objective_cases()))
@pytest.mark.parametrize("split", ["halves", "interleaved"])
def test_global_batch_loss_equals_mean_of_micro_batch_losses(name, split):
    B, step, seed = 8, 4, 21
    kind, cfg = _objective_cases()[name]
    model, batch = _case_model(kind), image_batch(B, seed=5)
    obj = build_objective(cfg, NUM_CLASSES)
    whole = obj.compute(model, batch, step, ObjectiveContext.single_process(B, seed))
    parts = [torch.arange(0, B // 2), torch.arange(B // 2, B)] if split == "halves" else \
        [torch.arange(0, B, 2), torch.arange(1, B, 2)]
    losses = []
    for rows in parts:
        micro = obj.compute(model, sub_batch(batch, rows), step, micro_context(seed, B, rows))
        assert torch.equal(micro.t, whole.t[rows]) and torch.equal(micro.r, whole.r[rows])
        torch.testing.assert_close(micro.z, whole.z[rows], rtol=0, atol=0)
        losses.append(micro.loss)
    torch.testing.assert_close(torch.stack(losses).mean(), whole.loss, rtol=1e-10, atol=0)


def test_r_eq_t_share_is_a_fixed_count_of_the_global_batch_by_index():
    B = 8
    cfg = objective_cfg("mf", **{"time.share_r_eq_t": 0.25}).time
    for rows in (torch.arange(B), torch.tensor([1, 5]), torch.tensor([6, 0, 3])):
        rand = StepRandom(seed=3, step=2, global_batch=B, rows=rows, device=torch.device("cpu"))
        t, r = sample_time_pairs(rand, cfg)
        assert bool((r <= t).all())
        assert torch.equal(t == r, rows % 4 == 3), rows      # ⌊(i + 1)/4⌋ > ⌊i/4⌋: 2 rows, spread


def test_draws_depend_on_run_seed_and_step():
    B = 16
    cfg = objective_cfg("mf").time

    def draw(seed, step):
        return sample_time_pairs(StepRandom(seed, step, B, torch.arange(B), torch.device("cpu")), cfg)[0]

    assert torch.equal(draw(1, 2), draw(1, 2))
    assert not torch.equal(draw(1, 2), draw(1, 3))
    assert not torch.equal(draw(1, 2), draw(2, 2))


def test_logit_normal_time_sampler_uses_mu_and_sigma():
    B = 4096
    rand = StepRandom(0, 0, B, torch.arange(B), torch.device("cpu"))
    cfg = objective_cfg("mf", **{"time.mu": -2.0, "time.sigma": 0.0, "time.share_r_eq_t": 0.0}).time
    t, r = sample_time_pairs(rand, cfg)
    torch.testing.assert_close(t, torch.full((B,), 1 / (1 + math.exp(2.0))))
    torch.testing.assert_close(r, t)
    cfg = objective_cfg("mf", **{"time.mu": -0.4, "time.sigma": 1.0, "time.share_r_eq_t": 0.0}).time
    t, r = sample_time_pairs(rand, cfg)
    # t = max, r = min of two logit-normals: the mean of both logits is μ.
    logits = torch.cat([torch.logit(t.double()), torch.logit(r.double())])
    assert abs(float(logits.mean()) + 0.4) < 4 / math.sqrt(2 * B)
    assert bool((r < t).all())


# ==============================================================================================================
# The stats contract and the objective registry
# ==============================================================================================================


JVP_OBJECTIVES = {"mf", "sg_lambda", "imf", "tangent_beta", "stability_mf", "stability_imf"}


@pytest.mark.parametrize("name", list(_objective_cases()))
def test_stats_are_finite_scalars_with_loss_u_norm_and_jvp_norm_where_a_jvp_was_taken(name):
    B = 8
    kind, cfg = _objective_cases()[name]
    model, batch = _case_model(kind), image_batch(B, seed=5)
    loss, stats = build_objective(cfg, NUM_CLASSES)(model, batch, 3, ObjectiveContext.single_process(B, 1))
    assert {"loss", "u_norm"} <= set(stats)
    assert ("jvp_norm" in stats) == (name in JVP_OBJECTIVES)
    for key, value in stats.items():
        assert isinstance(value, torch.Tensor) and value.dim() == 0, key
        assert bool(torch.isfinite(value)), key
        assert not value.requires_grad, key
    torch.testing.assert_close(stats["loss"], loss.detach(), rtol=0, atol=0)
    assert float(stats["u_norm"]) > 0


def test_jvp_norm_is_zero_not_nan_when_every_row_has_r_eq_t():
    B = 4
    cfg = objective_cfg("mf", **{"time.share_r_eq_t": 1.0})
    _, stats = MeanFlow(cfg, NUM_CLASSES)(tiny_dit(), image_batch(B), 0, ObjectiveContext.single_process(B, 0))
    assert float(stats["jvp_norm"]) == 0.0


def test_build_objective_maps_names_and_rejects_unknown_ones():
    expected = {"fm": FlowMatching, "mf": MeanFlow, "sg_lambda": SGLambda, "imf": ImprovedMeanFlow,
                "tangent_beta": TangentBeta}
    for name, cls in expected.items():
        assert type(build_objective(objective_cfg(name))) is cls
    wrapped = build_objective(objective_cfg("stability", **{"stability.base": "sg_lambda"}))
    assert isinstance(wrapped, NonExpansivity) and type(wrapped.base) is SGLambda
    with pytest.raises(ValueError, match="objective.name"):
        build_objective(objective_cfg("meanflow"))
    with pytest.raises(ValueError, match="stability.base"):
        build_objective(objective_cfg("stability", **{"stability.base": "stability"}))

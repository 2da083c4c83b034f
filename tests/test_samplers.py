"""Specification of the samplers in `meanflow.objectives.samplers` (docs/objectives.md, sampling):
1-NFE ``x̂ = z_1 − u(z_1, r=0, t=1)``; k-NFE on ``linspace(1, 0, k+1)`` with ``z ← z − (t_i − t_{i+1})·u(z, r=t_{i+1},
t=t_i)``; the noise of sample i depends only on (seed, i)."""

from __future__ import annotations

import pytest
import torch

from meanflow.objectives import guidance_conditions, sample, sample_noise

from objective_testkit import PointMassVelocity, Spy, tiny_dit, tiny_mlp

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("one_thread")]

F64 = torch.float64




def test_one_nfe_is_noise_minus_u_at_r_0_t_1_exactly():
    model = tiny_dit()
    noise = sample_noise(range(4), (1, 4, 4), seed=3).to(F64)
    y = torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        expected = noise - model(noise, t=torch.ones(4, dtype=F64), r=torch.zeros(4, dtype=F64), y=y)
    torch.testing.assert_close(sample(model, noise, steps=1, y=y), expected, rtol=0, atol=0)


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_k_nfe_calls_the_model_with_r_next_and_t_current_on_linspace(steps):
    model = Spy(tiny_mlp())
    noise = sample_noise(range(5), (2,), seed=0).to(F64)
    out = sample(model, noise, steps=steps)
    grid = torch.linspace(1.0, 0.0, steps + 1, dtype=F64)
    assert len(model.calls) == steps
    z = noise.clone()
    for i, call in enumerate(model.calls):
        torch.testing.assert_close(call["t"], torch.full((5,), float(grid[i]), dtype=F64), rtol=0, atol=0)
        torch.testing.assert_close(call["r"], torch.full((5,), float(grid[i + 1]), dtype=F64), rtol=0, atol=0)
        torch.testing.assert_close(call["x"], z, rtol=0, atol=1e-15)
        with torch.no_grad():
            z = z - (grid[i] - grid[i + 1]) * model.inner(z, t=call["t"], r=call["r"])
    torch.testing.assert_close(out, z, rtol=0, atol=1e-14)


def test_sampler_passes_labels_and_guidance_conditions_to_every_call():
    model = Spy(tiny_dit("imf_dit"))
    model.eval()
    noise = sample_noise(range(3), (1, 4, 4), seed=1).to(F64)
    y = torch.tensor([2, 0, 1])
    omega = guidance_conditions(3, 8.0, 0.42, 0.62).to(F64)
    torch.testing.assert_close(omega, torch.tensor([[8.0, 0.42, 0.62]] * 3, dtype=F64))
    sample(model, noise, steps=2, y=y, omega=omega)
    assert len(model.calls) == 2
    for call in model.calls:
        assert torch.equal(call["y"], y) and torch.equal(call["omega"], omega)


def test_sample_noise_row_depends_only_on_seed_and_index():
    shape = (1, 4, 4)
    full = sample_noise(range(10), shape, seed=7)
    assert full.shape == (10, *shape)
    # Any index set, order or batching gives the same rows.
    subset = sample_noise([7, 2, 9], shape, seed=7)
    torch.testing.assert_close(subset, full[[7, 2, 9]], rtol=0, atol=0)
    batched = torch.cat([sample_noise(range(i, min(i + 3, 10)), shape, seed=7) for i in range(0, 10, 3)])
    torch.testing.assert_close(batched, full, rtol=0, atol=0)
    # Different indices and different seeds give different noise.
    assert not torch.equal(full[0], full[1])
    assert not torch.equal(sample_noise([3], shape, seed=8)[0], full[3])
    # Standard normal rows.
    many = sample_noise(range(2000), (2,), seed=0)
    assert abs(float(many.mean())) < 0.1 and abs(float(many.std()) - 1.0) < 0.1


@pytest.mark.parametrize("steps", [1, 3])
def test_exact_average_velocity_of_a_point_mass_recovers_the_data_point(steps):
    """Data at x0: z_t = (1 − t)·x0 + t·e is a straight line, so u(z, r, t) = (z − x0)/t and 1-NFE lands on x0."""
    x0 = torch.tensor([1.5, -0.5], dtype=F64)
    noise = sample_noise(range(6), (2,), seed=2).to(F64)
    out = sample(PointMassVelocity(x0), noise, steps=steps)
    torch.testing.assert_close(out, x0.expand(6, 2), rtol=0, atol=1e-12)

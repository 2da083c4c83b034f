"""Specification of `meanflow.models`: sizes, the call interface, zero-init, h-only conditioning, forward-AD JVPs."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import forward_ad as fwAD

from meanflow.models import attention, build_model, count_parameters

pytestmark = pytest.mark.timeout(120)

FAMILIES = ("mf_dit", "imf_dit", "mlp")


def tiny_cfg(family, **overrides):
    fields = dict(family=family, size="tiny", patch_size=2, image_size=8, in_channels=1, num_classes=10)
    return SimpleNamespace(**{**fields, **overrides})


def example_input(family, batch=2, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, 2) if family == "mlp" else (batch, 1, 8, 8)
    x = torch.randn(shape, generator=gen, dtype=dtype)
    t = torch.tensor([0.7, 0.4], dtype=dtype)[:batch]
    r = torch.tensor([0.3, 0.1], dtype=dtype)[:batch]
    return x, t, r


def perturbed(model, scale=0.05, seed=0):
    """Add small seeded noise to every parameter, so zero-initialised layers stop hiding the computation."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model


def tiny_model(family, dtype=torch.float32, **overrides):
    torch.manual_seed(0)
    return build_model(tiny_cfg(family, **overrides)).to(dtype)


# ----------------------------------------------------------------------------------------------------------------
# Sizes
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "family, size, expected",
    [("mf_dit", "B", 131e6), ("mf_dit", "XL", 676e6), ("imf_dit", "B", 89e6), ("imf_dit", "L", 409e6),
     ("imf_dit", "XL", 610e6)],
)
def test_parameter_count_matches_published_size(family, size, expected):
    cfg = SimpleNamespace(family=family, size=size, patch_size=2, image_size=32, in_channels=4, num_classes=1000,
                          v_head=(family == "imf_dit"))
    with torch.device("meta"):
        model = build_model(cfg)
    n = count_parameters(model)
    assert abs(n - expected) / expected < 0.01, f"{family} {size}/2: {n:,} parameters, expected ~{expected:,.0f}"


def test_v_head_parameters_are_excluded_by_default():
    cfg = SimpleNamespace(family="imf_dit", size="B", patch_size=2, image_size=32, in_channels=4, num_classes=1000)
    with torch.device("meta"):
        plain = build_model(cfg)
        with_head = build_model(SimpleNamespace(**vars(cfg), v_head=True, v_head_depth=8))
    assert count_parameters(with_head) == count_parameters(plain)
    head = count_parameters(with_head, include_v_head=True) - count_parameters(plain)
    assert head == count_parameters(with_head.v_head) > 8 * 7e6, f"v-head has {head:,} parameters"


@pytest.mark.parametrize("family", ["mf_dit", "imf_dit"])
def test_model_built_on_meta_device_is_materialised_by_init_weights(family):
    # What a sharded engine does: build on meta, allocate with to_empty(), then initialise in place.
    with torch.device("meta"):
        model = build_model(tiny_cfg(family))
    model.to_empty(device="cpu")
    model.init_weights()
    reference = tiny_model(family)
    for (name, buffer), ref in zip(model.named_buffers(), reference.buffers()):
        torch.testing.assert_close(buffer, ref, msg=f"buffer {name}")
    x, t, r = example_input(family)
    assert torch.equal(model(x, t=t, r=r), torch.zeros_like(x))


# ----------------------------------------------------------------------------------------------------------------
# Call interface
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_output_has_the_shape_of_the_input(family):
    model = tiny_model(family)
    x, t, r = example_input(family)
    assert model(x, t=t, r=r, y=torch.tensor([3, 10])).shape == x.shape


@pytest.mark.parametrize("family", ["mf_dit", "imf_dit"])
def test_dit_output_is_exactly_zero_at_initialisation(family):
    model = tiny_model(family)
    x, t, r = example_input(family)
    out = model(x, t=t, r=r, y=torch.tensor([3, 10]))
    assert torch.equal(out, torch.zeros_like(x))
    assert perturbed(model)(x, t=t, r=r).abs().max() > 0  # the zero really comes from the zero-init


@pytest.mark.parametrize("family", FAMILIES)
def test_t_and_r_are_keyword_only(family):
    model = tiny_model(family)
    x, t, r = example_input(family)
    with pytest.raises(TypeError):
        model(x, t, r)


def test_missing_labels_mean_the_null_class():
    model = perturbed(tiny_model("mf_dit"))
    x, t, r = example_input("mf_dit")
    null = torch.full((2,), 10)
    torch.testing.assert_close(model(x, t=t, r=r), model(x, t=t, r=r, y=null), rtol=0, atol=0)
    assert not torch.allclose(model(x, t=t, r=r, y=torch.tensor([1, 2])), model(x, t=t, r=r, y=null))


def test_unconditional_models_ignore_labels():
    model = perturbed(tiny_model("imf_dit", num_classes=0))
    x, t, r = example_input("imf_dit")
    torch.testing.assert_close(model(x, t=t, r=r), model(x, t=t, r=r, y=torch.tensor([5, 7])), rtol=0, atol=0)


def test_imf_dit_missing_omega_means_no_guidance():
    model = perturbed(tiny_model("imf_dit"))
    x, t, r = example_input("imf_dit")
    y = torch.tensor([3, 4])
    default = torch.tensor([[1.0, 0.0, 1.0]] * 2)
    torch.testing.assert_close(model(x, t=t, r=r, y=y), model(x, t=t, r=r, y=y, omega=default), rtol=0, atol=0)
    guided = torch.tensor([[4.0, 0.2, 0.7]] * 2)
    assert not torch.allclose(model(x, t=t, r=r, y=y), model(x, t=t, r=r, y=y, omega=guided))


def test_imf_dit_depends_on_h_only_and_mf_dit_on_t_too():
    x, _, _ = example_input("imf_dit")
    # Dyadic values, so t - r is the same float in both calls.
    t1, r1 = torch.tensor([0.75, 0.5]), torch.tensor([0.5, 0.25])
    t2, r2 = torch.tensor([0.5, 0.875]), torch.tensor([0.25, 0.625])
    assert torch.equal(t1 - r1, t2 - r2)
    imf = perturbed(tiny_model("imf_dit"))
    torch.testing.assert_close(imf(x, t=t1, r=r1), imf(x, t=t2, r=r2), rtol=0, atol=0)
    mf = perturbed(tiny_model("mf_dit"))
    assert not torch.allclose(mf(x, t=t1, r=r1), mf(x, t=t2, r=r2))


# ----------------------------------------------------------------------------------------------------------------
# Forward-mode AD (the MeanFlow JVP)
# ----------------------------------------------------------------------------------------------------------------


def jvp(model, x, t, r, dx, dt, dr, y):
    with fwAD.dual_level():
        out = model(fwAD.make_dual(x, dx), t=fwAD.make_dual(t, dt), r=fwAD.make_dual(r, dr), y=y)
        primal, tangent = fwAD.unpack_dual(out)
    return primal, tangent


@pytest.mark.parametrize("family", FAMILIES)
def test_jvp_matches_central_finite_difference(family):
    model = perturbed(tiny_model(family, dtype=torch.float64)).eval()
    x, t, r = example_input(family, dtype=torch.float64)
    gen = torch.Generator().manual_seed(1)
    dx = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    dt, dr = torch.tensor([1.0, 0.5], dtype=torch.float64), torch.tensor([0.0, 0.25], dtype=torch.float64)
    y = torch.tensor([3, 10])

    with torch.no_grad():
        primal, tangent = jvp(model, x, t, r, dx, dt, dr, y)
        eps = 1e-6
        plus = model(x + eps * dx, t=t + eps * dt, r=r + eps * dr, y=y)
        minus = model(x - eps * dx, t=t - eps * dt, r=r - eps * dr, y=y)
    finite_difference = (plus - minus) / (2 * eps)

    torch.testing.assert_close(primal, model(x, t=t, r=r, y=y))
    assert finite_difference.abs().max() > 1e-3  # the tangent is not trivially zero
    rel = ((tangent - finite_difference).norm() / finite_difference.norm()).item()
    assert rel < 1e-6, f"{family}: JVP vs finite difference relative error {rel:.2e}"


@pytest.mark.parametrize("family", ["mf_dit", "imf_dit"])
def test_jvp_tangent_is_differentiable_wrt_parameters(family):
    # SG_lambda with lambda > 0 backpropagates through du/dt itself (second-order terms).
    model = perturbed(tiny_model(family))
    x, t, r = example_input(family)
    _, tangent = jvp(model, x, t, r, torch.randn_like(x), torch.ones_like(t), torch.zeros_like(r), None)
    tangent.square().sum().backward()
    # (Biases that only shift the primal, e.g. the patch-embedding bias, rightly get no gradient from du/dt.)
    missing = [name for name, p in model.blocks.named_parameters() if p.grad is None or not p.grad.abs().max() > 0]
    assert not missing, f"no gradient from the tangent for blocks.{missing}"


def test_attention_with_tangents_matches_sdpa_and_is_twice_differentiable():
    gen = torch.Generator().manual_seed(0)
    q, k, v, dq, dv = (torch.randn(2, 3, 5, 8, generator=gen, dtype=torch.float64) for _ in range(5))
    q.requires_grad_(True)
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        with fwAD.dual_level():
            expected, expected_tangent = fwAD.unpack_dual(
                F.scaled_dot_product_attention(fwAD.make_dual(q, dq), k, fwAD.make_dual(v, dv)))
    torch.testing.assert_close(attention(q, k, v), expected)
    with fwAD.dual_level():
        out, tangent = fwAD.unpack_dual(attention(fwAD.make_dual(q, dq), k, fwAD.make_dual(v, dv)))
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(tangent, expected_tangent)
    (grad,) = torch.autograd.grad(tangent.square().sum(), q)  # native softmax fails here (pytorch#162350)
    assert grad.abs().max() > 0


# ----------------------------------------------------------------------------------------------------------------
# v-head
# ----------------------------------------------------------------------------------------------------------------


def test_v_head_returns_u_and_v_in_training_and_u_in_eval():
    model = perturbed(tiny_model("imf_dit", v_head=True, v_head_depth=2))
    x, t, r = example_input("imf_dit")
    u, v = model.train()(x, t=t, r=r)
    assert u.shape == v.shape == x.shape
    assert not torch.allclose(u, v)
    u_eval = model.eval()(x, t=t, r=r)
    assert isinstance(u_eval, torch.Tensor)
    torch.testing.assert_close(u_eval, u)


def test_v_head_deeper_than_the_model_is_rejected():
    with pytest.raises(ValueError, match="model.v_head_depth"):
        build_model(tiny_cfg("imf_dit", v_head=True, v_head_depth=8))


# ----------------------------------------------------------------------------------------------------------------
# Config errors
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, key",
    [(dict(family="unet"), "model.family"), (dict(family="imf_dit", size="Q"), "model.size"),
     (dict(family="mf_dit", patch_size=3), "model.patch_size"), (dict(family="mf_dit", heads=5), "model.heads")],
)
def test_bad_config_raises_value_error_naming_the_key(overrides, key):
    with pytest.raises(ValueError, match=key):
        build_model(tiny_cfg(**overrides) if "family" in overrides else tiny_cfg("mf_dit", **overrides))

"""Embedded datasets: the 2-D toys, sklearn digits and their deterministic global-batch streams."""

from collections import Counter

import pytest
import torch

from meanflow.data_pipeline import TOY_NAMES, build_embedded_stream, sample_toy
from meanflow.data_pipeline.digits import load_digits_split

pytestmark = pytest.mark.timeout(120)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _image_counter(x: torch.Tensor) -> Counter:
    """Multiset of images (digits holds a few exact duplicates, so compare multisets, not sets)."""
    return Counter(row.numpy().tobytes() for row in x.reshape(len(x), -1))


# ---- 2-D toys -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", TOY_NAMES)
def test_toy_samples_are_finite_points_in_the_plane(name):
    x = sample_toy(name, 1000, _gen(0))
    assert x.shape == (1000, 2) and x.dtype == torch.float32
    assert torch.isfinite(x).all()
    assert x.abs().max() < 5.0  # roughly [-4, 4]^2, as the shared plot range and SW scale assume


@pytest.mark.parametrize("name", TOY_NAMES)
def test_toy_samples_are_a_function_of_the_generator_seed(name):
    assert torch.equal(sample_toy(name, 500, _gen(3)), sample_toy(name, 500, _gen(3)))
    assert not torch.allclose(sample_toy(name, 500, _gen(3)), sample_toy(name, 500, _gen(4)))


def test_checkerboard_samples_fall_in_filled_cells_only():
    x = sample_toy("checkerboard", 20000, _gen(0))
    assert (x.abs() <= 4).all()
    col, row = (torch.div(x + 4, 2, rounding_mode="floor").clamp(0, 3).long()).unbind(1)
    assert ((col + row) % 2 == 0).all()
    # all 8 filled cells are used, with about equal mass
    counts = torch.bincount(col * 4 + row, minlength=16)[(torch.arange(16) // 4 + torch.arange(16) % 4) % 2 == 0]
    assert (counts > 20000 / 8 * 0.9).all()


def test_eight_gaussians_lie_on_a_circle_of_radius_three():
    x = sample_toy("eight_gaussians", 20000, _gen(0))
    assert x.norm(dim=1).mean().item() == pytest.approx(3.0, abs=0.05)


def test_unknown_toy_names_data_name_and_the_known_ones():
    with pytest.raises(ValueError, match=r"data\.name.*checkerboard"):
        sample_toy("spiral_galaxy", 10, _gen(0))
    with pytest.raises(ValueError, match=r"data\.name.*digits"):
        build_embedded_stream("cifar10", 8, 0)


# ---- digits ---------------------------------------------------------------------------------------------------

def test_digits_splits_have_image_shapes_in_signed_unit_range():
    for split in ("train", "test"):
        x, y = load_digits_split(split)
        assert x.shape[1:] == (1, 8, 8) and x.dtype == torch.float32
        assert y.shape == (len(x),) and y.dtype == torch.int64
        assert x.min() >= -1 and x.max() <= 1
        assert x.min() == -1 and x.max() == 1  # the full 0..16 range is used
        assert set(y.tolist()) == set(range(10))


def test_digits_train_and_test_are_disjoint_and_cover_the_dataset():
    from sklearn.datasets import load_digits

    train_x, _ = load_digits_split("train")
    test_x, _ = load_digits_split("test")
    assert len(train_x) + len(test_x) == 1797
    # Disjoint as a split of the 1797 items: together they are exactly the dataset's multiset of images.
    everything = torch.from_numpy(load_digits().images).float().div(8).sub(1).reshape(-1, 1, 8, 8)
    assert _image_counter(torch.cat([train_x, test_x])) == _image_counter(everything)


def test_digits_split_is_the_same_on_every_call():
    a, _ = load_digits_split("train")
    a.fill_(0)  # callers get copies: mutating one must not change the cached split
    b, _ = load_digits_split("train")
    c, _ = load_digits_split("train")
    assert torch.equal(b, c) and b.abs().sum() > 0


# ---- streams --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["digits", "swiss_roll"])
def test_stream_batch_is_a_pure_function_of_seed_and_step(name):
    # Two separately built streams stand for an uninterrupted and a resumed run.
    a, b = build_embedded_stream(name, 64, seed=7), build_embedded_stream(name, 64, seed=7)
    for step in (0, 5, 123):
        ba, bb = a.global_batch(step), b.global_batch(step)
        assert torch.equal(ba["x"], bb["x"]) and torch.equal(ba["index"], bb["index"])
        assert torch.equal(ba["index"], step * 64 + torch.arange(64))
    assert not torch.equal(a.global_batch(0)["x"], a.global_batch(1)["x"])
    assert not torch.equal(a.global_batch(0)["x"], build_embedded_stream(name, 64, seed=8).global_batch(0)["x"])


def test_digits_stream_batches_carry_labels_and_toys_do_not():
    digits = build_embedded_stream("digits", 32, 0)
    batch = digits.global_batch(0)
    assert batch["x"].shape == (32, 1, 8, 8) and batch["y"].shape == (32,)
    assert digits.sample_shape == (1, 8, 8) and digits.num_classes == 10 and digits.name == "digits"
    toy = build_embedded_stream("pinwheel", 32, 0)
    assert toy.global_batch(0)["y"] is None and toy.global_batch(0)["x"].shape == (32, 2)
    assert toy.sample_shape == (2,) and toy.num_classes == 0


def test_digits_labels_match_their_images():
    train_x, train_y = load_digits_split("train")
    lookup = {row.numpy().tobytes(): int(y) for row, y in zip(train_x.reshape(len(train_x), -1), train_y)}
    batch = build_embedded_stream("digits", 256, 0).global_batch(3)
    for row, y in zip(batch["x"].reshape(256, -1), batch["y"]):
        assert lookup[row.numpy().tobytes()] == int(y)


def test_digits_stream_epoch_visits_every_train_image_once():
    # B = 100 does not divide 1437, so batch 14 straddles epochs 0 and 1.
    train_x, _ = load_digits_split("train")
    stream = build_embedded_stream("digits", 100, seed=0)
    seen = torch.cat([stream.global_batch(step)["x"] for step in range(15)])
    assert _image_counter(seen[: len(train_x)]) == _image_counter(train_x)
    # the next epoch is a different order of the same images
    second = torch.cat([stream.global_batch(step)["x"] for step in range(14, 29)])[37: 37 + len(train_x)]
    assert _image_counter(second) == _image_counter(train_x)
    assert not torch.equal(second, seen[: len(train_x)])


def test_stream_state_dict_rejects_resuming_with_other_data():
    stream = build_embedded_stream("digits", 64, seed=1)
    build_embedded_stream("digits", 64, seed=1).load_state_dict(stream.state_dict())
    for other in (build_embedded_stream("digits", 64, seed=2), build_embedded_stream("digits", 32, seed=1),
                  build_embedded_stream("two_moons", 64, seed=1)):
        with pytest.raises(ValueError, match="differs"):
            other.load_state_dict(stream.state_dict())


def test_real_samples_are_toy_draws_or_digits_test_images():
    toy = build_embedded_stream("two_spirals", 64, 0)
    assert toy.real_samples(4096, seed=0).shape == (4096, 2)
    assert torch.equal(toy.real_samples(100, seed=1), toy.real_samples(100, seed=1))
    digits = build_embedded_stream("digits", 64, 0)
    test_x, _ = load_digits_split("test")
    assert torch.equal(digits.real_samples(50, seed=0), test_x[:50])
    with pytest.raises(ValueError, match="360"):
        digits.real_samples(4096, seed=0)

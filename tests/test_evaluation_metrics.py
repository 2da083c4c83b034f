"""Evaluation metrics and pictures: sliced Wasserstein, the digits feature extractor as a classifier, image grids and
scatter plots."""

import math

import fsspec
import numpy as np
import pytest
import torch
from PIL import Image

from meanflow.data_pipeline import sample_toy
from meanflow.data_pipeline.digits import load_digits_split
from meanflow.evaluation import save_image_grid, save_scatter_png, sliced_wasserstein, to_uint8
from meanflow.evaluation.feature_extractors import load_feature_extractor
from meanflow.evaluation.sliced_wasserstein import random_directions

pytestmark = pytest.mark.timeout(120)


def _points(n=4096, seed=0):
    return sample_toy("swiss_roll", n, torch.Generator().manual_seed(seed))


# ---- sliced Wasserstein ---------------------------------------------------------------------------------------

def test_sliced_wasserstein_of_a_set_with_itself_is_zero():
    a = _points()
    assert sliced_wasserstein(a, a) == 0.0
    assert sliced_wasserstein(a, a[torch.randperm(len(a))], p=2) == pytest.approx(0.0, abs=1e-12)


def test_sliced_wasserstein_of_a_shift_is_the_mean_projected_shift():
    a, c = _points(), torch.tensor([1.5, -0.5])
    theta = random_directions(500, 2, seed=0)
    expected = (theta @ c.double()).abs().mean().item()  # each 1-D coupling moves every point by <c, theta>
    assert sliced_wasserstein(a, a + c, num_directions=500, seed=0) == pytest.approx(expected, rel=1e-5)
    # and that is close to its value for uniform directions in 2-D: E|<c, theta>| = 2|c|/pi
    assert expected == pytest.approx(2 * c.norm().item() / math.pi, rel=0.05)
    sw2 = sliced_wasserstein(a, a + c, num_directions=500, p=2, seed=0)
    assert sw2 == pytest.approx(c.norm().item() / math.sqrt(2), rel=0.05)  # sqrt(E<c, theta>^2) = |c|/sqrt(2)


def test_sliced_wasserstein_grows_with_the_shift():
    a, direction = _points(), torch.tensor([0.6, 0.8])
    values = [sliced_wasserstein(a, a + s * direction) for s in (0.1, 0.5, 1.0, 2.0)]
    assert values == sorted(values) and values[0] > 0


def test_sliced_wasserstein_separates_different_toys_more_than_two_draws_of_one():
    same = sliced_wasserstein(_points(seed=0), _points(seed=1))
    other = sliced_wasserstein(_points(seed=0), sample_toy("checkerboard", 4096, torch.Generator().manual_seed(1)))
    assert same < 0.1 < other


def test_sliced_wasserstein_rejects_sets_of_different_sizes():
    with pytest.raises(ValueError, match="equal sample counts"):
        sliced_wasserstein(_points(100), _points(99))


# ---- digits-cnn as a classifier (the class accuracy of conditional digits samples) -------------------------------

def accuracy(images: torch.Tensor, labels: torch.Tensor) -> float:
    _, logits = load_feature_extractor("digits-cnn")(to_uint8(images))
    return (logits.argmax(1) == labels).float().mean().item()


def test_digits_cnn_recognises_real_test_digits():
    x, y = load_digits_split("test")
    assert accuracy(x, y) >= 0.95


def test_digits_cnn_scores_noise_near_chance():
    g = torch.Generator().manual_seed(0)
    noise = torch.rand(2000, 1, 8, 8, generator=g) * 2 - 1
    assert accuracy(noise, torch.randint(0, 10, (2000,), generator=g)) < 0.3


def test_digits_cnn_scores_wrong_labels_low():
    x, y = load_digits_split("test")
    assert accuracy(x, (y + 1) % 10) < 0.1


# ---- pictures -------------------------------------------------------------------------------------------------

def test_to_uint8_maps_the_signed_unit_range_onto_0_255():
    out = to_uint8(torch.tensor([-2.0, -1.0, 0.0, 1.0, 2.0]))
    assert out.dtype == torch.uint8
    # 127.5*(-1) + 128 = 0.5 -> 0; 127.5*0 + 128 = 128; 127.5*1 + 128 = 255.5 -> clamped 255; outside is clamped
    assert out.tolist() == [0, 0, 128, 255, 255]


def _read_png(url: str) -> Image.Image:
    with fsspec.open(url, "rb") as f:
        img = Image.open(f)
        img.load()
    return img


def test_save_image_grid_writes_an_upscaled_png_to_a_local_url(tmp_path):
    x, _ = load_digits_split("test")
    url = (tmp_path / "nested" / "dir" / "grid.png").as_uri()  # file://...; the parent does not exist yet
    save_image_grid(x[:10], url, nrow=4, upscale=4)
    img = _read_png(url)
    # 3 rows x 4 columns of 32x32 tiles with 2-pixel padding around and between them
    assert img.format == "PNG" and img.mode == "L"
    assert img.size == (4 * (32 + 2) + 2, 3 * (32 + 2) + 2)
    # the first tile is the first image, upscaled by nearest neighbour
    tile = torch.from_numpy(np.array(img))[2:34, 2:34]
    assert torch.equal(tile[::4, ::4], to_uint8(x[0, 0]))


def test_save_image_grid_writes_to_an_in_memory_object_store():
    url = "memory://meanflow-tests/samples/step_000100.png"
    save_image_grid(torch.rand(6, 3, 8, 8) * 2 - 1, url, nrow=3, upscale=2)
    img = _read_png(url)
    assert img.mode == "RGB" and img.size == (3 * (16 + 2) + 2, 2 * (16 + 2) + 2)
    fsspec.filesystem("memory").rm(url, recursive=True)


def test_save_scatter_png_writes_a_png(tmp_path):
    url = str(tmp_path / "scatter.png")
    save_scatter_png(_points(500), url, reference=_points(500, seed=1))
    assert _read_png(url).format == "PNG"

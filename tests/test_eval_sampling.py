"""Evaluation sampling: the generated set depends on (eval seed, index) only, not on world or batch size."""

import hashlib

import pytest
import torch

from meanflow.evaluation.images import to_uint8
from meanflow.evaluation.sampling import generate, rank_indices, sample_labels
from meanflow.models import build_model
from meanflow.platform.config import load_config

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    net = build_model(load_config("tiny_mf").model)
    with torch.no_grad():   # away from the zero-output initialisation
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net


def set_hash(model, world: int, batch_size: int, n: int = 96) -> str:
    images = {}
    for rank in range(world):
        for idx, x, _ in generate(model, rank_indices(n, rank, world), (1, 8, 8), 10, seed=7,
                                  batch_size=batch_size):
            images.update(zip(idx.tolist(), to_uint8(x)))
    assert sorted(images) == list(range(n))
    return hashlib.sha256(b"".join(images[i].numpy().tobytes() for i in range(n))).hexdigest()


def test_generated_set_is_the_same_for_any_world_and_batch_size(model, one_thread):
    reference = set_hash(model, world=1, batch_size=96)
    assert set_hash(model, world=2, batch_size=16) == reference
    assert set_hash(model, world=3, batch_size=7) == reference


def test_labels_are_a_function_of_seed_and_index():
    assert torch.equal(sample_labels([5, 9, 2], 10, seed=1), sample_labels([5, 9, 2], 10, seed=1))
    both = sample_labels(range(1000), 10, seed=1)
    assert set(both.tolist()) == set(range(10)) and not torch.equal(both, sample_labels(range(1000), 10, seed=2))

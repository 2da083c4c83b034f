"""scikit-learn's bundled 8x8 digits (1797 images, offline): the CPU-sized image dataset for tiny configs.

Pixels are counts 0..16; we store them as x in [-1, 1] (x = count/8 - 1), the range every model and the image
writer (``evaluation.images.to_uint8``) expect. The train/test split is a fixed stratified 80/20 split with
seed 0, so training never sees the images that the evaluation classifier and ``real_samples`` are scored on.
"""

from __future__ import annotations

import functools

import torch

NUM_CLASSES = 10
IMAGE_SHAPE = (1, 8, 8)
SPLIT_SEED = 0
TEST_FRACTION = 0.2


def counts_to_signed(counts: torch.Tensor) -> torch.Tensor:
    """Pixel counts 0..16 -> [-1, 1]."""
    return counts.float() / 8.0 - 1.0


def to_unit_range(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1] (for plotting or feature extractors that want unit range)."""
    return (x + 1.0) / 2.0


def from_unit_range(x01: torch.Tensor) -> torch.Tensor:
    """[0, 1] -> [-1, 1]; inverse of ``to_unit_range``."""
    return x01 * 2.0 - 1.0


@functools.lru_cache(maxsize=None)
def _splits() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    # Imported here so that importing meanflow.data_pipeline does not pay for scikit-learn.
    import numpy as np
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    all_idx = np.arange(len(data.target))
    train_idx, test_idx = train_test_split(all_idx, test_size=TEST_FRACTION, random_state=SPLIT_SEED,
                                           stratify=data.target)
    images = counts_to_signed(torch.from_numpy(data.images)).reshape(-1, *IMAGE_SHAPE)  # (1797, 1, 8, 8)
    labels = torch.from_numpy(data.target).long()
    # Sorted indices keep each split in the dataset's own order (train_test_split returns them shuffled).
    out = {}
    for split, idx in (("train", train_idx), ("test", test_idx)):
        idx_t = torch.from_numpy(idx).sort().values
        out[split] = (images[idx_t].contiguous(), labels[idx_t].contiguous())
    return out


def load_digits_split(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (x (N, 1, 8, 8) float32 in [-1, 1], y (N,) int64) for split "train" (1437) or "test" (360).

    The arrays are loaded once per process; callers get copies, so mutating them cannot corrupt the cache.
    """
    if split not in ("train", "test"):
        raise ValueError(f"digits split must be 'train' or 'test', got {split!r}")
    x, y = _splits()[split]
    return x.clone(), y.clone()

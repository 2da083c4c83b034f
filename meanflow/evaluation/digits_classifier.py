"""A fixed digits classifier: checks that class-conditional generated digits are the class asked for.

Logistic regression on the 64 raw pixels of the real digits train split (test accuracy ~0.96). It is fitted once
per process and never on generated data, so the score of a sample set depends only on the samples.
"""

from __future__ import annotations

import functools

import torch

from meanflow.data_pipeline.digits import IMAGE_SHAPE, load_digits_split


@functools.lru_cache(maxsize=1)
def _fitted_model():
    from sklearn.linear_model import LogisticRegression

    x, y = load_digits_split("train")
    # lbfgs needs a few hundred iterations on these unscaled-but-bounded pixels; 5000 leaves ample margin so the
    # fit converges (and is deterministic) rather than stopping at the default 100 with a warning.
    model = LogisticRegression(max_iter=5000)
    model.fit(x.reshape(len(x), -1).numpy(), y.numpy())
    return model


class DigitsClassifier:
    """Wraps the cached fitted model; cheap to construct."""

    def __init__(self):
        self._model = _fitted_model()

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """images (N, 1, 8, 8) in [-1, 1] -> predicted labels (N,) int64."""
        if tuple(images.shape[1:]) != IMAGE_SHAPE:
            raise ValueError(f"expected images of shape (N, {', '.join(map(str, IMAGE_SHAPE))}), got {tuple(images.shape)}")
        flat = images.detach().cpu().float().reshape(len(images), -1).numpy()
        return torch.from_numpy(self._model.predict(flat)).long()

    def class_accuracy(self, images: torch.Tensor, labels: torch.Tensor) -> float:
        """Share of images classified as their requested label."""
        if len(images) != len(labels) or len(images) == 0:
            raise ValueError(f"need as many labels as images (and at least one): {len(images)} vs {len(labels)}")
        return float((self.predict(images) == labels.detach().cpu().long()).float().mean())

    def real_test_accuracy(self) -> float:
        """Accuracy on the real test split: the ceiling a perfect class-conditional generator would reach."""
        x, y = load_digits_split("test")
        return self.class_accuracy(x, y)


def class_accuracy(images: torch.Tensor, labels: torch.Tensor) -> float:
    return DigitsClassifier().class_accuracy(images, labels)


def real_test_accuracy() -> float:
    return DigitsClassifier().real_test_accuracy()

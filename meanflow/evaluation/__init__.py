"""Evaluation: sample metrics (sliced Wasserstein, digits class accuracy, FID/IS) and sample pictures."""

from meanflow.evaluation.digits_classifier import DigitsClassifier
from meanflow.evaluation.images import save_image_grid, save_scatter_png, to_uint8
from meanflow.evaluation.sliced_wasserstein import sliced_wasserstein

__all__ = ["DigitsClassifier", "save_image_grid", "save_scatter_png", "to_uint8", "sliced_wasserstein"]

"""Evaluation: sampling split over ranks, FID/IS (torch-fidelity feature extractors), SW for 2-D toys, pictures."""

from meanflow.evaluation.images import save_image_grid, save_scatter_png, to_uint8
from meanflow.evaluation.sliced_wasserstein import sliced_wasserstein

__all__ = ["save_image_grid", "save_scatter_png", "to_uint8", "sliced_wasserstein"]

"""Feature statistics for FID and IS that reduce over ranks by summation, so any world size gives the same numbers.

FID needs only n, Σx and Σxxᵀ of the features (float64, summed over ranks, then mean and covariance); the Fréchet
distance uses scipy's ``sqrtm`` as EDM's fid.py does. IS needs, per split of the global sample indices, the count,
Σ p(y|x) and Σ Σ_y p log p: the mean KL(p(y|x) ‖ p(y)) of a split is E[Σ p log p] − Σ p̄ log p̄ with p̄ = E[p],
so it also decomposes into sums.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg
import torch
import torch.distributed as dist


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t


class FeatureMoments:
    """Running float64 sums of features: n, Σx (D,), Σxxᵀ (D, D)."""

    def __init__(self, dim: int):
        self.dim = dim
        self.n = torch.zeros((), dtype=torch.float64)
        self.s1 = torch.zeros(dim, dtype=torch.float64)
        self.s2 = torch.zeros(dim, dim, dtype=torch.float64)

    def add(self, features: torch.Tensor) -> None:
        f = features.detach().to("cpu", torch.float64).reshape(len(features), -1)
        self.n += len(f)
        self.s1 += f.sum(0)
        self.s2 += f.T @ f

    def all_reduce(self) -> "FeatureMoments":
        """Sum over ranks in one collective."""
        packed = all_reduce_sum(torch.cat([self.n.view(1), self.s1, self.s2.view(-1)]))
        self.n, self.s1 = packed[0], packed[1:1 + self.dim]
        self.s2 = packed[1 + self.dim:].view(self.dim, self.dim)
        return self

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        n = self.n.item()
        if n < 2:
            raise ValueError(f"feature statistics need at least 2 samples, have {n:g}")
        mu = self.s1 / n
        sigma = (self.s2 - n * torch.outer(mu, mu)) / (n - 1)
        return mu.numpy(), sigma.numpy()


# Features whose spread is below these cannot carry a FID: every distance to them is ~0 or ~‖μ1 − μ2‖² alone.
RELATIVE_SPREAD_FLOOR = 1e-6     # trace(Σ) as a share of the mean square E‖x‖² = ‖μ‖² + trace(Σ)
ABSOLUTE_SPREAD_FLOOR = 1e-9     # trace(Σ) itself


def spread_problem(mu: np.ndarray, sigma: np.ndarray) -> str | None:
    """Why features with mean ``mu`` and covariance ``sigma`` are degenerate (None when they are not): non-finite
    values, near-constant features (trace(Σ) below the floors), or variation along a single direction (the
    effective rank trace(Σ)² / ‖Σ‖²_F is 1 for a rank-1 Σ)."""
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        return "non-finite mean or covariance"
    spread, mean_square = float(np.trace(sigma)), float(mu @ mu)
    if spread <= max(RELATIVE_SPREAD_FLOOR * (mean_square + spread), ABSOLUTE_SPREAD_FLOOR):
        return f"near-constant features (trace(Σ) {spread:.3g}, ‖μ‖² {mean_square:.3g})"
    effective_rank = spread ** 2 / float(np.square(sigma).sum())
    if effective_rank < 1.001:
        return f"features that vary along one direction only (effective rank {effective_rank:.4g})"
    return None


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """‖μ1 − μ2‖² + Tr(Σ1 + Σ2 − 2 (Σ1 Σ2)^½), as EDM's fid.py computes it."""
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"feature statistics differ in shape: {mu1.shape} vs {mu2.shape}")
    m = np.square(mu1 - mu2).sum()
    s = scipy.linalg.sqrtm(np.dot(sigma1, sigma2))
    return float(np.real(m + np.trace(sigma1 + sigma2 - s * 2)))


class InceptionScoreSums:
    """Per-split sums for IS. Split k holds global samples [k·N // splits, (k+1)·N // splits) (torch-fidelity's
    split without shuffling), whichever rank generated them: sample i is in split ((i+1)·splits − 1) // N."""

    def __init__(self, num_classes: int, num_samples: int, splits: int = 10):
        self.num_samples, self.splits = num_samples, splits
        self.count = torch.zeros(splits, dtype=torch.float64)
        self.p_sum = torch.zeros(splits, num_classes, dtype=torch.float64)
        self.plogp_sum = torch.zeros(splits, dtype=torch.float64)

    def add(self, logits: torch.Tensor, indices: torch.Tensor) -> None:
        p = torch.softmax(logits.detach().to("cpu", torch.float64), dim=1)
        split = ((indices.to("cpu") + 1) * self.splits - 1) // self.num_samples
        self.count.index_add_(0, split, torch.ones(len(p), dtype=torch.float64))
        self.p_sum.index_add_(0, split, p)
        self.plogp_sum.index_add_(0, split, torch.special.xlogy(p, p).sum(1))

    def all_reduce(self) -> "InceptionScoreSums":
        k = self.p_sum.shape[1]
        packed = all_reduce_sum(torch.cat([self.count, self.p_sum.view(-1), self.plogp_sum]))
        self.count = packed[:self.splits]
        self.p_sum = packed[self.splits:self.splits * (1 + k)].view(self.splits, k)
        self.plogp_sum = packed[self.splits * (1 + k):]
        return self

    def score(self) -> tuple[float, float]:
        """(mean, std) over splits of exp(mean KL(p(y|x) ‖ p(y)))."""
        p_bar = self.p_sum / self.count[:, None]
        kl = self.plogp_sum / self.count - torch.special.xlogy(p_bar, p_bar).sum(1)
        scores = torch.exp(kl)
        return scores.mean().item(), scores.std(unbiased=False).item()

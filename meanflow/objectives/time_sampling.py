"""(t, r) pairs: t, r i.i.d. logit-normal(μ, σ) (or uniform), swapped so t ≥ r, then r := t on a fixed share
spread evenly over the global batch.

docs/objectives.md, "(t, r) sampler". t = 0 is data, t = 1 is noise.
"""

from __future__ import annotations

import torch

from .randomness import StepRandom


def sample_time_pairs(rand: StepRandom, cfg, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (t, r), each (B,), with r ≤ t and r = t on ⌊share_r_eq_t·B_global⌋ global rows
    spread evenly over the global index (``StepRandom.spread_share``).

    dtype: at least float32; float64 data gets float64 times (the finite-difference tests need it).
    """
    dtype = torch.promote_types(dtype, torch.float32)
    if cfg.kind == "logit_normal":
        pair = rand.normal("t_r", 2, dtype=dtype, transform=lambda n: torch.sigmoid(cfg.mu + cfg.sigma * n))
    elif cfg.kind == "uniform":
        pair = rand.uniform("t_r", 2, dtype=dtype)
    else:
        raise ValueError(f"objective.time.kind: unknown sampler {cfg.kind!r}; known: logit_normal, uniform")
    t, r = pair.max(dim=1).values, pair.min(dim=1).values
    r = torch.where(rand.spread_share(cfg.share_r_eq_t), t, r)
    return t, r

"""(t, r) pairs: t, r i.i.d. logit-normal(μ, σ) (or uniform), swapped so t ≥ r, then r := t on a fixed share.

OBJECTIVES.md, "Building blocks". t = 0 is data, t = 1 is noise.
"""

from __future__ import annotations

import torch

from .randomness import StepRandom


def sample_time_pairs(rand: StepRandom, cfg) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (t, r), each (B,), with r ≤ t and r = t on the first ⌊share_r_eq_t·B_global⌋ global rows."""
    if cfg.kind == "logit_normal":
        pair = torch.sigmoid(cfg.mu + cfg.sigma * rand.normal("t_r", 2))
    elif cfg.kind == "uniform":
        pair = rand.uniform("t_r", 2)
    else:
        raise ValueError(f"objective.time.kind: unknown sampler {cfg.kind!r}; known: logit_normal, uniform")
    t, r = pair.max(dim=1).values, pair.min(dim=1).values
    r = torch.where(rand.first_share(cfg.share_r_eq_t), t, r)
    return t, r

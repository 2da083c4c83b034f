"""What every objective shares: the call contract, the context, and small helpers.

Contract: ``objective(model, batch, step, ctx) -> (loss, stats)``; pure (no optimizer, storage,
process group or ``.backward()``); ``stats`` is a dict of 0-d tensors with ``loss`` and ``u_norm`` always and
``jvp_norm`` where a JVP was taken.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import nn

from .randomness import StepRandom
from .time_sampling import sample_time_pairs


@dataclass
class ObjectiveContext:
    """What an objective may need beyond the model and the batch.

    rows: positions of this micro-batch's rows inside the step's global batch (for seeded draws).
    marginal_velocity: optional oracle v(z, t) (2-D toys only) for the exact β* diagnostic.
    teacher: optional frozen flow model (SplitMeanFlow's v_source=teacher), called like the trained model.
    """

    seed: int
    global_batch: int
    rows: torch.Tensor
    ema_model: Optional[nn.Module] = None
    rank: int = 0
    world_size: int = 1
    marginal_velocity: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None
    teacher: Optional[nn.Module] = None

    def random(self, step: int, device: torch.device) -> StepRandom:
        return StepRandom(self.seed, step, self.global_batch, self.rows, device)

    @classmethod
    def single_process(cls, batch_size: int, seed: int = 0, **kw: Any) -> "ObjectiveContext":
        return cls(seed=seed, global_batch=batch_size, rows=torch.arange(batch_size), **kw)


@dataclass
class ObjectiveOutput:
    """An objective's result plus the forward conditioning a composing term (stability) reuses."""

    loss: torch.Tensor
    stats: dict[str, torch.Tensor]
    z: torch.Tensor
    t: torch.Tensor
    r: torch.Tensor
    u: torch.Tensor
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    v_c: Optional[torch.Tensor] = None   # the conditional velocity e − x the objective drew


class Objective:
    """Base class: subclasses implement ``compute``; calling returns ``(loss, stats)``."""

    uses_jvp = True                   # takes a JVP through the model (the trainer's startup check tests it)
    needs_marginal_velocity = False   # wants ``ctx.marginal_velocity`` where the data stream can offer it

    def compute(self, model: nn.Module, batch: dict, step: int, ctx: ObjectiveContext) -> ObjectiveOutput:
        raise NotImplementedError

    def __call__(self, model: nn.Module, batch: dict, step: int, ctx: ObjectiveContext):
        out = self.compute(model, batch, step, ctx)
        return out.loss, out.stats


# ---------------------------------------------------------------------------------------------- helpers


def expand_like(s_B: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, 1, ...) broadcastable against x."""
    return s_B.reshape(-1, *([1] * (x.dim() - 1)))


def per_sample_sq(x: torch.Tensor) -> torch.Tensor:
    """Sum of squares over every element of a sample (sum, not mean, over C·H·W: docs/objectives.md, conventions)."""
    return x.pow(2).flatten(1).sum(1)


def per_sample_norm(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).norm(dim=1)


def adaptive_weighted_loss(delta: torch.Tensor, p: float, c: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``mean(sg(w)·‖Δ‖²)`` with ``w = 1/(‖Δ‖² + c)^p`` (MF's adaptive weight; p = 0 is plain L2).

    Returns (weighted loss, unweighted per-sample squared error).
    """
    sq = per_sample_sq(delta)
    weight = 1.0 / (sq.detach() + c).pow(p) if p else torch.ones_like(sq)
    return (weight * sq).mean(), sq


def model_u(out: Any) -> torch.Tensor:
    """The average-velocity output of a model that may also return a v-head: (u, v) -> u."""
    return out[0] if isinstance(out, (tuple, list)) else out


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over rows where mask is set; 0 when no row is (a 0-d tensor, never NaN)."""
    count = mask.sum()
    return torch.where(count > 0, (values * mask).sum() / count.clamp(min=1), values.new_zeros(()))


def drop_labels(y: Optional[torch.Tensor], rand: StepRandom, p: float, num_classes: int, layout: str = "official",
                r_eq_t_share: float = 0.0):
    """Replace a share p of labels by the null class ``num_classes``. Returns (y_model, dropped mask).

    ``official``: Bin(B_global, p) rows, the first ones of the r = t set (``r_eq_t_share``, spread as the time
    sampler spreads it) and, should the count exceed that set, the first of the other rows: both official codes drop
    the first rows of a batch whose r = t rows come first, so the unconditional rows are flow-matching rows;
    ``independent``: a Bernoulli draw per row.
    """
    if y is None:
        return None, None
    if layout == "official":
        dropped = rand.first_of_spread(r_eq_t_share, rand.binomial_count("label_drop", p))
    elif layout == "independent":
        dropped = rand.uniform("label_drop").lt(p)
    else:
        raise ValueError(f"objective.guidance.drop_layout: unknown {layout!r}; known: official, independent")
    dropped = dropped.to(y.device)
    return torch.where(dropped, torch.full_like(y, num_classes), y), dropped


@dataclass
class NoisedBatch:
    """One step's draws on a batch (docs/objectives.md, conventions): ``z_t = (1 − t)·x + t·e``, ``v_c = e − x``."""

    x: torch.Tensor
    e: torch.Tensor                    # N(0, I), shaped like x
    t: torch.Tensor                    # (B,)
    r: torch.Tensor                    # (B,), r ≤ t
    z: torch.Tensor                    # z_t, shaped like x
    v_c: torch.Tensor                  # conditional velocity e − x
    y: Optional[torch.Tensor]          # the batch's labels, none dropped
    y_model: Optional[torch.Tensor]    # the labels the model is fed: dropped ones are the null class
    dropped: Optional[torch.Tensor]    # (B,) bool, or None without labels
    rand: StepRandom                   # for the objective's own further draws


def with_r_eq_t_share(cfg, share: float):
    """The objective section with its (t, r) sampler's r = t share replaced (objectives whose boundary rows have a
    share of their own: alphaflow's share_fm, split_mf's share_boundary)."""
    from omegaconf import OmegaConf

    return OmegaConf.merge(cfg, {"time": {"share_r_eq_t": share}})


def noise_batch(batch: dict, step: int, ctx: ObjectiveContext, cfg, num_classes: int) -> NoisedBatch:
    """Draw (t, r), e and the label drop for this step's rows and build z_t and v_c; ``cfg`` is the objective's."""
    x = batch["x"]
    rand = ctx.random(step, x.device)
    t, r = sample_time_pairs(rand, cfg.time, x.dtype)
    e = rand.normal("e", *x.shape[1:], dtype=x.dtype)
    t_x = expand_like(t, x)
    z = (1 - t_x) * x + t_x * e
    y = batch.get("y")
    y_model, dropped = drop_labels(y, rand, cfg.label_drop, num_classes, cfg.guidance.drop_layout,
                                   cfg.time.share_r_eq_t)
    return NoisedBatch(x=x, e=e, t=t, r=r, z=z, v_c=e - x, y=y, y_model=y_model, dropped=dropped, rand=rand)

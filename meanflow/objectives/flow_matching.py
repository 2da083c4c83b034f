"""Flow matching (``fm``): ``L = ‖u_θ(z_t, t, t) − v_c‖²`` — the baseline every benchmark ratio is measured against."""

from __future__ import annotations

from .base import (Objective, ObjectiveOutput, drop_labels, expand_like, model_u, per_sample_norm,
                   per_sample_sq)
from .time_sampling import sample_time_pairs


class FlowMatching(Objective):
    def __init__(self, cfg, num_classes: int = 0):
        self.cfg, self.num_classes = cfg, num_classes

    def compute(self, model, batch, step, ctx):
        x = batch["x"]
        rand = ctx.random(step, x.device)
        t, _ = sample_time_pairs(rand, self.cfg.time, x.dtype)
        e = rand.normal("e", *x.shape[1:], dtype=x.dtype)
        z = (1 - expand_like(t, x)) * x + expand_like(t, x) * e
        y, _ = drop_labels(batch.get("y"), rand, self.cfg.label_drop, self.num_classes)
        u = model_u(model(z, t=t, r=t, y=y))
        sq = per_sample_sq(u - (e - x))
        loss = sq.mean()
        stats = {"loss": loss.detach(), "mse": sq.mean().detach(), "u_norm": per_sample_norm(u).mean().detach()}
        return ObjectiveOutput(loss, stats, z=z, t=t, r=t, u=u, model_kwargs={"y": y})

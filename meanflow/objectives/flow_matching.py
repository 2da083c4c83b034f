"""Flow matching (``fm``): ``L = ‖u_θ(z_t, t, t) − v_c‖²`` — the baseline every benchmark ratio is measured against."""

from __future__ import annotations

from .base import Objective, ObjectiveOutput, model_u, noise_batch, per_sample_norm, per_sample_sq


class FlowMatching(Objective):
    uses_jvp = False

    def __init__(self, cfg, num_classes: int = 0):
        self.cfg, self.num_classes = cfg, num_classes

    def compute(self, model, batch, step, ctx):
        nb = noise_batch(batch, step, ctx, self.cfg, self.num_classes)
        z, t, y = nb.z, nb.t, nb.y_model          # r is not used: FM trains the boundary u(z, t, t)
        u = model_u(model(z, t=t, r=t, y=y))
        sq = per_sample_sq(u - nb.v_c)
        loss = sq.mean()
        stats = {"loss": loss.detach(), "mse": sq.mean().detach(), "u_norm": per_sample_norm(u).mean().detach()}
        return ObjectiveOutput(loss, stats, z=z, t=t, r=t, u=u, model_kwargs={"y": y}, v_c=nb.v_c)

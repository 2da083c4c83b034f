"""The single-process engine: the optimizer side of a training step behind the interface every engine keeps.

``grad_norm = engine.backward(loss)`` (once per micro-batch; returns the global norm of the gradient accumulated
so far), then ``engine.apply(step)`` or ``engine.skip()`` — the guard decides in between; a skipped step leaves
parameters and optimizer state untouched. ``engine.model``, ``engine.ema_model``, ``state_dict()`` /
``load_state_dict()``. The distributed engines (ddp, fsdp2, deepspeed) implement the same surface.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def lr_at(step: int, peak: float, warmup_steps: int) -> float:
    """Linear warm-up to the peak LR, then constant (MF/iMF train at a constant LR after warm-up)."""
    return peak * min(1.0, (step + 1) / max(1, warmup_steps))


class SingleProcessEngine:
    def __init__(self, model: nn.Module, optim_cfg, device: torch.device):
        self.cfg = optim_cfg
        self.device = device
        self.model = model.to(device)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=optim_cfg.lr,
                                           betas=tuple(optim_cfg.betas), weight_decay=optim_cfg.weight_decay)
        self.ema_model = None
        if optim_cfg.ema_decay > 0:
            self.ema_model = copy.deepcopy(self.model).requires_grad_(False).eval()
        self._grad_norm = None

    def backward(self, loss: torch.Tensor) -> torch.Tensor:
        loss.backward()
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        self._grad_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        return self._grad_norm.detach()

    def apply(self, step: int) -> float:
        """Clip, step the optimizer at this step's LR, update the EMA. Returns the LR used."""
        lr = lr_at(step, self.cfg.lr, self.cfg.warmup_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if self.cfg.grad_clip > 0 and self._grad_norm is not None:
            scale = (self.cfg.grad_clip / (self._grad_norm + 1e-6)).clamp(max=1.0)
            torch._foreach_mul_([p.grad for p in self.model.parameters() if p.grad is not None], scale)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema_model is not None:
            self._update_ema(step)
        return lr

    def skip(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    @torch.no_grad()
    def _update_ema(self, step: int) -> None:
        # Warm-up min(decay, (1 + step)/(10 + step)): with a flat 0.999 the EMA of a zero-initialised DiT still
        # held e^-1 of its zero output after 1000 steps, which shrank 1-NFE samples into noise on short runs.
        decay = min(self.cfg.ema_decay, (1 + step) / (10 + step))
        ema = list(self.ema_model.parameters())
        torch._foreach_lerp_(ema, list(self.model.parameters()), 1.0 - decay)
        for b_ema, b in zip(self.ema_model.buffers(), self.model.buffers()):
            b_ema.copy_(b)

    def state_dict(self) -> dict:
        state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}
        if self.ema_model is not None:
            state["ema"] = self.ema_model.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.ema_model is not None:
            self.ema_model.load_state_dict(state["ema"])

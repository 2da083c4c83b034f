"""What every engine shares: the optimizer side of a training step behind one interface.

``grad_norm = engine.backward(loss, sync=...)`` once per micro-batch (``sync`` on the last: gradients are then
synchronised across ranks and the global norm is returned), then ``engine.apply(step, lr_scale)`` or ``engine.skip()`` —
the guard decides in between; a skipped step leaves parameters and optimizer state untouched. ``engine.model``
(what objectives call), ``engine.ema_model``, ``engine.autocast()``, ``state_dict()`` / ``load_state_dict()``.
Subclasses say how gradients are synchronised and where parameters live (replicated or sharded).
"""

from __future__ import annotations

import contextlib
import copy

import torch
from torch import nn


def lr_at(step: int, peak: float, warmup_steps: int) -> float:
    """Linear warm-up to the peak LR, then constant (MF/iMF train at a constant LR after warm-up)."""
    return peak * min(1.0, (step + 1) / max(1, warmup_steps))


def ema_decay_at(step: int, decay: float) -> float:
    # Warm-up min(decay, (1 + step)/(10 + step)): with a flat 0.999 the EMA of a zero-initialised DiT still
    # held e^-1 of its zero output after 1000 steps, which shrank 1-NFE samples into noise on short runs.
    return min(decay, (1 + step) / (10 + step))


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The part of a (possibly sharded DTensor) tensor this rank holds."""
    return t.to_local() if hasattr(t, "to_local") else t


def make_ema(model: nn.Module, optim_cfg) -> nn.Module | None:
    """A frozen copy of a (replicated) model to hold the EMA, or None when ``optim.ema_decay`` is 0."""
    return copy.deepcopy(model).requires_grad_(False).eval() if optim_cfg.ema_decay > 0 else None


class Engine:
    name = "base"

    def __init__(self, model: nn.Module, ema_model: nn.Module | None, optim_cfg, device: torch.device,
                 precision: str = "fp32"):
        self.cfg, self.device, self.precision = optim_cfg, device, precision
        self.model, self.ema_model = model, ema_model
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=optim_cfg.lr, betas=tuple(optim_cfg.betas),
                                           weight_decay=optim_cfg.weight_decay)
        self._grad_norm: torch.Tensor | None = None

    # ------------------------------------------------------------------------------------------ subclass hooks
    def _backward(self, loss: torch.Tensor, sync: bool) -> None:
        loss.backward()

    def _synchronise_gradients(self) -> None:
        """Make every rank's gradients the global ones (replicated) or their reduced shards (sharded)."""

    def _global_grad_norm(self, grads: list[torch.Tensor]) -> torch.Tensor:
        return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))

    # ------------------------------------------------------------------------------------------ interface
    def autocast(self):
        """bf16 autocast around the objective (forward, JVP); objectives reduce their loss in fp32."""
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _grads(self) -> list[torch.Tensor]:
        return [p.grad for p in self.model.parameters() if p.grad is not None]

    def backward(self, loss: torch.Tensor, sync: bool = True) -> torch.Tensor | None:
        self._backward(loss, sync)
        if not sync:
            return None
        self._synchronise_gradients()
        self._grad_norm = self._global_grad_norm(self._grads())
        return self._grad_norm.detach()

    def apply(self, step: int, lr_scale: float = 1.0) -> float:
        """Clip to the global norm, step the optimizer at this step's LR times ``lr_scale`` (the guard's cool-down
        after a rollback), update the EMA. Returns the LR used."""
        lr = self._set_lr(step, lr_scale, self.optimizer.param_groups)
        if self.cfg.grad_clip > 0 and self._grad_norm is not None:
            scale = (self.cfg.grad_clip / (self._grad_norm + 1e-6)).clamp(max=1.0)
            torch._foreach_mul_([local_tensor(g) for g in self._grads()], scale)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._after_step(step)
        return lr

    def skip(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def _set_lr(self, step: int, lr_scale: float, param_groups) -> float:
        """Set this step's LR (warm-up × ``lr_scale``) on ``param_groups``: the optimizer's or DeepSpeed ZeRO's."""
        lr = lr_at(step, self.cfg.lr, self.cfg.warmup_steps) * lr_scale
        for group in param_groups:
            group["lr"] = lr
        return lr

    def _after_step(self, step: int) -> None:
        if self.ema_model is not None:
            self._update_ema(step)

    @torch.no_grad()
    def _update_ema(self, step: int) -> None:
        decay = ema_decay_at(step, self.cfg.ema_decay)
        ema = [local_tensor(p) for p in self.ema_model.parameters()]     # sharded engines: this rank's shards
        torch._foreach_lerp_(ema, [local_tensor(p) for p in self.model.parameters()], 1.0 - decay)
        for b_ema, b in zip(self.ema_model.buffers(), self.model.buffers()):
            b_ema.copy_(b)

    # ------------------------------------------------------------------------------------------ state
    checkpoint_format = "torch"
    """torch: one replicated state dict, written by rank 0 with torch.save (``state_dict``); files: every rank
    writes its own files into a local directory (``save_files`` / ``load_files``: DCP, DeepSpeed)."""

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

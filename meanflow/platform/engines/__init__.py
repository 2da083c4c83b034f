"""Engines: ``single``, ``ddp`` (replicated, explicit all-reduce), ``fsdp2`` (sharded), ``deepspeed`` (ZeRO-1/2),
chosen by ``engine.kind``."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .base import Engine, lr_at, make_ema
from .fsdp2 import FSDP2Engine
from .jvp_smoke import EngineJVPError, jvp_smoke_test
from .replicated import ReplicatedEngine, SingleProcessEngine

KINDS = ("single", "ddp", "fsdp2", "deepspeed")
SHARDED_KINDS = ("fsdp2", "deepspeed")   # need a process group even alone (their state is written per rank)


def build_engine(engine_cfg, optim_cfg, model_factory: Callable[[], nn.Module], device: torch.device,
                 world_size: int) -> Engine:
    """The engine ``engine.kind`` names; ``model_factory`` builds identical models on every rank (seeded)."""
    kind = engine_cfg.kind
    if kind == "single" and world_size > 1:
        raise ValueError(f"engine.kind: single cannot run on {world_size} processes; use ddp or fsdp2")
    if kind == "fsdp2":
        return FSDP2Engine(model_factory, optim_cfg, device, engine_cfg.precision, engine_cfg.fsdp_strategy)
    if kind == "deepspeed":
        from .deepspeed_engine import DeepSpeedEngine   # deepspeed is slow to import: only when asked for
        return DeepSpeedEngine(model_factory, optim_cfg, device, engine_cfg.precision, engine_cfg.deepspeed_stage)
    model = model_factory().to(device)
    cls = {"single": SingleProcessEngine, "ddp": ReplicatedEngine}[kind]
    return cls(model, make_ema(model, optim_cfg), optim_cfg, device, engine_cfg.precision)


__all__ = ["Engine", "EngineJVPError", "KINDS", "SHARDED_KINDS", "build_engine", "jvp_smoke_test", "lr_at"]

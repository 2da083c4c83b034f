"""``fsdp2``: parameters, gradients, optimizer state and the EMA sharded over ranks with ``fully_shard``.

Every element of every ``nn.ModuleList`` (the DiT blocks, the v-head blocks) is its own FSDP unit, then the root.
``full_shard`` re-shards parameters after forward (least memory); ``shard_grad_op`` keeps them gathered until
backward (ZeRO-2-like: less communication). The EMA is a second model sharded the same way, so its update is a
local lerp of shards and sampling from it runs the same collectives as the model.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard

from .base import Engine, local_tensor
from .jvp_patches import patch_fsdp2_forward_ad

STRATEGIES = ("full_shard", "shard_grad_op")


def shard_model(model: nn.Module, strategy: str) -> nn.Module:
    if strategy not in STRATEGIES:
        raise ValueError(f"engine.fsdp_strategy: {strategy!r}, expected one of {STRATEGIES}")
    reshard = strategy == "full_shard"
    for module in model.modules():
        if isinstance(module, nn.ModuleList):
            for unit in module:
                fully_shard(unit, reshard_after_forward=reshard)
    fully_shard(model, reshard_after_forward=reshard)
    return model


class FSDP2Engine(Engine):
    name = "fsdp2"
    checkpoint_format = "files"

    def __init__(self, model_factory: Callable[[], nn.Module], optim_cfg, device: torch.device,
                 precision: str = "fp32", strategy: str = "full_shard"):
        patch_fsdp2_forward_ad()
        model = shard_model(model_factory().to(device), strategy)
        ema = None
        if optim_cfg.ema_decay > 0:
            ema = shard_model(model_factory().to(device), strategy).requires_grad_(False).eval()
            with torch.no_grad():
                for e, p in zip(ema.parameters(), model.parameters()):
                    local_tensor(e).copy_(local_tensor(p))
        super().__init__(model, ema, optim_cfg, device, precision)

    def _update_ema(self, step: int) -> None:
        # shard_grad_op keeps a module gathered after a forward with no backward (the EMA proxy's): shard it again,
        # or the lerp would write into the gathered copy and be lost.
        for module in self.ema_model.modules():
            if hasattr(module, "reshard"):
                module.reshard()
        super()._update_ema(step)

    def _backward(self, loss: torch.Tensor, sync: bool) -> None:
        self.model.set_requires_gradient_sync(sync)   # accumulate micro-batches locally, reduce-scatter once
        loss.backward()

    def _global_grad_norm(self, grads: list[torch.Tensor]) -> torch.Tensor:
        # Gradients are Shard(0) DTensors: the global squared norm is the sum of every rank's local squares.
        squares = torch.stack([local_tensor(g).float().pow(2).sum() for g in grads]).sum()
        dist.all_reduce(squares)
        return squares.sqrt()

    # DCP reads and writes these (sharded) state dicts; see platform/checkpoint/store.py.
    def state_dict(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        state = {"model": get_model_state_dict(self.model),
                 "optimizer": get_optimizer_state_dict(self.model, self.optimizer)}
        if self.ema_model is not None:
            state["ema"] = get_model_state_dict(self.ema_model)
        return state

    def load_state_dict(self, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

        set_model_state_dict(self.model, state["model"])
        set_optimizer_state_dict(self.model, self.optimizer, state["optimizer"])
        if self.ema_model is not None:
            set_model_state_dict(self.ema_model, state["ema"])

    def save_files(self, directory: str) -> None:
        """Collective: each rank writes its shards (``__<rank>_0.distcp``), rank 0 the ``.metadata``."""
        import torch.distributed.checkpoint as dcp

        dcp.save(self.state_dict(), storage_writer=dcp.FileSystemWriter(directory, single_file_per_rank=True))

    def load_files(self, directory: str) -> None:
        """Collective; DCP reshards when the saving world size differs from this one."""
        import torch.distributed.checkpoint as dcp

        state = self.state_dict()   # the sharded template to load into
        dcp.load(state, storage_reader=dcp.FileSystemReader(directory))
        self.load_state_dict(state)

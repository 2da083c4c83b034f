"""Engines whose every rank holds the whole model: ``single`` (one process) and ``ddp`` (data parallel).

``ddp`` does not wrap the model in DistributedDataParallel: torch.func transforms and forward-mode AD do not pass
through DDP's forward (pytorch#102197), so objectives call the plain module and the engine all-reduces the
gradients itself, in buckets, once per optimizer step (after the last micro-batch).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from .base import Engine

BUCKET_ELEMENTS = 25_000_000   # ~100 MB of fp32 gradients per all-reduce


class SingleProcessEngine(Engine):
    name = "single"


class ReplicatedEngine(Engine):
    name = "ddp"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        if self.world == 1:
            return
        with torch.no_grad():   # identical start on every rank, whatever each rank's RNG did
            for t in [*self.model.parameters(), *self.model.buffers()]:
                dist.broadcast(t, src=0)
            if self.ema_model is not None:
                for e, p in zip(self.ema_model.parameters(), self.model.parameters()):
                    e.copy_(p)

    def _synchronise_gradients(self) -> None:
        if self.world == 1:
            return
        params = [p for p in self.model.parameters() if p.requires_grad]
        for p in params:   # a parameter no rank's loss touched still takes part, so every rank sends one layout
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        bucket: list[torch.Tensor] = []
        for i, p in enumerate(params):
            bucket.append(p.grad)
            if sum(g.numel() for g in bucket) >= BUCKET_ELEMENTS or i == len(params) - 1:
                flat = _flatten_dense_tensors(bucket)
                dist.all_reduce(flat)
                flat /= self.world
                for g, reduced in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
                    g.copy_(reduced)
                bucket = []

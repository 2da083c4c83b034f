"""``deepspeed``: ZeRO stage 1 (optimizer state sharded) or 2 (+ gradients sharded), with our own loop.

The objective calls the plain module (forward-mode AD passes ZeRO-1/2 untouched); DeepSpeed owns gradient
reduction and the optimizer step. Micro-batch boundaries are set by hand, so one ``apply`` is one optimizer step.
We pass a ``torch.optim.AdamW`` (a DeepSpeed ``optimizer`` block JIT-compiles a fused Adam, ~45 s on CPU) and, on
CPU, skip DeepSpeed's shared-memory comm op (another JIT build, ~27 s; gloo does the work).

ZeRO-3 is refused: ``torch.func.jvp`` fails inside it (deepspeed#7913) and ``forward_ad`` needs patches to its hook
Functions plus ``memory_efficient_linear: false``; use ``engine.kind=fsdp2`` for fully sharded parameters.
The global gradient norm is read from the ZeRO optimizer's reduced partitions before stepping (the guard needs it
to decide between apply and skip), and a skip clears those partitions the way DeepSpeed's own overflow path does.
"""

from __future__ import annotations

import os
from typing import Callable

import torch
from torch import nn

from .base import Engine, make_ema

TESTED_DEEPSPEED = ("0.19",)
STAGES = (1, 2)


class DeepSpeedEngine(Engine):
    name = "deepspeed"
    checkpoint_format = "files"
    TAG = "state"

    def __init__(self, model_factory: Callable[[], nn.Module], optim_cfg, device: torch.device,
                 precision: str = "fp32", stage: int = 2):
        import deepspeed

        if stage not in STAGES:
            raise ValueError(f"engine.deepspeed_stage: {stage} is not supported (ZeRO-3 breaks the JVP: "
                             "deepspeed#7913); use 1 or 2, or engine.kind=fsdp2 for fully sharded parameters")
        if ".".join(deepspeed.__version__.split(".")[:2]) not in TESTED_DEEPSPEED:
            raise ValueError(f"engine.kind=deepspeed was tested with deepspeed {TESTED_DEEPSPEED}, this is "
                             f"{deepspeed.__version__} (its ZeRO optimizer internals are used for the grad norm)")
        if device.type == "cpu":
            import deepspeed.ops
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
        model = model_factory().to(device)
        super().__init__(model, make_ema(model, optim_cfg), optim_cfg, device, precision)
        config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
                  "gradient_clipping": float(optim_cfg.grad_clip), "zero_optimization": {"stage": stage},
                  "steps_per_print": 2**31 - 1, "wall_clock_breakdown": False}
        self.ds, self.zero, _, _ = deepspeed.initialize(model=model, optimizer=self.optimizer, config=config)
        self.model = self.ds.module   # objectives call the plain module; its parameters are DeepSpeed's

    def backward(self, loss: torch.Tensor, sync: bool = True) -> torch.Tensor | None:
        self.ds.set_gradient_accumulation_boundary(sync)   # reduce into the ZeRO partitions on the last only
        self.ds.backward(loss)
        if not sync:
            return None
        self._grad_norm = torch.as_tensor(self.zero.scaled_global_norm(), dtype=torch.float32)
        return self._grad_norm.detach()

    def apply(self, step: int, lr_scale: float = 1.0) -> float:
        """DeepSpeed clips to ``optim.grad_clip`` with the same global norm and steps; then the EMA."""
        lr = self._set_lr(step, lr_scale, self.zero.param_groups)
        self.ds.step()
        self._after_step(step)
        return lr

    def skip(self) -> None:
        """What DeepSpeed's own overflow path does instead of a step: drop the reduced partitions and buffers."""
        from deepspeed.runtime.zero.stage_1_and_2 import INITIAL_MICRO_STEP_ID

        zero = self.zero
        zero.micro_step_id = INITIAL_MICRO_STEP_ID
        zero.zero_grad(set_to_none=True)
        if hasattr(zero, "_release_preflattened_grad_buffers"):
            zero._release_preflattened_grad_buffers()
        for k in list(zero.averaged_gradients.keys()):
            zero.averaged_gradients[k] = None
            if hasattr(zero, "all_grad_tensors"):
                zero.all_grad_tensors[k] = None

    def save_files(self, directory: str) -> None:
        """Collective: DeepSpeed's own files under one tag (its ``latest`` file is never relied on: loading names
        the tag, deepspeed#8499). Rank 0 also writes the (ZeRO-1/2: whole) module and the EMA as plain tensor files,
        which evaluation and tools read with ``weights_only=True`` instead of unpickling DeepSpeed's files."""
        self.ds.save_checkpoint(directory, tag=self.TAG, save_latest=False)
        if torch.distributed.get_rank() == 0:
            torch.save(self.model.state_dict(), os.path.join(directory, "model.pt"))
            if self.ema_model is not None:
                torch.save(self.ema_model.state_dict(), os.path.join(directory, "ema.pt"))

    def load_files(self, directory: str) -> None:
        path, _ = self.ds.load_checkpoint(directory, tag=self.TAG, load_module_strict=True,
                                          load_optimizer_states=True, load_lr_scheduler_states=False)
        if path is None:
            raise RuntimeError(f"DeepSpeed found no checkpoint tag {self.TAG!r} in {directory}")
        if self.ema_model is not None:
            self.ema_model.load_state_dict(torch.load(os.path.join(directory, "ema.pt"), weights_only=True))

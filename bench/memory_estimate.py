"""Per-GPU memory of a training config's optimizer step, estimated on the CPU (no GPU; the model is never allocated).

    python bench/memory_estimate.py --config xl_imf [--gpus 8] [--gpu-mem 80] [--margin 0.15] [key=value ...]

Prints the per-GPU peak and its parts, whether it fits ``--gpu-mem`` GiB with the margin, and the largest
micro-batch (fewest ``optim.grad_accum`` steps) that fits, with and without activation checkpointing.

- **Model state**, counted from the parameters (v-head included), fp32 (the engines keep fp32 weights under bf16
  autocast): parameters, gradients, AdamW's m and v, the EMA copy, and a frozen teacher where split_mf distils from
  one, as the engine places them. fsdp2: the four sharded over the ranks, plus what it gathers (full_shard: the
  root and two blocks, the current and the prefetched one; shard_grad_op: the whole model) and a block's unsharded
  gradient with its reduce-scatter copy; with grad_accum > 1 the micro-batches before the last accumulate the whole
  model's unsharded gradients (no reduce-scatter until the last). ddp, single: all replicated. deepspeed (ZeRO
  defaults of 0.19): parameters and EMA replicated, AdamW state and an fp32 master copy sharded, gradients
  replicated (stage 1) or sharded plus a 5e8-element reduce bucket (stage 2).
- **Activations**, measured: the config's objective runs its step (no-grad forwards, the JVP, the backward) on its
  model built under FakeTensorMode (shapes and dtypes, no storage) at this rank's micro-batch, global_batch /
  (gpus × grad_accum), with engine.activation_checkpointing and bf16 autocast as configured. Every storage the
  step creates is counted from its creation until it is freed; the peak is the figure. Parameter gradients are
  dropped as they are accumulated (the model state counts them). The batch and its random draws stay real CPU
  tensors, so the objective's row splits run as on a GPU; a micro-batch holds its fair share ⌈(1 − share_r_eq_t)·m⌉
  of rows with r ≠ t (the r = t rows spread evenly over the ranks). Eager execution (engine.compile not modelled).
- **Attention under a tangent** runs jvp-flash-attention's Triton kernel on a GPU (``objective.jvp_attention``
  auto or fused); Triton cannot run on fake tensors, so ``KernelFootprint`` stands in with the kernel's allocations.
- **Depth**: a fake op costs about half a millisecond on a CPU and a block takes thousands, so the step is measured
  at small depths until successive blocks add the same bytes, and extended linearly to the config's blocks
  (identical blocks add identical bytes at the peak; checked against full depth in bench/RESULTS.md).
- **Allowance**: 2 GiB (CUDA context, cuBLAS workspaces, NCCL buffers) plus 10% of the allocated peak (the caching
  allocator's fragmentation: reserved beyond allocated). The margin comes on top: the total must stay within
  (1 − margin) × the GPU's memory. AdamW's foreach temporaries (about two copies of the local shard, after the
  backward has freed the activations) are below the activation peak and not added.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import weakref
from dataclasses import dataclass
from unittest import mock

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.autograd import forward_ad as fwAD
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

from meanflow.jobs.preflight import check_batch_splits
from meanflow.models import build_model
from meanflow.models.execution import configure_execution
from meanflow.objectives import ObjectiveContext, build_objective
from meanflow.platform.config import load_config

# The module: meanflow.models re-exports its function of the same name.
attention = importlib.import_module("meanflow.models.attention")

GiB = 2**30
FP32 = 4
CUDA_FIXED_BYTES = 2 * GiB
FRAGMENTATION = 0.10
DEEPSPEED_REDUCE_BUCKET = int(5e8)     # elements: ZeRO's reduce_bucket_size default
LINEAR_TOLERANCE = 1e-3               # successive blocks' bytes that count as equal


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of every storage an op creates until it is freed (weak references), and their peak.
    ``existing`` tensors' storages (the weights) are not counted: a view of them allocates nothing."""

    def __init__(self, existing=()):
        super().__init__()
        self.live = self.peak = 0
        self._seen = WeakIdKeyDictionary({t.untyped_storage(): 0 for t in existing})

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and not t._is_zerotensor():   # forward AD's zeros allocate nothing
                storage = t.untyped_storage()
                if storage not in self._seen:
                    self._seen[storage] = nbytes = storage.nbytes()
                    weakref.finalize(storage, self._free, nbytes)
                    self.live += nbytes
                    self.peak = max(self.peak, self.live)
        return out

    def _free(self, nbytes: int) -> None:
        self.live -= nbytes


class KernelFootprint(torch.autograd.Function):
    """jvp-flash-attention's ``JVPAttn`` (0.14) as far as memory goes: the outputs o and o_t and the fp32 row
    statistics M; q, k, v, o and M kept for the backward, which makes dq, dk, dv and an M-sized delta. No values."""

    @staticmethod
    def forward(q, k, v, q_t, k_t, v_t):
        # (o, (o_t, M)) as JVPAttn returns them: the nested pair is no differentiable output
        return torch.empty_like(q), (torch.empty_like(q_t), q.new_empty(q.shape[:3], dtype=torch.float32))

    @staticmethod
    def setup_context(ctx, inputs, outputs):
        q, k, v = inputs[:3]
        o, (o_t, m) = outputs
        ctx.save_for_forward(o_t)
        ctx.save_for_backward(q, k, v, o, m)

    @staticmethod
    def jvp(ctx, *tangents):
        return ctx.saved_for_forward[0], None

    @staticmethod
    def backward(ctx, do, _):
        q, k, v, o, m = ctx.saved_tensors
        torch.empty_like(m)   # delta
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), None, None, None

    @classmethod
    def fwd_dual(cls, q, k, v, sm_scale=None):
        return cls.apply(q, k, v, *(fwAD.unpack_dual(x).tangent for x in (q, k, v)))[0]


@contextlib.contextmanager
def gpu_execution(cfg: DictConfig):
    """Blocks run as on a GPU: eager, checkpointed as configured, attention under a tangent by the fused kernel (its
    stand-in) unless the config asks for math. The process's defaults are restored afterwards."""
    backend = "math" if cfg.objective.jvp_attention == "math" else "fused"
    try:
        with mock.patch.object(attention, "fused_available", lambda: True), \
                mock.patch("jvp_flash_attention.jvp_attention.JVPAttn", KernelFootprint):
            configure_execution(backend, "none", cfg.engine.activation_checkpointing)
            yield
    finally:
        configure_execution("auto")


# ------------------------------------------------------------------------------------------------- the model


@dataclass
class ModelSize:
    param_bytes: int            # fp32, v-head included
    block_bytes: list[int]      # each block's parameters: the FSDP2 units besides the root

    @property
    def blocks(self) -> int:
        return len(self.block_bytes)


def model_size(model_cfg) -> ModelSize:
    with torch.device("meta"):
        model = build_model(model_cfg)
    blocks = [block for m in model.modules() if isinstance(m, nn.ModuleList) for block in m]
    return ModelSize(sum(p.numel() for p in model.parameters()) * FP32,
                     [sum(p.numel() for p in block.parameters()) * FP32 for block in blocks])


def distils_from_teacher(cfg: DictConfig) -> bool:
    o = cfg.objective
    return ("split_mf" in (o.name, o.stability.base if o.name == "stability" else None)
            and o.split_mf.v_source == "teacher")


def model_state(cfg: DictConfig, gpus: int, size: ModelSize) -> dict[str, float]:
    """Bytes per GPU of the parameters, gradients, optimizer state, EMA and any teacher, placed as the engine does."""
    e, n, params = cfg.engine, gpus, size.param_bytes
    ema = params if cfg.optim.ema_decay > 0 else 0
    if e.kind == "fsdp2":
        block = max(size.block_bytes, default=0)
        root = params - sum(size.block_bytes)
        gathered = params if e.fsdp_strategy == "shard_grad_op" else root + 2 * block
        state = {"parameters": params / n, "gradients": params / n, "AdamW m, v": 2 * params / n, "EMA": ema / n,
                 "gathered parameters, reduce-scatter": gathered + 2 * block}
        if cfg.optim.grad_accum > 1:
            state["unsharded gradients (grad_accum > 1)"] = params
    elif e.kind == "deepspeed":
        grads = params if e.deepspeed_stage == 1 else params / n + min(DEEPSPEED_REDUCE_BUCKET * FP32, params)
        state = {"parameters": params, "gradients": grads, "AdamW m, v, fp32 master": 3 * params / n, "EMA": ema}
    else:
        state = {"parameters": params, "gradients": params, "AdamW m, v": 2 * params, "EMA": ema}
    if distils_from_teacher(cfg):
        state["teacher"] = params
    return state


# ------------------------------------------------------------------------------------------------- activations


def probe_step(cfg: DictConfig) -> int:
    """A step of the run at which the objective does the most work. α-Flow: α = 0 where the run reaches it (its
    graph holds the interval phase's grad forward on every row, plus the JVP's tangents; α = 1 does a subset of
    the interval phase), else the middle of its schedule. SG_λ: the last step (λ > 0 back-propagates through the
    JVP). The others do the same passes every step."""
    o, last = cfg.objective, cfg.run.steps - 1
    if o.name == "alphaflow":
        a = o.alphaflow
        return a.end_step if a.end_step <= last else min((a.start_step + a.end_step) // 2, last)
    return last if "sg_lambda" in (o.name, o.stability.base if o.name == "stability" else None) else 0


def with_depth(cfg: DictConfig, depth: int) -> DictConfig:
    """The config with a model of ``depth`` blocks (a v-head of one block; a decoupled model with one t-block)."""
    m, model = cfg.model, {"depth": depth}
    if m.family == "imf_dit" and m.v_head:
        model["v_head_depth"] = 1
    if m.family == "mf_dit" and m.conditioning == "decoupled":
        model["dmf_depth"] = 1
    return OmegaConf.merge(cfg, {"model": model})


def frozen_model(model_cfg) -> nn.Module:
    """The EMA or a teacher: what make_ema's deepcopy gives, built afresh (deepcopy reads fake data pointers)."""
    return build_model(model_cfg).eval().requires_grad_(False)


def step_peak(cfg: DictConfig, micro: int, step: int) -> int:
    """Peak bytes that the objective's step (forward passes, JVP, backward) creates on ``micro`` rows."""
    with FakeTensorMode(allow_non_fake_inputs=True):
        model = build_model(cfg.model)
        ema = frozen_model(cfg.model) if cfg.optim.ema_decay > 0 else None
        teacher = frozen_model(cfg.model) if distils_from_teacher(cfg) else None
    for p in model.parameters():
        p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None))
    objective = build_objective(cfg.objective, cfg.model.num_classes)
    ctx = ObjectiveContext.single_process(micro, cfg.run.seed, ema_model=ema, teacher=teacher)
    m = cfg.model
    weights = [t for module in (model, ema, teacher) if module is not None
               for t in (*module.parameters(), *module.buffers())]
    with LiveBytes(weights) as tracker, gpu_execution(cfg):
        shape = (m.data_dim,) if m.family == "mlp" else (m.in_channels, m.image_size, m.image_size)
        batch = {"x": torch.zeros(micro, *shape)}
        if m.num_classes:
            batch["y"] = torch.zeros(micro, dtype=torch.long)
        with torch.autocast("cpu", torch.bfloat16, enabled=cfg.engine.precision == "bf16"):   # Engine.autocast
            loss, _ = objective(model, batch, step, ctx)
        loss.float().backward()
        del loss
    return tracker.peak


def activation_peak(cfg: DictConfig, micro: int, blocks: int) -> int:
    """The step's peak activation bytes for a model of ``blocks`` blocks. Measured at growing small depths until two
    successive blocks add the same bytes, then extended linearly: the peak is the largest of a few moments' affine
    functions of the depth, and under checkpointing the fastest-growing one takes over only after three or four
    blocks (two depths alone under-counted XL by 19-74%). Directly where the model is that small."""
    step = probe_step(cfg)
    depth = 2 if cfg.model.family == "imf_dit" and cfg.model.v_head else 1
    measured: list[tuple[int, int]] = []      # (blocks, peak bytes)
    while True:
        small = with_depth(cfg, depth)
        small_blocks = model_size(small.model).blocks
        if small_blocks >= blocks:
            return step_peak(cfg, micro, step)
        measured.append((small_blocks, step_peak(small, micro, step)))
        if len(measured) >= 3:
            (_, a), (_, b), (n, c) = measured[-3:]
            if abs((c - b) - (b - a)) <= LINEAR_TOLERANCE * (c - b):
                return c + (c - b) * (blocks - n)
        depth += 1


# ------------------------------------------------------------------------------------------------- estimate


@dataclass
class Estimate:
    gpus: int
    micro_batch: int
    grad_accum: int
    checkpointing: bool
    parts: dict[str, float]      # bytes per GPU, in print order

    @property
    def total(self) -> float:
        return sum(self.parts.values())

    def fits(self, gpu_bytes: float, margin: float) -> bool:
        return self.total <= (1 - margin) * gpu_bytes


def estimate(cfg: DictConfig, gpus: int) -> Estimate:
    """The per-GPU peak of the config's optimizer step on ``gpus`` ranks."""
    check_batch_splits(cfg.data.global_batch, gpus, cfg.optim.grad_accum)
    micro = cfg.data.global_batch // (gpus * cfg.optim.grad_accum)
    size = model_size(cfg.model)
    parts = {**model_state(cfg, gpus, size), "activations": activation_peak(cfg, micro, size.blocks)}
    parts["allowance: CUDA context, fragmentation"] = CUDA_FIXED_BYTES + FRAGMENTATION * sum(parts.values())
    return Estimate(gpus, micro, cfg.optim.grad_accum, cfg.engine.activation_checkpointing, parts)


def fewest_accumulation_steps(cfg: DictConfig, gpus: int, gpu_bytes: float, margin: float,
                              checkpointing: bool) -> Estimate | None:
    """The estimate at the largest micro-batch that fits (a binary search over the divisors of the rank's batch),
    or None when one sample does not fit."""
    local = cfg.data.global_batch // gpus
    accums = [a for a in range(1, local + 1) if local % a == 0]
    best, low, high = None, 0, len(accums) - 1
    while low <= high:
        mid = (low + high) // 2
        settings = {"optim": {"grad_accum": accums[mid]}, "engine": {"activation_checkpointing": checkpointing}}
        est = estimate(OmegaConf.merge(cfg, settings), gpus)
        if est.fits(gpu_bytes, margin):
            best, high = est, mid - 1
        else:
            low = mid + 1
    return best


def report(est: Estimate, gpu_bytes: float, margin: float) -> str:
    lines = [f"  {name:<42}{value / GiB:>8.2f}" for name, value in est.parts.items()]
    verdict = "fits" if est.fits(gpu_bytes, margin) else "does NOT fit"
    lines.append(f"  {'total per GPU':<42}{est.total / GiB:>8.2f}   {verdict} in {gpu_bytes / GiB:g} GiB with a "
                 f"{margin:.0%} margin (limit {(1 - margin) * gpu_bytes / GiB:.1f} GiB)")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="xl_imf")
    p.add_argument("--gpus", type=int, default=0, help="world size (default: cluster.nodes × cluster.gpus_per_node)")
    p.add_argument("--gpu-mem", type=float, default=80.0, help="GiB per GPU")
    p.add_argument("--margin", type=float, default=0.15, help="share of the GPU's memory to leave free")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    cfg = load_config(args.config, args.overrides)
    gpus = args.gpus or cfg.cluster.nodes * cfg.cluster.gpus_per_node or 1
    gpu_bytes = args.gpu_mem * GiB
    est = estimate(cfg, gpus)
    e = cfg.engine
    print(f"# {args.config}, estimated on the CPU: {cfg.model.family}/{cfg.model.size}, {e.kind}"
          f"{f' ({e.fsdp_strategy})' if e.kind == 'fsdp2' else ''} on {gpus} GPUs, global batch "
          f"{cfg.data.global_batch} = {gpus} GPUs × grad_accum {est.grad_accum} × micro-batch {est.micro_batch}, "
          f"{e.precision}, activation checkpointing {'on' if est.checkpointing else 'off'}, JVP attention "
          f"{'math' if cfg.objective.jvp_attention == 'math' else 'fused (stand-in)'}, step {probe_step(cfg)}")
    print("per GPU, GiB:")
    print(report(est, gpu_bytes, args.margin))
    for checkpointing in (False, True):
        best = fewest_accumulation_steps(cfg, gpus, gpu_bytes, args.margin, checkpointing)
        how = f"activation checkpointing {'on' if checkpointing else 'off'}"
        if best is None:
            print(f"largest micro-batch that fits, {how}: none (one sample does not fit)")
        else:
            print(f"largest micro-batch that fits, {how}: {best.micro_batch} (optim.grad_accum={best.grad_accum}): "
                  f"{best.total / GiB:.2f} GiB, limit {(1 - args.margin) * gpu_bytes / GiB:.1f}")


if __name__ == "__main__":
    main()

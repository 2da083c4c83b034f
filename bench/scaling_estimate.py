"""Predicted data-parallel efficiency of DDP and FSDP2 for a model (default: MF DiT-XL/2 on 32×32×4 latents).

    python bench/scaling_estimate.py [--size XL] [--family mf_dit] [--batch 64] [--mfu 0.4] [key=value ...]

A model, not a measurement. Parameters and forward FLOPs come from the real model (built on the meta device,
FLOPs by torch's FlopCounterMode); the step's compute is the objective's FLOP floor (bench/step_cost.py) at the
given MFU of an H100's dense bf16 peak; communication per GPU per step is
  DDP            one all-reduce of the gradients:              2 (N−1)/N · P · b
  FSDP2 full     an all-gather of the parameters per forward call and per backward, a reduce-scatter of the
                 gradients: (gathers + 1) (N−1)/N · P · b. The row split makes two forward calls (JVP rows, plain
                 rows) and training CFG/iMF add no-grad ones, so MF gathers more often than flow matching.
  FSDP2 grad_op  parameters kept from the first forward to the end of the backward: one gather + one scatter.
with b = 4: the engines keep fp32 parameters and gradients under bf16 autocast, so they communicate fp32 (FSDP2
with bf16 gathers, MixedPrecisionPolicy, would halve the gather volume: --bytes 2 shows that case). Bus bandwidth: NVLink inside a node (8 GPUs), one 400 Gb/s NIC per GPU
between nodes. Efficiency = compute / step time, bounded between no overlap (compute + comm) and full overlap
(max(compute, comm)).
"""

from __future__ import annotations

import argparse

import torch
from torch.utils.flop_counter import FlopCounterMode

from meanflow.models import build_model, count_parameters
from meanflow.platform.config import load_config

GPUS = (8, 64, 256)


def forward_flops_per_sample(cfg) -> tuple[int, float]:
    with torch.device("meta"):
        model = build_model(cfg.model)
        m = cfg.model
        x = torch.randn(1, m.in_channels, m.image_size, m.image_size)
        t = torch.rand(1)
        y = torch.zeros(1, dtype=torch.long) if m.num_classes else None
        omega = torch.ones(1, 3) if m.family == "imf_dit" else None
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            model(x, t=t, r=t, y=y, omega=omega)
    return count_parameters(model), float(counter.get_total_flops())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--family", default="mf_dit")
    p.add_argument("--size", default="XL")
    p.add_argument("--batch", type=int, default=64, help="per GPU")
    p.add_argument("--mfu", type=float, default=0.4)
    p.add_argument("--bytes", type=int, default=4, help="per communicated parameter or gradient")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="H100 SXM dense bf16")
    p.add_argument("--nvlink-gbps", type=float, default=360.0, help="NCCL bus bandwidth inside a node, GB/s")
    p.add_argument("--network-gbps", type=float, default=45.0, help="per GPU between nodes (400 Gb/s NIC), GB/s")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    cfg = load_config("xl_imf", [f"model.family={args.family}", f"model.size={args.size}", "model.v_head=false",
                                 *args.overrides])
    params, flops = forward_flops_per_sample(cfg)
    # (objective, forward-equivalents of compute, FSDP2 full_shard all-gathers per step)
    steps = [("fm", 3.0, 2), ("mf, CFG off", 3.25, 4), ("mf, CFG on", 5.25, 5)]
    print(f"# {args.family}/{args.size}: {params / 1e6:.0f}M parameters, {flops / 1e9:.0f} GFLOP per sample forward, "
          f"batch {args.batch}/GPU, {args.bytes} bytes per value, {args.mfu:.0%} MFU of {args.peak_tflops:.0f} TFLOP/s, NVLink "
          f"{args.nvlink_gbps:.0f} GB/s, network {args.network_gbps:.0f} GB/s per GPU")
    print(f"{'objective':<13}{'GPUs':>5}{'compute ms':>11}{'engine':>16}{'GB/GPU':>8}{'comm ms':>9}"
          f"{'efficiency (no overlap … full)':>33}")
    for name, forwards, gathers in steps:
        compute_s = forwards * flops * args.batch / (args.mfu * args.peak_tflops * 1e12)
        for n in GPUS:
            bandwidth = (args.nvlink_gbps if n <= 8 else args.network_gbps) * 1e9
            share = (n - 1) / n
            for engine, volumes in (("ddp", 2), ("fsdp2 full", gathers + 1), ("fsdp2 grad_op", 2)):
                gb = volumes * share * params * args.bytes / 1e9
                comm_s = gb * 1e9 / bandwidth
                worst, best = compute_s / (compute_s + comm_s), compute_s / max(compute_s, comm_s)
                print(f"{name:<13}{n:>5}{compute_s * 1e3:>11.0f}{engine:>16}{gb:>8.2f}{comm_s * 1e3:>9.1f}"
                      f"{worst:>24.0%} … {best:.0%}")


if __name__ == "__main__":
    main()

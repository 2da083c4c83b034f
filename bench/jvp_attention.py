"""Attention inside the JVP: the math backend against the fused jvp-flash-attention kernel (models/attention.py).

    python bench/jvp_attention.py [--batch 64] [--dtype bfloat16] [--repeats 10]

One call = primal and tangent forward (the MF JVP) + backward of the primal, at the attention shapes of DiT-B/2
and DiT-XL/2 on 32×32×4 latents (256 tokens; heads × head dim 12 × 64 and 16 × 72) and of iMF-XL/2 (276 tokens:
a 20-token condition prefix, 16 × 64). Prints ms per call, peak memory (CUDA) and the fused ÷ math ratios. The fused kernel
needs a GPU (Triton's CPU interpreter is for correctness only); on a CPU only math is timed.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.autograd import forward_ad as fwAD

from meanflow.models.attention import attention, detached_tangents, fused_available, set_jvp_backend

SHAPES = {"B/2": (256, 12, 64), "XL/2": (256, 16, 72), "iMF-XL/2": (276, 16, 64)}   # tokens, heads, head dim


def one_call(q, k, v, tq, tk, tv):
    with detached_tangents(), fwAD.dual_level():
        out = attention(*(fwAD.make_dual(x, t) for x, t in zip((q, k, v), (tq, tk, tv))))
        primal = fwAD.unpack_dual(out).primal
    primal.float().square().mean().backward()


def measure(backend: str, shape, batch: int, dtype, device, repeats: int) -> tuple[float, float]:
    set_jvp_backend(backend)
    tokens, heads, head_dim = shape
    make = lambda grad: torch.randn(batch, heads, tokens, head_dim, device=device, dtype=dtype, requires_grad=grad)
    q, k, v = make(True), make(True), make(True)
    tq, tk, tv = make(False), make(False), make(False)
    for _ in range(2):
        one_call(q, k, v, tq, tk, tv)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(repeats):
        one_call(q, k, v, tq, tk, tv)
    if device.type == "cuda":
        torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else float("nan")
    return (time.perf_counter() - start) / repeats * 1e3, peak


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--repeats", type=int, default=10)
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    backends = ["math", "fused"] if device.type == "cuda" and fused_available() else ["math"]
    print(f"# device {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, batch {args.batch}, "
          f"{args.dtype}, torch {torch.__version__}, backends {backends}")
    print(f"{'shape':<10}{'backend':<8}{'ms/call':>9}{'peak MB':>10}")
    for name, shape in SHAPES.items():
        results = {b: measure(b, shape, args.batch, dtype, device, args.repeats) for b in backends}
        for backend, (ms, mb) in results.items():
            print(f"{name:<10}{backend:<8}{ms:>9.2f}{mb:>10.0f}")
        if len(results) == 2:
            print(f"{name:<10}{'fused÷math':<8}{results['fused'][0] / results['math'][0]:>9.2f}"
                  f"{results['fused'][1] / results['math'][1]:>10.2f}")


if __name__ == "__main__":
    main()

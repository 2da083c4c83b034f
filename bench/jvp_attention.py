"""Attention inside the JVP: the math backend against the fused jvp-flash-attention kernel (models/attention.py).

    python bench/jvp_attention.py [--batch 64] [--dtype bfloat16] [--repeats 10]
    python bench/jvp_attention.py --check-tma [--batch 4] [--dtype bfloat16] [--small]

One call = primal and tangent forward (the MF JVP) + backward of the primal, at the attention shapes of DiT-B/2
and DiT-XL/2 on 32×32×4 latents (256 tokens; heads × head dim 12 × 64 and 16 × 72) and of iMF-XL/2 (276 tokens:
a 20-token condition prefix, 16 × 64). Prints ms per call, peak memory (CUDA) and the fused ÷ math ratios. The fused
kernel needs a GPU (Triton's CPU interpreter is for correctness only); on a CPU only math is timed.

``--check-tma`` runs the fused kernel at the same shapes with the package's Hopper path (TMA descriptors and
warp specialisation, its default on sm_90+) on and off (its ``USE_TMA`` switch), XL/2 and iMF-XL/2 through the
padding of models/attention.py (head dim 72 and 64 + the hiding column, both to 128; 276 tokens to 288), and
compares primal, tangent and gradients with float64 math attention: pass when the largest error ÷ the largest
reference value is below the tests' tolerance (bf16 3e-2, fp32 1e-5). Exits 1 if any row does not pass. Without
a GPU it runs in Triton's CPU interpreter (float32; no TMA there, so both rows run the same kernel); ``--small``:
one head and 64/68 tokens, the same paddings in a fraction of the interpreter's time.
"""

from __future__ import annotations

import argparse
import functools
import os
import time
import traceback
from unittest import mock

import torch
from torch.autograd import forward_ad as fwAD

from meanflow.models.attention import FUSED_HEAD_DIMS, FUSED_LENGTH_MULTIPLE, attention, detached_tangents, \
    fused_available, set_jvp_backend

SHAPES = {"B/2": (256, 12, 64), "XL/2": (256, 16, 72), "iMF-XL/2": (276, 16, 64)}   # tokens, heads, head dim
SMALL_SHAPES = {"B/2": (64, 1, 64), "XL/2": (64, 1, 72), "iMF-XL/2": (68, 1, 64)}   # the same paddings
TOLERANCE = {"bfloat16": 3e-2, "float32": 1e-5}     # as tests/test_fused_attention.py
PIECES = ("primal", "tangent", "grad_q", "grad_k", "grad_v")


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


def kernel_shape(tokens: int, head_dim: int) -> str:
    """The (length × head dim) models/attention.py hands the kernel: both padded, one more column to hide keys."""
    length = -(-tokens // FUSED_LENGTH_MULTIPLE) * FUSED_LENGTH_MULTIPLE
    return f"{length}x{next(d for d in FUSED_HEAD_DIMS if d >= head_dim + (length != tokens))}"


def attention_pieces(backend: str, q, k, v, tq, tk, tv, weight) -> list[torch.Tensor]:
    """(primal, tangent, dq, dk, dv) of `attention` under ``backend``, the JVP taken inside detached_tangents()."""
    set_jvp_backend(backend)
    leaves = [x.detach().clone().requires_grad_(True) for x in (q, k, v)]
    with detached_tangents(), fwAD.dual_level():
        primal, tangent = fwAD.unpack_dual(attention(*(fwAD.make_dual(x, t) for x, t in zip(leaves, (tq, tk, tv)))))
        tangent = tangent.detach()
    (primal.float() * weight).sum().backward()
    return [primal.detach(), tangent, *(x.grad for x in leaves)]


def relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.double() - ref).abs().max() / ref.abs().max()).item()


def check_tma(shapes: dict, batch: int, dtype_name: str, device) -> bool:
    """Prints one row per shape and TMA setting; True if every row passes."""
    from jvp_flash_attention.jvp_attention import JVPAttn, supports_tma

    dtype, tolerance = getattr(torch, dtype_name), TOLERANCE[dtype_name]
    where = torch.cuda.get_device_name() if device.type == "cuda" else "cpu, Triton's interpreter"
    print(f"# device {where}, batch {batch}, {dtype_name}, torch {torch.__version__}, tolerance {tolerance:g}")
    tma_here = ("available: rows with tma on run the TMA, warp-specialised kernel" if supports_tma() else
                "not available here (needs CUDA sm_90+): tma on and off run the same kernel")
    print(f"# TMA: {tma_here}")
    print(f"{'shape':<10}{'kernel':>9}{'tma':>5}{'status':>7}" + "".join(f"{p:>10}" for p in PIECES), flush=True)
    passed = True
    for name, (tokens, heads, head_dim) in shapes.items():
        gen = torch.Generator().manual_seed(tokens + head_dim)
        q, k, v, tq, tk, tv, weight = (torch.randn(batch, heads, tokens, head_dim, generator=gen).to(device)
                                       for _ in range(7))
        reference = attention_pieces("math", *(x.double() for x in (q, k, v, tq, tk, tv)), weight.double())
        for tma in (True, False):
            try:   # the package's own switch, on the calls models/attention.py makes
                with mock.patch.object(JVPAttn, "fwd_dual", functools.partial(JVPAttn.fwd_dual, USE_TMA=tma)):
                    got = attention_pieces("fused", *(x.to(dtype) for x in (q, k, v, tq, tk, tv)), weight)
                errors = [relative_error(g, r) for g, r in zip(got, reference)]
                status = "pass" if max(errors) < tolerance else "FAIL"
            except Exception:
                traceback.print_exc()
                errors, status = [float("nan")] * len(PIECES), "error"
            passed &= status == "pass"
            print(f"{name:<10}{kernel_shape(tokens, head_dim):>9}{'on' if tma else 'off':>5}{status:>7}"
                  + "".join(f"{e:>10.2e}" for e in errors), flush=True)
    return passed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--check-tma", action="store_true", help="fused vs math with the kernel's TMA path on and off")
    p.add_argument("--small", action="store_true", help="--check-tma at one head and 64/68 tokens")
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.check_tma:
        if device.type == "cpu":
            os.environ["TRITON_INTERPRET"] = "1"   # read when the kernel's module is first imported
        raise SystemExit(0 if check_tma(SMALL_SHAPES if args.small else SHAPES, args.batch, args.dtype, device)
                         else 1)
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

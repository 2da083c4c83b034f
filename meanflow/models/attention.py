"""The one attention function every transformer in `meanflow.models` calls.

Without a tangent it is PyTorch's SDPA (flash / memory-efficient kernels). Inside the MeanFlow JVP (a forward-AD
tangent on q, k or v) the backend is ``objective.jvp_attention``:

- ``math``: an explicit softmax (below). Runs everywhere; O(L²) memory per head; its tangent is differentiable
  (SG_λ with λ > 0 backpropagates through it).
- ``fused``: the Triton flash kernel of the ``jvp-flash-attention`` package, primal and tangent in one pass with
  O(L) memory. Its tangent output carries no gradient, so it serves only calls made under ``detached_tangents()``
  (the JVP helper enters it for MF/iMF, whose targets stop the gradient); elsewhere ``math`` is used, and so in a
  JVP that torch.compile traces (``engine.compile: all``). q and k are cast to v's dtype first. Head dims
  other than 16/32/64/128/256 (XL/2: 72) and lengths that are not multiples of 32 (iMF's prefix tokens) are
  padded (see ``_fused_attention``).
- ``auto`` (default): ``fused`` on CUDA tensors when the package is installed and the shape is supported, else
  ``math``.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib.util
import math
import os

import torch
import torch.nn.functional as F
from torch.autograd import forward_ad as fwAD

JVP_BACKENDS = ("auto", "math", "fused")
FUSED_HEAD_DIMS = (16, 32, 64, 128, 256)
# The kernel asserts only an even length >= 32, but in Triton's interpreter lengths 48 and 80 corrupt memory
# (its blocks are unmasked): lengths are padded to a multiple of 32.
FUSED_LENGTH_MULTIPLE = 32
# Score offset that hides a padded key: after the softmax scale it is below -100, so exp() underflows to 0 in fp32.
_HIDDEN_KEY_OFFSET = 1e4

_jvp_backend = "auto"
_tangent_detached = contextvars.ContextVar("meanflow_tangent_detached", default=False)


def set_jvp_backend(name: str, key: str = "objective.jvp_attention") -> None:
    """Choose the backend for attention under a tangent, for this process (the trainer calls it from the config)."""
    global _jvp_backend
    if name not in JVP_BACKENDS:
        raise ValueError(f"{key}: {name!r} is not one of {', '.join(JVP_BACKENDS)}")
    if name == "fused" and not fused_available():
        raise ValueError(f"{key}: 'fused' needs the jvp-flash-attention package and a CUDA GPU (or Triton's "
                         f"CPU interpreter, TRITON_INTERPRET=1); pip install 'meanflow[gpu]'")
    _jvp_backend = name


def fused_available() -> bool:
    has_device = torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
    return has_device and importlib.util.find_spec("jvp_flash_attention") is not None


@contextlib.contextmanager
def detached_tangents(detached: bool = True):
    """Inside, the caller promises not to differentiate attention's tangent output: the fused kernel may serve.
    ``detached=False`` withdraws the promise; a recomputation re-enters the state its forward ran in with
    ``detached_tangents(tangents_detached())`` captured then."""
    token = _tangent_detached.set(detached)
    try:
        yield
    finally:
        _tangent_detached.reset(token)


def tangents_detached() -> bool:
    """Whether the caller is inside ``detached_tangents()``."""
    return _tangent_detached.get()


def _has_tangent(tensor):
    return fwAD.unpack_dual(tensor).tangent is not None


def _softmax_attention(q, k, v):
    """softmax(q k^T / sqrt(Dh)) v written with plain ops; the softmax runs in at least float32."""
    scores = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))  # (B, H, L, L)
    scores = scores.to(torch.promote_types(scores.dtype, torch.float32))
    # Subtracting the row max changes neither the value nor any derivative (softmax is shift-invariant).
    exp = torch.exp(scores - scores.amax(dim=-1, keepdim=True).detach())
    weights = exp / exp.sum(dim=-1, keepdim=True)
    return weights.to(v.dtype) @ v


def fused_supports(q) -> bool:
    length, head_dim = q.shape[-2], q.shape[-1]
    return q.shape[0] > 0 and head_dim + (length % FUSED_LENGTH_MULTIPLE != 0) <= FUSED_HEAD_DIMS[-1]


class _DefaultStridesGradient(torch.autograd.Function):
    """Identity whose backward hands on the gradient with default strides. jvp-flash-attention's backward asserts
    that the output gradient has exactly the strides of q, k, v, and a size-1 dim (one head, a one-row part of a
    row split) can carry any stride."""

    @staticmethod
    def forward(x):
        return x.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad):
        return grad.clone(memory_format=torch.contiguous_format)

    @staticmethod
    def jvp(ctx, tangent):
        return tangent.clone()


def _fused_attention(q, k, v):
    """jvp-flash-attention on duals (B, H, L, Dh). The kernel has head dims 16..256 and (safely) lengths that are
    multiples of 32, so both are zero-padded. Padded keys are hidden from every query by one extra column: 1 in
    every query, 0 in real keys, -1e4 in padded keys. Padded output rows and columns are dropped. Inputs without
    a tangent get a zero one (the kernel wants three)."""
    from jvp_flash_attention.jvp_attention import JVPAttn

    # Under autocast q and k can stay float32 while v is bfloat16 (iMF-DiT rotates q and k with float32 cos/sin),
    # and the kernel's backward `tl.dot` refuses operands of two dtypes.
    q, k = q.to(v.dtype), k.to(v.dtype)

    batch, heads, length, head_dim = q.shape
    padded_length = -(-length // FUSED_LENGTH_MULTIPLE) * FUSED_LENGTH_MULTIPLE
    hide = padded_length != length
    padded_dim = next(d for d in FUSED_HEAD_DIMS if d >= head_dim + hide)

    def prepare(x, extra_column=None, padded_rows=None):
        if not _has_tangent(x):
            x = fwAD.make_dual(x, torch.zeros_like(x))
        if hide:
            x = torch.cat([x, x.new_full((batch, heads, length, 1), extra_column)], dim=-1)
            rows = x.new_zeros((batch, heads, padded_length - length, head_dim + 1))
            rows[..., -1] = padded_rows
            x = torch.cat([x, rows], dim=-2)
        x = F.pad(x, (0, padded_dim - x.shape[-1]))
        return x.clone(memory_format=torch.contiguous_format)   # default strides (see _DefaultStridesGradient)

    out = JVPAttn.fwd_dual(prepare(q, 1.0, 0.0), prepare(k, 0.0, -_HIDDEN_KEY_OFFSET), prepare(v, 0.0, 0.0),
                           sm_scale=1.0 / math.sqrt(head_dim))
    return _DefaultStridesGradient.apply(out)[:, :, :length, :head_dim]


def _use_fused(q) -> bool:
    # Traced by torch.compile (engine.compile=all), the kernel runs its compile path: a custom op called under
    # no_grad, without a backward, so the gradient of attention's primal output would be lost. Math attention
    # is traced into the graph instead.
    if torch.compiler.is_compiling() or _jvp_backend == "math" or not _tangent_detached.get():
        return False
    if _jvp_backend == "fused":
        if not fused_supports(q):
            if q.shape[0] == 0:
                return False    # an empty part of a row split: nothing to compute
            raise ValueError(f"objective.jvp_attention: 'fused' does not support head dim {q.shape[-1]} at "
                             f"sequence length {q.shape[-2]}; use 'auto'")
        return True
    return q.is_cuda and fused_supports(q) and fused_available()


def attention(q, k, v):
    """Softmax attention. q, k, v: (B, H, L, Dh) -> (B, H, L, Dh)."""
    if _has_tangent(q) or _has_tangent(k) or _has_tangent(v):
        if _use_fused(q):
            return _fused_attention(q, k, v)
        # The fused SDPA kernels (flash / memory-efficient; on CPU `_scaled_dot_product_flash_attention_for_cpu`)
        # have no forward-AD formula and raise NotImplementedError. SDPA's MATH backend has one, but it goes
        # through the native softmax, whose forward-AD formula modifies the exp output in place, so a backward
        # through the tangent (SG_lambda with lambda > 0) fails with "modified by an inplace operation"
        # (pytorch/pytorch#162350, still present in torch 2.14.1). The explicit softmax below is the same
        # computation as the MATH backend, and both its tangent and the backward through that tangent work.
        return _softmax_attention(q, k, v)
    return F.scaled_dot_product_attention(q, k, v)

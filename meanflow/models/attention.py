"""The one attention function every transformer in `meanflow.models` calls.

Swap it here (e.g. for a fused JVP-capable GPU kernel) and every model follows.
"""

import math

import torch
import torch.nn.functional as F
from torch.autograd import forward_ad as fwAD


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


def attention(q, k, v):
    """Softmax attention. q, k, v: (B, H, L, Dh) -> (B, H, L, Dh)."""
    if _has_tangent(q) or _has_tangent(k) or _has_tangent(v):
        # The MeanFlow objectives take a JVP through the model with forward-mode AD. The fused SDPA kernels
        # (flash / memory-efficient; on CPU `_scaled_dot_product_flash_attention_for_cpu`) have no forward-AD
        # formula and raise NotImplementedError. SDPA's MATH backend has one, but it goes through the native
        # softmax, whose forward-AD formula modifies the exp output in place, so a backward through the tangent
        # (SG_lambda with lambda > 0) fails with "modified by an inplace operation" (pytorch/pytorch#162350,
        # still present in torch 2.14.1). The explicit softmax below is the same computation as the MATH
        # backend, and both its tangent and the backward through that tangent work.
        return _softmax_attention(q, k, v)
    return F.scaled_dot_product_attention(q, k, v)

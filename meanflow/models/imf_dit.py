"""iMF-DiT: in-context conditioning on (y, omega, t_min, t_max, h = t - r), as used by improved MeanFlow (docs/objectives.md, imf).

The conditions enter as a token prefix [8 class | 4 omega | 2 t_min | 2 t_max | 4 h] in front of the image patches;
the prefix outputs are discarded. The model sees h = t - r only, never t itself. Blocks are "modern" (pre-RMSNorm,
bias-free projections, QK-norm, 1-D RoPE over the whole sequence, SwiGLU) with zero-initialised per-channel residual
gates in place of adaLN-zero, and there is no absolute position embedding. An optional v-head (an auxiliary branch
of `v_head_depth` blocks after the shared trunk) predicts the instantaneous velocity during training.
"""

import torch
from torch import nn

from .attention import attention
from .execution import managed_block
from .embeddings import LabelEmbedder, PatchEmbed, TimestepEmbedder, init_linear_layers, unpatchify

# Tokens per condition, in prefix order: class, omega, t_min, t_max, h.
PREFIX_TOKENS = (8, 4, 2, 2, 4)

# --------------------------------------------------------------------------------------------------------------
# Rotary position embedding (1-D over prefix + patches)
# --------------------------------------------------------------------------------------------------------------


def rope_cos_sin(seq_len, head_dim, like, theta=10000.0):
    """cos, sin of shape (L, Dh/2) in the dtype of `like` (angles computed in at least float32)."""
    dtype = torch.promote_types(like.dtype, torch.float32)
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=dtype, device=like.device) / head_dim)
    angles = torch.arange(seq_len, dtype=dtype, device=like.device)[:, None] * inv_freq[None]
    return torch.cos(angles).to(like.dtype), torch.sin(angles).to(like.dtype)


def apply_rope(x_BHLD, cos, sin):
    """Rotate channel pairs (i, i + Dh/2) by position-dependent angles (GPT-NeoX / Llama layout)."""
    x1, x2 = x_BHLD.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


# --------------------------------------------------------------------------------------------------------------
# Blocks
# --------------------------------------------------------------------------------------------------------------


class RoPEAttention(nn.Module):
    """Bias-free q/k/v/o with per-head RMSNorm on q and k (keeps attention logits bounded) and RoPE."""

    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.q_norm = nn.RMSNorm(width // heads, eps=1e-6)
        self.k_norm = nn.RMSNorm(width // heads, eps=1e-6)
        self.proj = nn.Linear(width, width, bias=False)

    def forward(self, x_BLD, cos, sin):
        B, L, D = x_BLD.shape
        q, k, v = self.qkv(x_BLD).reshape(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        q = apply_rope(self.q_norm(q), cos, sin)  # (B, H, L, Dh)
        k = apply_rope(self.k_norm(k), cos, sin)
        out = attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(B, L, D))


class SwiGLU(nn.Module):
    def __init__(self, width, hidden):
        super().__init__()
        self.w12 = nn.Linear(width, 2 * hidden, bias=False)  # gate and value projections, fused
        self.w3 = nn.Linear(hidden, width, bias=False)

    def forward(self, x):
        gate, value = self.w12(x).chunk(2, dim=-1)
        return self.w3(nn.functional.silu(gate) * value)


class IMFBlock(nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.norm1 = nn.RMSNorm(width, eps=1e-6)
        self.attn = RoPEAttention(width, heads)
        self.norm2 = nn.RMSNorm(width, eps=1e-6)
        self.mlp = SwiGLU(width, int(8 * width / 3))
        # Zero-initialised per-channel gates: every block starts as the identity (the role adaLN-zero plays in DiT).
        self.gate_attn = nn.Parameter(torch.zeros(width))
        self.gate_mlp = nn.Parameter(torch.zeros(width))

    @managed_block
    def forward(self, x_BLD, cos, sin):
        x_BLD = x_BLD + self.gate_attn * self.attn(self.norm1(x_BLD), cos, sin)
        x_BLD = x_BLD + self.gate_mlp * self.mlp(self.norm2(x_BLD))
        return x_BLD


# --------------------------------------------------------------------------------------------------------------
# Final layer and v-head
# --------------------------------------------------------------------------------------------------------------


class FinalLayer(nn.Module):
    def __init__(self, width, patch_size, out_channels):
        super().__init__()
        self.norm = nn.RMSNorm(width, eps=1e-6)
        self.linear = nn.Linear(width, patch_size * patch_size * out_channels)

    def forward(self, x_BLD):
        return self.linear(self.norm(x_BLD))


class VHead(nn.Module):
    """Auxiliary v branch: `depth` new blocks + its own final layer on the trunk output; dropped at inference."""

    def __init__(self, depth, width, heads, patch_size, out_channels):
        super().__init__()
        self.blocks = nn.ModuleList(IMFBlock(width, heads) for _ in range(depth))
        self.final_layer = FinalLayer(width, patch_size, out_channels)


# --------------------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------------------


class IMFDiT(nn.Module):
    """u_theta(x, h | y, omega, t_min, t_max); returns u, or (u, v) in training mode when built with a v-head."""

    takes_guidance = True   # omega = (ω, t_min, t_max) is an input: guidance is chosen at sampling time

    def __init__(self, *, image_size, patch_size, in_channels, num_classes, depth, width, heads,
                 v_head=False, v_head_depth=8, prefix_tokens=PREFIX_TOKENS):
        super().__init__()
        # Fewer prefix tokens only for CPU-sized models: on 8×8 digits, 20 prefix tokens outnumber the 16 patches.
        self.prefix_tokens = tuple(prefix_tokens)
        self.prefix_len = sum(self.prefix_tokens)
        self.image_size, self.patch_size, self.in_channels = image_size, patch_size, in_channels
        self.num_classes = num_classes
        self.head_dim = width // heads

        self.x_embedder = PatchEmbed(patch_size, in_channels, width)
        self.y_embedder = LabelEmbedder(num_classes, width)
        self.omega_embedder = TimestepEmbedder(width)  # embeds 1 - 1/omega, in [0, 1) for omega >= 1
        self.t_min_embedder = TimestepEmbedder(width)
        self.t_max_embedder = TimestepEmbedder(width)
        self.h_embedder = TimestepEmbedder(width)
        # Learned per-prefix-token offsets, so the repeated copies of one condition differ.
        self.prefix_embed = nn.Parameter(torch.zeros(1, self.prefix_len, width))
        self.blocks = nn.ModuleList(IMFBlock(width, heads) for _ in range(depth))
        self.final_layer = FinalLayer(width, patch_size, in_channels)
        # The last v_head_depth blocks are the u branch; the blocks before them are the shared trunk.
        self.trunk_depth = depth - v_head_depth if v_head else depth
        self.v_head = VHead(v_head_depth, width, heads, patch_size, in_channels) if v_head else None
        self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        """Initialise every parameter; call again after `to_empty()` on a model built on the meta device."""
        init_linear_layers(self)
        for module in self.modules():
            if isinstance(module, nn.RMSNorm):
                module.reset_parameters()
            elif isinstance(module, IMFBlock):
                nn.init.zeros_(module.gate_attn)
                nn.init.zeros_(module.gate_mlp)
        self.x_embedder.init_weights()
        self.y_embedder.init_weights()
        for embedder in (self.omega_embedder, self.t_min_embedder, self.t_max_embedder, self.h_embedder):
            embedder.init_weights()
        nn.init.normal_(self.prefix_embed, std=0.02)
        # Zero-init outputs: u (and v) start exactly at zero.
        for final in [self.final_layer] + ([self.v_head.final_layer] if self.v_head is not None else []):
            nn.init.zeros_(final.linear.weight)
            nn.init.zeros_(final.linear.bias)

    def _prefix(self, y, omega, h, batch_size, device):
        """The condition tokens (B, prefix_len, D)."""
        conditions = (
            self.y_embedder(y, batch_size, device),
            self.omega_embedder(1 - 1 / omega[:, 0]),
            self.t_min_embedder(omega[:, 1]),
            self.t_max_embedder(omega[:, 2]),
            self.h_embedder(h),
        )
        repeated = [c.unsqueeze(1).expand(-1, n, -1) for c, n in zip(conditions, self.prefix_tokens)]
        return torch.cat(repeated, dim=1) + self.prefix_embed

    def _image(self, tokens_BLD, final_layer, H, W):
        out = final_layer(tokens_BLD[:, self.prefix_len:])  # prefix outputs are discarded
        return unpatchify(out, self.patch_size, self.in_channels, H, W)

    def forward(self, x, *, t, r, y=None, omega=None):
        """x: (B, C, H, W); t, r: (B,) with r <= t; y: (B,) labels or None; omega: (B, 3) [omega, t_min, t_max]."""
        B, _, H, W = x.shape
        if omega is None:  # no guidance: omega = 1 on the whole interval [0, 1]
            omega = torch.tensor([1.0, 0.0, 1.0], dtype=t.dtype, device=x.device).expand(B, 3)
        prefix = self._prefix(y, omega, t - r, B, x.device)
        tokens = torch.cat([prefix.to(x.dtype), self.x_embedder(x)], dim=1)  # (B, prefix_len + L, D)
        cos, sin = rope_cos_sin(tokens.shape[1], self.head_dim, tokens)

        for block in self.blocks[: self.trunk_depth]:
            tokens = block(tokens, cos, sin)
        trunk = tokens
        for block in self.blocks[self.trunk_depth :]:
            tokens = block(tokens, cos, sin)
        u = self._image(tokens, self.final_layer, H, W)
        if self.v_head is None or not self.training:
            return u

        for block in self.v_head.blocks:
            trunk = block(trunk, cos, sin)
        return u, self._image(trunk, self.v_head.final_layer, H, W)

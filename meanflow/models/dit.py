"""MF-DiT: DiT with adaLN-zero conditioning on (t, h = t - r, y), as used by MeanFlow (docs/objectives.md).

Follows facebookresearch/DiT `models.py` layer by layer; the differences are a second timestep embedder for
h = t - r, no learned sigma (out channels = in channels), no label dropout inside the model, and the fixed
position embedding kept as a buffer rather than a frozen parameter.

``conditioning="decoupled"`` is Decoupled MeanFlow's flow map (docs/objectives.md, dmf; kyungmnlee/dmf ``DMFT``): the
first ``dmf_depth`` blocks see t, the rest and the final layer see r, through one time embedder.
"""

import torch
from torch import nn

from .attention import attention
from .execution import managed_block
from .embeddings import (LabelEmbedder, PatchEmbed, TimestepEmbedder, init_linear_layers, sincos_pos_embed_2d,
                         timestep_embedding, unpatchify)

CONDITIONINGS = ("standard", "decoupled")


def modulate(x_BLD, shift_BD, scale_BD):
    return x_BLD * (1 + scale_BD.unsqueeze(1)) + shift_BD.unsqueeze(1)


# --------------------------------------------------------------------------------------------------------------
# Blocks
# --------------------------------------------------------------------------------------------------------------


class SelfAttention(nn.Module):
    """timm-style multi-head self-attention with a fused, biased qkv projection."""

    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width, bias=True)
        self.proj = nn.Linear(width, width)

    def forward(self, x_BLD):
        B, L, D = x_BLD.shape
        qkv = self.qkv(x_BLD).reshape(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        out = attention(qkv[0], qkv[1], qkv[2])  # (B, H, L, Dh)
        return self.proj(out.transpose(1, 2).reshape(B, L, D))


class FeedForward(nn.Module):
    def __init__(self, width, hidden):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    """Transformer block whose LayerNorm shift/scale and residual gates come from c (adaLN-zero)."""

    def __init__(self, width, heads, mlp_ratio=4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(width, heads)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = FeedForward(width, int(width * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))

    @managed_block
    def forward(self, x_BLD, c_BD):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c_BD).chunk(6, dim=1)
        x_BLD = x_BLD + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x_BLD), shift_msa, scale_msa))
        x_BLD = x_BLD + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x_BLD), shift_mlp, scale_mlp))
        return x_BLD


# --------------------------------------------------------------------------------------------------------------
# Final layer
# --------------------------------------------------------------------------------------------------------------


class FinalLayer(nn.Module):
    def __init__(self, width, patch_size, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(width, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x_BLD, c_BD):
        shift, scale = self.adaLN_modulation(c_BD).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x_BLD), shift, scale))


# --------------------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------------------


class MFDiT(nn.Module):
    """u_theta(x, r, t | y); returns u with the shape of x.

    standard: every block and the final layer on c = emb_t(t) + emb_h(t - r) + emb_y(y).
    decoupled: the first ``dmf_depth`` blocks on emb_t(t) + emb_h(0) + emb_y(y), the others and the final layer
    on emb_t(r) + emb_h(0) + emb_y(y) (the same embedder), plus a zero-initialised log-variance head
    (``log_variance``). emb_h(0) is a learned constant, not an h condition: it is what a standard model trained as a
    flow model (r = t) adds, and computing it as that model does (the same batched matmul; folding it into a bias
    changes the last bits, batched GEMMs are not row-independent) makes the decoupled model at r = t bitwise that
    flow model with the same weights (``decoupled_init.init_from_flow_model``).
    """

    def __init__(self, *, image_size, patch_size, in_channels, num_classes, depth, width, heads,
                 conditioning="standard", dmf_depth=0):
        super().__init__()
        if conditioning not in CONDITIONINGS:
            raise ValueError(f"model.conditioning: unknown {conditioning!r}; known: {', '.join(CONDITIONINGS)}")
        self.image_size, self.patch_size, self.in_channels = image_size, patch_size, in_channels
        self.num_classes = num_classes
        self.grid_size = image_size // patch_size
        self.conditioning = conditioning
        self.decoupled = conditioning == "decoupled"
        if self.decoupled:
            self.dmf_depth = dmf_depth or (2 * depth) // 3
            if not 0 < self.dmf_depth <= depth:
                raise ValueError(f"model.dmf_depth: must be in [1, depth] = [1, {depth}], got {self.dmf_depth}")

        self.x_embedder = PatchEmbed(patch_size, in_channels, width)
        self.t_embedder = TimestepEmbedder(width)
        self.h_embedder = TimestepEmbedder(width)
        if self.decoupled:
            self.logvar_head = nn.Linear(2 * self.t_embedder.frequency_dim, 1)
        self.y_embedder = LabelEmbedder(num_classes, width)
        # Fixed, but persistent so a model built on the meta device recovers it from a checkpoint.
        self.register_buffer("pos_embed", torch.zeros(1, self.grid_size**2, width))
        self.blocks = nn.ModuleList(DiTBlock(width, heads) for _ in range(depth))
        self.final_layer = FinalLayer(width, patch_size, in_channels)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        """DiT's initialisation; call again after `to_empty()` on a model built on the meta device."""
        init_linear_layers(self)
        self.pos_embed.copy_(sincos_pos_embed_2d(self.pos_embed.shape[-1], self.grid_size, self.pos_embed.device))
        self.x_embedder.init_weights()
        self.y_embedder.init_weights()
        self.t_embedder.init_weights()
        self.h_embedder.init_weights()
        # adaLN-zero: every block starts as the identity and the output as exactly zero.
        zero_init = [block.adaLN_modulation[-1] for block in self.blocks]
        zero_init += [self.final_layer.adaLN_modulation[-1], self.final_layer.linear]
        if self.decoupled:
            zero_init.append(self.logvar_head)
        for layer in zero_init:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def log_variance(self, t, r):
        """Decoupled only: l_φ(t, r) (B,) = Linear(concat(sin_emb(t), sin_emb(r))), the time embedder's features."""
        dim = self.t_embedder.frequency_dim
        freq = torch.cat([timestep_embedding(t, dim), timestep_embedding(r, dim)], dim=-1)
        return self.logvar_head(freq.to(self.logvar_head.weight.dtype)).squeeze(-1)

    def forward(self, x, *, t, r, y=None, omega=None, return_logvar=False):
        """x: (B, C, H, W); t, r: (B,) with r <= t; y: (B,) labels or None (null); omega is ignored.

        return_logvar (decoupled): also return ``log_variance(t, r)``, as (u, l). It runs inside forward so that
        engines which gather parameters per forward (FSDP2) have the head's weights at hand.
        """
        B, _, H, W = x.shape
        tokens = self.x_embedder(x) + self.pos_embed.to(x.dtype)  # (B, L, D)
        y_emb = self.y_embedder(y, B, x.device)
        if self.decoupled:
            h_emb = self.h_embedder(torch.zeros_like(t))
            c = self.t_embedder(t) + h_emb + y_emb  # (B, D)
            for block in self.blocks[:self.dmf_depth]:
                tokens = block(tokens, c)
            c = self.t_embedder(r) + h_emb + y_emb
            blocks = self.blocks[self.dmf_depth:]
        else:
            c = self.t_embedder(t) + self.h_embedder(t - r) + y_emb
            blocks = self.blocks
        for block in blocks:
            tokens = block(tokens, c)
        u = unpatchify(self.final_layer(tokens, c), self.patch_size, self.in_channels, H, W)
        return (u, self.log_variance(t, r)) if return_logvar else u

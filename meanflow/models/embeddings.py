"""Embeddings shared by the model families: time scalars, class labels, patches, 2-D sin-cos positions."""

import math

import torch
from torch import nn

# --------------------------------------------------------------------------------------------------------------
# Time-like scalars (t, h = t - r, and iMF's guidance conditions)
# --------------------------------------------------------------------------------------------------------------


def init_linear_layers(root: nn.Module) -> None:
    """DiT's default for every Linear below root: Xavier-uniform weights, zero biases (zero-inits come after)."""
    for module in root.modules():
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)


def timestep_embedding(s, dim, max_period=10000.0, scale=1.0):
    """Sinusoidal features of scalars s (B,) -> (B, dim), as in DiT / GLIDE.

    Inputs live in [0, 1] and are not stretched to DiT's [0, 1000] (SiT's convention for continuous time): the
    MeanFlow target contains du/dt, and ×1000 frequencies made ‖du/dt‖ grow to ~150 within 300 steps on the
    tiny digits run, drowning the target. Computed in at least float32 (float64 stays float64, which the JVP
    finite-difference tests rely on).
    """
    dtype = torch.promote_types(s.dtype, torch.float32)
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=dtype, device=s.device) / half)
    args = (s.to(dtype) * scale)[:, None] * freqs[None]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimestepEmbedder(nn.Module):
    """Scalar in [0, 1] (B,) -> vector (B, width): 256 sinusoidal features, then Linear-SiLU-Linear (DiT)."""

    def __init__(self, width, frequency_dim=256):
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, width), nn.SiLU(), nn.Linear(width, width))

    def init_weights(self):
        nn.init.normal_(self.mlp[0].weight, std=0.02)
        nn.init.normal_(self.mlp[2].weight, std=0.02)
        nn.init.zeros_(self.mlp[0].bias)
        nn.init.zeros_(self.mlp[2].bias)

    def forward(self, s):
        freq = timestep_embedding(s, self.frequency_dim)
        return self.mlp(freq.to(self.mlp[0].weight.dtype))


# --------------------------------------------------------------------------------------------------------------
# Class labels
# --------------------------------------------------------------------------------------------------------------


class LabelEmbedder(nn.Module):
    """Class label (B,) -> (B, width). Row `num_classes` is the null class (y=None, dropped labels).

    No label dropout here: the objectives drop labels themselves, with their own seeded generators.
    Unconditional models (num_classes == 0) keep the single null row and ignore y.
    """

    def __init__(self, num_classes, width):
        super().__init__()
        self.num_classes = num_classes
        self.embedding_table = nn.Embedding(num_classes + 1, width)

    def init_weights(self):
        nn.init.normal_(self.embedding_table.weight, std=0.02)

    def forward(self, y, batch_size, device):
        if y is None or self.num_classes == 0:
            y = torch.full((batch_size,), self.num_classes, dtype=torch.long, device=device)
        return self.embedding_table(y)


# --------------------------------------------------------------------------------------------------------------
# Patches and positions
# --------------------------------------------------------------------------------------------------------------


class PatchEmbed(nn.Module):
    """Image (B, C, H, W) -> tokens (B, H/p * W/p, width) with a stride-p convolution (timm's PatchEmbed)."""

    def __init__(self, patch_size, in_channels, width):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, width, kernel_size=patch_size, stride=patch_size)

    def init_weights(self):
        # Initialise like an nn.Linear over the flattened patch (DiT).
        nn.init.xavier_uniform_(self.proj.weight.view(self.proj.weight.shape[0], -1))
        nn.init.zeros_(self.proj.bias)

    def forward(self, x_BCHW):
        return self.proj(x_BCHW).flatten(2).transpose(1, 2)


def patchify(x_BCHW, p):
    """(B, C, H, W) -> (B, H/p * W/p, p*p*C); the inverse of `unpatchify`."""
    B, C, H, W = x_BCHW.shape
    x = x_BCHW.reshape(B, C, H // p, p, W // p, p)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(B, (H // p) * (W // p), p * p * C)


def unpatchify(x_BLD, p, channels, height, width):
    """(B, H/p * W/p, p*p*C) -> (B, C, H, W), with DiT's per-token layout (p, p, C)."""
    B = x_BLD.shape[0]
    h, w = height // p, width // p
    x = x_BLD.reshape(B, h, w, p, p, channels)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(B, channels, h * p, w * p)


def _sincos_1d(dim, pos):
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64, device=pos.device) / (dim / 2.0))
    out = pos.reshape(-1)[:, None] * omega[None]  # (M, dim/2)
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def sincos_pos_embed_2d(dim, grid_size, device=None):
    """Fixed 2-D sin-cos position embedding (grid_size**2, dim), row-major over the patch grid (as DiT/MAE)."""
    coords = torch.arange(grid_size, dtype=torch.float64, device=device)
    # DiT's np.meshgrid(grid_w, grid_h): cols[i, j] = j, rows[i, j] = i; the first half encodes the column.
    cols, rows = torch.meshgrid(coords, coords, indexing="xy")
    return torch.cat([_sincos_1d(dim // 2, cols), _sincos_1d(dim // 2, rows)], dim=1)

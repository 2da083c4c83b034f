"""The latent pre-computation's VAE: a diffusers ``AutoencoderKL`` loaded from a local or fsspec directory
(``config.json`` + ``diffusion_pytorch_model.safetensors``, as ``save_pretrained`` writes it). Nothing is
downloaded from a hub at run time; safetensors means no pickle is ever deserialised.
"""

from __future__ import annotations

import hashlib
import posixpath
import tempfile
from dataclasses import dataclass

import numpy as np
import torch

from meanflow.platform.storage import filesystem, is_local

from .manifest import IMF_CHANNEL_MEAN, IMF_CHANNEL_STD, MF_SCALE_FACTOR

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
# Latents per decoder call. The decoder's activations at full resolution grow with the batch (its last blocks hold
# 128 channels at 256² per image), so an evaluation batch of 256 latents in one call would not fit a GPU.
DECODE_CHUNK = 32


@dataclass
class LoadedVAE:
    model: torch.nn.Module
    vae_id: str
    weights_sha256: str
    scale_factor: float
    latent_channels: int
    downsample: int


def _local_copy(url: str, tmp: str) -> str:
    fs, path = filesystem(url)
    if is_local(fs):
        return path
    for name in ("config.json", WEIGHTS_NAME):
        fs.get(posixpath.join(path, name), posixpath.join(tmp, name))
    return tmp


def load_vae(url: str, vae_id: str | None = None, device: str | torch.device = "cpu") -> LoadedVAE:
    from diffusers import AutoencoderKL   # imported here: diffusers is slow to import and only the writer needs it

    fs, path = filesystem(url)
    for name in ("config.json", WEIGHTS_NAME):
        if not fs.exists(posixpath.join(path, name)):
            raise FileNotFoundError(f"--vae {url}: no {name} there (expected a diffusers AutoencoderKL directory "
                                    "written by save_pretrained with safetensors)")
    with tempfile.TemporaryDirectory() as tmp:
        local = _local_copy(url, tmp)
        with open(posixpath.join(local, WEIGHTS_NAME), "rb") as f:
            sha = hashlib.sha256(f.read()).hexdigest()
        model = AutoencoderKL.from_pretrained(local, local_files_only=True, use_safetensors=True,
                                              low_cpu_mem_usage=False)   # no `accelerate` needed
    model = model.to(device).eval().requires_grad_(False)
    cfg = model.config
    return LoadedVAE(model, vae_id or posixpath.basename(path.rstrip("/")), sha,
                     float(cfg.scaling_factor or MF_SCALE_FACTOR), int(cfg.latent_channels),
                     2 ** (len(cfg.block_out_channels) - 1))


@torch.no_grad()
def encode_moments(vae: LoadedVAE, images_uint8: np.ndarray, device) -> np.ndarray:
    """uint8 (B, H, W, C) -> float32 (B, 2 flips, 2 moments, C_lat, h, w): the posterior mean and std of each
    image and of its horizontal flip (flipping the latent is not the latent of the flip)."""
    x = torch.from_numpy(images_uint8).to(device).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    out = []
    for view in (x, x.flip(-1)):
        dist = vae.model.encode(view).latent_dist
        out.append(torch.stack([dist.mean, dist.std], dim=1))   # (B, 2, C, h, w)
    return torch.stack(out, dim=1).float().cpu().numpy()


@torch.no_grad()
def decode_latents(vae: LoadedVAE, latents: torch.Tensor, chunk: int = DECODE_CHUNK) -> torch.Tensor:
    """VAE latents (B, C_lat, h, w) -> images (B, C, H, W), decoded ``chunk`` latents at a time."""
    if chunk < 1:
        raise ValueError(f"decode chunk: {chunk}, expected at least 1 latent per call")
    return torch.cat([vae.model.decode(part).sample for part in latents.split(chunk)])


def normalization_block(vae: LoadedVAE) -> dict:
    """Both normalisations the objectives use (docs/objectives.md, imf): MF's single scale and iMF's per-channel stats.
    iMF's published numbers describe SD-VAE latents; for any other VAE use data.latent_norm=measured (the
    writer also stores the statistics it measured on this data)."""
    block = {"mf": {"scale_factor": vae.scale_factor}}
    if vae.latent_channels == len(IMF_CHANNEL_MEAN):
        block["imf"] = {"channel_mean": list(IMF_CHANNEL_MEAN), "channel_std": list(IMF_CHANNEL_STD)}
    return block

"""One sample's tar members, both ways: what the shard writer stores and how the stream decodes it.

Kinds (``manifest["kind"]``):
- ``image``:  ``<key>.png`` (uint8, C = 1 or 3) + ``<key>.cls``  -> x in [-1, 1], (C, H, W)
- ``array``:  ``<key>.npy`` (float, already in model range) + ``<key>.cls``
- ``latent``: ``<key>.latent.npy`` (2 flips, 2 moments (mean, std), C, H, W) + ``<key>.cls``; the stream draws
  ``mean + std·ε`` of a randomly chosen flip at every visit (a fresh posterior sample each epoch) and normalises
  it with MF's scale or iMF's per-channel statistics.
Pixel kinds (``image``, and ``array`` samples of shape (C, H, W)) are mirrored only where ``pixel_flip`` asks for it
(``data.pixel_flip``): a mirrored digit or text is another symbol, so a flip of pixels is never a default.
Every kind may also carry ``<key>.src``, the index of the source item (provenance: the writer shuffles the order).
The key is the global sample index (zero-padded), so a record names its own index.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import torch
from PIL import Image

from meanflow.seeding import stream_seed

KINDS = ("image", "array", "latent")
LATENT_NORMS = ("mf", "imf", "measured")
KEY_DIGITS = 9


def sample_key(index: int) -> str:
    return f"{index:0{KEY_DIGITS}d}"


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def _npy_load(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def encode_record(kind: str, index: int, value: Any, label: int | None,
                  source_index: int | None = None) -> dict[str, Any]:
    """Tar members of one sample. ``value``: uint8 array (H, W, C) for images, float array otherwise;
    ``source_index`` (stored as ``<key>.src``) says which source item it came from, for provenance."""
    record: dict[str, Any] = {"__key__": sample_key(index)}
    if source_index is not None:
        record["src"] = str(int(source_index)).encode()
    if kind == "image":
        arr = np.asarray(value, dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr).save(buf, format="PNG")
        record["png"] = buf.getvalue()
    elif kind == "array":
        record["npy"] = _npy_bytes(np.asarray(value))
    elif kind == "latent":
        record["latent.npy"] = _npy_bytes(np.asarray(value))
    else:
        raise ValueError(f"unknown record kind {kind!r}; one of {KINDS}")
    if label is not None:
        record["cls"] = str(int(label)).encode()
    return record


def latent_normalization(manifest: dict[str, Any], latent_norm: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(shift, scale) with normalised = (latent − shift)·scale, for the manifest's VAE and ``data.latent_norm``;
    evaluation inverts it before decoding."""
    if latent_norm not in LATENT_NORMS:
        raise ValueError(f"data.latent_norm: {latent_norm!r}, expected one of {LATENT_NORMS}")
    norm = manifest["normalization"]
    if latent_norm == "mf":
        return torch.zeros(()), torch.tensor(float(norm["mf"]["scale_factor"]))
    if latent_norm not in norm:
        raise ValueError(f"data.latent_norm: {latent_norm!r} is not available for this VAE's latents "
                         f"(the manifest has {', '.join(norm)})")
    stats, channel = norm[latent_norm], (-1, 1, 1)
    return (torch.tensor(stats["channel_mean"], dtype=torch.float32).view(channel),
            1.0 / torch.tensor(stats["channel_std"], dtype=torch.float32).view(channel))


def check_pixel_flip(pixel_flip: bool, manifest: dict[str, Any]) -> None:
    """``data.pixel_flip`` mirrors pixel samples (C, H, W): refused for latents (their flips were encoded:
    ``data.latent_flip``) and for samples that are not images."""
    kind, shape = manifest["kind"], tuple(manifest["sample_shape"])
    if pixel_flip and (kind == "latent" or len(shape) != 3):
        raise ValueError(f"data.pixel_flip: mirrors pixel images (C, H, W); these shards hold {kind} samples of "
                         f"shape {shape}" + (" (their flips: data.latent_flip)" if kind == "latent" else ""))


class RecordDecoder:
    """Decodes raw records of one shard set into ``{"x", "y"?, "index"}``; returns None for a corrupt record."""

    def __init__(self, manifest: dict[str, Any], seed: int, latent_norm: str = "mf", latent_flip: bool = True,
                 pixel_flip: bool = False):
        check_pixel_flip(pixel_flip, manifest)
        self.kind, self.shape = manifest["kind"], tuple(manifest["sample_shape"])
        self.num_classes = int(manifest["num_classes"])
        self.seed, self.latent_flip, self.pixel_flip = seed, latent_flip, pixel_flip
        self.last_error = ""
        if self.kind == "latent":
            self.shift, self.scale = latent_normalization(manifest, latent_norm)

    def __call__(self, record: dict[str, Any] | None, epoch: int) -> dict[str, torch.Tensor] | None:
        if record is None:
            self.last_error = "record lost (truncated or unreadable tar)"
            return None
        try:
            return self._decode(record, epoch)
        except Exception as err:   # any undecodable member (bad PNG, bad npy header, bad label) = corrupt
            self.last_error = f"record {record.get('__key__')}: {type(err).__name__}: {err}"
            return None

    def _decode(self, record: dict[str, Any], epoch: int) -> dict[str, torch.Tensor]:
        index = int(record["__key__"])
        if self.kind == "image":
            with Image.open(io.BytesIO(record["png"])) as im:
                arr = np.asarray(im.convert("L" if self.shape[0] == 1 else "RGB"))
            x = torch.from_numpy(arr.reshape(*arr.shape[:2], -1).copy()).permute(2, 0, 1).float() / 127.5 - 1.0
        elif self.kind == "array":
            x = torch.from_numpy(_npy_load(record["npy"]).astype(np.float32))
        else:
            x = self._sample_latent(torch.from_numpy(_npy_load(record["latent.npy"]).astype(np.float32)),
                                    index, epoch)
        if tuple(x.shape) != self.shape or not torch.isfinite(x).all():
            raise ValueError(f"shape {tuple(x.shape)} (manifest: {self.shape}) or non-finite values")
        if self.pixel_flip and stream_seed(self.seed, "pixel_flip", epoch, index) & 1:   # (seed, epoch, index) only
            x = x.flip(-1)
        out = {"x": x, "index": torch.tensor(index)}
        if self.num_classes:
            y = int(record["cls"])
            if not 0 <= y < self.num_classes:
                raise ValueError(f"label {y} outside [0, {self.num_classes})")
            out["y"] = torch.tensor(y)
        return out

    def _sample_latent(self, moments: torch.Tensor, index: int, epoch: int) -> torch.Tensor:
        """moments (2 flips, 2, C, H, W) -> one normalised posterior sample; the draw depends on (seed, epoch,
        index) only, so a resumed stream and the uninterrupted one draw the same ε and flip."""
        g = torch.Generator().manual_seed(stream_seed(self.seed, "latent", epoch, index))
        flip = int(torch.randint(2, (), generator=g)) if self.latent_flip else 0
        mean, std = moments[flip, 0], moments[flip, 1]
        x = mean + std * torch.randn(mean.shape, generator=g)
        return (x - self.shift) * self.scale

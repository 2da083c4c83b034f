"""Write a source as WebDataset tar shards (optionally as VAE latents) to any fsspec URL, then the manifest.

Global sample i is source item order[i] (a seeded permutation; ``shuffle_seed=None`` keeps the source order).
Shard k holds global samples [k·S, (k+1)·S); writer rank r of W writes shards r, r+W, r+2W, … and a manifest part;
the last rank to finish merges the parts into ``manifest.json``. Each shard is assembled in memory and published
in one write (temp-then-rename locally, one PUT on object stores), so a reader never sees half a shard.
"""

from __future__ import annotations

import hashlib
import io
import json
from typing import Any

import numpy as np
import torch
import webdataset as wds
from tqdm import tqdm

from meanflow.platform.storage import join, write_bytes_atomic

from .manifest import merge_parts_if_complete, remove_manifest, shard_name, write_part
from .records import encode_record
from .sources import Source
from .vae import LoadedVAE, encode_moments, normalization_block


def _tar_bytes(records: list[dict[str, Any]]) -> bytes:
    buf = io.BytesIO()
    with wds.TarWriter(buf, mtime=0, encoder=False) as tar:   # fixed mtime: identical inputs, identical shards
        for record in records:
            tar.write(record)
    return buf.getvalue()


class LatentChannelSums:
    """Running per-channel sums of posterior samples z = mean + std·ε: E[z] = E[mean], E[z²] = E[mean² + std²]."""

    def __init__(self):
        self.count, self.sum, self.sum_sq = 0, None, None

    def add(self, moments: np.ndarray) -> None:   # (B, 2 flips, 2, C, h, w)
        mean, std = moments[:, :, 0].astype(np.float64), moments[:, :, 1].astype(np.float64)
        axes = (0, 1, 3, 4)
        s1, s2 = mean.sum(axis=axes), (mean ** 2 + std ** 2).sum(axis=axes)
        self.sum = s1 if self.sum is None else self.sum + s1
        self.sum_sq = s2 if self.sum_sq is None else self.sum_sq + s2
        self.count += mean.size // mean.shape[2]

    def as_dict(self) -> dict[str, Any]:
        return {"count": self.count, "sum": self.sum.tolist(), "sum_sq": self.sum_sq.tolist()}


def write_shards(source: Source, out_url: str, *, samples_per_shard: int = 1000, prefix: str = "train",
                 rank: int = 0, world_size: int = 1, vae: LoadedVAE | None = None, latent_dtype: str = "float32",
                 batch_size: int = 64, device: str | torch.device = "cpu", shuffle_seed: int | None = 0,
                 show_progress: bool = True) -> dict[str, Any] | None:
    """Write this rank's shards and manifest part; returns the manifest if this rank completed it, else None."""
    if samples_per_shard <= 0:
        raise ValueError(f"--samples-per-shard must be positive, got {samples_per_shard}")
    if len(source) == 0:
        raise ValueError(f"source {source.name} is empty")
    if vae is not None and source.kind != "image":
        raise ValueError(f"--vae needs an image source; {source.name} holds {source.kind} samples")
    kind = "latent" if vae is not None else source.kind
    num_shards = -(-len(source) // samples_per_shard)
    mine = list(range(rank, num_shards, world_size))
    # Global index i holds source item order[i]: a seeded shuffle, because sources come grouped (an image folder
    # is sorted by class) and the stream only shuffles within blocks of consecutive records.
    order = np.random.default_rng(shuffle_seed).permutation(len(source)) if shuffle_seed is not None \
        else np.arange(len(source))
    write_id = hashlib.sha256(json.dumps([source.name, len(source), kind, samples_per_shard, prefix, world_size,
                                          shuffle_seed, vae.weights_sha256 if vae else None]).encode()).hexdigest()
    remove_manifest(out_url)
    sums = LatentChannelSums() if vae is not None else None
    shards, sample_shape, dtype = [], None, None
    bar = tqdm(total=sum(min(samples_per_shard, len(source) - k * samples_per_shard) for k in mine),
               desc=f"writing shards (rank {rank}/{world_size})", unit="sample", disable=not show_progress)
    for k in mine:
        indices = range(k * samples_per_shard, min((k + 1) * samples_per_shard, len(source)))
        items = [source[int(order[i])] for i in indices]
        values = [np.asarray(v) for v, _ in items]
        if vae is not None:
            moments = np.concatenate([encode_moments(vae, np.stack(values[s:s + batch_size]), device)
                                      for s in range(0, len(values), batch_size)]).astype(latent_dtype)
            sums.add(moments)
            values = list(moments)
        records = [encode_record(kind, i, v, label, source_index=int(order[i]))
                   for i, v, (_, label) in zip(indices, values, items)]
        name = shard_name(prefix, k)
        write_bytes_atomic(join(out_url, name), _tar_bytes(records))
        shards.append({"name": name, "first_index": indices[0], "count": len(indices)})
        first = values[0]
        sample_shape = (list(first.shape[2:]) if kind == "latent" else
                        [first.shape[2], *first.shape[:2]] if kind == "image" else list(first.shape))
        dtype = str(first.dtype)
        bar.update(len(indices))
    bar.close()
    part = {"rank": rank, "write_id": write_id, "kind": kind, "name": source.name, "sample_shape": sample_shape,
            "dtype": dtype, "num_classes": source.num_classes, "samples_per_shard": samples_per_shard,
            "prefix": prefix, "num_shards": num_shards, "shuffle_seed": shuffle_seed, "shards": shards}
    if source.class_names:
        part["class_names"] = source.class_names
    if vae is not None and sums.count:
        part["vae"] = {"id": vae.vae_id, "weights_sha256": vae.weights_sha256, "downsample": vae.downsample}
        part["normalization"] = normalization_block(vae)
        part["channel_sums"] = sums.as_dict()
    write_part(out_url, rank, part)
    return merge_parts_if_complete(out_url, world_size, write_id)

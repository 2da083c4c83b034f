"""Streaming throughput of latent shards, local disk vs an S3 server, next to the raw read speed of the same bytes.

    .venv/bin/python bench/data_throughput.py [--samples 1024] [--s3-endpoint URL]

Writes ImageNet-256-shaped latent shards (moments of image and flip: 2×2×4×32×32 float32 = 64 KiB a sample) with a
small random VAE, then measures (1) raw bytes/s reading every shard through fsspec and (2) samples/s of
``ShardStream`` (decode + posterior sampling + shuffle + collate) over one epoch, with 0 and 2 workers. Without
``--s3-endpoint`` it starts moto's server on loopback (as the tests do).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import fsspec
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from meanflow.data_pipeline.shard_writer import write_shards  # noqa: E402
from s3_server import s3_environment  # noqa: E402
from meanflow.data_pipeline.sources import open_source  # noqa: E402
from meanflow.data_pipeline.vae import load_vae  # noqa: E402
from meanflow.data_pipeline.webdataset_stream import ShardStream  # noqa: E402

IMAGE, PER_SHARD, BATCH = 256, 128, 64


def make_latent_set(root: Path, url: str, n: int) -> None:
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(4, 4, 4, 4),
                        layers_per_block=1, latent_channels=4, norm_num_groups=2, sample_size=IMAGE)
    vae.save_pretrained(root / "vae", safe_serialization=True)
    images = np.random.default_rng(0).integers(0, 256, size=(n, IMAGE, IMAGE, 3), dtype=np.uint8)
    np.savez(root / "images.npz", x=images, y=np.arange(n) % 1000)
    write_shards(open_source(f"npz:{root / 'images.npz'}"), url, samples_per_shard=PER_SHARD,
                 vae=load_vae(str(root / "vae")), show_progress=False)


def raw_read(url: str) -> tuple[float, int]:
    fs, path = fsspec.core.url_to_fs(url)
    shards = sorted(p for p in fs.ls(path, detail=False) if p.endswith(".tar"))
    start, total = time.perf_counter(), 0
    for shard in shards:
        with fs.open(shard, "rb") as f:
            total += len(f.read())
    return time.perf_counter() - start, total


def stream_epoch(url: str, n: int, workers: int) -> float:
    stream = ShardStream(url, global_batch=BATCH, seed=0, num_workers=workers, shuffle_block=256)
    stream.next_batch()                                    # workers started, first blocks read
    start = time.perf_counter()
    for _ in range(n // BATCH - 1):
        stream.next_batch()
    elapsed = time.perf_counter() - start
    stream.close()
    return (n // BATCH - 1) * BATCH / elapsed


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--samples", type=int, default=1024)
    p.add_argument("--s3-endpoint", help="use this S3 server (credentials from the environment)")
    args = p.parse_args()
    with s3_environment(args.s3_endpoint):
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            local = str(root / "latents")
            fsspec.filesystem("s3").mkdir("bench-latents")
            t = time.perf_counter()
            make_latent_set(root, local, args.samples)
            print(f"wrote {args.samples} latent samples in {time.perf_counter() - t:.1f}s")
            fsspec.filesystem("s3").put(local, "bench-latents/set", recursive=True)
            print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
                  f"{torch.__version__}, {torch.get_num_threads()} threads")
            print("| store | raw read MB/s | raw samples/s | workers | stream samples/s | stream / raw |")
            print("|---|---|---|---|---|---|")
            for name, url in (("local disk", local), ("S3 (moto, loopback)", "s3://bench-latents/set")):
                seconds, nbytes = raw_read(url)
                raw_rate = args.samples / seconds
                for workers in (0, 2):
                    rate = stream_epoch(url, args.samples, workers)
                    print(f"| {name} | {nbytes / seconds / 1e6:.0f} | {raw_rate:.0f} | {workers} | {rate:.0f} | "
                          f"{rate / raw_rate:.2f} |")


if __name__ == "__main__":
    main()

"""``python -m meanflow.data_pipeline.write --source SRC --out URL [--vae DIR] ...``: a source as WebDataset shards.

Examples::

    python -m meanflow.data_pipeline.write --source digits --out runs/data/digits --samples-per-shard 256
    python -m meanflow.data_pipeline.write --source imagefolder:/data/imagenet/train --image-size 256 \\
        --vae s3://models/sd-vae-ft-ema --out s3://bucket/imagenet256-latents --samples-per-shard 1000

Several writer processes split the shards: pass ``--rank``/``--world-size`` or run under SLURM/torchrun, whose
environment (SLURM_PROCID/SLURM_NTASKS, RANK/WORLD_SIZE) is read when the flags are absent.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from .manifest import ManifestError
from .shard_writer import write_shards
from .sources import open_source
from .vae import load_vae


def _env_rank() -> tuple[int, int]:
    for rank_key, world_key in (("RANK", "WORLD_SIZE"), ("SLURM_PROCID", "SLURM_NTASKS")):
        if rank_key in os.environ and world_key in os.environ:
            return int(os.environ[rank_key]), int(os.environ[world_key])
    return 0, 1


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m meanflow.data_pipeline.write", description=__doc__.split("\n")[0])
    p.add_argument("--source", required=True, help="digits[:train|test] | npz:<path> | imagefolder:<dir>")
    p.add_argument("--out", required=True, help="directory URL for the shards (file path, s3://bucket/prefix, …)")
    p.add_argument("--prefix", default="train", help="shard name prefix: <prefix>-000000.tar")
    p.add_argument("--samples-per-shard", type=int, default=1000)
    p.add_argument("--image-size", type=int, default=256, help="image folders: centre crop size")
    p.add_argument("--channels", type=int, default=3, choices=(1, 3), help="image folders: grey or RGB")
    p.add_argument("--vae", help="AutoencoderKL directory (local or URL): store latent moments instead of pixels")
    p.add_argument("--vae-id", help="name recorded in the manifest (default: the VAE directory's name)")
    p.add_argument("--latent-dtype", default="float32", choices=("float32", "float16"))
    p.add_argument("--batch-size", type=int, default=64, help="images per VAE forward")
    p.add_argument("--device", default="auto", help="VAE device: auto | cpu | cuda")
    p.add_argument("--shuffle-seed", type=int, default=0,
                   help="global sample order = this seeded permutation of the source (sources come grouped by "
                        "class); -1 keeps the source order")
    p.add_argument("--rank", type=int)
    p.add_argument("--world-size", type=int)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    rank, world = _env_rank()
    rank = args.rank if args.rank is not None else rank
    world = args.world_size if args.world_size is not None else world
    if not 0 <= rank < world:
        print(f"error: --rank {rank} outside --world-size {world}", file=sys.stderr)
        return 2
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    try:
        source = open_source(args.source, image_size=args.image_size, channels=args.channels)
        vae = load_vae(args.vae, args.vae_id, device) if args.vae else None
        manifest = write_shards(source, args.out, samples_per_shard=args.samples_per_shard, prefix=args.prefix,
                                rank=rank, world_size=world, vae=vae, latent_dtype=args.latent_dtype,
                                batch_size=args.batch_size, device=device, show_progress=not args.quiet,
                                shuffle_seed=None if args.shuffle_seed < 0 else args.shuffle_seed)
    except (ValueError, FileNotFoundError, PermissionError, ManifestError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if manifest is None:
        print(f"rank {rank}/{world}: shards written to {args.out}; the manifest is written by the last rank")
    else:
        print(f"wrote {manifest['total']} {manifest['kind']} samples in {len(manifest['shards'])} shards to "
              f"{args.out} (manifest.json); data.url={args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

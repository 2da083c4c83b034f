"""Reference statistics for FID: ``mu``, ``sigma`` of real images' features in an ``.npz`` at any fsspec URL.

The file also names the feature extractor and the sha256 of its weights: FID against statistics of another
network's features is meaningless, so loading checks both. Statistics of degenerate features (near-constant, or
varying along one direction) are refused, loaded or computed: every FID against them would be ~0. Compute them
once per dataset with

    python -m meanflow.evaluation.reference_stats --data s3://bucket/imagenet256-shards --out s3://bucket/ref/in256.npz \
        --feature-weights s3://bucket/weights/weights-inception-2015-12-05-6726825d.pth

(under torchrun or SLURM every rank reads its own shards; the sums are all-reduced). The embedded digits need no
file: their statistics come from the digits train split and the shipped digits-cnn.
"""

from __future__ import annotations

import argparse
import io
import sys
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from meanflow.platform.storage import read_bytes, write_bytes_atomic

from .feature_extractors import FeatureExtractor, load_feature_extractor
from .feature_stats import FeatureMoments, spread_problem
from .images import to_uint8


@dataclass
class ReferenceStats:
    mu: np.ndarray
    sigma: np.ndarray
    num_images: int
    feature_extractor: str
    weights_sha256: str
    source: str

    def check_matches(self, extractor: FeatureExtractor) -> None:
        if (self.feature_extractor, self.weights_sha256) != (extractor.name, extractor.weights_sha256):
            raise ValueError(f"eval.reference_stats: {self.source} was computed with {self.feature_extractor} "
                             f"(weights sha256 {self.weights_sha256[:12]}…), this evaluation uses {extractor.name} "
                             f"({extractor.weights_sha256[:12]}…); FID between them is meaningless")

    def check_spread(self, setting: str) -> "ReferenceStats":
        """Refuse statistics of degenerate features; ``setting`` names what they came from in the error."""
        problem = spread_problem(self.mu, self.sigma)
        if problem:
            raise ValueError(f"{setting}: {problem} ({self.feature_extractor} features of {self.num_images} images); "
                             "FID against them is meaningless")
        return self


def from_moments(moments: FeatureMoments, extractor: FeatureExtractor, source: str) -> ReferenceStats:
    mu, sigma = moments.mean_cov()
    stats = ReferenceStats(mu, sigma, int(moments.n.item()), extractor.name, extractor.weights_sha256, source)
    return stats.check_spread(f"reference statistics of {source}")


def save_reference(stats: ReferenceStats, url: str) -> None:
    buf = io.BytesIO()
    np.savez(buf, mu=stats.mu, sigma=stats.sigma, num_images=stats.num_images,
             feature_extractor=stats.feature_extractor, weights_sha256=stats.weights_sha256, source=stats.source)
    write_bytes_atomic(url, buf.getvalue())


def load_reference(url: str) -> ReferenceStats:
    try:
        data = np.load(io.BytesIO(read_bytes(url)), allow_pickle=False)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"eval.reference_stats: no file at {url}") from err
    missing = {"mu", "sigma", "feature_extractor", "weights_sha256"} - set(data.files)
    if missing:
        raise ValueError(f"eval.reference_stats: {url} lacks {', '.join(sorted(missing))} (write it with "
                         "python -m meanflow.evaluation.reference_stats)")
    stats = ReferenceStats(data["mu"], data["sigma"], int(data["num_images"]), str(data["feature_extractor"]),
                           str(data["weights_sha256"]), url)
    return stats.check_spread(f"eval.reference_stats: {url}")


def embedded_digits_reference(extractor: FeatureExtractor) -> ReferenceStats:
    """The real digits (train split) through the extractor: the embedded default's reference."""
    from meanflow.data_pipeline.digits import load_digits_split

    x, _ = load_digits_split("train")
    moments = FeatureMoments(extractor.feature_dim)
    for chunk in x.split(512):
        moments.add(extractor(to_uint8(chunk))[0])
    return from_moments(moments, extractor, "embedded digits (train split)")


def shard_moments(url: str, extractor: FeatureExtractor, rank: int = 0, world_size: int = 1,
                  batch_size: int = 256, limit: int = 0) -> FeatureMoments:
    """Features of every image in a WebDataset (manifest kind ``image``), rank r reading shards r, r+W, …;
    summed over ranks. ``limit``: stop after that many images per rank (0: all)."""
    from meanflow.data_pipeline.manifest import read_manifest, select_shards
    from meanflow.data_pipeline.records import RecordDecoder
    from meanflow.data_pipeline.shard_reader import ShardReader

    manifest = read_manifest(url)
    if manifest["kind"] != "image":
        raise ValueError(f"--data {url}: reference statistics need real images, these shards hold {manifest['kind']}")
    urls, counts = select_shards(url, manifest)
    reader, decoder = ShardReader(urls), RecordDecoder(manifest, seed=0)
    moments, batch = FeatureMoments(extractor.feature_dim), []

    def flush():
        if batch:
            moments.add(extractor(to_uint8(torch.stack(batch)))[0])
            batch.clear()

    mine = range(rank, len(urls), world_size)
    seen = 0
    with tqdm(total=sum(counts[s] for s in mine), desc="reference features", unit="img",
              disable=rank != 0) as bar:
        for shard in mine:
            for record in reader.shard_records(shard, 0, counts[shard]):
                sample = decoder(record, epoch=0)
                if sample is None:
                    raise ValueError(f"--data {url}: shard {urls[shard]}: {decoder.last_error}")
                batch.append(sample["x"])
                seen += 1
                bar.update()
                if len(batch) == batch_size:
                    flush()
                if limit and seen >= limit:
                    break
            if limit and seen >= limit:
                break
        flush()
    return moments.all_reduce()


def main(argv=None) -> int:
    from meanflow.platform.distributed import init_distributed, resolve_env, shutdown, task_device

    p = argparse.ArgumentParser(prog="python -m meanflow.evaluation.reference_stats",
                                description="FID reference statistics (mu, sigma) of a WebDataset of real images")
    p.add_argument("--data", required=True, help="shard directory (with manifest.json) or brace pattern, any URL")
    p.add_argument("--out", required=True, help="where to write the .npz (any fsspec URL)")
    p.add_argument("--feature-extractor", default="inception-v3-compat", choices=("inception-v3-compat", "digits-cnn"))
    p.add_argument("--feature-weights", default="", help="weights file (local or s3://); required for inception")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--limit", type=int, default=0, help="images per rank (0: all)")
    args = p.parse_args(argv)
    env = resolve_env()
    device = task_device("auto", env.local_rank)
    init_distributed(env, device, timeout_s=600)
    try:
        extractor = load_feature_extractor(args.feature_extractor, args.feature_weights, device)
        moments = shard_moments(args.data, extractor, env.rank, env.world_size, args.batch_size, args.limit)
        if env.is_main:
            stats = from_moments(moments, extractor, args.data)
            save_reference(stats, args.out)
            print(f"wrote {args.out}: {stats.num_images} images, {extractor.name} features ({len(stats.mu)})")
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())

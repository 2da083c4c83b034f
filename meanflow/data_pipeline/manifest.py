"""The manifest of a shard set: what each shard holds, written last so its presence means the set is complete.

Layout at a shard URL ``<root>``::

    <root>/<prefix>-000000.tar …      shard k holds global samples [k·S, (k+1)·S) (S = samples per shard)
    <root>/manifest.json              {"shards": [{"name", "first_index", "count"}], "total", "kind", ...}
    <root>/_parts/rank-00000.json     one per writer rank, merged into manifest.json by the last rank to finish

Because a shard's number is its first global sample index divided by S, writer ranks that own disjoint index
ranges never write the same name.
"""

from __future__ import annotations

import json
import posixpath
from typing import Any

from braceexpand import braceexpand

from meanflow.platform.storage import filesystem, join, read_bytes, write_bytes_atomic

MANIFEST_NAME = "manifest.json"
PARTS_DIR = "_parts"
FORMAT_VERSION = 1

# Per-channel statistics of SD-VAE latents that iMF standardises by (docs/objectives.md, imf), and MF's single scale.
IMF_CHANNEL_MEAN = (0.86488, -0.27787, 0.21617, 0.37384)
IMF_CHANNEL_STD = (4.85504, 5.31922, 3.93725, 3.98700)
MF_SCALE_FACTOR = 0.18215


class ManifestError(ValueError):
    """A shard set that cannot be read: missing or inconsistent manifest, missing shards."""


def shard_name(prefix: str, shard_number: int) -> str:
    return f"{prefix}-{shard_number:06d}.tar"


def part_name(rank: int) -> str:
    return f"{PARTS_DIR}/rank-{rank:05d}.json"


def write_part(root: str, rank: int, part: dict[str, Any]) -> None:
    write_bytes_atomic(join(root, part_name(rank)), json.dumps(part, indent=1).encode())


def merge_parts_if_complete(root: str, world_size: int, write_id: str) -> dict[str, Any] | None:
    """Merge every writer rank's part into ``manifest.json`` once all ``world_size`` parts of this write exist.

    Called by each rank after writing its part; the last to finish finds them all. Parts left by an earlier write
    (another world size or source) carry another ``write_id`` and are ignored. Two ranks that both see a complete
    set write byte-identical manifests, so that race is harmless.
    """
    parts = []
    for rank in range(world_size):
        try:
            part = json.loads(read_bytes(join(root, part_name(rank))))
        except FileNotFoundError:
            return None
        if part.get("write_id") != write_id:
            return None
        parts.append(part)
    manifest = merge_parts(parts)
    write_bytes_atomic(join(root, MANIFEST_NAME), json.dumps(manifest, indent=1).encode())
    return manifest


def merge_parts(parts: list[dict[str, Any]]) -> dict[str, Any]:
    parts = [p for p in parts if p["shards"]]   # a rank beyond the shard count wrote an empty part
    if not parts:
        raise ManifestError("no writer rank wrote a shard")
    first = parts[0]
    for key in ("kind", "name", "sample_shape", "dtype", "num_classes", "samples_per_shard", "num_shards",
                "vae", "normalization"):
        values = {json.dumps(p.get(key), sort_keys=True) for p in parts}
        if len(values) > 1:
            raise ManifestError(f"writer ranks disagree on manifest key {key!r}: {sorted(values)}")
    shards = sorted((s for p in parts for s in p["shards"]), key=lambda s: s["first_index"])
    expected = [shard_name(first["prefix"], k) for k in range(first["num_shards"])]
    if [s["name"] for s in shards] != expected:
        raise ManifestError(f"writer parts cover shards {[s['name'] for s in shards]}, expected {expected}")
    manifest = {k: v for k, v in first.items() if k not in ("shards", "channel_sums", "rank")}
    manifest.update(format=FORMAT_VERSION, shards=shards, total=sum(s["count"] for s in shards))
    if "channel_sums" in first:   # latents: per-channel statistics of posterior samples over the whole set
        count = sum(p["channel_sums"]["count"] for p in parts)
        s1 = [sum(p["channel_sums"]["sum"][c] for p in parts) for c in range(len(first["channel_sums"]["sum"]))]
        s2 = [sum(p["channel_sums"]["sum_sq"][c] for p in parts) for c in range(len(s1))]
        mean = [v / count for v in s1]
        std = [max(q / count - m * m, 0.0) ** 0.5 for q, m in zip(s2, mean)]
        manifest["normalization"] = {**manifest["normalization"],
                                     "measured": {"channel_mean": mean, "channel_std": std}}
    return manifest


def remove_manifest(root: str) -> None:
    """A rewrite starts by withdrawing the old manifest: its presence must keep meaning "complete"."""
    fs, path = filesystem(root)
    try:
        fs.rm(join(path, MANIFEST_NAME))
    except FileNotFoundError:
        pass


def manifest_root(url: str) -> str:
    """The directory holding the manifest: ``url`` itself, or the parent of a (brace-pattern) shard URL."""
    return posixpath.dirname(url) if url.endswith(".tar") or "{" in url else url.rstrip("/")


def read_manifest(url: str) -> dict[str, Any]:
    root = manifest_root(url)
    manifest_url = join(root, MANIFEST_NAME)
    try:
        manifest = json.loads(read_bytes(manifest_url))
    except FileNotFoundError:
        raise ManifestError(f"data.url {url}: no {manifest_url} (shards are written by "
                            "`python -m meanflow.data_pipeline.write`, which writes the manifest last)") from None
    except ValueError as err:   # JSONDecodeError, or bytes that are not text at all (UnicodeDecodeError)
        raise ManifestError(f"data.url {url}: {manifest_url} is not valid JSON ({err})") from None
    if not isinstance(manifest, dict):
        raise ManifestError(f"data.url {url}: {manifest_url} is not a JSON object")
    if manifest.get("format") != FORMAT_VERSION:
        raise ManifestError(f"{manifest_url}: manifest format {manifest.get('format')!r}, "
                            f"this version reads {FORMAT_VERSION}")
    if not manifest.get("shards"):
        raise ManifestError(f"{manifest_url}: lists no shards")
    return manifest


def select_shards(url: str, manifest: dict[str, Any]) -> tuple[list[str], list[int]]:
    """(shard URLs, record counts) named by ``url``: every shard of the manifest for a directory URL, else the
    brace-expanded list, each of which must be in the manifest (its count is needed to resume without reading)."""
    root = manifest_root(url)
    by_name = {s["name"]: s["count"] for s in manifest["shards"]}
    if url.rstrip("/") == root:
        names = [s["name"] for s in manifest["shards"]]
    else:
        names = [posixpath.basename(u) for u in braceexpand(url)]
        unknown = [n for n in names if n not in by_name]
        if unknown:
            raise ManifestError(f"data.url {url}: {len(unknown)} shard(s) not in {join(root, MANIFEST_NAME)}, "
                                f"e.g. {join(root, unknown[0])}")
    if not names:
        raise ManifestError(f"data.url {url}: names no shards")
    urls = [join(root, n) for n in names]
    fs, path = filesystem(root)
    present = {posixpath.basename(p) for p in fs.ls(path, detail=False)}   # one listing, not one request per shard
    missing = [u for u, n in zip(urls, names) if n not in present]
    if missing:
        raise FileNotFoundError(f"data.url {url}: {len(missing)} shard(s) missing, e.g. {missing[0]}")
    return urls, [by_name[n] for n in names]

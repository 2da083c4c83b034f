"""fsspec helpers: every path in the platform is a URL (file://, s3://, memory://).

Credentials come from the environment or an fsspec profile, never from a config, so nothing here logs them.
"""

from __future__ import annotations

import fsspec
from fsspec.core import url_to_fs


def filesystem(url: str):
    """(filesystem, path) for a URL; a plain path means the local filesystem."""
    return url_to_fs(url)


# Stores whose first path component is a bucket (container) and which have no directories to create.
OBJECT_STORES = {"s3", "s3a", "gs", "gcs", "abfs", "abfss", "az", "adl"}


class MissingBucket(FileNotFoundError):
    """A write to an object store whose bucket does not exist. Buckets are never created here: a missing one is a
    typo or a missed set-up step (s3fs's ``makedirs`` would silently create it, with the account's defaults)."""


def _protocols(fs) -> tuple:
    return tuple(fs.protocol) if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)


def is_local(fs) -> bool:
    protocols = _protocols(fs)
    return "file" in protocols or "local" in protocols


def is_object_store(fs) -> bool:
    return bool(OBJECT_STORES.intersection(_protocols(fs)))


def make_parent_dirs(fs, path: str, url: str) -> None:
    """Directories for ``path``: created where the store has them; an object store only needs its bucket."""
    if is_object_store(fs):
        bucket = path.split("/", 1)[0]
        fs.invalidate_cache(bucket)   # a listing cached before the bucket was made must not hide it
        try:
            fs.info(bucket)
        except FileNotFoundError as err:
            raise MissingBucket(f"{url}: bucket {bucket} does not exist (buckets are not created here: create it "
                                "first, or correct the URL)") from err
        except PermissionError:
            pass   # a role may write below a prefix without the right to look at the bucket itself
    else:
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)


def join(url: str, *parts: str) -> str:
    return "/".join([url.rstrip("/"), *parts])


def write_bytes_atomic(url: str, data: bytes) -> None:
    """Write via a temporary name then rename where the store can rename (local); object stores publish a
    whole object on close, so a reader never sees half a file either way."""
    fs, path = filesystem(url)
    make_parent_dirs(fs, path, url)
    if is_local(fs):
        tmp = f"{path}.tmp"
        with fs.open(tmp, "wb") as f:
            f.write(data)
        fs.mv(tmp, path)
    else:
        with fs.open(path, "wb") as f:
            f.write(data)


def read_bytes(url: str) -> bytes:
    with fsspec.open(url, "rb") as f:
        return f.read()


def exists(url: str) -> bool:
    fs, path = filesystem(url)
    return fs.exists(path)

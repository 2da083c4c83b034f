"""fsspec helpers: every path in the platform is a URL (file://, s3://, memory://).

Credentials come from the environment or an fsspec profile, never from a config, so nothing here logs them.
"""

from __future__ import annotations

import fsspec
from fsspec.core import url_to_fs


def filesystem(url: str):
    """(filesystem, path) for a URL; a plain path means the local filesystem."""
    return url_to_fs(url)


def is_local(fs) -> bool:
    protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    return "file" in protocols or "local" in protocols


def join(url: str, *parts: str) -> str:
    return "/".join([url.rstrip("/"), *parts])


def write_bytes_atomic(url: str, data: bytes) -> None:
    """Write via a temporary name then rename where the store can rename (local); object stores publish a
    whole object on close, so a reader never sees half a file either way."""
    fs, path = filesystem(url)
    parent = path.rsplit("/", 1)[0]
    fs.makedirs(parent, exist_ok=True)
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

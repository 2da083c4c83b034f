"""fsspec helpers: every path in the platform is a URL (file://, s3://, memory://).

Credentials come from the environment or an fsspec profile, never from a config, so nothing here logs them.

One parser (``parse_url``, behind ``filesystem``) refuses a URL the platform cannot use (``UnusableURL``, the
CLI's exit code 2) rather than letting fsspec read it as something else: ``s3://`` without a bucket, ``s3:/x`` (a
local folder named ``s3:``), an unknown protocol. ``is_permanent`` sorts a store's errors: a full disk, a read-only
target, a missing permission or a 4xx answer fails at once; timeouts, resets, 5xx and throttling are retried
(``checkpoint.upload``).
"""

from __future__ import annotations

import contextlib
import errno
import re
import threading
import uuid
from typing import Any, Callable

import fsspec
from fsspec.core import split_protocol, url_to_fs
from fsspec.registry import registry

# Stores whose first path component is a bucket (container) and which have no directories to create.
OBJECT_STORES = {"s3", "s3a", "gs", "gcs", "abfs", "abfss", "az", "adl"}

# An OSError with one of these numbers is the target's state, not a passing fault: retrying cannot mend it.
PERMANENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EISDIR}
# 4xx answers that mean "try again later" (S3 and other object stores' throttling and request timeouts).
RETRIED_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequestsException",
                 "RequestTimeout"}


class UnusableURL(ValueError):
    """A URL the run cannot use (bad input, exit code 2): an unknown protocol, a remote URL without its bucket or
    host, a local path that begins like a URL, or (``probe_writable``) a place that refuses writes."""


class MissingBucket(FileNotFoundError):
    """A write to an object store whose bucket does not exist. Buckets are never created here: a missing one is a
    typo or a missed set-up step (s3fs's ``makedirs`` would silently create it, with the account's defaults)."""


def _known_protocols() -> list[str]:
    return sorted({*fsspec.available_protocols(), *registry})


def parse_url(url: str) -> tuple[str, str]:
    """(protocol, path) of ``url``; a plain path is ``file``. Raises UnusableURL for a URL fsspec would misread or
    cannot open: an unknown protocol, one whose package is not installed, a URL of a store without a root
    directory (an object store, a web server) that names no bucket or host, a local path that begins like a URL."""
    protocol, path = split_protocol(url)
    if protocol is None:
        head = re.match(r"([A-Za-z][\w+.-]*):", path)
        if head and head.group(1).lower() in _known_protocols():   # "s3:/b/x" would be a local folder "s3:"
            raise UnusableURL(f"{url}: a slash missing after '{head.group(1)}:'? (write "
                              f"{head.group(1)}://<bucket or host>/<path>, or ./{path} for a local folder)")
        return "file", path
    target = protocol.rsplit("::", 1)[-1]   # the store a chained URL (simplecache::s3://b/x) ends at
    try:
        fs_class = fsspec.get_filesystem_class(target)
    except ValueError:
        raise UnusableURL(f"{url}: unknown protocol {target!r} (known: {', '.join(_known_protocols())})") from None
    except ImportError as err:   # gs:// without gcsfs
        raise _not_installed(url, target, err) from err
    if fs_class.root_marker != "/" and not path.split("/", 1)[0]:
        raise UnusableURL(f"{url}: names no bucket or host (write {target}://<bucket or host>/<path>)")
    return protocol, path


def _not_installed(url: str, protocol: str, err: ImportError) -> UnusableURL:
    return UnusableURL(f"{url}: protocol {protocol!r} needs a package that is not installed: {err}")


def filesystem(url: str):
    """(filesystem, path) for a URL (checked by ``parse_url``); a plain path means the local filesystem."""
    protocol, _ = parse_url(url)
    try:
        return url_to_fs(url)
    except ImportError as err:   # some implementations import their library only when instantiated (hdfs)
        raise _not_installed(url, protocol, err) from err


def _protocols(fs) -> tuple:
    return tuple(fs.protocol) if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)


def is_local(fs) -> bool:
    protocols = _protocols(fs)
    return "file" in protocols or "local" in protocols


def is_object_store(fs) -> bool:
    return bool(OBJECT_STORES.intersection(_protocols(fs)))


def _causes(err: BaseException):
    while err is not None:   # s3fs raises an OSError whose __cause__ is botocore's ClientError
        yield err
        err = err.__cause__


def is_permanent(err: BaseException) -> bool:
    """Whether retrying ``err`` cannot help: no space or quota, read-only, no permission, not a directory (or a
    directory where a file goes), or an object store's 4xx answer other than throttling (NoSuchBucket, AccessDenied,
    InvalidArgument, ...)."""
    for cause in _causes(err):
        if isinstance(cause, (MissingBucket, PermissionError)):
            return True
        if isinstance(cause, OSError) and cause.errno in PERMANENT_ERRNOS:
            return True
        response = getattr(cause, "response", None)   # botocore's ClientError
        if isinstance(response, dict) and "Error" in response:
            code = str(response["Error"].get("Code", ""))
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
            return code == "NoSuchBucket" or (400 <= status < 500 and status != 429 and code not in RETRIED_CODES)
    return False


def is_transient(err: BaseException) -> bool:
    """Whether ``err`` is a store's passing fault, worth retrying: a timeout, a reset, a 5xx, throttling."""
    if is_permanent(err):
        return False
    return any(isinstance(cause, (OSError, TimeoutError)) or isinstance(getattr(cause, "response", None), dict)
               for cause in _causes(err))


def call_with_timeout(fn: Callable[[], Any], timeout_s: float):
    """Run ``fn`` in a daemon thread and wait at most ``timeout_s``: a stalled upload (a store that accepts the
    connection and never answers) cannot hang the caller. An abandoned call may still finish later; uploads
    write the same bytes to the same key, so a late finish is harmless."""
    result: dict[str, Any] = {}

    def target():
        try:
            result["value"] = fn()
        except BaseException as err:   # reported to the caller's thread below
            result["error"] = err

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise TimeoutError(f"no answer within {timeout_s:.3g}s")
    if "error" in result:
        raise result["error"]
    return result.get("value")


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
        return
    parent = path.rsplit("/", 1)[0]
    try:
        fs.makedirs(parent, exist_ok=True)
    except FileExistsError as err:   # a file stands where the directory goes: the same fault as one in its path
        raise NotADirectoryError(errno.ENOTDIR, "a file stands where a directory goes", parent) from err


def join(url: str, *parts: str) -> str:
    protocol, path = split_protocol(url)   # "s3://" + "x" is "s3:///x" (refused: no bucket), never "s3:/x"
    return (f"{protocol}://" if protocol else "") + "/".join([path.rstrip("/"), *parts])


def write_bytes_atomic(url: str, data: bytes) -> None:
    """Write via a temporary name then rename where the store can rename (local); object stores publish a
    whole object on close, so a reader never sees half a file either way. A failed write leaves no ``.tmp``."""
    fs, path = filesystem(url)
    make_parent_dirs(fs, path, url)
    if is_local(fs):
        tmp = f"{path}.tmp"
        try:
            with fs.open(tmp, "wb") as f:
                f.write(data)
            fs.mv(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                fs.rm_file(tmp)
            raise
    else:
        with fs.open(path, "wb") as f:
            f.write(data)


def probe_writable(url: str, timeout_s: float = 60.0) -> None:
    """Write and remove a small file in the directory ``url``, once, within ``timeout_s``: a place that is
    read-only, full, not a directory, without permission, in a missing bucket, or that does not answer is refused
    here (UnusableURL naming the URL and the error) rather than at a run's first save."""
    probe = join(url, f".write-probe-{uuid.uuid4().hex}")

    def write_and_remove():
        write_bytes_atomic(probe, b"meanflow write probe\n")
        fs, path = filesystem(probe)
        fs.rm_file(path)

    try:
        call_with_timeout(write_and_remove, timeout_s)
    except UnusableURL:
        raise
    except Exception as err:   # whatever the store says, the run cannot write there now
        raise UnusableURL(f"{url}: not writable ({type(err).__name__}: {err})") from err


def read_bytes(url: str) -> bytes:
    fs, path = filesystem(url)
    with fs.open(path, "rb") as f:
        return f.read()


def exists(url: str) -> bool:
    fs, path = filesystem(url)
    return fs.exists(path)

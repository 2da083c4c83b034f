"""Raw records of one reader slot, read sequentially from shards through fsspec (no ``pipe:`` commands).

Records come out as webdataset samples (``{"__key__": ..., "npy": b"...", "cls": b"3"}``), undecoded. A shard that
cannot be opened (missing, forbidden) fails at once with its URL; a transient error while reading (connection
reset, throttling) re-opens the shard and skips what was already delivered, with exponential backoff; a tar error
that recurs at the same record (a truncated or corrupt shard) ends that shard early and its missing records come
out as ``None`` so every position keeps its meaning (the manifest's count is the truth).
"""

from __future__ import annotations

import http.client
import os
import tarfile
import time
from collections.abc import Iterator
from typing import Any

from webdataset.tariterators import group_by_keys, tar_file_iterator

from meanflow.platform.storage import filesystem

from .errors import ShardUnreadable
from .shard_plan import ShardPlan, SlotPosition

# A tar error is corruption only if it recurs at the same record: a connection dropped mid-body also looks like a
# short (truncated) tar, so the first one is retried like any transient error.
CORRUPT_TAR_ERRORS = (tarfile.TarError, EOFError, ValueError)
# Errors that say the URL will never work: fail fast, naming it.
FATAL_OPEN_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError)


def _transient_errors() -> tuple[type[BaseException], ...]:
    """Network-level errors s3fs can let through untranslated, besides OSError (which covers ConnectionError and
    TimeoutError)."""
    errors: list[type[BaseException]] = [OSError, http.client.HTTPException]
    try:
        from botocore.exceptions import BotoCoreError
        errors.append(BotoCoreError)
    except ImportError:
        pass
    try:
        from aiohttp import ClientError
        errors.append(ClientError)
    except ImportError:
        pass
    return tuple(errors)


TRANSIENT_ERRORS = _transient_errors()


def _tar_samples(fileobj, url: str) -> Iterator[dict[str, Any]]:
    files = ({**f, "__url__": url} for f in tar_file_iterator(fileobj))
    return group_by_keys(files)


class ShardReader:
    """Reads shards of one filesystem; the filesystem object is created once per process and reused."""

    def __init__(self, urls: list[str], retries: int = 5, backoff_s: float = 0.5):
        self.urls, self.retries, self.backoff_s = urls, retries, backoff_s
        self._fs, self._fs_pid = None, None
        self.transient_errors = 0

    def _filesystem(self):
        # One filesystem object per process, reused for every shard: a DataLoader worker forked from a parent that
        # already used its s3fs client must not share it (aiobotocore sessions are not fork-safe).
        if self._fs is None or self._fs_pid != os.getpid():
            self._fs, self._fs_pid = filesystem(self.urls[0])[0], os.getpid()
        return self._fs

    def _backoff(self, url: str, attempt: int, err: BaseException) -> None:
        self.transient_errors += 1
        if attempt > self.retries:
            raise ShardUnreadable(f"shard {url}: giving up after {self.retries} retries: {err}") from err
        time.sleep(self.backoff_s * 2 ** (attempt - 1))

    def shard_records(self, shard: int, offset: int, count: int) -> Iterator[dict[str, Any] | None]:
        """Records ``offset..count-1`` of a shard; ``None`` for each record a truncated or corrupt tar lost."""
        url = self.urls[shard]
        delivered, attempt, tar_error_at = offset, 0, None
        while delivered < count:
            try:
                with self._filesystem().open(filesystem(url)[1], "rb") as f:
                    for i, sample in enumerate(_tar_samples(f, url)):
                        if i < delivered:   # re-opened after an error: skip what was already delivered
                            continue
                        if i >= count:
                            break
                        yield sample
                        delivered += 1
                        attempt = 0
                break   # the tar ended (maybe short of ``count``: the rest is reported as lost below)
            except FATAL_OPEN_ERRORS as e:
                raise ShardUnreadable(f"cannot read shard {url}: {type(e).__name__}: {e}") from e
            except CORRUPT_TAR_ERRORS as e:
                if tar_error_at == delivered:   # the same place twice: the bytes themselves are bad
                    break
                tar_error_at, attempt = delivered, attempt + 1
                self._backoff(url, attempt, e)
            except TRANSIENT_ERRORS as e:   # network, throttling, server errors
                attempt += 1
                self._backoff(url, attempt, e)
        for _ in range(delivered, count):
            yield None

    def slot_records(self, plan: ShardPlan, slot: int, start: SlotPosition) -> Iterator[dict[str, Any] | None]:
        """Every record of ``slot`` from ``start`` on, across shard and epoch ends (an endless iterator)."""
        epoch, record = start.epoch, start.record
        while True:
            shards = plan.slot_shards(epoch, slot)
            cursor, offset = plan.locate(epoch, slot, record)
            for shard in shards[cursor:]:
                yield from self.shard_records(shard, offset, plan.counts[shard])
                offset = 0
            epoch, record = epoch + 1, 0

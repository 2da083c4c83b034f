"""Uploads that run beside training: ``PeriodicUpload`` calls an upload function on a background thread every few
seconds while something is waiting to go up, so a slow or frozen store never stalls a step.

The function does its own writes through a BoundedWriter (each attempt bounded, retried, ``StorageOutage`` past
``max_outage_s``). A failure is kept and raised in the owner's thread at its next ``raise_if_failed`` (or
``flush``/``close``); whatever was pending stays pending, so nothing is lost while the store is away. ``flush`` and
``close`` wait for an upload under way at most ``wait_s`` (the writer's ``longest_call_s``): an upload stuck even so
ends the run with a StorageOutage naming ``url``, never hangs it.
"""

from __future__ import annotations

import threading
from typing import Callable, Optional

from .checkpoint.upload import StorageOutage


class PeriodicUpload:
    def __init__(self, upload: Callable[[], None], every_s: float, name: str, url: str, wait_s: float):
        self._upload_fn, self.every_s, self.url, self.wait_s = upload, every_s, url, wait_s
        self._pending, self._closing = threading.Event(), threading.Event()
        self._one_at_a_time = threading.Lock()   # the background upload, or a flush
        self._error: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._loop, daemon=True, name=name)
        self._thread.start()

    def mark_pending(self) -> None:
        self._pending.set()

    def flush(self) -> None:
        """Upload what is pending now, in the caller's thread (bounded by the writer the function uses)."""
        self.raise_if_failed()
        self._upload(self.wait_s)
        self.raise_if_failed()

    def close(self, raise_errors: bool = True) -> None:
        """A last upload, then stop; ``raise_errors=False`` on a failure path, where the run's own error is the one
        to report."""
        self._closing.set()   # the background loop ends after the upload under way, which this one waits for
        self._upload(self.wait_s)
        if raise_errors:
            self.raise_if_failed()

    def raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    def _loop(self) -> None:
        while self._error is None and not self._closing.wait(self.every_s):
            self._upload()

    def _upload(self, wait_s: float = -1) -> None:
        """Upload what is pending, after the upload under way (if any); waits ``wait_s`` for it (-1: as long as it
        takes, in the background thread)."""
        if not self._one_at_a_time.acquire(timeout=wait_s):
            self._error = self._error or StorageOutage(f"{self.url}: the upload under way has not ended after "
                                                       f"{wait_s:g}s")
            return
        try:
            if not self._pending.is_set() or self._error is not None:
                return
            self._pending.clear()
            try:
                self._upload_fn()
            except Exception as err:   # the owner's thread raises it
                self._pending.set()
                self._error = err
        finally:
            self._one_at_a_time.release()

"""Bounded writes to a store: every attempt has a deadline, a failed attempt is retried with backoff, and an
outage longer than a limit fails loudly.

Why: a store that accepts the connection and never answers must not hang a training run, and a short outage must
not kill one. Nothing here knows what it writes (checkpoints, the run's metrics, evaluation outputs), so the
caller names the config section whose limits apply in the messages.
"""

from __future__ import annotations

import threading
import time
import warnings
from typing import Any, Callable, Optional

from ..storage import MissingBucket, write_bytes_atomic


class StorageOutage(RuntimeError):
    pass


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
        raise TimeoutError(f"no answer within {timeout_s:g}s")
    if "error" in result:
        raise result["error"]
    return result.get("value")


class BoundedWriter:
    """``write(url, data)``: each attempt bounded by ``timeout_s``, retried with exponential backoff (at most 30 s
    apart), ``StorageOutage`` once the store has failed for longer than ``max_outage_s``. ``what`` names the
    config section whose settings these are (``checkpoint`` → ``checkpoint.max_outage_s`` in the error).
    A missing bucket is not an outage: it fails at once."""

    def __init__(self, what: str, timeout_s: float = 300.0, max_outage_s: float = 1800.0, backoff_s: float = 1.0):
        self.what, self.timeout_s, self.max_outage_s, self.backoff_s = what, timeout_s, max_outage_s, backoff_s
        self.retries = 0

    def write(self, url: str, data: bytes) -> None:
        self.call(lambda: write_bytes_atomic(url, data), url, "upload")

    def call(self, fn: Callable[[], Any], url: str, doing: str = "access"):
        """``fn()`` (an access to ``url``) with the same deadline, retries and outage limit as a write."""
        started, attempt = time.monotonic(), 0
        while True:
            try:
                return call_with_timeout(fn, self.timeout_s)
            except MissingBucket:
                raise
            except (OSError, TimeoutError) as err:
                attempt += 1
                self.retries += 1
                down = time.monotonic() - started
                if down > self.max_outage_s:
                    raise StorageOutage(f"store unreachable for {down:.0f}s (> {self.what}.max_outage_s="
                                        f"{self.max_outage_s:g}) at {url}: {type(err).__name__}: {err}") from err
                warnings.warn(f"{self.what} {doing} {url} failed ({type(err).__name__}: {err}); retry {attempt}",
                              stacklevel=2)
                time.sleep(min(self.backoff_s * 2 ** (attempt - 1), 30.0))


class OneInFlight:
    """Runs a call in a background thread, at most one at a time: ``start`` first waits for the previous call;
    ``wait`` joins it and re-raises its failure in the caller's thread (a background failure is never lost)."""

    def __init__(self):
        self._thread: Optional[threading.Thread] = None
        self._error: Optional[BaseException] = None

    def start(self, fn: Callable[..., Any], *args, name: str) -> None:
        self.wait()
        self._thread = threading.Thread(target=self._run, args=(fn, *args), daemon=True, name=name)
        self._thread.start()

    def _run(self, fn, *args) -> None:
        try:
            fn(*args)
        except BaseException as err:   # surfaced by the next start() or wait() in the caller's thread
            self._error = err

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error

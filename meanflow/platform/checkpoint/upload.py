"""Bounded writes to a store: every attempt has a deadline, a failed attempt is retried with backoff, and an
outage longer than a limit fails loudly; a failure that no retry mends fails at once.

Why: a store that accepts the connection and never answers must not hang a training run, a short outage must not
kill one, and a full disk or a read-only target must not be waited on for the whole outage limit. Nothing here
knows what it writes (checkpoints, the run's metrics, evaluation outputs), so the caller names the config section
whose limits apply in the messages.
"""

from __future__ import annotations

import threading
import time
import warnings
from typing import Any, Callable, Optional

from ..storage import MissingBucket, call_with_timeout, is_permanent, is_transient, write_bytes_atomic

__all__ = ["LAST_ATTEMPT_S", "BoundedWriter", "OneInFlight", "StorageOutage", "StoragePermanentError",
           "call_with_timeout"]

# Past the outage limit a call still gets one attempt this long (at most): the last records of a run that is
# stopping go up if the store is back, and the run never waits a new outage's worth of retries for them.
LAST_ATTEMPT_S = 5.0


class StorageOutage(RuntimeError):
    """The store did not answer for longer than the outage limit: the run stops (the message names the URL, how
    long, and the last error). Committed checkpoints stay; rerun to continue."""


class StoragePermanentError(StorageOutage):
    """A failure that no retry mends (no space, read-only, no permission, not a directory, a 4xx answer): raised at
    the first attempt, naming the URL and the error. A StorageOutage too: whatever stops a run on an outage stops
    it on this."""


class BoundedWriter:
    """``write(url, data)`` and ``call(fn, url)``: each attempt bounded, a transient failure retried with
    exponential backoff (at most 30 s apart), ``StorageOutage`` once the store has failed for ``max_outage_s``,
    ``StoragePermanentError`` at once for a failure that retrying cannot mend. ``what`` names the config section
    whose settings these are (``checkpoint`` → ``checkpoint.max_outage_s`` in the error). A missing bucket fails at
    once as it is (MissingBucket: a wrong URL).

    The outage clock starts with the first attempt that failed or did not answer, and is shared by every call
    through this writer (a training run's checkpoints, metrics and trackers): a call made during an outage gets
    what is left of it, not a fresh ``max_outage_s``. Each attempt gets ``timeout_s`` or what is left (a stuck one
    is abandoned in its daemon thread); once the limit has passed, one short last attempt (LAST_ATTEMPT_S at most).
    So no call ends later than ``max_outage_s`` and that one attempt after the outage began."""

    def __init__(self, what: str, timeout_s: float = 300.0, max_outage_s: float = 1800.0, backoff_s: float = 1.0):
        self.what, self.timeout_s, self.max_outage_s, self.backoff_s = what, timeout_s, max_outage_s, backoff_s
        self.retries = 0
        self._clock = threading.Lock()
        self._down_since: Optional[float] = None   # None while the store answers

    @property
    def longest_call_s(self) -> float:
        """The longest one call can take: the outage limit and one last attempt."""
        return self.max_outage_s + min(self.timeout_s, LAST_ATTEMPT_S)

    def write(self, url: str, data: bytes) -> None:
        self.call(lambda: write_bytes_atomic(url, data), url, "upload")

    def call(self, fn: Callable[[], Any], url: str, doing: str = "access"):
        """``fn()`` (an access to ``url``) with the same deadline, retries and outage limit as a write."""
        attempt, first_failed = 0, None
        while True:
            started = time.monotonic()
            try:
                value = call_with_timeout(fn, self._attempt_s(started, first_failed))
            except MissingBucket:
                raise
            except Exception as err:
                if is_permanent(err):
                    raise StoragePermanentError(f"{url}: {doing} failed, not retried: {type(err).__name__}: "
                                                f"{err}") from err
                if not is_transient(err):
                    raise
                attempt += 1
                self.retries += 1
                first_failed = started if first_failed is None else first_failed
                down = time.monotonic() - self._went_down(started, first_failed)
                if down >= self.max_outage_s:
                    raise StorageOutage(f"store unreachable for {down:.0f}s (> {self.what}.max_outage_s="
                                        f"{self.max_outage_s:g}) at {url}: {type(err).__name__}: {err}") from err
                warnings.warn(f"{self.what} {doing} {url} failed ({type(err).__name__}: {err}); retry {attempt}",
                              stacklevel=2)
                time.sleep(min(self.backoff_s * 2 ** (attempt - 1), 30.0, self.max_outage_s - down))
            else:
                with self._clock:
                    self._down_since = None
                return value

    def _since(self, first_failed: Optional[float]) -> Optional[float]:
        """When the outage began: this call's first failed attempt, or an earlier one of another call (forgotten
        once any call gets an answer)."""
        known = [t for t in (self._down_since, first_failed) if t is not None]
        return min(known) if known else None

    def _attempt_s(self, now: float, first_failed: Optional[float]) -> float:
        """``timeout_s``, or what is left of the outage limit; past it, one short last attempt."""
        since = self._since(first_failed)
        left = self.max_outage_s - (now - since if since is not None else 0.0)
        return min(self.timeout_s, left if left > 0 else LAST_ATTEMPT_S)

    def _went_down(self, started: float, first_failed: float) -> float:
        """Record a failed attempt that began at ``started``; returns when the outage began."""
        with self._clock:
            if self._down_since is None or started < self._down_since:
                self._down_since = started
            return min(self._down_since, first_failed)


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

"""The run's metrics log, appends to the other JSON-lines files of a run directory, and the progress line.

Metrics are JSON lines (one record per ``log_every`` steps, plus events) a person can load and plot; the progress
line shows step, loss, jvp_norm, steps/s and ETA. Every access to the store goes through a BoundedWriter: a store
that stops answering fails the run after ``max_outage_s`` with a message naming the URL, never hangs it.
"""

from __future__ import annotations

import json
import math
import sys
import threading
import time
from typing import Any, Optional

import torch

from .checkpoint.upload import BoundedWriter
from .storage import read_bytes


def to_jsonable(stats: dict[str, Any]) -> dict[str, Any]:
    return {k: (v.item() if isinstance(v, torch.Tensor) else v) for k, v in stats.items()}


def _read_text(url: str) -> str:
    try:
        return read_bytes(url).decode()
    except FileNotFoundError:
        return ""


def append_records(url: str, records: list[dict[str, Any]], writer: BoundedWriter) -> None:
    """Append JSON lines to ``url`` (object stores cannot append: read, then write the whole), each access bounded
    by ``writer``. For files written now and then (the jobs ledger, evaluation rows), not per step."""
    text = writer.call(lambda: _read_text(url), url, "read")
    writer.write(url, (text + "".join(json.dumps(to_jsonable(r)) + "\n" for r in records)).encode())


def _kept(line: str, step: int) -> bool:
    record = json.loads(line)
    return "event" in record or record.get("step", 0) <= step


class MetricsLog:
    """The run's ``metrics.jsonl``, written by one process (training rank 0). ``write`` only buffers: a background
    thread uploads the whole file every ``flush_every_s`` through ``writer``, so a slow or frozen store never
    stalls a step and nothing buffered is lost while it is away; once it has been away longer than the writer's
    ``max_outage_s``, the next ``write`` (or ``close``) raises StorageOutage naming the URL.
    ``keep_until(step)`` drops the step records after ``step``: a resumed or rolled-back run trains those steps
    again, and every step keeps exactly one record (events stay: they are the run's history)."""

    def __init__(self, url: str, writer: BoundedWriter, flush_every_s: float = 2.0):
        self.url, self.writer, self.flush_every_s = url, writer, flush_every_s
        self.lines = [line for line in writer.call(lambda: _read_text(url), url, "read").splitlines() if line]
        self._lock, self._dirty, self._closing = threading.Lock(), threading.Event(), threading.Event()
        self._uploading = threading.Lock()   # one upload at a time: the background one, or a flush
        self._error: Optional[BaseException] = None
        self._uploader = threading.Thread(target=self._upload_loop, daemon=True, name="metrics-upload")
        self._uploader.start()

    def write(self, record: dict[str, Any]) -> None:
        self._raise_if_failed()
        with self._lock:
            self.lines.append(json.dumps(to_jsonable(record)))
        self._dirty.set()

    def keep_until(self, step: int) -> None:
        with self._lock:
            self.lines = [line for line in self.lines if _kept(line, step)]
        self._dirty.set()

    def flush(self) -> None:
        """Upload what is buffered now, bounded by the writer. Before a checkpoint: once a step is committed it is
        never trained again, so its record must be up before a crash could lose it."""
        self._raise_if_failed()
        self._upload()
        self._raise_if_failed()

    def close(self, raise_errors: bool = True) -> None:
        """Upload what is buffered (bounded by the writer) and stop; ``raise_errors=False`` on a failure path,
        where the run's own error is the one to report."""
        self._closing.set()
        self._uploader.join()
        self._upload()
        if raise_errors:
            self._raise_if_failed()

    def _upload_loop(self) -> None:
        while self._error is None and not self._closing.wait(self.flush_every_s):
            self._upload()

    def _upload(self) -> None:
        with self._uploading:
            if not self._dirty.is_set() or self._error is not None:
                return
            self._dirty.clear()
            with self._lock:
                data = "".join(line + "\n" for line in self.lines).encode()
            try:
                self.writer.write(self.url, data)
            except Exception as err:   # the training thread raises it at its next write
                self._dirty.set()
                self._error = err

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class ProgressLine:
    """Prints ``step 100/3000 | loss 0.41 | mse 12.3 | jvp_norm 2.3 | 41.2 steps/s | ETA 1m10s`` lines (log-file
    friendly). The rate counts attempted steps (a rollback moves the step back, never the work done), and the ETA
    divides the steps still to go by it."""

    KEYS = ("loss", "mse", "jvp_norm", "grad_norm")

    def __init__(self, total_steps: int, start_attempt: int = 0, stream=sys.stdout):
        self.total, self.stream = total_steps, stream
        self.last_time, self.last_attempt = time.perf_counter(), start_attempt

    def update(self, step: int, attempt: int, stats: dict[str, Any], extra: str = "") -> float:
        now = time.perf_counter()
        rate = (attempt - self.last_attempt) / max(now - self.last_time, 1e-9)
        self.last_time, self.last_attempt = now, attempt
        values = to_jsonable(stats)
        parts = [f"step {step}/{self.total}"]
        parts += [f"{k} {values[k]:.4g}" for k in self.KEYS if k in values]
        parts += [f"{rate:.1f} steps/s", f"ETA {format_duration((self.total - step) / rate if rate else math.inf)}"]
        if extra:
            parts.append(extra)
        if self.stream is not None:   # ranks other than 0 keep time but print nothing
            print(" | ".join(parts), file=self.stream, flush=True)
        return rate

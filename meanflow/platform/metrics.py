"""The run's metrics log, and appends to the other JSON-lines files of a run directory.

Metrics are JSON lines (one record per ``log_every`` steps, plus events) a person can load and plot. Every access
to the store goes through a BoundedWriter: a store that stops answering fails the run after ``max_outage_s`` with
a message naming the URL, never hangs it.
"""

from __future__ import annotations

import json
import threading
from typing import Any

import torch

from .background_upload import PeriodicUpload
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
    upload (``PeriodicUpload``) puts the whole file up every ``flush_every_s`` through ``writer``, so a slow or
    frozen store never stalls a step and nothing buffered is lost while it is away; once it has been away longer
    than the writer's ``max_outage_s``, the next ``write`` (or ``close``) raises StorageOutage naming the URL.
    ``keep_until(step)`` drops the step records after ``step``: a resumed or rolled-back run trains those steps
    again, and every step keeps exactly one record (events stay: they are the run's history)."""

    def __init__(self, url: str, writer: BoundedWriter, flush_every_s: float = 2.0):
        self.url, self.writer = url, writer
        self.lines = [line for line in writer.call(lambda: _read_text(url), url, "read").splitlines() if line]
        self._lock = threading.Lock()
        self._uploads = PeriodicUpload(self._upload, flush_every_s, "metrics-upload", url, writer.longest_call_s)

    def write(self, record: dict[str, Any]) -> None:
        self._uploads.raise_if_failed()
        with self._lock:
            self.lines.append(json.dumps(to_jsonable(record)))
        self._uploads.mark_pending()

    def keep_until(self, step: int) -> None:
        with self._lock:
            self.lines = [line for line in self.lines if _kept(line, step)]
        self._uploads.mark_pending()

    def flush(self) -> None:
        """Upload what is buffered now, bounded by the writer (an upload under way is waited for as long as the
        writer lets it run). Before a checkpoint: once a step is committed it is never trained again, so its record
        must be up before a crash could lose it."""
        self._uploads.flush()

    def close(self, raise_errors: bool = True) -> None:
        """Upload what is buffered (bounded by the writer) and stop; ``raise_errors=False`` on a failure path (a
        store already down past its limit gets one short attempt)."""
        self._uploads.close(raise_errors)

    def _upload(self) -> None:
        with self._lock:
            data = "".join(line + "\n" for line in self.lines).encode()
        self.writer.write(self.url, data)

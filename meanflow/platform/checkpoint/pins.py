"""Pins: steps that retention keeps whatever their age, each with the reason (an evaluation scheduled for it).

Why a module: a pin is taken by one process (training rank 0, when it schedules an evaluation) and released by
another (the evaluation job, possibly after both were requeued), neither of which holds a whole ``CheckpointStore``
(a store's save path is collective). So a pin is a small ``PINNED`` file in the step's directory: it outlives the
processes that took it, and retention sees it in the listing it already makes.
"""

from __future__ import annotations

from typing import Optional

from ..storage import filesystem, join, read_bytes
from .layout import PIN, step_dir
from .retention import remove_if_present
from .upload import BoundedWriter


class Pins:
    """The pins of the store at ``url``; every access bounded by ``writer``."""

    def __init__(self, url: str, writer: BoundedWriter):
        self.url, self.writer = url.rstrip("/"), writer
        self.fs, self.path = filesystem(self.url)

    def _url(self, step: int) -> str:
        return join(self.url, step_dir(step), PIN)

    def pin(self, step: int, reason: str) -> None:
        self.writer.write(self._url(step), reason.encode())

    def unpin(self, step: int) -> None:
        """Release ``step``; releasing a step that is not pinned is no error (a job that ran twice)."""
        path = join(self.path, step_dir(step), PIN)
        self.writer.call(lambda: remove_if_present(self.fs, path), self._url(step), "delete")

    def reason(self, step: int) -> Optional[str]:
        """Why ``step`` is pinned; None when it is not."""
        def read() -> Optional[bytes]:
            try:
                return read_bytes(self._url(step))
            except FileNotFoundError:
                return None

        data = self.writer.call(read, self._url(step), "read")
        return None if data is None else data.decode(errors="replace")

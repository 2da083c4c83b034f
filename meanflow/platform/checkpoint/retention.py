"""Retention: which committed steps a store keeps, and deleting the others.

Why a module: deletion runs in a background thread that dies with the process at any instruction, and a rollback
deletes steps while training runs. So a step is deleted COMMIT first (half deleted, it is uncommitted, never a
damaged "committed" step), and each pass also removes uncommitted step directories older than the step just
committed: a save in flight is always newer than that (one upload in flight, one writer per store), so those are
the leftovers of killed writers and killed passes.
"""

from __future__ import annotations

import threading
import warnings
from typing import Optional

from ..storage import join
from .layout import COMMIT, DAMAGED, Scan, step_dir


def remove_if_present(fs, path: str, recursive: bool = False) -> None:
    """Remove ``path``; one already gone is no error (a deletion killed midway, a job that ran twice)."""
    try:
        fs.rm(path, recursive=recursive)
    except FileNotFoundError:
        pass


def steps_to_keep(commits: dict[int, dict], keep_last: int, keep_every: int, pinned: set[int]) -> set[int]:
    """The last ``keep_last`` committed steps, every ``keep_every``-th step as a milestone, the newest healthy step
    whatever its age (the rollback target of last resort), and the pinned steps."""
    steps = sorted(commits)
    keep = set(steps[-keep_last:]) if keep_last > 0 else set()
    keep |= pinned
    if keep_every:
        keep |= {s for s in steps if s % keep_every == 0}
    healthy = [s for s in steps if commits[s].get("healthy", True)]
    if healthy:
        keep.add(healthy[-1])
    return keep


class Retention:
    """Mixed into ``CheckpointStore``, which provides ``fs``, ``path``, ``keep_last``, ``keep_every``, ``pins``
    and ``scan()``."""

    _pruner: Optional[threading.Thread] = None

    def prune_in_background(self, committed: Optional[int] = None) -> None:
        """Retention never delays training (a slow or frozen store only delays deletions); one pass at a time."""
        if self._pruner is not None and self._pruner.is_alive():
            return
        self._pruner = threading.Thread(target=self._prune_quietly, args=(committed,), daemon=True,
                                        name="checkpoint-prune")
        self._pruner.start()

    def wait_for_pruning(self, timeout_s: float = 60.0) -> bool:
        """Join the running pass for at most ``timeout_s``; True when none is running any more."""
        if self._pruner is not None:
            self._pruner.join(timeout_s)
        return self._pruner is None or not self._pruner.is_alive()

    def _prune_quietly(self, committed: Optional[int]) -> None:
        try:
            self.prune(committed)
        except Exception as err:   # the next commit's pass retries; a failed deletion loses nothing
            warnings.warn(f"checkpoint retention pass failed: {type(err).__name__}: {err}", stacklevel=1)

    def prune(self, committed: Optional[int] = None) -> None:
        """Delete the committed steps that ``steps_to_keep`` does not keep, and the step directories older than
        ``committed`` (the step this writer committed last; default: the newest committed step) that are not
        intact commits: uncommitted or damaged. Pinned steps stay."""
        scan: Scan = self.scan()
        keep = steps_to_keep(scan.committed, self.keep_last, self.keep_every, scan.pinned)
        newest = max(scan.committed, default=-1) if committed is None else committed
        leftovers = {s for s in scan.present - set(scan.committed) if s < newest and s not in scan.pinned}
        for step in sorted(leftovers | (set(scan.committed) - keep)):
            self._delete_step(step)

    def discard_after(self, step: int) -> None:
        """Delete committed steps newer than ``step`` (a rollback abandoned them). A pinned one (an evaluation
        reads it) only loses its COMMIT: it must never be resumed, and training will save that step anew; its
        files go once it is unpinned. A pass still running first gets its time: it listed the store before the
        rollback, so it must not see the saves that follow it."""
        self.wait_for_pruning()
        scan: Scan = self.scan()
        for newer in [s for s in scan.committed if s > step]:
            self._delete_step(newer, keep_files=newer in scan.pinned)

    def _delete_step(self, step: int, keep_files: bool = False) -> None:
        """The records first (COMMIT, DAMAGED), so a half-deleted step is never taken for committed or damaged; a
        part already gone is no error."""
        directory = join(self.path, step_dir(step))
        for record in (COMMIT, DAMAGED):
            remove_if_present(self.fs, join(directory, record))
        if not keep_files:
            remove_if_present(self.fs, directory, recursive=True)

    def pin(self, step: int, reason: str) -> None:
        """Protect a step from retention (an evaluation scheduled for it) until ``unpin``."""
        self.pins.pin(step, reason)

    def unpin(self, step: int) -> None:
        self.pins.unpin(step)

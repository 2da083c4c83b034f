"""Kill points of the save path, for fault drills.

Why a module of its own: the drills (a writer SIGKILLed between two files, a store frozen mid-upload) must strike
at exact, named places of the real save path, and that hook must stay a no-op costing one dict lookup otherwise.
"""

from __future__ import annotations

import os
import signal
from typing import Any, Callable

KILL_POINT_ENV = "MEANFLOW_CHECKPOINT_KILL_AT"
FAULT_HOOKS: dict[str, Callable[[], Any]] = {}
_visits: dict[str, int] = {}


def arm_fault_hook(visit: str, action: Callable[[], Any]) -> None:
    """In-process fault tests: run ``action`` at ``"<point>@<n>"`` (e.g. freeze the object store mid-save),
    counting visits from now."""
    _visits.clear()
    FAULT_HOOKS[visit] = action


def disarm_fault_hooks() -> None:
    FAULT_HOOKS.clear()
    _visits.clear()


def fault_point(name: str) -> None:
    """Named points of the save path where fault tests strike: ``MEANFLOW_CHECKPOINT_KILL_AT=<name>@<n>`` kills
    this process (SIGKILL: no cleanup, no flush) the n-th time the point is reached; ``FAULT_HOOKS`` runs a
    registered callable there. A no-op otherwise."""
    wanted = os.environ.get(KILL_POINT_ENV)
    if not wanted and not FAULT_HOOKS:
        return
    _visits[name] = _visits.get(name, 0) + 1
    visit = f"{name}@{_visits[name]}"
    if wanted == visit:
        os.kill(os.getpid(), signal.SIGKILL)
    if visit in FAULT_HOOKS:
        FAULT_HOOKS.pop(visit)()

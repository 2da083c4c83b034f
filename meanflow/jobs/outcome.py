"""Exit codes, the one mapping for the submit CLI and for what runs inside a job: 0 done; 1 training failed
(``failed: ...``); 2 bad input, a config key, file, URL or flag (``error: ...``). Anything else raises, so that a
bug shows its trace.

Light on purpose: a job unpickles its callable (and so imports this) before torch loads.
"""

from __future__ import annotations

import sys
from typing import Callable

from meanflow.platform.config import ConfigError
from meanflow.platform.storage import UnusableURL


class TrainingFailed(RuntimeError):
    """Training stopped for a reason the user must read (the guard gave up, no checkpoint verifies, storage stayed
    unreachable): exit code 1."""


def _failure_types() -> tuple[type[BaseException], ...]:
    # imported only once a RuntimeError is in hand: the engines module loads torch
    from meanflow.platform.checkpoint.upload import StorageOutage
    from meanflow.platform.engines.jvp_smoke import EngineJVPError

    return TrainingFailed, EngineJVPError, StorageOutage


def exit_status(fn: Callable[[], int | None]) -> tuple[int, str]:
    """Run ``fn``: (its exit code, None meaning 0, and no message), or the code and message of a failure the user
    must read."""
    try:
        return fn() or 0, ""
    except (ConfigError, UnusableURL, FileNotFoundError) as err:
        return 2, f"error: {err}"
    except RuntimeError as err:
        if not isinstance(err, _failure_types()):
            raise
        return 1, f"failed: {err}"


def run_command(fn: Callable, args) -> int:
    """A CLI command ``fn(args) -> exit code``: the message of a failure goes to stderr, its code is returned."""
    code, message = exit_status(lambda: fn(args))
    if message:
        print(message, file=sys.stderr)
    return code


def job_result(fn: Callable[[], None]) -> dict:
    """What a job callable returns (pickled back to the submitting command, which prints the message)."""
    code, message = exit_status(fn)
    return {"exit_code": code, "message": message}

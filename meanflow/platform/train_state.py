"""The trainer's counters, saved in every checkpoint's ``train_state.pt`` and read back on resume."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path


def git_sha() -> str | None:
    """The code's commit, recorded in every checkpoint (None outside a git checkout)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


@dataclass
class TrainState:
    step: int = 0
    """Optimizer steps taken (applied or skipped); a rollback sets it back."""
    attempt: int = 0
    """Training steps attempted, repeats after a rollback included (fault injection and the guard count these)."""
    cooldown_until: int = -1
    """Attempts up to this one train at guard.cooldown_factor × the scheduled LR (after a rollback)."""
    unhealthy_since_save: bool = False
    """A detector fired since the last checkpoint: the next one is committed with healthy=false."""
    saved_step: int | None = None
    """The newest step committed in the store by this run (none yet: None)."""
    git_sha: str | None = None
    """The code's commit when this state was saved."""

    def state_dict(self) -> dict:
        """What a checkpoint keeps. The health and the saved step are not kept: a resumed run reads them from the
        commit it resumes from."""
        return {"step": self.step, "attempt": self.attempt, "cooldown_until": self.cooldown_until,
                "git_sha": self.git_sha}

    def load_state_dict(self, state: dict, healthy: bool = True) -> None:
        """The counters of the checkpoint committed at ``state["step"]`` (with its ``healthy`` flag). The code's
        commit stays this process's. Checkpoints older than attempts counted them as steps."""
        self.step = self.saved_step = state["step"]
        self.attempt = state.get("attempt", self.step)
        self.cooldown_until = state.get("cooldown_until", -1)
        self.unhealthy_since_save = not healthy

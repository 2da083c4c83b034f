"""Names of a checkpoint store on storage, the verdict on one step directory, and what one listing of them says.

Why a module: the store (which writes, reads and judges steps) and retention (which deletes them) must agree on
these names and verdicts, and neither should import the other.
"""

from __future__ import annotations

import json
import re
from typing import NamedTuple, Optional

STEP_DIR = re.compile(r"step-(\d{8})$")
COMMIT = "COMMIT.json"
DAMAGED = "DAMAGED.json"   # a damaged step's COMMIT record once set aside, with what is wrong
PIN = "PINNED"


def step_dir(step: int) -> str:
    return f"step-{step:08d}"


def parse_commit(data: bytes) -> Optional[dict]:
    """The COMMIT record, or None when ``data`` is not one (empty, truncated, not this store's record)."""
    try:
        commit = json.loads(data)
    except ValueError:   # JSONDecodeError, UnicodeDecodeError
        return None
    if not (isinstance(commit, dict) and "format" in commit and isinstance(commit.get("files"), dict)):
        return None
    if not all(isinstance(meta, dict) and {"bytes", "sha256"} <= meta.keys() for meta in commit["files"].values()):
        return None
    return commit


def size_damage(commit: dict, sizes: dict[str, int], shown: int = 3) -> Optional[str]:
    """What differs between the files COMMIT lists and those present (name -> bytes); None when nothing does."""
    damage = [f"{name} missing" if name not in sizes else f"{name}: {sizes[name]} bytes, {COMMIT} says {meta['bytes']}"
              for name, meta in commit["files"].items() if sizes.get(name) != meta["bytes"]]
    if len(damage) > shown:   # a sharded engine's step can list thousands of files
        damage = [*damage[:shown], f"{len(damage) - shown} more"]
    return "; ".join(damage) or None


class Verdict(NamedTuple):
    """The one verdict on a step directory: an intact commit (``commit``: its record), a damaged one (``damage``
    says what is wrong; ``set_aside`` once its record has become DAMAGED.json), or neither: uncommitted (a save in
    flight, or what a killed writer or deleter left)."""
    commit: Optional[dict] = None
    damage: Optional[str] = None
    set_aside: bool = False

    @property
    def intact(self) -> bool:
        return self.commit is not None


class Scan(NamedTuple):
    """One listing of a store: the verdict on every step directory present, and the ``pinned`` steps."""
    verdicts: dict[int, Verdict]
    pinned: set[int]

    @property
    def committed(self) -> dict[int, dict]:
        """Intact commits and their COMMIT records, sorted by step."""
        return {s: v.commit for s, v in sorted(self.verdicts.items()) if v.intact}

    @property
    def present(self) -> set[int]:
        """Every step directory, committed or not."""
        return set(self.verdicts)

    @property
    def damaged(self) -> dict[int, Verdict]:
        return {s: v for s, v in sorted(self.verdicts.items()) if v.damage}

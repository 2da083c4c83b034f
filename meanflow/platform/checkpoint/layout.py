"""Names of a checkpoint store on storage, and what one listing of it says.

Why a module: the store (which writes and reads steps) and retention (which deletes them) must agree on these
names, and neither should import the other.
"""

from __future__ import annotations

import re
from typing import NamedTuple

STEP_DIR = re.compile(r"step-(\d{8})$")
COMMIT = "COMMIT.json"
PIN = "PINNED"


def step_dir(step: int) -> str:
    return f"step-{step:08d}"


class Scan(NamedTuple):
    """One listing of a store: ``committed`` steps with their COMMIT records (sorted by step), every step directory
    ``present`` (committed or not: a save in flight, or what a killed writer or deleter left), and ``pinned``."""
    committed: dict[int, dict]
    present: set[int]
    pinned: set[int]

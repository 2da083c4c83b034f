"""Checkpoints: a store of committed steps under any fsspec URL (``store``), bounded uploads (``upload``),
retention (``retention``) and the pins that hold steps back from it (``pins``), the names on storage and the
verdict on a step (``layout``), and the kill points of fault drills (``faults``).

Why a package: the save path's parts fail differently (a writer killed mid-save, a frozen store, a deleter killed at
exit) and each is easier to reason about alone. ``from meanflow.platform.checkpoint import CheckpointStore`` and
``checkpoint.arm_fault_hook(...)`` keep working: the public names are re-exported here.
"""

from .faults import FAULT_HOOKS, KILL_POINT_ENV, arm_fault_hook, disarm_fault_hooks, fault_point
from .layout import COMMIT, DAMAGED, PIN, STEP_DIR, Verdict
from .pins import Pins
from .retention import steps_to_keep
from .store import CheckpointDamaged, CheckpointError, CheckpointStore
from .upload import BoundedWriter, OneInFlight, StorageOutage, call_with_timeout

__all__ = ["COMMIT", "DAMAGED", "FAULT_HOOKS", "KILL_POINT_ENV", "PIN", "STEP_DIR", "BoundedWriter",
           "CheckpointDamaged", "CheckpointError", "CheckpointStore", "OneInFlight", "Pins", "StorageOutage",
           "Verdict", "arm_fault_hook", "call_with_timeout", "disarm_fault_hooks", "fault_point", "steps_to_keep"]

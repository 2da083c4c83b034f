"""Checkpoints: a store of committed steps under any fsspec URL (``store``), bounded uploads (``upload``),
retention (``retention``), the names on storage (``layout``) and the kill points of fault drills (``faults``).

Why a package: the save path's parts fail differently (a writer killed mid-save, a frozen store, a deleter killed at
exit) and each is easier to reason about alone. ``from meanflow.platform.checkpoint import CheckpointStore`` and
``checkpoint.arm_fault_hook(...)`` keep working: the public names are re-exported here.
"""

from .faults import FAULT_HOOKS, KILL_POINT_ENV, arm_fault_hook, disarm_fault_hooks, fault_point
from .layout import COMMIT, PIN, STEP_DIR
from .retention import steps_to_keep
from .store import CheckpointError, CheckpointStore
from .upload import BoundedWriter, OneInFlight, StorageOutage, call_with_timeout

__all__ = ["COMMIT", "FAULT_HOOKS", "KILL_POINT_ENV", "PIN", "STEP_DIR", "BoundedWriter", "CheckpointError",
           "CheckpointStore", "OneInFlight", "StorageOutage", "arm_fault_hook", "call_with_timeout",
           "disarm_fault_hooks", "fault_point", "steps_to_keep"]

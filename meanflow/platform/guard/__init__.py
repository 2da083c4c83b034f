"""The training guard: ``detect`` decides from one step's rank-reduced stats (apply | skip | rollback | fail),
``respond`` carries the decision out (LR cool-down, skip, rollback), ``rollback`` finds and restores the newest
healthy state, ``inject`` scales chosen steps' losses for fault drills."""

from .detect import Decision, Guard
from .inject import FaultInjector, build_fault_injector
from .respond import Recovery, Response
from .rollback import RollbackTargets

__all__ = ["Decision", "FaultInjector", "Guard", "Recovery", "Response", "RollbackTargets", "build_fault_injector"]

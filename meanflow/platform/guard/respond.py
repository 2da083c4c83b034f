"""What the trainer does about a guard decision: apply (at the cool-down's LR factor), skip, roll back, or fail.

``Recovery.respond(decision, state)`` carries out the decision on everything but the optimizer step (which the
trainer takes with the returned LR factor) and returns a ``Response``: the action, the LR factor, and the event
record and log line the trainer writes. It never logs and never raises. It updates the ``TrainState`` counters:
the attempt, the step (a skip moves on, a rollback moves back), the cool-down window, and the health of the
state since the last save. It also times the in-memory snapshots (``step_applied``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from meanflow.platform.distributed import barrier
from meanflow.platform.train_state import TrainState

from .detect import Decision
from .rollback import RollbackTargets


@dataclass
class Response:
    action: str                                    # apply | skip | rollback | fail
    lr_scale: float = 1.0                          # apply: the factor on the scheduled LR (the cool-down)
    event: dict = field(default_factory=dict)      # skip | rollback | fail: the metrics record to write
    message: str = ""                              # rollback | fail: what to tell the user


class Recovery:
    """``guard_cfg``: the guard section (snapshot_every, skip_batches, cooldown_*). ``global_batch``: samples per
    step, to count what a rollback's jump over the data skips. ``is_main``: this rank deletes abandoned
    checkpoints."""

    def __init__(self, guard_cfg, targets: RollbackTargets, global_batch: int, is_main: bool):
        self.cfg, self.targets = guard_cfg, targets
        self.global_batch, self.is_main = global_batch, is_main

    def respond(self, decision: Decision, state: TrainState) -> Response:
        state.attempt += 1
        if decision.action == "apply":
            in_cooldown = state.attempt <= state.cooldown_until
            return Response("apply", lr_scale=self.cfg.cooldown_factor if in_cooldown else 1.0)
        state.unhealthy_since_save = True
        event = {"event": decision.action, "step": state.step, "detector": decision.detector, **decision.values,
                 "data_batches": self.targets.stream.state_dict().get("batches")}
        if decision.action == "skip":
            state.step += 1
            return Response("skip", event=event)
        if decision.action == "rollback":
            return self._roll_back(event, state)
        return Response("fail", event=event, message=f"guard: {decision.describe(state.step)}")

    def start(self, step: int) -> None:
        """A rollback target before the first periodic snapshot (none when the guard is off)."""
        if self.cfg.enabled:
            self.targets.take_snapshot(step)

    def step_applied(self, step: int) -> None:
        """After an applied step: take the periodic in-memory snapshot (a rollback target)."""
        if self.cfg.enabled and self.cfg.snapshot_every and step % self.cfg.snapshot_every == 0:
            self.targets.take_snapshot(step)

    def _roll_back(self, event: dict, state: TrainState) -> Response:
        """Every rank restores the same healthy state (rank 0 chooses it), then the data stream jumps past the
        offending window: at least ``guard.skip_batches`` batches, and never back onto batches already read."""
        stream, store = self.targets.stream, self.targets.store
        store.wait()                                          # no commit lands while the target is chosen
        consumed = stream.state_dict()["batches"]
        target, source = self.targets.restore()
        if target < 0:
            detector = event["detector"] + ", nothing to roll back to"
            return Response("fail", event={**event, "event": "fail", "detector": detector},
                            message=f"guard: step {state.step}: {event['detector']} and no healthy state to roll "
                                    "back to")
        batches = max(self.cfg.skip_batches, consumed - stream.state_dict()["batches"])
        stream.skip(batches * self.global_batch)
        committed = target in store.steps()                  # a committed step is never saved again (immutable)
        if self.is_main:   # the abandoned trajectory's checkpoints must not be resumed
            store.discard_after(target)
        barrier()
        state.cooldown_until = state.attempt + self.cfg.cooldown_steps
        message = (f"guard: rollback at step {state.step} ({event['detector']}) to step {target} from {source}; "
                   f"data stream jumped {batches} batches")
        event = {**event, "rollback_to": target, "source": source, "skipped_samples": batches * self.global_batch,
                 "data_batches_after": stream.state_dict()["batches"]}
        state.step = target
        state.saved_step = target if committed else None
        return Response("rollback", event=event, message=message)

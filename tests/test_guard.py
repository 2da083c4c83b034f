"""The training guard: its decisions (pure), and the real training loop under injected faults."""

from __future__ import annotations

import json
import math

import pytest
from omegaconf import OmegaConf

from distributed_run import losses, run_world
from meanflow.jobs.train import Trainer, TrainingFailed
from meanflow.platform.config import ConfigError, GuardConfig, load_config
from meanflow.platform.guard import Guard

pytestmark = pytest.mark.timeout(240)


def guard(**overrides) -> Guard:
    return Guard(OmegaConf.merge(OmegaConf.structured(GuardConfig), overrides))


def warm(g: Guard, n: int = 30) -> None:
    for i in range(n):
        assert g.decide(i, {"loss": 1.0 + 0.01 * (i % 3), "grad_norm": 2.0 + 0.02 * (i % 5)}).action == "apply"


# ------------------------------------------------------------------------------------------------ decisions
def test_nonfinite_values_roll_back_even_during_warmup():
    assert guard().decide(0, {"loss": 1.0, "grad_norm": math.nan}).detector == "nonfinite:grad_norm"
    assert guard().decide(0, {"loss": math.inf, "jvp_norm": 1.0}).action == "rollback"


def test_a_spike_is_skipped_after_warmup_only():
    g = guard(warmup=20)
    assert g.decide(0, {"loss": 1.0}).action == "apply"
    assert g.decide(1, {"loss": 100.0}).action == "apply"          # still warming up: no statistics yet
    g = guard()
    warm(g)
    decision = g.decide(30, {"loss": 100.0, "grad_norm": 2.0})
    assert (decision.action, decision.detector) == ("skip", "zscore:loss")


def test_a_regime_change_in_a_norm_is_not_a_spike():
    """The end of LR warm-up on the README run (tiny_imf): grad_norm, ~0.35–1 for a window, moves to 2–5 within a
    few steps. On a linear scale that scored 6.5σ and rolled back a healthy run; norms are z-scored as logs."""
    g = guard()
    quiet = [0.35 + 0.65 * (0.5 + 0.5 * math.sin(1.7 * i)) for i in range(128)]
    for i, v in enumerate(quiet):
        assert g.decide(i, {"grad_norm": v}).action == "apply"
    rising = [g.decide(128 + i, {"grad_norm": v}) for i, v in enumerate([1.4, 2.0, 2.7, 3.1, 3.8, 4.6, 4.4])]
    assert [d.action for d in rising] == ["apply"] * 7
    # a real spike still fires: 100× the window
    assert g.decide(135, {"grad_norm": 100 * quiet[-1]}).detector == "zscore:grad_norm"


def test_a_change_of_branch_restarts_the_windows_instead_of_reading_the_jump_as_a_spike():
    """α-Flow's switch to α = 0 lifts the weighted loss from ~0.75 to ~1 for good: with the objective's ``branch``
    changing, the guard starts new windows; the same jump without a branch change is a spike."""
    for branch_changes, expected in ((True, "apply"), (False, "skip")):
        g = guard()
        for i in range(128):
            g.decide(i, {"loss": 0.75 + 0.001 * math.sin(i), "branch": 1.0})
        assert g.decide(128, {"loss": 1.0, "branch": 2.0 if branch_changes else 1.0}).action == expected
    assert g.state_dict()["phase"] == 1.0


def test_a_slow_ramp_is_caught_by_the_lagged_maximum():
    """3% growth per step with 20% noise: the z-score adapts to it; ratio against the maximum older than the
    window (128) fires once the ramp has grown 10× over a window."""
    g = guard(z_threshold=0.0, ratio=10.0, ratio_warmup=200)
    noise = [1.0 + 0.2 * math.sin(7.3 * i) for i in range(600)]
    decisions = [g.decide(i, {"grad_norm": (1.03 ** max(i - 200, 0)) * noise[i]}) for i in range(600)]
    fired = [i for i, d in enumerate(decisions) if d.action != "apply"]
    # flat until 200, then +3%/step: 10× over the window (128 steps) after ~80 steps of ramp
    assert fired and decisions[fired[0]].detector == "ratio:grad_norm" and 200 < fired[0] < 450


def test_repeated_skips_roll_back_and_repeated_rollbacks_fail():
    g = guard(max_skips=3, skip_window=10, max_rollbacks=2, rollback_window=100)
    warm(g)
    actions = [g.decide(30 + i, {"loss": 1e3, "grad_norm": 2.0}).action for i in range(3)]
    assert actions == ["skip", "skip", "rollback"]
    assert g.decide(40, {"loss": math.nan}).action == "rollback"
    final = g.decide(41, {"loss": math.nan})
    assert final.action == "fail" and "after 2 rollbacks in 100 steps" in final.detector


def test_only_reported_stats_are_watched():
    g = guard()
    warm(g)
    assert g.decide(30, {"loss": 1.0, "grad_norm": 2.0}).action == "apply"   # fm: no jvp_norm, no error


def test_injection_is_refused_unless_allowed():
    with pytest.raises(ConfigError, match="guard.inject"):
        load_config("toy2d_mf", ["guard.inject.kind=jvp_nan"])


# ------------------------------------------------------------------------------------------------ training loop
def toy(run_dir, *extra) -> list[str]:
    return [f"run.run_dir={run_dir}", "run.steps=60", "run.log_every=1", "eval.num_samples=64",
            "checkpoint.every=0", "guard.snapshot_every=10", "guard.skip_batches=4", "guard.allow_inject=true",
            *extra]


def events(run_dir, kind: str) -> list[dict]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r.get("event") == kind]


def test_nan_in_the_jvp_rolls_back_once_and_training_finishes(tmp_path):
    trainer = Trainer(load_config("toy2d_mf", toy(tmp_path, "guard.inject.kind=jvp_nan", "guard.inject.start=35")))
    trainer.run()
    [rollback] = events(tmp_path, "rollback")
    assert rollback["step"] == 35 and rollback["rollback_to"] == 30 and rollback["source"] == "snapshot"
    # The stream had read batches 0..35; it jumps max(4, 36 − 30) batches from the snapshot's position: nothing
    # already read (the offending batch included) is read again.
    assert rollback["detector"].startswith("nonfinite:") and rollback["skipped_samples"] == 6 * 256
    assert rollback["data_batches"] == 36 and rollback["data_batches_after"] == 36
    assert trainer.step == 60 and math.isfinite(losses(tmp_path)[-1])
    assert not events(tmp_path, "skip")
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    # steps 31–34 of the abandoned trajectory were trained again: their first records are gone
    assert [r["step"] for r in records if "event" not in r] == list(range(1, 61))


def test_a_single_spike_is_skipped_without_rollback(tmp_path):
    trainer = Trainer(load_config("toy2d_mf", toy(tmp_path, "guard.inject.kind=loss_spike", "guard.inject.start=40",
                                                  "checkpoint.every=10", "checkpoint.keep_last=10")))
    trainer.run()
    [skip] = events(tmp_path, "skip")
    assert skip["step"] == 40 and skip["detector"].startswith(("zscore:", "ratio:"))
    assert not events(tmp_path, "rollback")
    healthy = {step: c["healthy"] for step, c in trainer.store.commits().items()}
    assert healthy == {10: True, 20: True, 30: True, 40: True, 50: False, 60: True}   # 50: a detector fired


def test_repeated_spikes_roll_back(tmp_path):
    Trainer(load_config("toy2d_mf", toy(tmp_path, "guard.inject.kind=loss_spike", "guard.inject.start=40",
                                        "guard.inject.count=3"))).run()
    assert len(events(tmp_path, "skip")) == 2
    [rollback] = events(tmp_path, "rollback")
    assert rollback["detector"].startswith("repeated_skips")


def test_persistent_nan_fails_with_the_detector_step_and_values(tmp_path):
    cfg = load_config("toy2d_mf", toy(tmp_path, "guard.inject.kind=jvp_nan", "guard.inject.start=25",
                                      "guard.inject.count=1000000"))
    with pytest.raises(TrainingFailed, match=r"guard: step \d+: fail \(nonfinite:loss, after 3 rollbacks"):
        Trainer(cfg).run()
    assert len(events(tmp_path, "rollback")) == 3 and len(events(tmp_path, "fail")) == 1
    assert not (tmp_path / "checkpoints").exists() or not list((tmp_path / "checkpoints").glob("step-*"))


def test_the_same_injection_gives_the_same_losses(tmp_path):
    for run in ("a", "b"):
        Trainer(load_config("toy2d_mf", toy(tmp_path / run, "guard.inject.kind=jvp_nan",
                                            "guard.inject.start=35"))).run()
    assert losses(tmp_path / "a") == losses(tmp_path / "b")


def test_rollback_targets_skip_unhealthy_and_uncommitted_checkpoints(tmp_path):
    trainer = Trainer(load_config("toy2d_mf", toy(tmp_path, "run.steps=1")))
    store = trainer.store
    for step, healthy in ((10, True), (20, True), (30, False)):
        store.save(step, trainer.engine, {"step": step, "rng": []}, {"data": trainer.stream.state_dict()},
                   healthy=healthy)
    (tmp_path / "checkpoints" / "step-00000040").mkdir()                 # a save that never committed
    (tmp_path / "checkpoints" / "step-00000040" / "model.pt").write_bytes(b"partial")
    trainer.targets.snapshot = None
    assert trainer.targets.newest_healthy_commit() == 20
    assert trainer.targets.restore()[0] == 20


def test_two_ranks_roll_back_together_and_match_one_process(tmp_path):
    run_world(2, "toy2d_mf", toy(tmp_path / "ddp", "engine.kind=ddp", "guard.inject.kind=jvp_nan",
                                 "guard.inject.start=35"))
    Trainer(load_config("toy2d_mf", toy(tmp_path / "one", "guard.inject.kind=jvp_nan",
                                        "guard.inject.start=35"))).run()
    assert len(events(tmp_path / "ddp", "rollback")) == 1
    import torch
    torch.testing.assert_close(losses(tmp_path / "ddp"), losses(tmp_path / "one"), rtol=1e-5, atol=1e-6)


def test_resume_carries_the_guard_state(tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    inject = ["guard.inject.kind=loss_spike", "guard.inject.start=45", "checkpoint.every=30"]
    Trainer(load_config("toy2d_mf", toy(straight, *inject))).run()
    Trainer(load_config("toy2d_mf", [*toy(split, *inject), "run.steps=30"])).run()
    Trainer(load_config("toy2d_mf", toy(split, *inject))).run()     # resumes at 30 with the guard's windows
    assert losses(split)[30:] == losses(straight)[30:] and events(split, "skip") == events(straight, "skip")


def test_sharded_engine_rolls_back_to_a_committed_checkpoint_like_a_snapshot(tmp_path):
    """fsdp2 keeps no in-memory snapshot: it restores the healthy commit at step 30, agreed by both ranks, and
    lands exactly where the single process does from its snapshot at 30."""
    inject = ["guard.inject.kind=jvp_nan", "guard.inject.start=35", "checkpoint.every=10", "checkpoint.keep_last=10"]
    run_world(2, "toy2d_mf", toy(tmp_path / "fsdp2", "engine.kind=fsdp2", *inject))
    Trainer(load_config("toy2d_mf", toy(tmp_path / "one", *inject))).run()
    [rollback] = events(tmp_path / "fsdp2", "rollback")
    assert rollback["rollback_to"] == 30 and rollback["source"].startswith("checkpoint")
    import torch
    torch.testing.assert_close(losses(tmp_path / "fsdp2"), losses(tmp_path / "one"), rtol=1e-5, atol=1e-6)


def test_a_rollback_discards_the_abandoned_checkpoints(tmp_path):
    trainer = Trainer(load_config("toy2d_mf", toy(tmp_path, "run.steps=1")))
    for step in (10, 20, 30):
        trainer.store.save(step, trainer.engine, {"step": step, "rng": []}, {"data": {}})
    trainer.store.discard_after(15)
    assert trainer.store.steps() == [10]


def test_a_rollback_uncommits_an_abandoned_step_an_evaluation_holds(tmp_path):
    """A pinned step of the abandoned trajectory keeps its files for its reader, but is no longer committed: it is
    never resumed, and training saves that step anew when it gets there."""
    trainer = Trainer(load_config("toy2d_mf", toy(tmp_path, "run.steps=1")))
    for step in (10, 20):
        trainer.store.save(step, trainer.engine, {"step": step, "rng": []}, {"data": {}})
    trainer.store.pin(20, "evaluation")
    trainer.store.discard_after(15)
    assert trainer.store.steps() == [10] and (tmp_path / "checkpoints" / "step-00000020" / "model.pt").exists()
    trainer.store.save(20, trainer.engine, {"step": 20, "rng": []}, {"data": {}})
    assert trainer.store.steps() == [10, 20]


# ------------------------------------------------------------------------------------------------ recovery, unit
class CountingStream:
    """A data stream reduced to its position: global batches read."""

    def __init__(self, global_batch: int):
        self.global_batch, self.batches = global_batch, 0

    def next_batch(self):
        self.batches += 1

    def skip(self, n_samples: int) -> None:
        self.batches += n_samples // self.global_batch

    def state_dict(self) -> dict:
        return {"batches": self.batches}

    def load_state_dict(self, state: dict) -> None:
        self.batches = state["batches"]


class ScalarEngine:
    """An engine reduced to one parameter tensor."""

    checkpoint_format = "torch"

    def __init__(self):
        import torch
        self.weight = torch.zeros(())

    def state_dict(self) -> dict:
        return {"model": {"weight": self.weight}}

    def load_state_dict(self, state: dict) -> None:
        self.weight = state["model"]["weight"].clone()


def recovery_for(tmp_path, **guard_overrides):
    from meanflow.platform.checkpoint import CheckpointStore
    from meanflow.platform.guard import Recovery, RollbackTargets

    cfg = OmegaConf.merge(OmegaConf.structured(GuardConfig), guard_overrides)
    engine, stream = ScalarEngine(), CountingStream(global_batch=8)
    targets = RollbackTargets(engine, stream, CheckpointStore(str(tmp_path / "checkpoints")))
    return Recovery(cfg, targets, global_batch=8, is_main=True), engine, stream


def take_steps(recovery, engine, stream, state, n: int) -> list[float]:
    """n healthy steps as the trainer takes them; returns the LR factors the recovery gave."""
    from meanflow.platform.guard import Decision

    factors = []
    for _ in range(n):
        stream.next_batch()
        response = recovery.respond(Decision("apply"), state)
        factors.append(response.lr_scale)
        engine.weight = engine.weight + 1
        state.step += 1
        recovery.step_applied(state.step)
    return factors


def test_a_rollback_restores_the_snapshot_and_jumps_the_stream(tmp_path):
    from meanflow.platform.guard import Decision
    from meanflow.platform.train_state import TrainState

    recovery, engine, stream = recovery_for(tmp_path, snapshot_every=10, skip_batches=2)
    state = TrainState()
    recovery.start(0)
    take_steps(recovery, engine, stream, state, 13)                 # snapshot at step 10 (weight 10, 10 batches)
    stream.next_batch()                                             # the offending step's batch: 14 read
    response = recovery.respond(Decision("rollback", "nonfinite:loss", {"loss": math.nan}), state)
    assert response.action == "rollback" and response.event["rollback_to"] == 10
    assert (state.step, state.attempt, engine.weight.item()) == (10, 14, 10.0)
    # from the snapshot's position (10) the stream jumps max(skip_batches = 2, 14 − 10 read since) batches: no batch
    # already read is read again
    assert stream.batches == 14 and response.event["skipped_samples"] == 4 * 8
    assert state.unhealthy_since_save and state.saved_step is None   # step 10 was never committed


def test_the_cooldown_scales_the_lr_for_its_attempts_after_a_rollback(tmp_path):
    from meanflow.platform.guard import Decision
    from meanflow.platform.train_state import TrainState

    recovery, engine, stream = recovery_for(tmp_path, snapshot_every=5, cooldown_steps=3, cooldown_factor=0.1)
    state = TrainState()
    recovery.start(0)
    assert take_steps(recovery, engine, stream, state, 7) == [1.0] * 7
    recovery.respond(Decision("rollback", "nonfinite:loss"), state)
    assert take_steps(recovery, engine, stream, state, 5) == [0.1, 0.1, 0.1, 1.0, 1.0]


def test_a_non_finite_loss_stops_the_step_before_the_optimizer(tmp_path):
    """torchtitan's invalid-loss test: one ``train_step`` with a fake objective and engine."""
    import torch

    class NaNObjective:
        def __call__(self, model, batch, step, ctx):
            return torch.tensor(math.nan, requires_grad=True), {"loss": torch.tensor(math.nan)}

    class RecordingEngine:
        name, model, ema_model, calls = "fake", None, None, []

        def autocast(self):
            import contextlib
            return contextlib.nullcontext()

        def backward(self, loss, sync=True):
            self.calls.append("backward")
            return torch.tensor(1.0)

        def apply(self, step, lr_scale=1.0):
            self.calls.append("apply")

        def skip(self):
            self.calls.append("skip")

    trainer = Trainer(load_config("toy2d_mf", toy(tmp_path, "run.steps=1", "guard.snapshot_every=0")))
    trainer.objective, trainer.engine = NaNObjective(), RecordingEngine()
    trainer.targets.engine = trainer.engine
    with pytest.raises(TrainingFailed, match="no healthy state to roll back to"):
        trainer.train_step(trainer.stream.next_batch())
    assert trainer.engine.calls == ["backward", "skip"] and trainer.step == 0
    trainer.metrics.close()   # run() would: the records are uploaded in the background
    assert events(tmp_path, "fail")[0]["detector"] == "nonfinite:loss, nothing to roll back to"


def test_a_rollback_to_a_committed_step_never_rewrites_it(tmp_path):
    """Snapshots and checkpoints both every 10 steps: spikes at 40, 41, 42 roll back to the snapshot of step 40,
    which is also committed (healthy). Training on must not save step 40 again (as unhealthy)."""
    trainer = Trainer(load_config("toy2d_mf", toy(tmp_path, "guard.inject.kind=loss_spike", "guard.inject.start=40",
                                                  "guard.inject.count=3", "checkpoint.every=10",
                                                  "checkpoint.keep_last=10")))
    commit_40 = tmp_path / "checkpoints" / "step-00000040" / "COMMIT.json"
    trainer.run()
    [rollback] = events(tmp_path, "rollback")
    assert rollback["rollback_to"] == 40 and rollback["source"] == "snapshot"
    assert [e["step"] for e in events(tmp_path, "checkpoint")] == [10, 20, 30, 40, 50, 60]
    assert json.loads(commit_40.read_text())["healthy"] is True

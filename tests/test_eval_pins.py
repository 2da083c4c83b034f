"""Pins: a step an evaluation is scheduled for outlives retention until that evaluation has written its metrics or
failed, across store objects (a requeued job, another process); ``status`` shows the pins and why an evaluation
failed. The held evaluation is a ``debug`` submission: submitit runs it only when its result is asked for."""

from __future__ import annotations

import argparse
import io
from types import SimpleNamespace

import pytest

from meanflow.jobs import status
from meanflow.jobs.cluster import read_ledger
from meanflow.jobs.job_callables import EvalScheduler
from meanflow.jobs.train import Trainer
from meanflow.platform.checkpoint import CheckpointStore
from meanflow.platform.config import load_config

pytestmark = pytest.mark.timeout(240)


def overrides(run_dir) -> list[str]:
    return [f"run.run_dir={run_dir}", "run.steps=12", "run.log_every=4", "checkpoint.every=2",
            "checkpoint.keep_last=1", "eval.every=4", "eval.at_end=false", "eval.num_samples=64",
            "data.global_batch=32", f"cluster.log_dir={run_dir}/logs"]


@pytest.fixture(scope="module")
def held_run(tmp_path_factory):
    """Training to 12 with evaluations scheduled at 4 and 8, both still waiting in the queue when it ends."""
    run_dir = tmp_path_factory.mktemp("held")
    cfg = load_config("toy2d_mf", overrides(run_dir))
    scheduler, jobs = EvalScheduler(cfg, "debug"), {}
    Trainer(cfg, stdout=io.StringIO(), on_commit=lambda step, store: jobs.update({step: scheduler(step, store)})
            ).run()
    store = CheckpointStore(str(run_dir / "checkpoints"), keep_last=2)
    return SimpleNamespace(run_dir=run_dir, jobs=jobs, store=store, steps=store.steps(),
                           pins={s: store.pins.reason(s) for s in store.scan().pinned})


def test_a_scheduled_evaluation_keeps_its_step_past_keep_last(held_run):
    assert held_run.steps == [4, 8, 12]                       # keep_last=1: 12; 4 and 8 are pinned
    assert sorted(held_run.pins) == [4, 8] and held_run.pins[4].startswith("evaluation scheduled ")
    assert [step for step, job in held_run.jobs.items() if job is not None] == [4, 8]


def test_an_evaluation_releases_its_pin_once_it_has_written_its_metrics(held_run):
    assert held_run.jobs[4].result()["exit_code"] == 0
    assert (held_run.run_dir / "eval" / "step-00000004" / "metrics.json").exists()
    assert held_run.store.pins.reason(4) is None
    held_run.store.prune()
    assert 4 not in held_run.store.steps()


def test_a_failed_evaluation_releases_its_pin_and_status_says_why(held_run, capsys):
    (held_run.run_dir / "checkpoints" / "step-00000008" / "ema.pt").unlink()
    result = held_run.jobs[8].result()
    assert result["exit_code"] == 2 and "--step 8: not a committed step" in result["message"]
    assert held_run.store.pins.reason(8) is None
    [failed] = [r for r in read_ledger(str(held_run.run_dir)) if r.get("event") == "failed"]
    assert failed["steps"] == [8] and failed["job_id"]
    status.run(argparse.Namespace(run_dir=str(held_run.run_dir)))
    out = capsys.readouterr().out
    assert f"evaluation {failed['job_id']} of step(s) [8] failed: error: --step 8: not a committed step" in out
    assert "damaged steps: 8 (ema.pt missing)" in out


def test_a_pin_survives_a_new_store_and_unpin_releases_it(held_run, tmp_path):
    first = CheckpointStore(str(tmp_path / "ckpt"), keep_last=1)
    engine = Trainer(load_config("toy2d_mf", [f"run.run_dir={tmp_path}", "run.steps=1"])).engine
    first.save(5, engine, {"step": 5}, {})
    first.pin(5, "evaluation scheduled")
    second = CheckpointStore(str(tmp_path / "ckpt"), keep_last=1)   # a requeued job's
    for step in (10, 15):
        second.save(step, engine, {"step": step}, {})
        second.wait_for_pruning()
    assert second.steps() == [5, 15] and second.pins.reason(5) == "evaluation scheduled"
    second.unpin(5)
    second.prune()
    assert second.steps() == [15]

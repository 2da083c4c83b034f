"""Submitting from the command line, before any job runs: exit codes, the caller's config left as it is, runs
refused before anything is submitted or recorded, and a ``--run-dir`` that is not a run directory named."""

from __future__ import annotations

import copy
import io
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from omegaconf import OmegaConf

from meanflow.jobs import cluster, submit_training
from meanflow.jobs.outcome import TrainingFailed, exit_status
from meanflow.jobs.submit import main as submit
from meanflow.platform.config import ConfigError, load_config

pytestmark = pytest.mark.timeout(300)


# ------------------------------------------------------------------------------------------------ exit codes
def test_bad_input_exits_2_and_a_failed_training_1_with_its_message():
    def raising(err):
        def fn():
            raise err
        return fn

    assert exit_status(lambda: None) == (0, "")
    assert exit_status(lambda: 3) == (3, "")
    assert exit_status(raising(ConfigError("optim.lr: bad"))) == (2, "error: optim.lr: bad")
    assert exit_status(raising(FileNotFoundError("no shard"))) == (2, "error: no shard")
    assert exit_status(raising(TrainingFailed("guard: gave up"))) == (1, "failed: guard: gave up")
    from meanflow.platform.engines import EngineJVPError

    assert exit_status(raising(EngineJVPError("jvp broke"))) == (1, "failed: jvp broke")
    with pytest.raises(ZeroDivisionError):   # a bug keeps its trace
        exit_status(lambda: 1 / 0)
    with pytest.raises(RuntimeError):
        exit_status(raising(RuntimeError("a bug")))


# ------------------------------------------------------------------------------------------------ the caller's config
def tiny_cfg(tmp_path, *overrides):
    return load_config("tiny_mf", [f"run.run_dir={tmp_path}/run", f"cluster.log_dir={tmp_path}/logs", "run.steps=2",
                                   "run.log_every=1", "data.global_batch=16", *overrides])


def test_a_dry_run_leaves_the_callers_config_unchanged(tmp_path):
    cfg = tiny_cfg(tmp_path, "eval.at_end=true", "eval.every=1", "eval.mode=watcher", "eval.tasks=2")
    before = OmegaConf.to_container(cfg)
    out = io.StringIO()
    assert submit_training.submit_training(cfg, "slurm", dry_run=True, stdout=out) == 0
    assert OmegaConf.to_container(cfg) == before
    assert "at_end: false" in out.getvalue()   # what the training job gets: its final evaluation is its own job


class FakeExecutor:
    """Records what would be submitted (a SLURM cluster in a unit test)."""

    def __init__(self, submitted: list):
        self.submitted = submitted

    def submit(self, job):
        self.submitted.append(job)
        return SimpleNamespace(job_id=str(len(self.submitted)), paths=SimpleNamespace(folder=Path("/nowhere")))


def test_a_slurm_submission_leaves_the_callers_config_unchanged(tmp_path, monkeypatch):
    submitted = []
    monkeypatch.setattr(submit_training, "make_executor", lambda *a, **k: FakeExecutor(submitted))
    monkeypatch.setattr(cluster, "eval_executor", lambda cfg, *a, **k: FakeExecutor(submitted))
    cfg = tiny_cfg(tmp_path, "eval.at_end=true", "eval.every=1", "eval.mode=watcher", "eval.tasks=2")
    before = copy.deepcopy(cfg)
    assert submit_training.submit_training(cfg, "slurm", stdout=io.StringIO()) == 0
    assert cfg == before
    train, final, watcher = submitted
    assert "at_end: false" in train.config_yaml and final.steps == [2] and watcher.watch
    ledger = [json.loads(line) for line in (tmp_path / "run" / "jobs.jsonl").read_text().splitlines()]
    assert [r.get("what", r["kind"]) for r in ledger] == ["train", "final", "watcher"]


def test_a_local_submission_leaves_the_callers_config_unchanged(tmp_path, one_thread):
    cfg = tiny_cfg(tmp_path, "eval.at_end=false")
    before = copy.deepcopy(cfg)
    assert submit_training.submit_training(cfg, "local", stdout=io.StringIO()) == 0
    assert cfg == before
    assert (tmp_path / "run" / "checkpoints" / "step-00000002" / "COMMIT.json").exists()


# ------------------------------------------------------------------------------------------------ refused runs
@pytest.fixture(scope="module")
def trained_dir(tmp_path_factory):
    """A run directory holding tiny_mf's committed step 2."""
    from meanflow.jobs.train import Trainer

    tmp = tmp_path_factory.mktemp("trained")
    Trainer(tiny_cfg(tmp, "eval.at_end=false"), stdout=io.StringIO()).run()
    return tmp / "run"


def train_args(run_dir, *extra):
    return ["--cluster", "local", "--config", "tiny_mf", "--run-dir", str(run_dir), "run.steps=2",
            "data.global_batch=16", f"cluster.log_dir={Path(run_dir).parent}/logs", *extra]


def test_a_run_dir_with_another_runs_checkpoints_is_refused_before_submission(trained_dir, capsys):
    assert submit(train_args(trained_dir, "objective.name=fm")) == 2
    err = capsys.readouterr().err
    assert f"run.run_dir: {trained_dir} holds checkpoints of a run with another 'objective'" in err
    assert not (trained_dir / "jobs.jsonl").exists() and not (trained_dir.parent / "logs").exists()


@pytest.mark.parametrize("extra, named", [
    (["--resume"], "run.resume"),
    (["eval.every=1", "eval.time=soon"], "eval.time"),   # was refused inside the job, by its first evaluation
])
def test_a_refused_submission_leaves_no_record_in_jobs_jsonl(tmp_path, capsys, extra, named):
    run_dir = tmp_path / "run"
    assert submit(train_args(run_dir, *extra)) == 2
    assert named in capsys.readouterr().err
    assert not (run_dir / "jobs.jsonl").exists() and not (tmp_path / "logs").exists()


def test_a_training_run_dir_that_is_a_file_is_named(tmp_path, capsys):
    (tmp_path / "file").write_text("not a run")
    assert submit(train_args(tmp_path / "file")) == 2
    assert f"run.run_dir: {tmp_path / 'file'}: is a file" in capsys.readouterr().err
    assert submit(train_args(tmp_path / "file" / "run")) == 2
    assert f"{tmp_path / 'file' / 'run'}: not a directory" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ --run-dir
@pytest.mark.parametrize("command", [["eval"], ["sample"], ["export", "--out", "x.safetensors"], ["plot"],
                                     ["status"]])
def test_a_run_dir_that_is_a_file_is_named(tmp_path, capsys, command):
    (tmp_path / "file").write_text("not a run")
    for run_dir in (tmp_path / "file", tmp_path / "file" / "below"):
        assert submit([*command, "--run-dir", str(run_dir)]) == 2
        assert f"--run-dir {run_dir}" in capsys.readouterr().err


def test_a_failed_run_fails_its_slurm_task_and_is_returned_elsewhere():
    """On SLURM nobody waits for the result: the task must exit non-zero (JobFailed) so that SLURM records the job
    FAILED and srun's --kill-on-bad-exit ends the other ranks. Elsewhere the submitting command reads the result."""
    from meanflow.jobs.job_callables import JobFailed, finish

    failed = {"exit_code": 1, "message": "failed: the guard gave up"}
    with pytest.raises(JobFailed, match="the guard gave up"):
        finish(failed, "slurm")
    assert finish(failed, "local") == failed
    assert finish({"exit_code": 0, "message": ""}, "slurm") == {"exit_code": 0, "message": ""}

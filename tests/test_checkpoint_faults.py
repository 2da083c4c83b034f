"""The checkpoint store under faults: a writer killed mid-save, a corrupted file, a frozen object store, and the
retention rules."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from meanflow.jobs.train import Trainer
from meanflow.platform import checkpoint
from meanflow.platform.checkpoint import CheckpointError, CheckpointStore
from meanflow.platform.config import load_config

pytestmark = pytest.mark.timeout(240)
REPO = Path(__file__).resolve().parents[1]
SAVE_POINTS = ["wrote:model.pt", "wrote:optimizer.pt", "wrote:ema.pt", "wrote:train_state.pt", "before-commit"]
KILL_POINTS = random.Random(0).sample(SAVE_POINTS, 3)   # seeded choice, the same in every run


def toy_overrides(run_dir, steps=20) -> list[str]:
    return [f"run.run_dir={run_dir}", f"run.steps={steps}", "run.log_every=5", "checkpoint.every=5",
            "eval.num_samples=64"]


def cli(run_dir, env=None) -> subprocess.CompletedProcess:
    # --cluster debug: the job runs in this process, so the injected SIGKILL kills the writer the test watches
    return subprocess.run([sys.executable, str(REPO / "jobs" / "submit.py"), "--cluster", "debug",
                           "--config", "toy2d_mf",
                           *toy_overrides(run_dir)], capture_output=True, text=True, timeout=200,
                          env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("straight")
    proc = cli(run_dir)
    assert proc.returncode == 0, proc.stderr
    return run_dir


def final_model(run_dir) -> dict:
    return torch.load(Path(run_dir) / "checkpoints" / "step-00000020" / "model.pt", weights_only=True)


@pytest.mark.parametrize("point", KILL_POINTS)
def test_writer_killed_mid_save_leaves_the_previous_commit_and_resume_is_exact(point, straight_run, tmp_path):
    killed = cli(tmp_path, env={checkpoint.KILL_POINT_ENV: f"{point}@2"})   # during the save at step 10
    assert killed.returncode == -signal.SIGKILL
    assert CheckpointStore(str(tmp_path / "checkpoints")).latest() == 5
    resumed = cli(tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout and "at step 5" in resumed.stdout
    for key, value in final_model(tmp_path).items():
        assert torch.equal(value, final_model(straight_run)[key]), key


def test_corrupted_file_falls_back_to_the_previous_commit(tmp_path):
    trainer = Trainer(load_config("toy2d_mf", toy_overrides(tmp_path)))
    trainer.run()
    store = trainer.store
    store.wait_for_pruning()
    assert store.steps() == [10, 15, 20]
    damaged = tmp_path / "checkpoints" / "step-00000020" / "optimizer.pt"
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0xFF                               # same size: only the checksum can tell
    damaged.write_bytes(bytes(data))
    assert store.latest() == 20
    with pytest.raises(CheckpointError, match="optimizer.pt: sha256 differs"):
        store.load(20, trainer.engine)
    with pytest.warns(UserWarning, match="step 20 is damaged"):
        step, train_state, _ = store.load_latest(trainer.engine)
    assert step == 15 and train_state["step"] == 15


def test_retention_keeps_last_milestones_pinned_and_the_newest_healthy_step(tmp_path):
    trainer = Trainer(load_config("toy2d_mf", toy_overrides(tmp_path, steps=1)))
    store = CheckpointStore(str(tmp_path / "ckpt"), keep_last=2, keep_every=10)
    for step in (5, 10, 15, 20, 25):
        store.save(step, trainer.engine, {"step": step}, {}, healthy=step < 20)
        store.wait_for_pruning()
    # last two: 20, 25 (both unhealthy); milestones: 10, 20; the newest healthy: 15
    assert store.steps() == [10, 15, 20, 25]
    store.pin(15, "evaluation in progress")
    for step in (30, 35, 40):
        store.save(step, trainer.engine, {"step": step}, {}, healthy=True)
        store.wait_for_pruning()
    assert store.steps() == [10, 15, 20, 30, 35, 40]   # 15 pinned; 10, 20, 30 milestones; 35, 40 the last two
    store.unpin(15)
    store.prune()
    assert store.steps() == [10, 20, 30, 35, 40]


@pytest.mark.parametrize("async_save", [False, True])
def test_frozen_object_store_mid_save_loses_no_step(async_save, s3_server, s3_bucket, tmp_path):
    """moto is SIGSTOPped while a checkpoint uploads (its buckets live in its memory, so it is frozen, not
    restarted) and resumed after longer than the upload timeout: uploads retry, the run completes (async: the
    training goes on meanwhile and the next save waits for the upload)."""
    def freeze():
        os.kill(s3_server.process.pid, signal.SIGSTOP)
        threading.Timer(6.0, os.kill, (s3_server.process.pid, signal.SIGCONT)).start()

    checkpoint.arm_fault_hook("wrote:model.pt@1", freeze)        # right after the first file of the first save
    try:
        cfg = load_config("toy2d_mf", [*toy_overrides(tmp_path), f"checkpoint.url={s3_bucket}/ckpt",
                                       "checkpoint.upload_timeout_s=2", "checkpoint.keep_last=10",
                                       f"checkpoint.async_save={async_save}"])
        trainer = Trainer(cfg)
        trainer.run()
    finally:
        checkpoint.disarm_fault_hooks()
        os.kill(s3_server.process.pid, signal.SIGCONT)
    trainer.store.wait_for_pruning()
    assert trainer.store.upload_retries >= 1
    assert trainer.store.steps() == [5, 10, 15, 20]


def test_store_down_longer_than_max_outage_stops_the_run_loudly(s3_server, s3_bucket, tmp_path):
    checkpoint.arm_fault_hook("wrote:model.pt@1", lambda: os.kill(s3_server.process.pid, signal.SIGSTOP))
    try:
        cfg = load_config("toy2d_mf", [*toy_overrides(tmp_path), f"checkpoint.url={s3_bucket}/ckpt",
                                       "checkpoint.upload_timeout_s=1", "checkpoint.max_outage_s=3"])
        from meanflow.jobs.train import TrainingFailed
        with pytest.raises(TrainingFailed, match=r"unreachable for \d+s \(> checkpoint.max_outage_s=3\)"):
            Trainer(cfg).run()
    finally:
        checkpoint.disarm_fault_hooks()
        os.kill(s3_server.process.pid, signal.SIGCONT)

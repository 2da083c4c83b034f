"""The checkpoint store under faults: a writer killed mid-save, a corrupted file or commit record, a frozen object
store, a deleter killed at exit, a stale listing, a missing bucket, and the retention rules."""

from __future__ import annotations

import io
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import fsspec
import pytest
import torch

from meanflow.jobs.train import Trainer
from meanflow.platform import checkpoint
from meanflow.platform.checkpoint import CheckpointError, CheckpointStore, Verdict
from meanflow.platform.config import load_config
from meanflow.platform.storage import write_bytes_atomic

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
    with pytest.raises(CheckpointError, match="step-00000020 is damaged: optimizer.pt: sha256 mismatch"):
        store.load(20, trainer.engine)
    with pytest.warns(UserWarning, match=r"step-00000020 is damaged \(optimizer.pt: sha256 mismatch\)"):
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


def toy_engine(tmp_path):
    return Trainer(load_config("toy2d_mf", toy_overrides(tmp_path, steps=1))).engine


@pytest.mark.parametrize("damage", ["truncated", "empty"])
def test_a_damaged_newest_commit_record_resumes_from_the_previous_step(damage, tmp_path):
    Trainer(load_config("toy2d_mf", toy_overrides(tmp_path)), stdout=io.StringIO()).run()
    record = tmp_path / "checkpoints" / "step-00000020" / "COMMIT.json"
    record.write_bytes(record.read_bytes()[:len(record.read_bytes()) // 2] if damage == "truncated" else b"")
    out = io.StringIO()
    with pytest.warns(UserWarning, match=r"step-00000020 is damaged \(COMMIT.json: \d+ bytes, not a commit record\)"):
        Trainer(load_config("toy2d_mf", toy_overrides(tmp_path)), stdout=out).run()
    assert "at step 15" in out.getvalue()
    assert CheckpointStore(str(tmp_path / "checkpoints")).latest() == 20   # committed again by the resumed run


def test_a_committed_step_is_never_rewritten(tmp_path):
    engine, store = toy_engine(tmp_path), CheckpointStore(str(tmp_path / "ckpt"))
    store.save(5, engine, {"step": 5}, {"first": True})
    record = (tmp_path / "ckpt" / "step-00000005" / "COMMIT.json").read_bytes()
    with pytest.raises(CheckpointError, match=r"ckpt/step-00000005 is already committed"):
        store.save(5, engine, {"step": 5}, {"first": False})
    assert (tmp_path / "ckpt" / "step-00000005" / "COMMIT.json").read_bytes() == record


def test_a_deletion_killed_midway_never_leaves_a_committed_step(tmp_path, monkeypatch):
    engine, store = toy_engine(tmp_path), CheckpointStore(str(tmp_path / "ckpt"), keep_last=10)
    for step in (5, 10):
        store.save(step, engine, {"step": step}, {})
        store.wait_for_pruning()
    rm = store.fs.rm

    def killed_after_one_file(path, recursive=False, **kwargs):   # the process dies inside the deletion
        rm(path, recursive=recursive, **kwargs)
        raise KeyboardInterrupt("process exit")

    monkeypatch.setattr(store.fs, "rm", killed_after_one_file)
    store.keep_last = 1
    with pytest.raises(KeyboardInterrupt):
        store.prune()
    monkeypatch.undo()
    assert (tmp_path / "ckpt" / "step-00000005" / "model.pt").exists()   # half deleted ...
    assert store.steps() == [10]                                            # ... and not committed


def test_the_next_commit_removes_what_dead_writers_and_deleters_left(tmp_path):
    engine, store = toy_engine(tmp_path), CheckpointStore(str(tmp_path / "ckpt"), keep_last=2)
    for step in (5, 10):
        store.save(step, engine, {"step": step}, {})
        store.wait_for_pruning()
    (tmp_path / "ckpt" / "step-00000005" / "ema.pt").unlink()             # a deleter killed at exit
    for leftover in (7, 12):               # a writer killed mid-save; newer than the commit below (may be in flight)
        (tmp_path / "ckpt" / f"step-{leftover:08d}").mkdir()
        (tmp_path / "ckpt" / f"step-{leftover:08d}" / "model.pt").write_bytes(b"partial")
    store.save(11, engine, {"step": 11}, {})
    store.close()
    assert store.steps() == [10, 11]
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["step-00000010", "step-00000011",
                                                                      "step-00000012"]


def test_close_gives_a_running_retention_pass_a_bounded_time(tmp_path, monkeypatch):
    engine, store = toy_engine(tmp_path), CheckpointStore(str(tmp_path / "ckpt"), keep_last=1)
    store.save(5, engine, {"step": 5}, {})
    store.close()
    release, scan = threading.Event(), store.scan
    monkeypatch.setattr(store, "scan", lambda: (release.wait(30), scan())[1])   # a store answering slowly
    store.save(10, engine, {"step": 10}, {})
    with pytest.warns(UserWarning, match="retention pass .* still running after 0.2s"):
        store.close(timeout_s=0.2)
    release.set()
    store.close(timeout_s=30)
    monkeypatch.undo()
    assert store.steps() == [10]


def test_a_store_sees_a_commit_made_by_another_process_after_it_listed(s3_bucket, tmp_path):
    """A long-lived process (an evaluation watcher, status) listed the run directory before the first commit; a
    commit made elsewhere (here: another thread, so another s3fs instance with its own cache) must show."""
    engine = toy_engine(tmp_path)
    reader = CheckpointStore(f"{s3_bucket}/run/ckpt")
    reader.fs.pipe(f"{s3_bucket}/run/config.yaml", b"{}")
    reader.fs.ls(f"{s3_bucket}/run")   # cached: a run directory without ckpt/
    assert reader.steps() == []

    def commit_elsewhere():
        writer = CheckpointStore(f"{s3_bucket}/run/ckpt")
        writer.save(5, engine, {"step": 5}, {})
        writer.close()

    thread = threading.Thread(target=commit_elsewhere)
    thread.start()
    thread.join()
    assert reader.steps() == [5]


def test_a_missing_bucket_is_an_error_naming_it_never_created(s3_server, tmp_path):
    fs = fsspec.filesystem("s3")
    with pytest.raises(FileNotFoundError, match="bucket no-such-bucket does not exist"):
        write_bytes_atomic("s3://no-such-bucket/run/config.yaml", b"{}")
    store = CheckpointStore("s3://no-such-bucket/ckpt")
    with pytest.raises(FileNotFoundError, match="s3://no-such-bucket/ckpt/step-00000005/.*bucket no-such-bucket"):
        store.save(5, toy_engine(tmp_path), {"step": 5}, {})
    assert store.upload_retries == 0          # not an outage: no retries for checkpoint.max_outage_s
    fs.invalidate_cache()
    assert not fs.exists("no-such-bucket")
    write_bytes_atomic(str(tmp_path / "new" / "dir" / "file"), b"x")   # local directories are still created
    assert (tmp_path / "new" / "dir" / "file").read_bytes() == b"x"


@pytest.mark.parametrize("outage_s", [6.0, None], ids=["store-back-in-6s", "store-gone"])
def test_a_frozen_store_holding_the_run_dir_never_hangs_the_run(outage_s, s3_server, s3_bucket, tmp_path):
    """The whole run directory on s3:// (metrics, config, checkpoints) and the store frozen mid-run. Back within
    checkpoint.max_outage_s: the run completes and no record is lost or doubled. Gone for good: the run stops
    with TrainingFailed naming the limit and the URL, about max_outage_s after the freeze, never later."""
    run_dir = f"{s3_bucket}/run"
    cfg = load_config("toy2d_mf", [f"run.run_dir={run_dir}", "run.steps=1000", "run.log_every=10",
                                   "checkpoint.every=250", "checkpoint.upload_timeout_s=2",
                                   "checkpoint.max_outage_s=10", "eval.at_end=false"])
    trainer = Trainer(cfg, stdout=io.StringIO())
    frozen_at = []

    def freeze():
        frozen_at.append(time.monotonic())
        os.kill(s3_server.process.pid, signal.SIGSTOP)
        if outage_s is not None:
            threading.Timer(outage_s, os.kill, (s3_server.process.pid, signal.SIGCONT)).start()

    threading.Timer(1.0, freeze).start()
    try:
        if outage_s is None:
            from meanflow.jobs.train import TrainingFailed
            with pytest.raises(TrainingFailed, match=rf"unreachable for \d+s \(> checkpoint.max_outage_s=10\) at "
                                                     rf"{run_dir}/"):
                trainer.run()
            # the limit, the attempt and backoff under way, the lease's bounded release, slack for a loaded machine
            assert time.monotonic() - frozen_at[0] < 10 + 2 + 8 + 10 + 15
            return
        trainer.run()
    finally:
        os.kill(s3_server.process.pid, signal.SIGCONT)
    assert frozen_at and trainer.step == 1000
    fs = fsspec.filesystem("s3")
    fs.invalidate_cache()
    records = [json.loads(line) for line in fs.cat(f"{run_dir}/metrics.jsonl").decode().splitlines()]
    assert [r["step"] for r in records if "event" not in r] == list(range(10, 1001, 10))
    assert CheckpointStore(f"{run_dir}/checkpoints").steps() == [500, 750, 1000]


def test_after_a_resume_every_step_has_one_metrics_record(tmp_path):
    """A writer killed after step 12's record but before its step-15 save: the resumed run trains 11–15 again and
    the file keeps one record per step (the dead writer's 11 and 12 are replaced)."""
    overrides = [f"run.run_dir={tmp_path}", "run.steps=20", "run.log_every=1", "checkpoint.every=10",
                 "eval.at_end=false"]
    Trainer(load_config("toy2d_mf", [*overrides, "run.steps=12"]), stdout=io.StringIO()).run()
    commit = tmp_path / "checkpoints" / "step-00000012" / "COMMIT.json"
    commit.unlink()                                    # its last save never committed: resume from 10
    Trainer(load_config("toy2d_mf", overrides), stdout=io.StringIO()).run()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "event" not in r] == list(range(1, 21))
    assert [r["step"] for r in records if r.get("event") == "checkpoint"] == [10, 12, 20]   # events: history


# ------------------------------------------------------------------------------------------------ damaged steps
def flip_a_byte(step_dir: Path) -> None:
    data = bytearray((step_dir / "model.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF                               # same size: only the checksum can tell
    (step_dir / "model.pt").write_bytes(bytes(data))


def wrong_sha256_in_commit(step_dir: Path) -> None:
    record = json.loads((step_dir / "COMMIT.json").read_text())
    record["files"]["ema.pt"]["sha256"] = "0" * 64
    (step_dir / "COMMIT.json").write_text(json.dumps(record))


def truncate_optimizer(step_dir: Path) -> None:
    (step_dir / "optimizer.pt").write_bytes((step_dir / "optimizer.pt").read_bytes()[:12])


def keep_only_commit(step_dir: Path) -> None:
    for path in step_dir.iterdir():
        if path.name != "COMMIT.json":
            path.unlink()


def delete_ema(step_dir: Path) -> None:
    (step_dir / "ema.pt").unlink()


# each damage, and how the warning and the event name it
DAMAGES = {"flipped-byte": (flip_a_byte, r"model.pt: sha256 mismatch"),
           "wrong-sha256": (wrong_sha256_in_commit, r"ema.pt: sha256 mismatch"),
           "truncated": (truncate_optimizer, r"optimizer.pt: 12 bytes, COMMIT.json says \d+"),
           "only-commit": (keep_only_commit, r"model.pt missing; optimizer.pt missing; ema.pt missing; 1 more"),
           "no-ema": (delete_ema, r"ema.pt missing")}


def quick_overrides(run_dir) -> list[str]:
    return [f"run.run_dir={run_dir}", "run.steps=6", "run.log_every=2", "checkpoint.every=2", "eval.at_end=false",
            "data.global_batch=32"]


@pytest.fixture(scope="module")
def trained_to_6(tmp_path_factory):
    """A run committed at 2, 4 and 6, copied by each test that damages it."""
    run_dir = tmp_path_factory.mktemp("trained")
    Trainer(load_config("toy2d_mf", quick_overrides(run_dir)), stdout=io.StringIO()).run()
    return run_dir


def damaged_copy(trained_to_6, tmp_path, damage: str) -> Path:
    shutil.copytree(trained_to_6, tmp_path, dirs_exist_ok=True)
    DAMAGES[damage][0](tmp_path / "checkpoints" / "step-00000006")
    return tmp_path


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_newest_step_is_resumed_before_and_saved_anew(damage, trained_to_6, tmp_path):
    run_dir, named = damaged_copy(trained_to_6, tmp_path, damage), DAMAGES[damage][1]
    out = io.StringIO()
    trainer = Trainer(load_config("toy2d_mf", quick_overrides(run_dir)), stdout=out)
    with pytest.warns(UserWarning, match=rf"checkpoints/step-00000006 is damaged \({named}\)"):
        trainer.run()                                 # returns: the run ends with exit 0
    assert "at step 4" in out.getvalue()
    store = CheckpointStore(str(run_dir / "checkpoints"))
    assert store.verdict(6).intact and store.steps() == [2, 4, 6]
    assert store.load(6, trainer.engine)[0]["step"] == 6    # every sha256 of the new commit verifies
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    [event] = [r for r in records if r.get("event") == "checkpoint_damaged"]
    assert event["step"] == 6 and re.fullmatch(named, event["reason"])


def test_resume_sets_a_damaged_step_aside_and_retention_removes_it(trained_to_6, tmp_path):
    step_dir = damaged_copy(trained_to_6, tmp_path, "no-ema") / "checkpoints" / "step-00000006"
    engine, store = toy_engine(tmp_path / "engine"), CheckpointStore(str(tmp_path / "checkpoints"), keep_last=3)
    with pytest.warns(UserWarning, match=r"step-00000006 set aside: its COMMIT.json is now DAMAGED.json"):
        assert store.load_latest(engine)[0] == 4
    assert not (step_dir / "COMMIT.json").exists() and (step_dir / "model.pt").exists()   # kept for inspection
    assert json.loads((step_dir / "DAMAGED.json").read_text())["damage"] == "ema.pt missing"
    assert CheckpointStore(str(tmp_path / "checkpoints")).scan().damaged == {
        6: Verdict(damage="set aside: ema.pt missing", set_aside=True)}
    store.save(8, engine, {"step": 8}, {})
    store.close()
    assert store.steps() == [2, 4, 8] and not step_dir.exists()   # an old step that is no commit


def test_a_damaged_step_is_reported_once_per_store(trained_to_6, tmp_path):
    damaged_copy(trained_to_6, tmp_path, "truncated")
    store = CheckpointStore(str(tmp_path / "checkpoints"), rank=0)
    with pytest.warns(UserWarning, match="optimizer.pt: 12 bytes"):
        store.scan()
    store.scan()
    assert [step for step, _ in store.take_damage_reports()] == [6] and store.take_damage_reports() == []
    assert CheckpointStore(str(tmp_path / "checkpoints"), rank=1).take_damage_reports() == []

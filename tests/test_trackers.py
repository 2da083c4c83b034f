"""TensorBoard and W&B trackers, read back the way their tools read them: TensorBoard's EventAccumulator over the
event files, and the W&B offline run files (the records `wandb sync` uploads), with W&B's rewind applied.

Each curve must have exactly one point per step, equal to metrics.jsonl's record, after a guard rollback and after
a crash + resume, both of which train steps again."""

from __future__ import annotations

import itertools
import json

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

from meanflow.jobs.train import Trainer
from meanflow.platform.config import ConfigError, load_config


def step_records(run_dir) -> dict[int, dict]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "event" not in r]
    assert len(steps) == len(set(steps))
    return {r["step"]: r for r in records if "event" not in r}


def tensorboard_scalars(log_dir, tag: str) -> dict[int, float]:
    """What TensorBoard plots for ``tag``: {step: value}, asserting one point per step."""
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    events = acc.Scalars(tag)
    steps = [e.step for e in events]
    assert len(steps) == len(set(steps)), f"{tag}: duplicate steps {sorted(steps)}"
    return {e.step: e.value for e in events}


def session_starts(log_dir) -> list[int]:
    """The purge points in the raw event files (SessionLog START steps), file by file."""
    starts = []
    for path in sorted(log_dir.glob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime_ns):
        for event in EventFileLoader(str(path)).Load():
            if event.HasField("session_log") and event.session_log.status == event.session_log.START:
                starts.append(event.step)
    return starts


def wandb_runs(run_dir) -> list[dict]:
    """Every offline W&B run file of the run directory, in the order they were written: its run record (id,
    rewind point, whether it carries the config) and its history rows."""
    from wandb.proto import wandb_internal_pb2 as pb
    from wandb.sdk.internal import datastore

    runs = []
    for path in sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb"), key=lambda p: p.stat().st_mtime_ns):
        store, run = datastore.DataStore(), {"history": []}
        store.open_for_scan(str(path))
        while (data := store.scan_data()) is not None:
            record = pb.Record()
            record.ParseFromString(data)
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run["id"] = record.run.run_id
                run["rewind_to"] = record.run.branch_point.value if record.run.HasField("branch_point") else None
                run["has_config"] = "model" in {item.key for item in record.run.config.update}
            elif kind == "history":
                run["history"].append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                                       for item in record.history.item})
        runs.append(run)
    return runs


def wandb_history(runs: list[dict]) -> list[dict]:
    """The rows W&B shows once the runs are synced: each rewind drops the rows after its step."""
    rows: list[dict] = []
    for run in runs:
        if run["rewind_to"] is not None:
            rows = [r for r in rows if r["_step"] <= run["rewind_to"]]
        rows += run["history"]
    return rows


def toy(run_dir, *extra) -> list[str]:
    return [f"run.run_dir={run_dir}", "run.steps=60", "run.log_every=1", "eval.num_samples=64",
            "checkpoint.every=20", "guard.snapshot_every=10", "guard.allow_inject=true",
            "guard.inject.kind=jvp_nan", "guard.inject.start=35", "run.trackers=[tensorboard,wandb]", *extra]


@pytest.mark.timeout(240)
def test_curves_have_one_point_per_step_after_a_rollback_and_a_crash_resume(tmp_path, monkeypatch):
    """A NaN at step 35 rolls back to 30 (steps 31-34 trained again); a crash after 50 batches, past the checkpoint
    at 40, then a resume from 40 (steps 41-4x trained again). TensorBoard and W&B each show steps 1..60 once, with
    metrics.jsonl's values, the rollback on the guard/rollbacks curve, and one W&B run rewound twice."""
    monkeypatch.delenv("WANDB_MODE", raising=False)   # the default must be offline
    monkeypatch.setenv("WANDB_SILENT", "true")
    crashing = Trainer(load_config("toy2d_mf", toy(tmp_path)))
    read_batch, batches = crashing.stream.next_batch, itertools.count()

    def next_batch_then_crash():
        if next(batches) == 50:
            raise RuntimeError("simulated crash")
        return read_batch()

    crashing.stream.next_batch = next_batch_then_crash
    with pytest.raises(RuntimeError, match="simulated crash"):
        crashing.run()
    assert crashing.step > 41
    Trainer(load_config("toy2d_mf", toy(tmp_path))).run()   # resumes from the checkpoint at 40

    records = step_records(tmp_path)
    assert sorted(records) == list(range(1, 61))
    tb = tmp_path / "tb"
    for key in ("loss", "mse", "grad_norm"):
        curve = tensorboard_scalars(tb, f"train/{key}")
        assert sorted(curve) == list(range(1, 61))
        assert all(curve[s] == pytest.approx(records[s][key], rel=1e-6) for s in curve)
    # The purges: a fresh run from 0, the rollback to 30, the resume from 40.
    assert session_starts(tb) == [1, 31, 41]
    assert tensorboard_scalars(tb, "guard/rollbacks") == {30: 1.0}
    assert 35 in {json.loads(e.tensor_proto.string_val[0])["step"] for e in _texts(tb)}
    assert sorted(tensorboard_scalars(tb, "eval/sw1")) == [60]

    runs = wandb_runs(tmp_path)
    stored_id = json.loads((tmp_path / "trackers" / "wandb.json").read_text())["id"]
    assert [r["id"] for r in runs] == [stored_id] * 3
    assert [r["rewind_to"] for r in runs] == [None, 30, 40] and [r["has_config"] for r in runs] == [True, False, False]
    history = [row for row in wandb_history(runs) if "train/loss" in row]
    assert [row["_step"] for row in history] == list(range(1, 61))
    assert all(row["train/loss"] == pytest.approx(records[row["_step"]]["loss"], rel=1e-6) for row in history)
    assert [row["_step"] for row in history if "guard/rollbacks" in row] == [31]   # the first step trained again
    assert not list(tmp_path.rglob("*api_key*")) and "WANDB_API_KEY" not in (tmp_path / "config.yaml").read_text()


def _texts(log_dir):
    acc = EventAccumulator(str(log_dir), size_guidance={"tensors": 0})
    acc.Reload()
    return acc.Tensors("events/text_summary")


@pytest.mark.timeout(180)
def test_a_remote_run_directory_gets_its_event_files_and_sample_grids(tmp_path, s3_bucket):
    """Run directory on s3:// (moto): the event files are uploaded under <run>/tb/, and a synced copy shows the
    scalars and the end-of-run sample grid of each guidance setting; an evaluation job adds its own under tb/eval."""
    from meanflow.jobs.evaluate import evaluate_steps
    from meanflow.platform.storage import filesystem

    run_dir = s3_bucket + "/tracked"
    Trainer(load_config("tiny_imf", [f"run.run_dir={run_dir}", "run.steps=4", "run.log_every=1",
                                     "eval.num_samples=32", "run.trackers=[tensorboard]"])).run()
    evaluate_steps(run_dir, [4], overrides=["eval.num_samples=16", "eval.guidance=[{omega: 3.0}]"])
    fs, path = filesystem(run_dir)
    copy = tmp_path / "copy"
    fs.get(path + "/tb/", str(copy), recursive=True)
    assert sorted(tensorboard_scalars(copy, "train/mse")) == [1, 2, 3, 4]
    acc = EventAccumulator(str(copy), size_guidance={"images": 0})
    acc.Reload()
    for tag in ("-w1-t0-1", "-w2-t0-1"):
        [image] = acc.Images(f"eval/samples{tag}")
        assert image.step == 4 and image.width > 8 * 8 and image.encoded_image_string.startswith(b"\x89PNG")
        assert sorted(tensorboard_scalars(copy, f"eval/class_accuracy{tag}")) == [4]
    evaluation_job = EventAccumulator(str(copy / "eval"), size_guidance={"images": 0})
    evaluation_job.Reload()
    assert [image.step for image in evaluation_job.Images("eval/samples-w3-t0-1")] == [4]


def test_an_unknown_tracker_is_a_config_error():
    with pytest.raises(ConfigError, match="run.trackers"):
        load_config("toy2d_mf", ["run.trackers=[tensorbored]"])

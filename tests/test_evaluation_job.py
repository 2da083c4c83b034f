"""The evaluation job and the commands that use a trained model (eval, sample, export, plot), on a committed tiny
checkpoint in a loopback-S3 run directory; feature extractor weights loaded offline by path."""

from __future__ import annotations

import io
import json
from pathlib import Path

import fsspec
import numpy as np
import pytest
import torch

from distributed_run import evaluate_over
from meanflow.evaluation.feature_extractors import INCEPTION, load_feature_extractor
from meanflow.jobs.submit import main as submit
from meanflow.jobs.train import Trainer
from meanflow.platform.config import load_config

pytestmark = pytest.mark.timeout(300)


def read_json(url: str):
    with fsspec.open(url, "r") as f:
        return json.load(f)


def read_jsonl(url: str) -> list[dict]:
    with fsspec.open(url, "r") as f:
        return [json.loads(line) for line in f.read().splitlines()]


@pytest.fixture(scope="module")
def s3_run(s3_server):
    """tiny_imf trained 40 steps into s3://…/run, checkpoints at 20 and 40, no end-of-run evaluation."""
    fs = fsspec.filesystem("s3")
    fs.mkdir("eval-job")
    run_dir = "s3://eval-job/run"
    Trainer(load_config("tiny_imf", [f"run.run_dir={run_dir}", "run.steps=40", "run.log_every=10",
                                     "checkpoint.every=20", "eval.at_end=false"]), stdout=io.StringIO()).run()
    return run_dir


def test_eval_writes_metrics_jsonl_and_grids_for_a_guidance_sweep(s3_run, capsys, one_thread):
    code = submit(["eval", "--run-dir", s3_run, "--step", "20", "--guidance", "1.0", "--guidance", "2.0,0.2,0.8",
                   "eval.num_samples=64"])
    assert code == 0, capsys.readouterr().err
    results = read_json(f"{s3_run}/eval/step-00000020/metrics.json")["results"]
    assert [r["guidance"] for r in results] == [{"omega": 1.0, "t_min": 0.0, "t_max": 1.0},
                                                {"omega": 2.0, "t_min": 0.2, "t_max": 0.8}]
    for r in results:
        assert r["step"] == 20 and r["num_samples"] == 64 and r["nfe"] == 1 and r["weights"] == "ema"
        assert np.isfinite(r["fid"]) and r["fid"] > 0 and r["is_mean"] >= 1.0 and 0 <= r["class_accuracy"] <= 1
        assert r["feature_extractor"]["name"] == "digits-cnn" and len(r["feature_extractor"]["weights_sha256"]) == 64
        assert r["uint8"].startswith("clamp(127.5*x + 128, 0, 255)") and isinstance(r["wall_s"], float)
        assert {"tf32_matmul", "dtype", "seed"} <= set(r)
        assert fsspec.filesystem("s3").exists(f"{s3_run}/eval/step-00000020/{r['picture']}")
    assert [row["guidance"]["omega"] for row in read_jsonl(f"{s3_run}/eval/metrics.jsonl")] == [1.0, 2.0]

    # the same request again is skipped; a new setting of the same step is added beside the earlier ones
    assert submit(["eval", "--run-dir", s3_run, "--step", "20", "--guidance", "1.0", "eval.num_samples=64"]) == 0
    assert "nothing to evaluate" in capsys.readouterr().out
    assert submit(["eval", "--run-dir", s3_run, "--step", "20", "--guidance", "3.0", "eval.num_samples=64"]) == 0
    assert len(read_json(f"{s3_run}/eval/step-00000020/metrics.json")["results"]) == 3
    assert len(read_jsonl(f"{s3_run}/eval/metrics.jsonl")) == 3


def test_two_ranks_give_the_numbers_of_one(s3_run, tmp_path):
    """Samples are split by global index and the feature sums all-reduced: 2 ranks score what 1 rank does."""
    overrides = ["eval.num_samples=96", "eval.batch_size=32"]
    one = evaluate_over(1, s3_run, overrides, tmp_path / "one.json")
    two = evaluate_over(2, s3_run, overrides, tmp_path / "two.json")
    assert [r["world_size"] for r in one + two] == [1, 1, 2, 2]
    for a, b in zip(one, two):
        for key in ("fid", "is_mean", "is_std", "class_accuracy"):
            assert a[key] == pytest.approx(b[key], rel=1e-9, abs=1e-9), key


def test_eval_names_a_step_that_is_not_committed(s3_run, capsys):
    assert submit(["eval", "--run-dir", s3_run, "--step", "25"]) == 2
    assert "--step 25" in capsys.readouterr().err


def test_eval_names_a_missing_reference_statistics_file(s3_run, capsys):
    code = submit(["eval", "--run-dir", s3_run, "eval.reference_stats=s3://eval-job/nope.npz", "eval.num_samples=8"])
    assert code == 2 and "eval.reference_stats" in capsys.readouterr().err


def test_export_loads_without_the_training_stack_and_samples_like_sample(s3_run, tmp_path, capsys, one_thread):
    from meanflow.evaluation.images import to_uint8
    from meanflow.models.export import load_exported
    from meanflow.objectives import guidance_conditions, sample, sample_noise
    from meanflow.evaluation.sampling import sample_labels

    out = str(tmp_path / "model.safetensors")
    assert submit(["export", "--run-dir", s3_run, "--out", out]) == 0
    model, info = load_exported(out)
    assert info["meanflow.step"] == "40" and info["meanflow.weights"] == "ema"
    assert submit(["sample", "--run-dir", s3_run, "--num", "16", "--guidance", "2.0",
                   "--out", str(tmp_path / "s")]) == 0
    saved = np.load(tmp_path / "s-w2-t0-1.npz")
    assert (tmp_path / "s-w2-t0-1.png").exists() and saved["images_uint8"].shape == (16, 1, 8, 8)
    # sample i of the command = sample i from the exported model with the same seed
    idx = range(16)
    x = sample(model, sample_noise(idx, (1, 8, 8), 1234), y=sample_labels(idx, 10, 1234),
               omega=guidance_conditions(16, 2.0))
    assert np.array_equal(to_uint8(x).numpy(), saved["images_uint8"])
    assert np.array_equal(saved["label"], sample_labels(idx, 10, 1234).numpy())


def test_export_names_an_out_it_cannot_write(s3_run, tmp_path, capsys):
    (tmp_path / "somefile").write_text("")
    outs = [(tmp_path / "somefile" / "model.safetensors", f"{tmp_path / 'somefile'} is a file"),   # under a file
            (tmp_path, "is a directory")]
    if Path("/sys").is_dir():   # read-only for every user, root included
        outs.append((Path("/sys/meanflow-test/model.safetensors"), "cannot write there"))
    for out, why in outs:
        assert submit(["export", "--run-dir", s3_run, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert f"error: --out {out}: " in err and why in err and "Traceback" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["somefile"]


def test_plot_draws_training_and_eval_metrics(s3_run, capsys):
    assert submit(["plot", "--run-dir", s3_run]) == 0
    with fsspec.open(f"{s3_run}/plots/progress.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert submit(["plot", "--run-dir", "s3://eval-job/not-a-run"]) == 2
    assert "metrics.jsonl" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------- feature weights offline
def test_inception_weights_load_offline_by_path(random_inception, one_thread):
    path, net = random_inception
    extractor = load_feature_extractor(INCEPTION, str(path))
    images = torch.randint(0, 256, (3, 1, 16, 16), dtype=torch.uint8)
    features, logits = extractor(images)
    assert features.shape == (3, 2048) and logits.shape == (3, 1008)
    expected = net.eval()(images.repeat(1, 3, 1, 1))
    torch.testing.assert_close(features, expected[0])


def test_a_missing_or_unsafe_weights_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="eval.feature_weights: not set"):
        load_feature_extractor(INCEPTION, "")
    with pytest.raises(FileNotFoundError, match=f"eval.feature_weights: no weights file at {tmp_path}/x.pth"):
        load_feature_extractor(INCEPTION, str(tmp_path / "x.pth"))
    torch.save({"w": torch.zeros(1), "code": print}, tmp_path / "pickled.pth")   # not plain tensors
    with pytest.raises(ValueError, match="not a plain tensor weights file"):
        load_feature_extractor(INCEPTION, str(tmp_path / "pickled.pth"))

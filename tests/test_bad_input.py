"""Bad input, one row each: the command exits 2 with one line naming the key, file, flag or URL to change, and a
refused run leaves nothing behind (no run directory, or an empty one, and no submission folder; a command on an
existing run directory adds no file to it).

Every row runs the real CLI in this process (``jobs/submit.py``'s ``main``): the table costs one torch import."""

from __future__ import annotations

import io
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from safetensors.torch import save_file

from meanflow.data_pipeline.shard_writer import write_shards
from meanflow.data_pipeline.sources import open_source
from meanflow.evaluation.feature_extractors import DIGITS
from meanflow.evaluation.reference_stats import ReferenceStats, save_reference
from meanflow.jobs.submit import main as submit
from meanflow.models import build_model
from meanflow.platform.config import load_config, save_config

pytestmark = pytest.mark.timeout(120)


@dataclass
class Where:
    """The places a row's command line and expected message are written with."""
    tmp: Path                      # this row's own folder, holding a regular file "file"
    trained: Path                  # a run directory with tiny_mf's committed step 2 (shared: rows must not write)
    other_shape: Path              # a .safetensors export of a model tiny_mf cannot load (width 32, not 64)
    rgb_shards: Path               # image shards of 3-channel 8×8 samples
    read_only: Path | None = None  # a read-only mount (rows that need it)

    @property
    def run(self) -> Path:
        return self.tmp / "run"


@dataclass
class Row:
    argv: Callable[[Where], list[str]]
    names: Callable[[Where], str]          # text the one error line must hold
    needs: tuple[str, ...] = ()            # fixtures beyond the table's: "s3_server", "read_only"


def train(*extra: str) -> Callable[[Where], list[str]]:
    """A tiny_mf submission (a global batch of 24: 1 or 3 tasks) into the row's own run and log folders;
    ``{w.…}`` in ``extra`` is filled in."""
    return lambda w: ["--cluster", "local", "--config", "tiny_mf", "--run-dir", str(w.run), "run.steps=2",
                      "data.global_batch=24", f"cluster.log_dir={w.tmp}/logs", *(arg.format(w=w) for arg in extra)]


def split_mf_teacher(url: str) -> Callable[[Where], list[str]]:
    return train("objective.name=split_mf", "objective.split_mf.v_source=teacher", f"objective.split_mf.teacher={url}")


def list_yaml(folder: Path) -> Path:
    path = folder / "list.yaml"
    path.write_text("- run\n- model\n")
    return path


def constant_features_reference(folder: Path) -> Path:
    """digits-cnn reference statistics of features that never vary (sigma = 0): every FID against them is noise."""
    path = folder / "ref.npz"
    save_reference(ReferenceStats(np.ones(16), np.zeros((16, 16)), 100, DIGITS, "ab" * 32, str(path)), str(path))
    return path


def config_only_run(folder: Path) -> Path:
    """A run directory whose job died before its first checkpoint: config.yaml, nothing committed."""
    run = folder / "started"
    run.mkdir()
    (run / "config.yaml").write_text(save_config(load_config("tiny_mf", [f"run.run_dir={run}"])))
    return run


ROWS = {
    # ---- the config file and its values
    "yaml-top-level-is-a-list": Row(lambda w: ["--config", str(list_yaml(w.tmp)), "--run-dir", str(w.run)],
                                    lambda w: str(w.tmp / "list.yaml")),
    "non-finite-number": Row(train("optim.lr=inf"), lambda w: "optim.lr"),
    "dmf-on-a-standard-model": Row(train("objective.name=dmf"), lambda w: "model.conditioning"),
    "dmf-depth-beyond-the-model": Row(train("objective.name=dmf", "model.conditioning=decoupled", "model.dmf_depth=99"),
                                      lambda w: "model.dmf_depth"),
    "eval-steps-not-decreasing": Row(train("eval.steps=[0,0.5,1]"), lambda w: "eval.steps"),
    # ---- what the config points at
    "init-from-missing": Row(train("model.init_from={w.tmp}/missing.safetensors"), lambda w: "model.init_from"),
    "init-from-another-shape": Row(train("model.init_from={w.other_shape}"), lambda w: "model.init_from"),
    "teacher-missing": Row(split_mf_teacher("{w.tmp}/missing"), lambda w: "objective.split_mf.teacher"),
    "teacher-of-another-shape": Row(split_mf_teacher("{w.other_shape}"), lambda w: "objective.split_mf.teacher"),
    "num-classes-not-the-datas": Row(train("model.num_classes=5"), lambda w: "model.num_classes"),
    # ---- the world
    "batch-not-divisible-by-the-tasks": Row(train("data.global_batch=16", "cluster.tasks_per_node=3"),
                                            lambda w: "data.global_batch"),
    # ---- storage
    "run-dir-s3-without-bucket": Row(lambda w: [*train()(w), "--run-dir", "s3://"], lambda w: "s3://"),
    "run-dir-unknown-protocol": Row(lambda w: [*train()(w), "--run-dir", "foo://x"], lambda w: "foo://x"),
    "checkpoint-url-a-regular-file": Row(train("checkpoint.url={w.tmp}/file"), lambda w: str(w.tmp / "file")),
    "checkpoint-url-missing-bucket": Row(train("checkpoint.url=s3://no-such-bucket/x"), lambda w: "no-such-bucket",
                                         needs=("s3_server",)),
    "run-dir-read-only": Row(lambda w: [*train()(w), "--run-dir", str(w.read_only / "run")],
                             lambda w: str(w.read_only), needs=("read_only",)),
    # ---- what an evaluation measures with
    "reference-stats-of-constant-features": Row(
        lambda w: train(f"eval.reference_stats={constant_features_reference(w.tmp)}")(w),
        lambda w: "eval.reference_stats"),
    "digits-cnn-on-3-channel-data": Row(train("data.name=webdataset", "data.url={w.rgb_shards}", "model.in_channels=3",
                                              "model.num_classes=0", "eval.feature_extractor=digits-cnn"),
                                        lambda w: "eval.feature_extractor"),
    "digits-cnn-on-3-channel-data-scheduled-evaluations-only": Row(
        train("data.name=webdataset", "data.url={w.rgb_shards}", "model.in_channels=3", "model.num_classes=0",
              "eval.feature_extractor=digits-cnn", "eval.at_end=false", "eval.every=10"),
        lambda w: "eval.feature_extractor"),
    "pixel-flip-on-data-it-cannot-flip": Row(train("data.pixel_flip=true"), lambda w: "data.pixel_flip"),
    "feature-extractor-changed-on-resume": Row(lambda w: [*train("data.global_batch=16")(w), "--run-dir",
                                                          str(w.trained), "eval.feature_extractor=digits-cnn"],
                                               lambda w: "eval.feature_extractor"),
    # ---- commands on a run directory
    "sample-num-0": Row(lambda w: ["sample", "--run-dir", str(w.trained), "--num", "0"], lambda w: "--num"),
    "sample-out-read-only": Row(lambda w: ["sample", "--run-dir", str(w.trained), "--num", "2", "--out",
                                           str(w.read_only / "x")], lambda w: "--out", needs=("read_only",)),
    "plot-out-read-only": Row(lambda w: ["plot", "--run-dir", str(w.trained), "--out", str(w.read_only / "p.png")],
                              lambda w: "--out", needs=("read_only",)),
    "eval-all-without-a-checkpoint": Row(lambda w: ["eval", "--run-dir", str(config_only_run(w.tmp)), "--all"],
                                         lambda w: "--all"),
}


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from meanflow.jobs.train import Trainer

    run = tmp_path_factory.mktemp("trained") / "run"
    cfg = load_config("tiny_mf", [f"run.run_dir={run}", "run.steps=2", "run.log_every=1", "data.global_batch=16",
                                  "eval.at_end=false"])
    Trainer(cfg, stdout=io.StringIO()).run()
    return run


@pytest.fixture(scope="module")
def other_shape(tmp_path_factory):
    model = build_model(load_config("tiny_mf", ["model.width=32"]).model)
    path = tmp_path_factory.mktemp("export") / "width32.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


@pytest.fixture(scope="module")
def rgb_shards(tmp_path_factory):
    folder = tmp_path_factory.mktemp("rgb")
    np.savez(folder / "rgb.npz", x=np.random.default_rng(0).integers(0, 256, (48, 8, 8, 3), dtype=np.uint8))
    write_shards(open_source(f"npz:{folder / 'rgb.npz'}"), str(folder / "shards"), samples_per_shard=16,
                 show_progress=False)
    return folder / "shards"


@pytest.fixture(scope="module")
def read_only(tmp_path_factory):
    """A read-only tmpfs: root writes through chmod, not through a read-only mount."""
    folder = tmp_path_factory.mktemp("read-only")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)],
                             capture_output=True, text=True, timeout=30)
    if mounted.returncode:
        pytest.skip(f"cannot mount a read-only tmpfs here: {mounted.stderr.strip()}")
    yield folder
    subprocess.run(["umount", str(folder)], check=True, timeout=30)


def files_under(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*") if p.is_file()} if folder.exists() else set()


# ------------------------------------------------------------------------------------------------ the table
@pytest.mark.parametrize("name", ROWS)
def test_bad_input_exits_2_naming_it_and_leaves_nothing_behind(name, tmp_path, trained, other_shape, rgb_shards,
                                                             request, capsys, one_thread):
    row = ROWS[name]
    needed = {fixture: request.getfixturevalue(fixture) for fixture in row.needs}
    where = Where(tmp_path, trained, other_shape, rgb_shards, needed.get("read_only"))
    (tmp_path / "file").write_text("a regular file")
    argv = row.argv(where)
    before = files_under(trained) | files_under(tmp_path)
    try:
        code = submit(argv)
    except SystemExit as exit_:   # argparse's own refusals
        code = exit_.code
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert row.names(where) in err
    assert files_under(trained) | files_under(tmp_path) == before, "a refused command wrote files"
    assert not files_under(where.run) and not (tmp_path / "logs").exists()

"""Config schema: YAML + dotlist overrides, validated; bad input names the key and the file, exit code 2."""

import subprocess
import sys
from pathlib import Path

import pytest

from meanflow.platform.config import ConfigError, load_config, save_config

pytestmark = pytest.mark.timeout(120)
REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["tiny_mf", "tiny_imf", "toy2d_mf", "toy2d_imf"])
def test_every_shipped_config_loads(name):
    cfg = load_config(name)
    assert cfg.run.name == name
    assert "${" not in save_config(cfg)          # resolved: the saved config is self-contained


def test_overrides_apply_with_types():
    cfg = load_config("tiny_mf", ["optim.lr=3e-4", "run.steps=7", "objective.name=sg_lambda"])
    assert cfg.optim.lr == 3e-4 and cfg.run.steps == 7 and cfg.objective.name == "sg_lambda"


@pytest.mark.parametrize("yaml_text, key", [("model:\n  widht: 64\n", "model.widht"),    # unknown key
                                             ("optim:\n  lr: fast\n", "optim.lr")])      # wrong type
def test_bad_yaml_names_key_and_file(tmp_path, yaml_text, key):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml_text)
    with pytest.raises(ConfigError) as err:
        load_config(str(bad))
    assert key in str(err.value) and str(bad) in str(err.value)


def test_unknown_override_key_is_rejected():
    with pytest.raises(ConfigError, match="objective.nmae"):
        load_config("tiny_mf", ["objective.nmae=mf"])


def test_bad_choice_is_rejected_with_key():
    with pytest.raises(ConfigError, match="objective.name"):
        load_config("tiny_mf", ["objective.name=meanflw"])


def test_grad_accum_must_divide_batch():
    with pytest.raises(ConfigError, match="optim.grad_accum"):
        load_config("tiny_mf", ["optim.grad_accum=3"])


def test_missing_config_file_lists_known_configs():
    with pytest.raises(ConfigError, match="tiny_mf"):
        load_config("no_such_config")


def test_cli_bad_key_exits_2_and_names_it(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "jobs" / "submit.py"), "--config", "tiny_mf",
                           "--run-dir", f"file://{tmp_path}/run", "model.widht=3"],
                          capture_output=True, text=True, timeout=100)
    assert proc.returncode == 2
    assert "model.widht" in proc.stderr
    assert not (tmp_path / "run").exists()          # nothing written for a rejected config


@pytest.mark.parametrize("overrides", [["data.name=webdataset"], ["data.url=s3://bucket/train"]])
def test_data_url_goes_with_webdataset_only(overrides):
    with pytest.raises(ConfigError, match="data.url"):
        load_config("tiny_mf", overrides)

"""Config schema: YAML + dotlist overrides, validated; bad input names the key and the file, exit code 2."""

import dataclasses
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from meanflow.platform import config
from meanflow.platform.config import ConfigError, load_config, save_config

pytestmark = pytest.mark.timeout(120)
REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", sorted(p.stem for p in (REPO / "configs").glob("*.yaml")))
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


def test_the_fused_jvp_attention_is_refused_inside_a_compiled_jvp():
    with pytest.raises(ConfigError, match="'objective.jvp_attention': 'fused' cannot run inside the compiled JVP"):
        load_config("tiny_mf", ["engine.compile=all", "objective.jvp_attention=fused"])
    load_config("tiny_mf", ["engine.compile=outside_jvp", "objective.jvp_attention=fused"])


def test_eval_nodes_must_divide_eval_tasks():
    with pytest.raises(ConfigError, match="'eval.nodes': 2 does not divide eval.tasks = 3"):
        load_config("tiny_mf", ["eval.tasks=3", "eval.nodes=2"])
    assert load_config("tiny_mf", ["eval.tasks=4", "eval.nodes=2"]).eval.nodes == 2


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


# ---------------------------------------------------------------------------------------------- ranges


@pytest.mark.parametrize("override, key, value", [
    ("run.steps=-5", "run.steps", "-5"),
    ("run.steps=0", "run.steps", "0"),
    ("run.log_every=0", "run.log_every", "0"),
    ("checkpoint.every=-1", "checkpoint.every", "-1"),
    ("checkpoint.keep_last=-1", "checkpoint.keep_last", "-1"),
    ("checkpoint.upload_timeout_s=0", "checkpoint.upload_timeout_s", "0"),
    ("cluster.nodes=0", "cluster.nodes", "0"),
    ("cluster.nodes=-1", "cluster.nodes", "-1"),
    ("cluster.gpus_per_node=-1", "cluster.gpus_per_node", "-1"),
    ("cluster.tasks_per_node=0", "cluster.tasks_per_node", "0"),
    ("cluster.mem_gb=-5", "cluster.mem_gb", "-5"),
    ("eval.num_samples=0", "eval.num_samples", "0"),
    ("data.global_batch=0", "data.global_batch", "0"),
    ("optim.lr=-1", "optim.lr", "-1"),
    ("optim.lr=nan", "optim.lr", "nan"),
    ("optim.ema_decay=1.0", "optim.ema_decay", "1.0"),
    ("optim.betas=[0.9,1.5]", "optim.betas[1]", "1.5"),
    ("objective.time.share_r_eq_t=1.5", "objective.time.share_r_eq_t", "1.5"),
    ("objective.label_drop=-0.1", "objective.label_drop", "-0.1"),
    ("objective.guidance.kappa=1.0", "objective.guidance.kappa", "1.0"),
    ("engine.process_group_timeout_s=0", "engine.process_group_timeout_s", "0"),
    ("guard.cooldown_factor=0", "guard.cooldown_factor", "0"),
    ("model.prefix_tokens=[8,0,2,2,4]", "model.prefix_tokens[1]", "0"),
    ("eval.guidance=[{omega: 2.0, t_min: 0.0, t_max: 1.5}]", "eval.guidance[0].t_max", "1.5"),
])
def test_a_number_out_of_its_range_names_key_value_and_range(override, key, value):
    with pytest.raises(ConfigError) as err:
        load_config("toy2d_mf", [override])
    message = str(err.value)
    assert f"key '{key}': {value}" in message and "out of range (must be " in message


def test_out_of_range_message_reads_as_a_bound():
    with pytest.raises(ConfigError, match=r"key 'run.steps': -5 is out of range \(must be ≥ 1\)"):
        load_config("toy2d_mf", ["run.steps=-5"])
    with pytest.raises(ConfigError, match=r"key 'optim.ema_decay': 1.0 is out of range \(must be in \[0, 1\)\)"):
        load_config("toy2d_mf", ["optim.ema_decay=1.0"])


@pytest.mark.parametrize("override", ["optim.ema_decay=0", "checkpoint.every=0", "checkpoint.keep_last=0",
                                      "model.width=0", "model.depth=null", "objective.imf.s_max=0",
                                      "objective.time.share_r_eq_t=1.0", "cluster.gpus_per_node=0",
                                      "objective.time.mu=-2.0", "objective.stability.active_until_step=null"])
def test_a_range_includes_its_bounds_and_null(override):
    load_config("toy2d_mf", [override])


def _numeric(hint) -> bool:
    """int or float, bare or inside Optional[...] / List[...] (bool is not a number here)."""
    return hint in (int, float) or any(_numeric(arg) for arg in typing.get_args(hint))


def test_every_numeric_field_declares_a_range():
    choices = config.choices()
    unbounded = []

    def walk(schema, prefix):
        hints = typing.get_type_hints(schema)
        for f in dataclasses.fields(schema):
            key, hint = prefix + f.name, hints[f.name]
            sections = [t for t in (hint, *typing.get_args(hint)) if dataclasses.is_dataclass(t)]
            if sections:
                walk(sections[0], key + ".")
            elif _numeric(hint) and "range" not in f.metadata and key not in choices:
                unbounded.append(key)

    walk(config.Config, "")
    assert unbounded == []
    assert str(config.ranges()["eval.guidance.t_max"]) == "in [0, 1]"


# --------------------------------------------------------------------------------------------- choices


def test_objective_choices_are_the_objectives_registry(monkeypatch):
    from meanflow.objectives import OBJECTIVES, WRAPPERS, FlowMatching

    assert config.CHOICES["objective.name"] == (*OBJECTIVES, *WRAPPERS)
    assert config.CHOICES["objective.stability.base"] == tuple(OBJECTIVES)
    with pytest.raises(ConfigError, match="objective.name"):
        load_config("toy2d_mf", ["objective.name=my_fm"])
    monkeypatch.setitem(OBJECTIVES, "my_fm", FlowMatching)     # registering it is the one edit that admits it
    assert load_config("toy2d_mf", ["objective.name=my_fm"]).objective.name == "my_fm"


def test_engine_and_model_choices_come_from_their_registries():
    from meanflow.models.registry import FAMILIES, IMF_DIT_SIZES, MF_DIT_SIZES
    from meanflow.platform.engines import KINDS
    from meanflow.platform.engines.fsdp2 import STRATEGIES

    assert config.CHOICES["engine.kind"] == KINDS
    assert config.CHOICES["engine.fsdp_strategy"] == STRATEGIES
    assert config.CHOICES["model.family"] == FAMILIES
    assert set(config.CHOICES["model.size"]) == set(MF_DIT_SIZES) | set(IMF_DIT_SIZES)


def test_config_import_and_a_range_error_do_not_import_torch():
    # the CLI imports config for --help and rejects a bad config before its heavy imports; only the registries'
    # choices, checked last, import the modules (and torch) that own them
    code = ("import sys\nfrom meanflow.platform.config import ConfigError, load_config\n"
            "try:\n    load_config('toy2d_mf', ['run.steps=-5'])\nexcept ConfigError:\n"
            "    sys.exit('torch' in sys.modules)\nsys.exit(2)")
    assert subprocess.run([sys.executable, "-c", code], timeout=100).returncode == 0


# ------------------------------------------------------------------------------------------------- CLI


@pytest.mark.parametrize("argv, key", [(["run.steps=-5"], "run.steps"), (["--nodes", "0"], "cluster.nodes")])
def test_cli_out_of_range_exits_2_and_names_the_key(argv, key, capsys):
    from meanflow.jobs.submit import main as submit

    assert submit(["--cluster", "local", "--config", "toy2d_mf", "--dry-run", *argv]) == 2
    assert key in capsys.readouterr().err

"""Distributed engines on 2 real processes (gloo, CPU): parity with one process on the same global batch, exact
resume, and the startup JVP check."""

from __future__ import annotations

import pytest
import torch

from distributed_run import losses, model_state, run_world, sharded_jvp_check, skip_check
from meanflow.jobs.train import Trainer
from meanflow.models import build_model
from meanflow.platform.checkpoint import CheckpointStore
from meanflow.platform.config import load_config

pytestmark = pytest.mark.timeout(240)

OBJECTIVES = {   # config, extra overrides
    "mf": ("tiny_mf", []),
    "sg_lambda": ("tiny_mf", ["objective.name=sg_lambda", "objective.sg_lambda.start=1.0",
                              "objective.sg_lambda.end=1.0"]),
    "imf": ("tiny_imf", []),
    "stability": ("tiny_mf", ["objective.name=stability", "objective.stability.base=mf"]),
    # α from about 0.6 down (the interval rows' no-grad forward), then α = 0 at step 4 (MF's JVP)
    "alphaflow": ("tiny_mf", ["objective.name=alphaflow", "objective.alphaflow.end_step=4",
                              "objective.alphaflow.gamma=1"]),
    "split_mf": ("tiny_mf", ["objective.name=split_mf", "objective.weight_p=0"]),
    "dmf": ("tiny_dmf", []),
}


def common(run_dir, steps: int) -> list[str]:
    return [f"run.run_dir={run_dir}", f"run.steps={steps}", "run.log_every=1", "data.global_batch=16",
            "eval.num_samples=10", "optim.warmup_steps=1", "checkpoint.every=0"]


@pytest.fixture(scope="module")
def single_runs(tmp_path_factory):
    """The reference: each objective for 5 steps in one process."""
    out = {}
    for name, (config, extra) in OBJECTIVES.items():
        run_dir = tmp_path_factory.mktemp(f"single-{name}")
        Trainer(load_config(config, [*common(run_dir, 5), *extra])).run()
        out[name] = run_dir
    return out


ENGINE_VARIANTS = {"ddp": ["engine.kind=ddp"], "fsdp2": ["engine.kind=fsdp2"],
                   "deepspeed": ["engine.kind=deepspeed", "engine.deepspeed_stage=2"]}
EXTRA_VARIANTS = {"fsdp2-shard_grad_op": ["engine.kind=fsdp2", "engine.fsdp_strategy=shard_grad_op"],
                  "deepspeed-zero1": ["engine.kind=deepspeed", "engine.deepspeed_stage=1"],
                  # recomputation inside FSDP2's per-block all-gathers, with a backward through the tangent
                  "fsdp2-checkpointing": ["engine.kind=fsdp2", "engine.activation_checkpointing=true"]}
EXTRA_CASES = [("fsdp2-shard_grad_op", "mf"), ("deepspeed-zero1", "mf"), ("fsdp2-checkpointing", "sg_lambda")]


@pytest.mark.parametrize("engine,objective", [(e, o) for e in ENGINE_VARIANTS for o in OBJECTIVES] + EXTRA_CASES)
def test_two_ranks_match_one_process(engine, objective, single_runs, tmp_path):
    config, extra = OBJECTIVES[objective]
    run_world(2, config, [*common(tmp_path, 5), *extra, *{**ENGINE_VARIANTS, **EXTRA_VARIANTS}[engine]])
    # Tolerance: the same sums in another order (per-rank means, then an all-reduce) differ in the last bits.
    torch.testing.assert_close(losses(tmp_path), losses(single_runs[objective]), rtol=1e-5, atol=1e-6)
    reference = model_state(single_runs[objective], 5)
    # atol: AdamW divides by √v, so a weight whose gradient is near zero moves by up to lr = 1e-3 per step on
    # last-bit noise of the summation order (seen 5e-6 on iMF's first MLP); a wrong gradient moves it by ~lr.
    for key, value in model_state(tmp_path, 5).items():
        torch.testing.assert_close(value, reference[key], rtol=1e-4, atol=2e-5, msg=key)


@pytest.mark.parametrize("engine,async_save", [("ddp", False), ("fsdp2", True), ("deepspeed", False)])
def test_two_rank_resume_is_bitwise_exact(engine, async_save, tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    kind = [f"engine.kind={engine}", f"checkpoint.async_save={async_save}"]
    run_world(2, "tiny_mf", [*common(straight, 6), *kind])
    run_world(2, "tiny_mf", [*common(split, 3), *kind, "checkpoint.every=1"])
    run_world(2, "tiny_mf", [*common(split, 6), *kind])   # resumes: the dir holds step 3
    assert losses(split) == losses(straight)
    for component in ("model", "ema"):
        for key, value in model_state(split, 6, component).items():
            assert torch.equal(value, model_state(straight, 6, component)[key]), (component, key)
    # what evaluation and export read: the EMA, from any engine's files, by one process
    template = build_model(load_config("tiny_mf").model).state_dict()
    weights, which = CheckpointStore(str(split / "checkpoints")).load_weights(6, template)
    assert which == "ema" and weights.keys() == template.keys()
    for key, value in model_state(split, 6, "ema").items():
        assert torch.equal(weights[key], value), key


def test_fsdp2_resumes_on_another_world_size(single_runs, tmp_path):
    """DCP reshards: 3 steps on 2 ranks, then 2 more on 1 rank, lands where 5 steps in one process do (the
    embedded data and every random draw are world-size invariant)."""
    config, extra = OBJECTIVES["mf"]
    run_world(2, config, [*common(tmp_path, 3), *extra, "engine.kind=fsdp2"])
    run_world(1, config, [*common(tmp_path, 5), *extra, "engine.kind=fsdp2"])
    torch.testing.assert_close(losses(tmp_path), losses(single_runs["mf"]), rtol=1e-5, atol=1e-6)


def test_bf16_autocast_trains_close_to_fp32(single_runs, tmp_path):
    config, extra = OBJECTIVES["imf"]
    run_world(2, config, [*common(tmp_path, 5), *extra, "engine.kind=fsdp2", "engine.precision=bf16"])
    torch.testing.assert_close(losses(tmp_path), losses(single_runs["imf"]), rtol=2e-2, atol=1e-3)
    assert losses(tmp_path) != losses(single_runs["imf"])      # bf16 really ran: not the fp32 numbers


@pytest.mark.parametrize("engine", ["ddp", "fsdp2", "deepspeed"])
def test_a_skipped_step_leaves_no_trace(engine, tmp_path):
    result = skip_check(2, engine, tmp_path / "skip.json")
    assert result == {"untouched": True, "same_after": True}


def test_sharded_jvp_equals_the_unsharded_jvp(tmp_path):
    result = sharded_jvp_check(2, tmp_path / "jvp.json")
    assert result["tangent_scale"] > 1e-2                  # perturbed weights: not the zero-output initialisation
    assert result["primal"] < 1e-5 and result["tangent"] < 1e-5 * max(1.0, result["tangent_scale"])

"""Run the trainer on N real processes (gloo on CPU), the way a launcher would: torchrun-style environment
variables per rank, a short process-group timeout, spawned processes (no fork after torch threads exist)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
import torch.multiprocessing as mp

from s3_server import free_port

PG_TIMEOUT = "engine.process_group_timeout_s=60"


def _rank_main(rank: int, world: int, port: int, config: str, overrides: list[str], env: dict) -> None:
    os.environ.update(env)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    from meanflow.jobs.train import Trainer
    from meanflow.platform.config import load_config

    # PG_TIMEOUT first: a caller's own engine.process_group_timeout_s wins
    Trainer(load_config(config, [PG_TIMEOUT, *overrides]), stdout=open(os.devnull, "w")).run()


def run_world(world: int, config: str, overrides: list[str], env: dict | None = None) -> None:
    """Train on ``world`` processes; raises if any rank fails."""
    mp.start_processes(_rank_main, args=(world, free_port(), config, list(overrides), dict(env or {})),
                       nprocs=world, start_method="spawn", join=True)


def losses(run_dir: Path) -> list[float]:
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines if '"event"' not in line]


def model_state(run_dir: Path, step: int, component: str = "model") -> dict[str, torch.Tensor]:
    """A committed step's full (unsharded) ``component`` state dict, whatever engine wrote it."""
    step_dir = Path(run_dir) / "checkpoints" / f"step-{step:08d}"
    commit = json.loads((step_dir / "COMMIT.json").read_text())
    if commit["format"] == "torch":
        return torch.load(step_dir / f"{component}.pt", weights_only=True)
    plain = step_dir / "engine" / f"{component}.pt"
    if plain.exists():   # deepspeed: rank 0 writes the whole module and the EMA as plain tensor files
        return torch.load(plain, weights_only=True)
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "full.pt"
        dcp_to_torch_save(step_dir / "engine", out)
        return torch.load(out, weights_only=True)[component]


def _skip_rank_main(rank: int, world: int, port: int, kind: str, out: str) -> None:
    """Engine A: apply (batch 0), skip (batch 1), apply (batch 2). Engine B: apply (batch 0), apply (batch 2).
    A skip must leave parameters and optimizer state untouched, and no gradient behind for the next step."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from meanflow.data_pipeline import build_stream
    from meanflow.models import build_model
    from meanflow.objectives import ObjectiveContext, build_objective
    from meanflow.platform.config import load_config
    from meanflow.platform.distributed import init_distributed, resolve_env, shutdown
    from meanflow.platform.engines import build_engine
    from meanflow.platform.engines.base import local_tensor

    cfg = load_config("tiny_mf", [f"engine.kind={kind}", "data.global_batch=16", "optim.warmup_steps=1"])
    device = torch.device("cpu")
    init_distributed(resolve_env(), device, 60, required=True)
    objective = build_objective(cfg.objective, cfg.model.num_classes)
    local = cfg.data.global_batch // world

    def factory():
        torch.manual_seed(0)
        return build_model(cfg.model)

    def one_step(engine, stream, step: int, action: str) -> None:
        ctx = ObjectiveContext(seed=0, global_batch=cfg.data.global_batch, rows=rank * local + torch.arange(local),
                               rank=rank, world_size=world)
        loss, _ = objective(engine.model, stream.next_batch(), step, ctx)
        engine.backward(loss * (1e3 if action == "skip" else 1.0))   # a big gradient would show if it leaked
        engine.skip() if action == "skip" else engine.apply(step)

    def snapshot(engine) -> list[torch.Tensor]:
        tensors = [local_tensor(p).detach().clone() for p in engine.model.parameters()]
        for state in engine.optimizer.state.values():
            tensors += [local_tensor(v).clone() for v in state.values() if isinstance(v, torch.Tensor)]
        return tensors

    a, b = (build_engine(cfg.engine, cfg.optim, factory, device, world) for _ in range(2))
    stream_a, stream_b = (build_stream(cfg.data, 0, rank, world) for _ in range(2))
    one_step(a, stream_a, 0, "apply")
    before = snapshot(a)
    one_step(a, stream_a, 1, "skip")
    untouched = all(torch.equal(x, y) for x, y in zip(before, snapshot(a)))
    one_step(a, stream_a, 2, "apply")
    one_step(b, stream_b, 0, "apply")
    stream_b.skip(cfg.data.global_batch)
    one_step(b, stream_b, 2, "apply")
    same_after = all(torch.equal(x, y) for x, y in zip(snapshot(a), snapshot(b)))
    if rank == 0:
        Path(out).write_text(json.dumps({"untouched": untouched, "same_after": same_after}))
    shutdown()   # a process that exits with a live gloo group can abort in its destructor


def skip_check(world: int, kind: str, out: Path) -> dict:
    mp.start_processes(_skip_rank_main, args=(world, free_port(), kind, str(out)), nprocs=world,
                       start_method="spawn", join=True)
    return json.loads(Path(out).read_text())


def _sharded_jvp_main(rank: int, world: int, port: int, out: str) -> None:
    """The forward-mode JVP through the fully_shard-ed iMF-DiT equals the unsharded model's, on weights that
    are not the (zero-output) initialisation."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    from meanflow.models import build_model
    from meanflow.objectives import guidance_conditions
    from meanflow.objectives.base import model_u
    from meanflow.objectives.jvp import jvp
    from meanflow.platform.config import load_config
    from meanflow.platform.distributed import init_distributed, resolve_env, shutdown
    from meanflow.platform.engines.fsdp2 import shard_model
    from meanflow.platform.engines.jvp_patches import patch_fsdp2_forward_ad

    cfg = load_config("tiny_imf")
    init_distributed(resolve_env(), torch.device("cpu"), 60, required=True)
    torch.manual_seed(0)
    reference = build_model(cfg.model)
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.05 * torch.randn_like(p))
    patch_fsdp2_forward_ad()
    sharded = shard_model(build_model(cfg.model), "full_shard")
    set_model_state_dict(sharded, reference.state_dict(),   # the full state in; each rank keeps its shards
                         options=StateDictOptions(full_state_dict=True))
    g = torch.Generator().manual_seed(1)
    z, v = torch.randn(4, 1, 8, 8, generator=g), torch.randn(4, 1, 8, 8, generator=g)
    t, y = torch.rand(4, generator=g), torch.randint(10, (4,), generator=g)
    omega = guidance_conditions(4, 2.0)
    outs = []
    for model in (reference, sharded):
        def u(z, t, r, model=model):
            return model_u(model(z, t=t, r=r, y=y, omega=omega))
        outs.append(jvp(u, {"z": z, "t": t, "r": t * 0.3}, {"z": v, "t": 1.0, "r": 0.0}))
    if rank == 0:
        (u_ref, du_ref), (u_sh, du_sh) = outs
        Path(out).write_text(json.dumps({"primal": (u_ref - u_sh).abs().max().item(),
                                         "tangent": (du_ref - du_sh).abs().max().item(),
                                         "tangent_scale": du_ref.abs().max().item()}))
    shutdown()


def sharded_jvp_check(world: int, out: Path) -> dict:
    mp.start_processes(_sharded_jvp_main, args=(world, free_port(), str(out)), nprocs=world, start_method="spawn",
                       join=True)
    return json.loads(Path(out).read_text())


def _feature_stats_main(rank: int, world: int, port: int, out: str) -> None:
    """Each rank sums its share of a fixed feature set (rows i ≡ rank mod world); the all-reduced moments and IS
    sums must equal one process's."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    from meanflow.evaluation.feature_stats import FeatureMoments, InceptionScoreSums
    from meanflow.platform.distributed import init_distributed, resolve_env, shutdown

    init_distributed(resolve_env(), torch.device("cpu"), 60, required=True)
    g = torch.Generator().manual_seed(0)
    feats, logits = torch.randn(301, 8, generator=g), torch.randn(301, 5, generator=g)
    mine = torch.arange(rank, 301, world)
    moments, sums = FeatureMoments(8), InceptionScoreSums(5, 301, splits=4)
    moments.add(feats[mine])
    sums.add(logits[mine], mine)
    moments.all_reduce()
    sums.all_reduce()
    if rank == 0:
        mu, sigma = moments.mean_cov()
        Path(out).write_text(json.dumps({"mu": mu.tolist(), "sigma": sigma.tolist(), "is": sums.score()}))
    shutdown()


def feature_stats_over(world: int, out: Path) -> dict:
    mp.start_processes(_feature_stats_main, args=(world, free_port(), str(out)), nprocs=world, start_method="spawn",
                       join=True)
    return json.loads(Path(out).read_text())


def _evaluate_main(rank: int, world: int, port: int, run_dir: str, overrides: list[str], out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    from meanflow.jobs.evaluate import evaluate_steps

    rows = evaluate_steps(run_dir, overrides=[*overrides, PG_TIMEOUT], force=True, stdout=open(os.devnull, "w"))
    if rank == 0:
        Path(out).write_text(json.dumps(rows))


def evaluate_over(world: int, run_dir: str, overrides: list[str], out: Path) -> list[dict]:
    """The evaluation job on ``world`` processes; rank 0's metrics rows."""
    mp.start_processes(_evaluate_main, args=(world, free_port(), run_dir, list(overrides), str(out)), nprocs=world,
                       start_method="spawn", join=True)
    return json.loads(Path(out).read_text())

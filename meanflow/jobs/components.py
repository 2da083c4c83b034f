"""What a training job is made of, each built from its config section and checked against the others before the
first step: the data stream, the engine (model, optimizer, EMA), the objective and its context, the checkpoint
store, the guard's parts and the end-of-run evaluator. A failure of the user's making is a ``ConfigError`` naming
the key (exit code 2)."""

from __future__ import annotations

import warnings

import torch
from omegaconf import DictConfig

from meanflow.data_pipeline import build_stream
from meanflow.evaluation.evaluator import Evaluator, describe_data, feature_extractor_for
from meanflow.evaluation.sampling import sampling_setting
from meanflow.models import build_model, count_parameters
from meanflow.models.decoupled_init import init_from_flow_model
from meanflow.models.execution import configure_execution
from meanflow.models.pretrained import load_flow_weights, load_teacher
from meanflow.objectives import ObjectiveContext, build_objective
from meanflow.platform.checkpoint import CheckpointStore
from meanflow.platform.config import ConfigError
from meanflow.platform.distributed import DistEnv, DistributedEnvError, init_distributed, task_device
from meanflow.platform.engines import SHARDED_KINDS, build_engine
from meanflow.platform.guard import Guard, Recovery, RollbackTargets, build_fault_injector
from meanflow.platform.storage import join

from .preflight import check_batch_splits, check_data_fits_model


def resolve_device(name: str, env: DistEnv = DistEnv()) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("engine.device: cuda requested but no GPU is visible")
    try:
        return task_device(name, env.local_rank)
    except DistributedEnvError as err:   # more tasks than GPUs on a node: the submission's settings, exit 2
        raise ConfigError(str(err)) from err


def process_group(cfg: DictConfig, env: DistEnv, device: torch.device) -> None:
    """The default process group for a launched world, and for a sharded engine even alone."""
    init_distributed(env, device, cfg.engine.process_group_timeout_s, required=cfg.engine.kind in SHARDED_KINDS)


def data_stream(cfg: DictConfig, env: DistEnv):
    """This rank's stream of the global batches, checked against the model and the world."""
    check_batch_splits(cfg.data.global_batch, env.world_size, cfg.optim.grad_accum)
    try:
        stream = build_stream(cfg.data, cfg.run.seed, env.rank, env.world_size)
    except (ValueError, OSError) as err:   # no manifest, missing shard, too few shards: bad input, exit 2
        raise ConfigError(f"data: {err}") from err
    check_data_fits_model(cfg.model, stream)
    return stream


def training_engine(cfg: DictConfig, device: torch.device, env: DistEnv):
    """The engine ``engine.kind`` names, over identical initial weights on every rank, with the model's execution
    settings (JVP attention backend, compiled and checkpointed blocks) in force."""
    start = starting_weights(cfg.model.init_from)

    def model_factory():
        torch.manual_seed(cfg.run.seed)                  # the same initial weights on every rank and rebuild
        return initial_model(cfg.model, start)

    try:
        configure_execution(cfg.objective.jvp_attention, cfg.engine.compile, cfg.engine.activation_checkpointing,
                            cfg.engine.compile_backend)
        return build_engine(cfg.engine, cfg.optim, model_factory, device, env.world_size)
    except ValueError as err:
        raise ConfigError(str(err)) from err


def initial_model(model_cfg: DictConfig, start: dict[str, torch.Tensor] | None) -> torch.nn.Module:
    """The model ``model_cfg`` describes, started from ``start`` (model.init_from's weights) where given."""
    model = build_model(model_cfg)
    if start is not None:                                # a resume then loads its checkpoint over these
        init_from_flow_model(model, start)
    return model


def starting_weights(url: str) -> dict[str, torch.Tensor] | None:
    """model.init_from's state dict (read once: sharded engines build the model twice, for the EMA too)."""
    if not url:
        return None
    try:
        return load_flow_weights(url)
    except (ValueError, OSError) as err:
        raise ConfigError(f"model.init_from {url}: {err}") from err


def objective_with_context(cfg: DictConfig, stream, env: DistEnv, device: torch.device):
    """The objective, and a function giving its context for a micro-batch's rows of the global batch. What an
    objective needs beyond the model it declares (the marginal-velocity oracle), and the stream offers; a
    SplitMeanFlow distillation's frozen teacher."""
    objective = build_objective(cfg.objective, cfg.model.num_classes)
    oracle = stream.marginal_velocity() if objective.needs_marginal_velocity else None
    teacher = frozen_teacher(cfg, device)

    def context(rows: torch.Tensor, ema_model) -> ObjectiveContext:
        return ObjectiveContext(seed=cfg.run.seed, global_batch=cfg.data.global_batch, rows=rows,
                                ema_model=ema_model, rank=env.rank, world_size=env.world_size,
                                marginal_velocity=oracle, teacher=teacher)

    return objective, context


def frozen_teacher(cfg: DictConfig, device: torch.device):
    """objective.split_mf.teacher's flow model when split_mf (itself, or under stability) distils from it."""
    o = cfg.objective
    distils = "split_mf" in (o.name, o.stability.base if o.name == "stability" else None)
    if not distils or o.split_mf.v_source != "teacher":
        return None
    try:
        return load_teacher(cfg.model, o.split_mf.teacher, device)
    except (ValueError, OSError, RuntimeError) as err:   # RuntimeError: the weights do not fit the model config
        raise ConfigError(f"objective.split_mf.teacher {o.split_mf.teacher or '(empty)'}: {one_line(err)}") from err


def one_line(err: BaseException) -> str:
    """An error that lists one line per item (torch's load_state_dict: each mismatched tensor) as its first item
    and a count: bad input is reported in one line."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return " ".join(lines[:2]) + (f" (and {len(lines) - 2} more)" if len(lines) > 2 else "")


def checkpoint_store(cfg: DictConfig, rank: int) -> CheckpointStore:
    ckpt = cfg.checkpoint
    return CheckpointStore(ckpt.url or join(cfg.run.run_dir, "checkpoints"), keep_last=ckpt.keep_last,
                           keep_every=ckpt.keep_every, rank=rank, upload_timeout_s=ckpt.upload_timeout_s,
                           max_outage_s=ckpt.max_outage_s, async_save=ckpt.async_save,
                           collective_timeout_s=cfg.engine.process_group_timeout_s)


def guard_parts(cfg: DictConfig, engine, stream, store, env: DistEnv):
    """(the detector, the recovery that carries its decisions out, fault injection or None)."""
    targets = RollbackTargets(engine, stream, store)
    recovery = Recovery(cfg.guard, targets, cfg.data.global_batch, env.is_main)
    return Guard(cfg.guard), recovery, build_fault_injector(cfg.guard)


def end_of_run_evaluator(cfg: DictConfig, device: torch.device, env: DistEnv) -> Evaluator | None:
    """Built before training: a missing feature extractor or VAE fails now, not after the run."""
    if not cfg.eval.at_end:
        return None
    try:
        return Evaluator(cfg, describe_data(cfg.data, cfg.run.seed), device, env.rank, env.world_size,
                         require_fid=False)
    except (ValueError, OSError) as err:
        raise ConfigError(f"{err} (or eval.at_end=false to train without the end-of-run evaluation)") from err


def check_buildable(cfg: DictConfig, world_size: int) -> None:
    """What building the components would refuse that the config and its inputs decide, checked where
    ``jobs/submit.py`` runs (no GPU, no job): rank 0's data stream against the model and ``world_size``; the
    model, with model.init_from's weights, and split_mf's teacher, built on the meta device (shapes checked, no
    memory taken); the sampling settings and feature extractor (read by every later evaluation, whether or not
    this run evaluates) and the end-of-run evaluator on the CPU."""
    data_stream(cfg, DistEnv(world_size=world_size)).close()
    start = starting_weights(cfg.model.init_from)
    with torch.device("meta"), warnings.catch_warnings():
        # loading real tensors into meta parameters checks keys and shapes; the copy itself is the no-op we want
        warnings.filterwarnings("ignore", message=".*copying from a non-meta parameter")
        try:
            initial_model(cfg.model, start)
        except ValueError as err:
            raise ConfigError(str(err)) from err
        frozen_teacher(cfg, torch.device("meta"))
    try:
        sampling_setting(cfg.eval)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    # the scheduled evaluations' extractor against the data, whether or not the run ends with one
    feature_extractor_for(cfg.eval, describe_data(cfg.data, cfg.run.seed))
    end_of_run_evaluator(cfg, torch.device("cpu"), DistEnv())


def run_summary(cfg: DictConfig, engine, device: torch.device) -> str:
    return (f"run {cfg.run.name}: {cfg.objective.name} on {cfg.data.name}, model {cfg.model.family}/{cfg.model.size} "
            f"({count_parameters(engine.model) / 1e6:.2f}M params), device {device}, run_dir {cfg.run.run_dir}")


def progress_keys(cfg: DictConfig) -> tuple[str, ...]:
    """The stats the progress shows, unweighted mse first. The loss only where it says something: under MF's
    adaptive weight (weight_p = 1) each row's weighted loss is ≈ 1 whatever the error, so it stays flat."""
    adaptive = cfg.objective.name != "fm" and cfg.objective.weight_p > 0
    return ("mse", "jvp_norm", "grad_norm") if adaptive else ("loss", "mse", "jvp_norm", "grad_norm")

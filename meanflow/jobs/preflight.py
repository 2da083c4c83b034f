"""Pre-flight checks of a training job: that the config, the data, the world and the run directory fit together,
before the first step. Each raises ``ConfigError`` naming the key to change (the CLI's exit code 2).

Those that need no GPU and no job also run where ``jobs/submit.py`` runs, before anything is written, submitted or
recorded (``run_dir.check_training_run_dir``, ``components.check_buildable``); the job runs them again, with what
only it knows (its world, the engine's JVP, the run's lease)."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from meanflow.platform.config import Config, ConfigError
from meanflow.platform.distributed import all_gather_objects
from meanflow.platform.engines import EngineJVPError, jvp_smoke_test
from meanflow.platform.run_lease import RunLease
from meanflow.platform.storage import join, read_bytes


def check_data_fits_model(model_cfg: DictConfig, stream) -> None:
    """The model's classes and input shape are the data's."""
    if model_cfg.num_classes != stream.num_classes:
        raise ConfigError(f"model.num_classes: {model_cfg.num_classes}, but the data ({stream.name}) has "
                          f"{stream.num_classes} classes")
    model_shape = (model_cfg.in_channels, model_cfg.image_size, model_cfg.image_size)
    if model_cfg.family != "mlp" and tuple(stream.sample_shape) != model_shape:
        raise ConfigError(f"model.in_channels/image_size: the model takes {model_shape}, but the data "
                          f"({stream.name}) holds samples of shape {tuple(stream.sample_shape)}")


def check_batch_splits(global_batch: int, world_size: int, grad_accum: int) -> None:
    """The global batch splits into world_size ranks × grad_accum equal micro-batches."""
    if global_batch % (world_size * grad_accum):
        raise ConfigError(f"data.global_batch: {global_batch} does not split into {world_size} ranks × "
                          f"optim.grad_accum={grad_accum} equal micro-batches")


def check_same_run(cfg: DictConfig) -> None:
    """Resuming continues the same experiment: the model, objective and data must match the stored config."""
    run_dir = cfg.run.run_dir
    try:
        stored = OmegaConf.create(read_bytes(join(run_dir, "config.yaml")).decode())
    except FileNotFoundError:
        return
    defaults = OmegaConf.structured(Config)   # fields added since the run started take their defaults
    for section in ("model", "objective", "data"):
        if (OmegaConf.to_container(OmegaConf.merge(defaults[section], stored[section]))
                != OmegaConf.to_container(cfg[section])):
            raise ConfigError(f"run.run_dir: {run_dir} holds checkpoints of a run with another '{section}' "
                              "section; choose another --run-dir to start a new run")
    check_same_fid_series(stored, cfg)


FID_SERIES_KEYS = ("feature_extractor", "feature_weights", "reference_stats")


def check_same_fid_series(stored: DictConfig, cfg: DictConfig) -> None:
    """A resumed run's FIDs stay one series: another feature extractor, weights file or reference statistics than
    the stored config's is refused, before the stored config is rewritten, unless ``eval.new_series`` is set."""
    defaults = OmegaConf.structured(Config).eval
    changed = {}
    for key in FID_SERIES_KEYS:
        old = OmegaConf.select(stored, f"eval.{key}", default=defaults[key])
        if old != cfg.eval[key]:
            changed[f"eval.{key}"] = f"{old!r} -> {cfg.eval[key]!r}"
    if changed and not cfg.eval.new_series:
        raise ConfigError(f"{', '.join(changed)}: resuming {cfg.run.run_dir} with another FID measurement ("
                          + "; ".join(f"{k} {v}" for k, v in changed.items()) + "); its FIDs would not compare "
                          "with the run's earlier ones: keep the stored values, or set eval.new_series=true to start "
                          "a new FID series on purpose")


def check_resumable(cfg: DictConfig, engine_name: str, newest_commit: dict | None, world_size: int,
                    store_url: str) -> None:
    """--resume needs a checkpoint; DeepSpeed's ZeRO partitions load only on the world size that wrote them."""
    if cfg.run.resume and newest_commit is None:
        raise ConfigError(f"run.resume: {cfg.run.run_dir} holds no committed checkpoint to resume from")
    if newest_commit is None:
        return
    saved_world = newest_commit["metadata"].get("world_size")
    if engine_name == "deepspeed" and saved_world != world_size:
        raise ConfigError(f"engine.kind: deepspeed cannot resume the {saved_world}-process checkpoints in "
                          f"{store_url} on {world_size} (ZeRO partitions are per rank)")
    check_same_run(cfg)


def check_engine_jvp(engine, objective, stream, cfg: DictConfig, device) -> float | None:
    """The engine's JVP through its model agrees with a finite difference (objectives that take one). Collective:
    every rank stops, or none does. Returns the relative error (None when not checked)."""
    if not (cfg.engine.jvp_smoke_test and objective.uses_jvp):
        return None
    try:
        error, failure = jvp_smoke_test(engine, tuple(stream.sample_shape), cfg.model.num_classes, device,
                                        seed=cfg.run.seed), None
    except EngineJVPError as err:
        error, failure = None, str(err)
    _raise_if_any_rank_failed(failure, EngineJVPError)
    return error


def take_run_lease(run_dir: str, is_main: bool) -> RunLease | None:
    """Rank 0 takes the run directory's lease (one live writer per run); every rank stops if it could not.
    Collective. Returns rank 0's lease (None elsewhere)."""
    lease, error = (RunLease(run_dir) if is_main else None), None
    try:
        if lease:
            lease.acquire()
    except ConfigError as err:
        error = str(err)
    _raise_if_any_rank_failed(error, ConfigError)
    return lease


def _raise_if_any_rank_failed(message: str | None, kind: type[Exception]) -> None:
    """Collective: every rank raises the first rank's failure (as ``kind``), or none does."""
    failures = [m for m in all_gather_objects(message) if m]
    if failures:
        raise kind(failures[0])

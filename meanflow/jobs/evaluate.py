"""The evaluation job: score a run's committed checkpoints, on any number of ranks.

    python -m meanflow.jobs.evaluate --run-dir URL [--step N | --all] [--force] [key=value ...]
    (the same as ``python jobs/submit.py eval ...``; under torchrun or SLURM every rank samples its share)

The run's stored config.yaml says what the model and data are; ``key=value`` overrides change the evaluation
(``eval.num_samples=50000``, ``eval.guidance=[{omega:1.0},{omega:2.5,t_min:0.2,t_max:0.8}]``,
``eval.sampler=consistency eval.steps=[1,0.55,0]``, ...). Each rank
loads the step's EMA weights itself (no sharding at inference), samples global indices rank, rank+W, …, and the
feature sums are all-reduced; rank 0 writes ``<run>/eval/step-000NNNNN/``. A step already evaluated (its
metrics.json holds every requested setting) is skipped unless ``--force``, so a resubmitted job does no work twice.
"""

from __future__ import annotations

import argparse
import sys

from omegaconf import DictConfig

from meanflow.evaluation.evaluator import Evaluator, describe_data, guidance_settings
from meanflow.evaluation.outputs import describe_metrics, is_evaluated, write_results
from meanflow.evaluation.sampling import sampling_setting
from meanflow.platform.checkpoint import CheckpointStore
from meanflow.platform.config import ConfigError
from meanflow.platform.distributed import all_gather_objects, init_distributed, resolve_env, shutdown, \
    task_device

from meanflow.platform.trackers import open_trackers

from .cluster import store_writer
from .outcome import run_command
from .run_dir import load_run_config, load_sampling_model, open_store, resolve_step


def evaluate_steps(run_dir: str, steps: list[int] | None = None, every_step: bool = False,
                   overrides: list[str] | None = None, force: bool = False, stdout=None) -> list[dict]:
    """Evaluate ``steps`` (default: the newest committed; ``every_step``: all committed). Collective when
    launched on several ranks. Returns the metrics rows of the steps evaluated here."""
    env, stdout = resolve_env(), stdout or sys.stdout
    device = task_device("auto", env.local_rank)
    cfg = load_run_config(run_dir, overrides)
    init_distributed(env, device, cfg.engine.process_group_timeout_s)
    try:
        store = open_store(cfg, run_dir, env.rank)
        try:
            settings = requested_settings(cfg)
        except ValueError as err:
            raise ConfigError(str(err)) from err
        # Rank 0's view of the store and of what is evaluated, on every rank: they must loop over the same steps.
        todo = all_gather_objects(_plan(store, run_dir, steps, every_step, force, settings))[0]
        if not todo:
            _log(env, stdout, f"{run_dir}: nothing to evaluate (every requested step has metrics; --force redoes)")
            return []
        try:
            evaluator = Evaluator(cfg, describe_data(cfg.data, cfg.run.seed), device, env.rank, env.world_size)
        except (ValueError, OSError) as err:
            raise ConfigError(str(err)) from err
        rows = []
        for step in todo:
            model, which = load_sampling_model(cfg, store, step, device)
            _log(env, stdout, f"evaluating step {step} ({which} weights, {cfg.eval.num_samples} samples, "
                              f"{env.world_size} rank(s))")
            results = evaluator.run(model, step, show_progress=env.is_main)
            if env.is_main:
                writer = store_writer(cfg)
                url = write_results(run_dir, step, results, extra={"weights": which}, writer=writer)
                trackers = open_trackers(cfg, run_dir, writer, step, job="eval")
                for result in results:
                    trackers.log_evaluation(step, result.metrics, result.grid)
                trackers.close()
                for result in results:
                    _log(env, stdout, f"step {step}: " + describe_metrics(result.metrics))
                _log(env, stdout, f"wrote {url}")
            rows += [r.metrics for r in results]
        return rows
    finally:
        shutdown()


def requested_settings(cfg: DictConfig) -> list[dict]:
    """The settings (``setting_key`` fields) an evaluation with this config produces; ValueError on a bad one."""
    ev = cfg.eval
    return [{"guidance": g, **sampling_setting(ev), "num_samples": ev.num_samples, "seed": ev.seed}
            for g in guidance_settings(cfg.model, ev)]


def _plan(store: CheckpointStore, run_dir: str, steps: list[int] | None, every_step: bool, force: bool,
          settings: list[dict]) -> list[int]:
    if every_step:
        wanted = store.steps()
        if not wanted:   # not "nothing to evaluate": there is nothing evaluable at all
            raise ConfigError(f"--all: {store.url} holds no committed checkpoint")
    else:
        wanted = [resolve_step(store, s) for s in (steps or [None])]
    return [s for s in wanted if force or not is_evaluated(run_dir, s, settings)]


def _log(env, stdout, message: str) -> None:
    if env.is_main:
        print(message, file=stdout, flush=True)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run-dir", required=True, help="the run directory (any fsspec URL)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--step", type=int, action="append", help="a committed step (repeatable; default: newest)")
    which.add_argument("--all", action="store_true", help="every committed step")
    p.add_argument("--force", action="store_true", help="evaluate steps that already have metrics again")
    p.add_argument("--guidance", action="append", metavar="OMEGA[,T_MIN,T_MAX]",
                   help="iMF guidance setting to sweep (repeatable); replaces eval.guidance")
    p.add_argument("overrides", nargs="*", help="eval.* overrides, e.g. eval.num_samples=50000")


def guidance_override(settings: list[str] | None) -> list[str]:
    """``--guidance 2.0,0.2,0.8`` (repeatable) as an ``eval.guidance=[...]`` override."""
    if not settings:
        return []
    items = []
    for text in settings:
        parts = text.split(",")
        try:
            omega, t_min, t_max = (float(parts[0]), *(map(float, parts[1:]) if len(parts) == 3 else (0.0, 1.0)))
        except ValueError:
            raise ConfigError(f"--guidance {text!r}: expected OMEGA or OMEGA,T_MIN,T_MAX (numbers)") from None
        if len(parts) not in (1, 3):
            raise ConfigError(f"--guidance {text!r}: expected OMEGA or OMEGA,T_MIN,T_MAX")
        items.append(f"{{omega: {omega}, t_min: {t_min}, t_max: {t_max}}}")
    return [f"eval.guidance=[{','.join(items)}]"]


def run(args) -> int:
    evaluate_steps(args.run_dir, args.step, args.all, [*args.overrides, *guidance_override(args.guidance)],
                   args.force)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m meanflow.jobs.evaluate", description=__doc__.splitlines()[0])
    add_arguments(p)
    return run_command(run, p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

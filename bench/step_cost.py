"""Step time and peak memory of every objective relative to flow matching, on the same model and batch.

    python bench/step_cost.py [--config tiny_mf] [--steps 20] [--warmup 3] [key=value ...]

Prints one row per objective: ms/step, ratio to fm, and peak memory (CUDA) or peak RSS growth (CPU), all
measured in this one run, so the ratios compare like with like. The figures go to bench/RESULTS.md by hand, with
the machine they came from.
"""

from __future__ import annotations

import argparse
import platform
import resource
import time

import torch

from meanflow.data_pipeline import build_embedded_stream
from meanflow.models import build_model, count_parameters
from meanflow.objectives import ObjectiveContext, build_objective
from meanflow.platform.config import load_config
from meanflow.platform.engines import build_engine
from meanflow.jobs.train import resolve_device

OBJECTIVES = ("fm", "mf", "imf", "sg_lambda", "stability", "tangent_beta")


def time_objective(cfg, name: str, steps: int, warmup: int, device) -> tuple[float, float]:
    cfg.objective.name = name
    if name == "sg_lambda":                       # λ = 1: the full extra backward through the JVP
        cfg.objective.sg_lambda.start = cfg.objective.sg_lambda.end = 1.0
    if name == "imf" and cfg.model.family != "imf_dit":
        cfg.objective.imf.tangent = "boundary"
    torch.manual_seed(0)
    engine = build_engine(cfg.engine, cfg.optim, lambda: build_model(cfg.model), device, world_size=1)
    objective = build_objective(cfg.objective, cfg.model.num_classes)
    stream = build_embedded_stream(cfg.data.name, cfg.data.global_batch, cfg.run.seed)
    ctx = ObjectiveContext.single_process(cfg.data.global_batch, cfg.run.seed, ema_model=engine.ema_model)
    batches = [{k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in stream.global_batch(s).items()}
               for s in range(steps + warmup)]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for step, batch in enumerate(batches):
        if step == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        loss, _ = objective(engine.model, batch, step, ctx)
        engine.backward(loss)
        engine.apply(step)
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    return (time.perf_counter() - start) / steps * 1e3, peak_mb


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="tiny_mf")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--objectives", default=",".join(OBJECTIVES))
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    base = load_config(args.config, args.overrides)
    device = resolve_device(base.engine.device)
    model = build_model(base.model)
    print(f"# {args.config}: {base.model.family}/{base.model.size} {count_parameters(model) / 1e6:.2f}M params, "
          f"global batch {base.data.global_batch}, device {device}, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, {platform.processor() or platform.machine()}")
    rows = {}
    for name in args.objectives.split(","):
        cfg = load_config(args.config, args.overrides)
        rows[name] = time_objective(cfg, name, args.steps, args.warmup, device)
    fm_ms = rows.get("fm", (float("nan"),))[0]
    print(f"{'objective':<14}{'ms/step':>10}{'÷ fm':>8}{'peak MB':>10}")
    for name, (ms, mb) in rows.items():
        print(f"{name:<14}{ms:>10.1f}{ms / fm_ms:>8.2f}{mb:>10.1f}")


if __name__ == "__main__":
    main()

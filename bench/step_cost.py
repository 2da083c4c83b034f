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

OBJECTIVES = ("fm", "mf", "mf+all", "imf", "imf+all", "sg_lambda", "stability", "tangent_beta")
# NAME+all: the same objective with the JVP's tangent pass on every row (objective.jvp_all_rows), the way public
# ports run it; without the suffix it runs only on the rows with r ≠ t.


def time_objective(cfg, name: str, steps: int, warmup: int, device) -> tuple[float, float]:
    name, _, variant = name.partition("+")
    cfg.objective.name = name
    cfg.objective.jvp_all_rows = variant == "all"
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


def forward_ms(cfg, device, repeats: int = 10) -> float:
    """F: one no-grad forward of the model over the global batch (the unit of the FLOP floors)."""
    torch.manual_seed(0)
    model = build_model(cfg.model).to(device)
    batch = build_embedded_stream(cfg.data.name, cfg.data.global_batch, cfg.run.seed).global_batch(0)
    x = batch["x"].to(device)
    y = batch["y"].to(device) if "y" in batch else None
    t = torch.rand(len(x), device=device)
    omega = (torch.tensor([1.0, 0.0, 1.0], device=device).expand(len(x), 3)
             if cfg.model.family == "imf_dit" else None)
    with torch.no_grad():
        for i in range(repeats + 2):
            if i == 2:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
            model(x, t=t, r=t, y=y, omega=omega)
        if device.type == "cuda":
            torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats * 1e3


def floor_in_forwards(cfg, name: str, all_rows: bool) -> float:
    """Issue 8's FLOP floor in forward-equivalents F: forward + backward 3F; the JVP's tangent pass 1F on the rows
    with r ≠ t only (on every row for NAME+all); each no-grad forward 1F (training CFG: 2; iMF: 2; the EMA or
    boundary proxy of tangent_beta: 1); SG_λ's backward through the JVP 2F on those rows; stability 3F."""
    o = cfg.objective
    share = 1.0 if all_rows else 1.0 - o.time.share_r_eq_t
    cfg_on = cfg.model.num_classes and not (o.guidance.omega == 1.0 and o.guidance.kappa == 0.0)
    base = o.stability.base if name == "stability" else name
    if base == "fm":
        floor = 3.0
    elif base == "imf":
        floor = 3.0 + share + 2.0
    else:
        floor = 3.0 + share + (2.0 if cfg_on else 0.0)
        floor += 2.0 * share if base == "sg_lambda" else 0.0
        floor += 1.0 if base == "tangent_beta" and o.tangent_beta.proxy != "v_head" else 0.0
    return floor + (3.0 if name == "stability" else 0.0)


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
    f_ms = forward_ms(base, device)
    print(f"F (one no-grad forward of the batch) = {f_ms:.1f} ms")
    print(f"{'objective':<14}{'ms/step':>10}{'÷ fm':>8}{'floor F':>9}{'floor ms':>10}{'÷ floor':>9}{'peak MB':>10}")
    for name, (ms, mb) in rows.items():
        objective, _, variant = name.partition("+")
        cfg = load_config(args.config, args.overrides)
        cfg.objective.name = objective
        floor = floor_in_forwards(cfg, objective, variant == "all")
        print(f"{name:<14}{ms:>10.1f}{ms / fm_ms:>8.2f}{floor:>9.2f}{floor * f_ms:>10.1f}{ms / (floor * f_ms):>9.2f}"
              f"{mb:>10.1f}")


if __name__ == "__main__":
    main()

"""End-of-run evaluation on the embedded data: the numbers that say whether a local run really learned.

2-D toys: 1-NFE (or k-NFE) samples vs fresh real samples, sliced Wasserstein SW1/SW2 (4096 samples, 500
directions, fixed seed — OBJECTIVES.md) and a scatter plot. Digits (embedded or from shards): class-conditional
samples classified by a classifier trained on the real digits (class accuracy) and a sample grid, one row per
class. Other pixel data: a sample grid only (FID belongs to the evaluation job); latents: nothing to draw without
the VAE decoder, so only the run facts.
"""

from __future__ import annotations

import json
import time

import torch

from meanflow.data_pipeline import TOY_NAMES, digits
from meanflow.objectives import guidance_conditions, sample, sample_noise

from .digits_classifier import class_accuracy
from .images import save_image_grid, save_scatter_png
from .sliced_wasserstein import sliced_wasserstein


def _conditions(model_cfg, eval_cfg, n, device):
    if model_cfg.family != "imf_dit":
        return None
    return guidance_conditions(n, eval_cfg.omega, eval_cfg.t_min, eval_cfg.t_max, device=device)


def generate(model, stream, model_cfg, eval_cfg, device, labels=None) -> torch.Tensor:
    """``eval.num_samples`` samples; sample i's noise depends only on (eval.seed, i)."""
    n = eval_cfg.num_samples if labels is None else len(labels)
    noise = sample_noise(range(n), stream.sample_shape, eval_cfg.seed, device=device)
    was_training = model.training
    model.eval()
    try:
        out = []
        for start in range(0, n, 512):
            rows = slice(start, start + 512)
            y = None if labels is None else labels[rows].to(device)
            out.append(sample(model, noise[rows], steps=eval_cfg.nfe, y=y,
                              omega=_conditions(model_cfg, eval_cfg, noise[rows].shape[0], device)))
        return torch.cat(out).cpu()
    finally:
        model.train(was_training)


def evaluate_run(model, stream, cfg, run_dir: str, device, step: int, write: bool = True) -> dict:
    """Sample, score, draw; returns the metrics dict (also written to <run_dir>/eval/final/metrics.json unless
    ``write`` is false: ranks other than 0 sample with a sharded model but write nothing)."""
    from meanflow.platform.storage import join, write_bytes_atomic

    start = time.perf_counter()
    metrics = {"step": step, "nfe": cfg.eval.nfe, "num_samples": cfg.eval.num_samples, "seed": cfg.eval.seed}
    out_dir = join(run_dir, "eval", "final")
    if stream.name in TOY_NAMES:
        samples = generate(model, stream, cfg.model, cfg.eval, device)
        real = stream.real_samples(cfg.eval.num_samples, seed=cfg.eval.seed + 1)
        metrics["sw1"] = sliced_wasserstein(samples, real, num_directions=500, p=1, seed=0)
        metrics["sw2"] = sliced_wasserstein(samples, real, num_directions=500, p=2, seed=0)
        if samples.shape[1] == 2 and write:
            save_scatter_png(samples, join(out_dir, "samples.png"), reference=real,
                             title=f"{stream.name}: {cfg.eval.nfe}-NFE, SW1 {metrics['sw1']:.3f}")
    elif stream.name == "digits" and tuple(stream.sample_shape) == digits.IMAGE_SHAPE:
        labels = torch.arange(cfg.eval.num_samples) % stream.num_classes
        samples = generate(model, stream, cfg.model, cfg.eval, device, labels=labels)
        metrics["class_accuracy"] = class_accuracy(samples, labels)
        if cfg.model.family == "imf_dit":
            metrics["guidance"] = {"omega": cfg.eval.omega, "t_min": cfg.eval.t_min, "t_max": cfg.eval.t_max}
        k = stream.num_classes
        per_class = torch.cat([samples[labels == c][:k] for c in range(k)])   # row c: k samples of class c
        if write:
            save_image_grid(per_class, join(out_dir, "samples.png"), nrow=k)
    elif getattr(stream, "kind", "array") != "latent":   # other pixel data: a sample grid (FID: the eval job)
        labels = torch.arange(64) % stream.num_classes if stream.num_classes else None
        samples = generate(model, stream, cfg.model, cfg.eval, device, labels=labels)
        if write:
            save_image_grid(samples[:64], join(out_dir, "samples.png"), nrow=8)
    metrics["wall_s"] = round(time.perf_counter() - start, 2)
    if write:
        write_bytes_atomic(join(out_dir, "metrics.json"), json.dumps(metrics, indent=1).encode())
    return metrics

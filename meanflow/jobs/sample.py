"""``jobs/submit.py sample --run-dir URL [--step N] --num 64 [--guidance OMEGA,T_MIN,T_MAX ...]``: samples of a
committed step as a PNG (grid, or scatter plot for 2-D toys) and an ``.npz`` (uint8 images or float points, labels,
global indices) per guidance setting, under ``<run>/samples/`` or ``--out``. ``eval.sampler`` / ``eval.steps`` /
``eval.nfe`` overrides choose the sampler as in an evaluation. Sample i is the same as sample i of an evaluation with
the same seed and sampling setting."""

from __future__ import annotations

import argparse
import io

import numpy as np
import torch

from meanflow.evaluation.evaluator import LatentDecoder, describe_data, guidance_settings, guidance_tag, sampler_tag
from meanflow.evaluation.images import save_image_grid, save_scatter_png, to_uint8
from meanflow.evaluation.sampling import generate, sampling_setting
from meanflow.objectives import guidance_conditions
from meanflow.platform.config import ConfigError
from meanflow.platform.storage import join, write_bytes_atomic

from .evaluate import guidance_override
from .run_dir import check_output_writable, load_run_config, load_sampling_model, open_store, resolve_step


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run-dir", required=True, help="the run directory (any fsspec URL)")
    p.add_argument("--step", type=int, help="a committed step (default: the newest)")
    p.add_argument("--num", type=int, default=64, help="samples per guidance setting")
    p.add_argument("--guidance", action="append", metavar="OMEGA[,T_MIN,T_MAX]", help="iMF guidance (repeatable)")
    p.add_argument("--out", help="URL prefix of the files (default <run>/samples/step-000NNNNN)")
    p.add_argument("overrides", nargs="*",
                   help="eval.* overrides (eval.seed, eval.nfe, eval.sampler, eval.steps, eval.vae, ...)")


def run(args) -> int:
    if args.num < 1:   # checked as the flag: it reaches the config as eval.num_samples
        raise ConfigError(f"--num {args.num}: must be at least 1")
    cfg = load_run_config(args.run_dir, [*args.overrides, *guidance_override(args.guidance),
                                         f"eval.num_samples={args.num}"])
    try:
        setting = sampling_setting(cfg.eval)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    store = open_store(cfg, args.run_dir)
    step = resolve_step(store, args.step)
    prefix = args.out or join(args.run_dir, "samples", f"step-{step:08d}")
    check_output_writable(prefix, "--out" if args.out else "--run-dir")
    model, which = load_sampling_model(cfg, store, step, "cpu")
    data = describe_data(cfg.data, cfg.run.seed)
    decoder = LatentDecoder(cfg.eval.vae, data.manifest, cfg.data.latent_norm, "cpu") if data.kind == "latent" else None
    for guidance in guidance_settings(cfg.model, cfg.eval):
        omega = None if guidance is None else guidance_conditions(1, **guidance)
        parts = list(generate(model, range(args.num), data.sample_shape, data.num_classes, cfg.eval.seed, **setting,
                              omega=omega, batch_size=cfg.eval.batch_size, show_progress=True))
        x = torch.cat([p[1] for p in parts])
        labels = None if parts[0][2] is None else torch.cat([p[2] for p in parts])
        name = prefix + guidance_tag(guidance) + sampler_tag(setting)
        arrays = {"index": np.arange(args.num), "step": step}
        if labels is not None:
            arrays["label"] = labels.numpy()
        if data.kind == "toy":
            arrays["points"] = x.numpy()
            save_scatter_png(x, name + ".png", title=f"step {step}: {setting['nfe']}-NFE {setting['sampler']}")
        else:
            images = decoder(x) if decoder else x
            arrays["images_uint8"] = to_uint8(images).numpy()
            save_image_grid(images, name + ".png", nrow=8)
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        write_bytes_atomic(name + ".npz", buf.getvalue())
        print(f"wrote {name}.png and {name}.npz ({args.num} samples, {which} weights of step {step}"
              + (f", guidance {guidance}" if guidance else "") + ")")
    return 0

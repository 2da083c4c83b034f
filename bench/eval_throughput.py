"""Evaluation throughput: samples/s of 1-NFE generation, of feature extraction, and of the whole evaluation
(generate → uint8 → features → sums), on one process.

    python bench/eval_throughput.py [--config tiny_imf] [--num 4096] [--inception-weights PATH] [key=value ...]

Weights do not change the cost, so the model is used at initialisation. With ``--inception-weights`` (any
inception-v3-compat state dict: the real file, or random weights saved by tests/conftest.py's fixture) the
inception feature cost at the model's image size is measured too. Figures go to bench/RESULTS.md by hand.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from meanflow.evaluation.evaluator import Evaluator, describe_data, guidance_settings
from meanflow.evaluation.feature_extractors import INCEPTION, load_feature_extractor
from meanflow.evaluation.images import to_uint8
from meanflow.evaluation.sampling import generate
from meanflow.jobs.components import resolve_device
from meanflow.models import build_model
from meanflow.objectives import guidance_conditions
from meanflow.platform.config import load_config


def rate(fn, n: int) -> float:
    start = time.perf_counter()
    fn()
    return n / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--config", default="tiny_imf")
    p.add_argument("--num", type=int, default=4096)
    p.add_argument("--inception-weights", default="")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    cfg = load_config(args.config, [*args.overrides, f"eval.num_samples={args.num}"])
    device = resolve_device(cfg.engine.device)
    torch.manual_seed(0)
    model = build_model(cfg.model).to(device).eval()
    data = describe_data(cfg.data, cfg.run.seed)
    omega = guidance_conditions(1, 1.0) if cfg.model.family == "imf_dit" else None
    ev = cfg.eval

    def sample_all():
        return [to_uint8(x) for _, x, _ in generate(model, range(args.num), data.sample_shape, data.num_classes,
                                                     ev.seed, omega=omega, batch_size=ev.batch_size, device=device)]

    images = sample_all() if data.kind != "toy" else []   # warm-up, and the images the feature row uses
    print(f"{args.config} on {device} ({platform.processor() or platform.machine()}, {torch.get_num_threads()} "
          f"threads), {args.num} samples, batch {ev.batch_size}")
    print(f"  1-NFE generation        {rate(sample_all, args.num):10.0f} samples/s")
    evaluator = Evaluator(cfg, data, device)
    if evaluator.extractor is not None:   # 2-D toys are scored by SW, no features
        feats = lambda: [evaluator.extractor(b) for b in images]   # noqa: E731
        print(f"  {evaluator.extractor.name + ' features':22s}  {rate(feats, args.num):10.0f} samples/s")
    settings = len(guidance_settings(cfg.model, ev))
    print(f"  whole evaluation        {rate(lambda: evaluator.run(model, 0), args.num * settings):10.0f} samples/s "
          f"({settings} guidance setting(s))")
    if args.inception_weights:
        inception = load_feature_extractor(INCEPTION, args.inception_weights, device)
        few = images[0][:64]
        print(f"  inception-v3 features   {rate(lambda: inception(few), len(few)):10.0f} samples/s "
              f"(images {tuple(few.shape[1:])} resized to 299²)")


if __name__ == "__main__":
    main()

"""Sample a model and score the samples, split over ranks by global sample index (any world size, same numbers).

What is measured depends on the data:
- 2-D toys: SW1/SW2 of ``eval.num_samples`` 1-NFE (or k-NFE) samples against fresh real samples (500 directions,
  seed 0: docs/objectives.md), and a scatter plot;
- images (pixels, or latents decoded through ``eval.vae``): FID and IS from a torch-fidelity feature extractor
  (``eval.feature_extractor``; ``digits-cnn`` for the embedded digits, ``inception-v3-compat`` otherwise) against
  ``eval.reference_stats``; for class-conditional digits also the share classified as the requested class; a grid of
  the first ``eval.grid`` samples.
iMF models are sampled once per ``eval.guidance`` setting (ω, t_min, t_max): guidance is chosen at inference, so
one evaluation sweeps it. MF models take no guidance at sampling. ``eval.sampler`` (flow_map | consistency) and
``eval.steps`` (the time grid; empty: ``eval.nfe`` uniform steps) choose how every model is sampled; each metrics row
records them with the NFE.

Before anything loads, the extractor is checked against the images it will see (``feature_extractor_for``); an
FID below ``FID_FLOOR`` is recorded with a ``suspect`` note (samples indistinguishable from the reference are a
broken measurement, not a model).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from meanflow.data_pipeline import TOY_NAMES
from meanflow.data_pipeline.records import latent_normalization
from meanflow.data_pipeline.vae import DECODE_CHUNK, decode_latents, load_vae
from meanflow.objectives import guidance_conditions
from meanflow.platform.config import ConfigError
from meanflow.platform.distributed import all_gather_objects

from .digits_features import IMAGE_SHAPE as DIGITS_SHAPE
from .feature_extractors import DIGITS, INCEPTION, INPUTS, load_feature_extractor, takes
from .feature_stats import FeatureMoments, InceptionScoreSums, all_reduce_sum, frechet_distance
from .images import to_uint8
from .reference_stats import embedded_digits_reference, load_reference
from .sampling import UINT8_FORMULA, generate, rank_indices, sampling_setting
from .sliced_wasserstein import sliced_wasserstein


@dataclass
class EvalData:
    """What evaluation needs to know about the training data."""
    name: str
    kind: str                                 # toy | pixels | latent
    sample_shape: tuple[int, ...]
    num_classes: int
    manifest: dict | None = None              # shards
    stream: Any = None                        # embedded data (the toys' real samples)


def describe_data(data_cfg, seed: int) -> EvalData:
    if data_cfg.name == "webdataset":
        from meanflow.data_pipeline.manifest import read_manifest

        m = read_manifest(data_cfg.url)
        shape = tuple(m["sample_shape"])
        kind = {"latent": "latent", "image": "pixels"}.get(m["kind"], "pixels" if len(shape) == 3 else "other")
        return EvalData(data_cfg.name, kind, shape, int(m["num_classes"]), manifest=m)
    from meanflow.data_pipeline import build_embedded_stream

    stream = build_embedded_stream(data_cfg.name, data_cfg.global_batch, seed)
    return EvalData(stream.name, "toy" if stream.name in TOY_NAMES else "pixels", tuple(stream.sample_shape),
                    stream.num_classes, stream=stream)


def image_shape(data: EvalData) -> tuple[int, ...]:
    """(C, H, W) of the images the feature extractor sees: the samples, or a latent model's VAE-decoded RGB."""
    if data.kind != "latent":
        return data.sample_shape
    down = int(data.manifest.get("vae", {}).get("downsample", 8))
    return (3, data.sample_shape[1] * down, data.sample_shape[2] * down)


def feature_extractor_for(eval_cfg, data: EvalData) -> str | None:
    """The extractor ``eval.feature_extractor`` names for this data (None for 2-D toys, scored without one); a
    ConfigError, before anything loads, when it cannot take the data's images."""
    if data.kind not in ("pixels", "latent"):
        return None
    shape, name = image_shape(data), eval_cfg.feature_extractor
    if name == "auto":   # digits-cnn is the extractor that makes sense for 8×8 greyscale
        name = DIGITS if shape == DIGITS_SHAPE else INCEPTION
    if not takes(name, shape):
        raise ConfigError(f"eval.feature_extractor: {name} takes {INPUTS[name]}; the data ({data.name}, "
                          f"{data.kind}) gives images of shape {shape}")
    return name


class LatentDecoder:
    """Normalised latents -> images in [-1, 1] through the VAE the shards were encoded with (``eval.vae``),
    ``chunk`` latents per decoder call."""

    def __init__(self, vae_url: str, manifest: dict, latent_norm: str, device, chunk: int = DECODE_CHUNK):
        if not vae_url:
            raise FileNotFoundError("eval.vae: not set; a latent model's samples are decoded through the VAE its "
                                    "shards were encoded with (a diffusers AutoencoderKL directory, local or s3://)")
        self.vae = load_vae(vae_url, device=device)
        expected = manifest.get("vae", {}).get("weights_sha256")
        if expected and expected != self.vae.weights_sha256:
            raise ValueError(f"eval.vae: {vae_url} is not the VAE the shards were encoded with (weights sha256 "
                             f"{self.vae.weights_sha256[:12]}…, manifest {expected[:12]}…)")
        shift, scale = latent_normalization(manifest, latent_norm)
        self.shift, self.scale = shift.to(device), scale.to(device)
        self.chunk = chunk

    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        return decode_latents(self.vae, latents / self.scale + self.shift, self.chunk).float()


def guidance_settings(model_cfg, eval_cfg) -> list[dict | None]:
    if model_cfg.family != "imf_dit":
        return [None]
    if not eval_cfg.guidance:
        raise ValueError("eval.guidance: an iMF model needs at least one (omega, t_min, t_max) setting")
    return [{"omega": float(g.omega), "t_min": float(g.t_min), "t_max": float(g.t_max)} for g in eval_cfg.guidance]


def guidance_tag(guidance: dict | None) -> str:
    """File-name suffix of a guidance setting ('' without guidance)."""
    if guidance is None:
        return ""
    return f"-w{guidance['omega']:g}-t{guidance['t_min']:g}-{guidance['t_max']:g}"


def sampler_tag(setting: dict) -> str:
    """File-name suffix of a sampling setting (``sampling_setting``, or a metrics row): '' for the flow map on the
    uniform grid, so those names stay as they were."""
    if setting.get("sampler", "flow_map") == "flow_map" and not setting.get("steps"):
        return ""
    grid = "-".join(f"{t:g}" for t in setting["steps"]) if setting["steps"] else f"nfe{setting['nfe']}"
    return f"-{setting['sampler']}-{grid}"


FID_FLOOR = 1e-3


def suspect_reason(row: dict) -> str | None:
    """Why a metrics row's FID is not to be trusted (None when it is): one below ``FID_FLOOR`` says the samples'
    features equal the reference's, which a generative model does not achieve; rows written before the flag
    existed are judged by the same rule."""
    if row.get("suspect"):
        return row["suspect"]
    if row.get("fid") is not None and row["fid"] < FID_FLOOR:
        return f"fid below {FID_FLOOR:g}"
    return None


@dataclass
class SettingResult:
    metrics: dict[str, Any]
    grid: torch.Tensor | None = None          # images (N, C, H, W) in [-1, 1], on rank 0
    points: torch.Tensor | None = None        # toys: the samples (N, 2), on rank 0
    real: torch.Tensor | None = None
    extra: dict = field(default_factory=dict)


def numeric_settings() -> dict:
    """The numerics that change FID in the last digits (recorded with every result)."""
    return {"tf32_matmul": torch.backends.cuda.matmul.allow_tf32, "tf32_cudnn": torch.backends.cudnn.allow_tf32,
            "float32_matmul_precision": torch.get_float32_matmul_precision()}


class Evaluator:
    """Built once per job (feature extractor, reference statistics, VAE); ``run`` once per model/step."""

    def __init__(self, cfg, data: EvalData, device, rank: int = 0, world_size: int = 1, require_fid: bool = True):
        self.cfg, self.data, self.device = cfg, data, torch.device(device)
        self.rank, self.world_size = rank, world_size
        ev = cfg.eval
        self.extractor = self.reference = self.decoder = None
        if data.kind == "other":
            raise ValueError(f"eval: no metric for {data.name} samples of shape {data.sample_shape}")
        name = feature_extractor_for(ev, data)   # before the VAE loads
        if data.kind == "latent":
            self.decoder = LatentDecoder(ev.vae, data.manifest, cfg.data.latent_norm, self.device)
        if name is not None:
            self.extractor = load_feature_extractor(name, ev.feature_weights, self.device)
            self.extractor.check_features_vary(image_shape(data))
            if ev.reference_stats:
                self.reference = load_reference(ev.reference_stats)
                self.reference.check_matches(self.extractor)
            elif data.name == "digits" and name == DIGITS:
                self.reference = embedded_digits_reference(self.extractor)
            elif require_fid:
                raise FileNotFoundError("eval.reference_stats: not set; FID needs the real data's statistics (.npz "
                                        "from python -m meanflow.evaluation.reference_stats)")
        self.autocast_dtype = {"float32": None, "bfloat16": torch.bfloat16}[ev.dtype]
        self.setting = sampling_setting(ev)

    def run(self, model, step: int, show_progress: bool = False) -> list[SettingResult]:
        return [self._run_setting(model, step, g, show_progress)
                for g in guidance_settings(self.cfg.model, self.cfg.eval)]

    def _run_setting(self, model, step: int, guidance: dict | None, show_progress: bool) -> SettingResult:
        ev = self.cfg.eval
        started = time.perf_counter()
        omega = None if guidance is None else guidance_conditions(1, **guidance)
        indices = rank_indices(ev.num_samples, self.rank, self.world_size)
        batches = generate(model, indices, self.data.sample_shape, self.data.num_classes, ev.seed, **self.setting,
                           omega=omega, batch_size=ev.batch_size, device=self.device,
                           autocast_dtype=self.autocast_dtype, show_progress=show_progress)
        metrics = {"step": step, **self.setting, "guidance": guidance, "num_samples": ev.num_samples,
                   "seed": ev.seed, "world_size": self.world_size, "dtype": ev.dtype, **numeric_settings()}
        if self.data.kind == "toy":
            result = self._score_points(batches, metrics)
        else:
            result = self._score_images(batches, metrics)
        wall = time.perf_counter() - started
        metrics.update(wall_s=round(wall, 3), samples_per_s=round(ev.num_samples / wall, 2))
        return result

    def _score_points(self, batches, metrics: dict) -> SettingResult:
        mine = [(idx, x.cpu()) for idx, x, _ in batches]
        gathered = [pair for rank_pairs in all_gather_objects(mine) for pair in rank_pairs]
        order = torch.cat([idx for idx, _ in gathered]).argsort()
        points = torch.cat([x for _, x in gathered])[order]
        real = self.data.stream.real_samples(len(points), seed=self.cfg.eval.seed + 1)
        metrics["sw1"] = sliced_wasserstein(points, real, num_directions=500, p=1, seed=0)
        metrics["sw2"] = sliced_wasserstein(points, real, num_directions=500, p=2, seed=0)
        return SettingResult(metrics, points=points, real=real)

    def _score_images(self, batches, metrics: dict) -> SettingResult:
        ev = self.cfg.eval
        moments = FeatureMoments(self.extractor.feature_dim)
        scores = None
        correct = torch.zeros(2, dtype=torch.float64)          # (correct, counted) for class accuracy
        grid = []
        for idx, x, labels in batches:
            if self.decoder is not None:
                x = self.decoder(x)
            images = to_uint8(x)
            features, logits = self.extractor(images)
            moments.add(features)
            if scores is None:
                scores = InceptionScoreSums(logits.shape[1], ev.num_samples, min(ev.is_splits, ev.num_samples))
            scores.add(logits, idx)
            if labels is not None and self.extractor.name == DIGITS:
                correct += torch.tensor([(logits.argmax(1).cpu() == labels).sum().item(), len(labels)],
                                        dtype=torch.float64)
            keep = idx < ev.grid
            grid.extend(zip(idx[keep].tolist(), x[keep].cpu()))
        moments.all_reduce()
        scores.all_reduce()
        all_reduce_sum(correct)
        gathered = dict(pair for rank_grid in all_gather_objects(grid) for pair in rank_grid)
        metrics["is_mean"], metrics["is_std"] = scores.score()
        if self.reference is not None:
            metrics["fid"] = frechet_distance(*moments.mean_cov(), self.reference.mu, self.reference.sigma)
            metrics["reference_stats"] = self.reference.source
            suspect = suspect_reason(metrics)
            if suspect:
                metrics["suspect"] = suspect
        if correct[1] > 0:
            metrics["class_accuracy"] = (correct[0] / correct[1]).item()
        metrics["feature_extractor"] = self.extractor.describe()
        metrics["uint8"] = UINT8_FORMULA
        grid_images = torch.stack([gathered[i] for i in sorted(gathered)]) if gathered else None
        return SettingResult(metrics, grid=grid_images)

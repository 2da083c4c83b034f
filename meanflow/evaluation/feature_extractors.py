"""FID/IS feature extractors through torch-fidelity's registry, their weights read from a file at any fsspec URL.

Nothing is downloaded at run time: ``inception-v3-compat`` (real runs) needs ``eval.feature_weights`` (torch-fidelity's
``weights-inception-2015-12-05-6726825d.pth``, copied to the cluster's storage once); ``digits-cnn`` (the embedded
default) ships its weights with the package. The file is read as plain tensors (``torch.load(weights_only=True)`` or
safetensors) and its sha256 recorded with every metric; torch-fidelity, which unpickles with ``weights_only=False``,
is only ever handed a re-saved copy of tensors already loaded that way.

Each extractor takes its own images (``takes``), checked against the data before anything loads, and a loaded one
must tell different images apart (``check_features_vary``): features that hardly vary make every FID ~0.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
from dataclasses import dataclass

import torch
import torch_fidelity
from safetensors.torch import load as load_safetensors

from meanflow.platform.storage import read_bytes

from . import digits_features
from .feature_stats import FeatureMoments, spread_problem

INCEPTION = "inception-v3-compat"
DIGITS = digits_features.NAME
FID_LAYERS = {INCEPTION: "2048", DIGITS: "64"}
IS_LAYER = "logits_unbiased"
INPUTS = {INCEPTION: "1- or 3-channel images (C, H, W) of any size (resized to 299×299; grey repeated to RGB)",
          DIGITS: f"greyscale 8×8 images {digits_features.IMAGE_SHAPE}"}


def takes(name: str, image_shape: tuple[int, ...]) -> bool:
    """Whether extractor ``name`` accepts uint8 images of ``image_shape`` (C, H, W) (what it takes: ``INPUTS``)."""
    if name == DIGITS:
        return tuple(image_shape) == digits_features.IMAGE_SHAPE
    return len(image_shape) == 3 and image_shape[0] in (1, 3)


def read_weights(url: str, setting: str = "eval.feature_weights") -> tuple[dict[str, torch.Tensor], str]:
    """(state dict, sha256 of the file) of a ``.safetensors`` or torch file; errors name the setting and URL."""
    try:
        data = read_bytes(url)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{setting}: no weights file at {url}") from err
    try:
        if url.endswith(".safetensors"):
            state = load_safetensors(data)
        else:
            state = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    except Exception as err:   # a pickle with code in it, a truncated file, not a weights file at all
        raise ValueError(f"{setting}: {url} is not a plain tensor weights file ({type(err).__name__}: {err})") from err
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{setting}: {url} holds no state dict of tensors")
    return state, hashlib.sha256(data).hexdigest()


@dataclass
class FeatureExtractor:
    module: torch.nn.Module
    name: str
    weights_sha256: str
    weights_url: str

    @property
    def fid_layer(self) -> str:
        return FID_LAYERS[self.name]

    @property
    def feature_dim(self) -> int:
        return int(self.fid_layer)   # both layers are named by their width

    @torch.no_grad()
    def __call__(self, images_uint8: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 (N, C, H, W) -> (FID features, IS logits). Greyscale is repeated to RGB for inception."""
        if self.name == INCEPTION and images_uint8.shape[1] == 1:
            images_uint8 = images_uint8.repeat(1, 3, 1, 1)
        device = next(self.module.parameters()).device
        features, logits = self.module(images_uint8.to(device))
        return features, logits

    def check_features_vary(self, image_shape: tuple[int, ...], probe: int = 4) -> None:
        """Refuse an extractor whose features of ``probe`` different random images (C, H, W) are degenerate (a
        zeroed, untrained or wrong weights file): every FID through it would be ~0."""
        g = torch.Generator().manual_seed(0)
        moments = FeatureMoments(self.feature_dim)
        moments.add(self(torch.randint(0, 256, (probe, *image_shape), generator=g, dtype=torch.uint8))[0])
        problem = spread_problem(*moments.mean_cov())
        if problem:
            raise ValueError(f"eval.feature_weights: {self.weights_url}: {self.name} gives {problem} on {probe} "
                             "different random images; FID through it is meaningless")

    def describe(self) -> dict:
        return {"name": self.name, "weights": self.weights_url, "weights_sha256": self.weights_sha256}


def load_feature_extractor(name: str, weights_url: str = "", device="cpu") -> FeatureExtractor:
    registry = torch_fidelity.registry.FEATURE_EXTRACTORS_REGISTRY
    if name not in FID_LAYERS or name not in registry:
        raise ValueError(f"eval.feature_extractor: {name!r} is not one of {', '.join(FID_LAYERS)}")
    if not weights_url:
        if name != DIGITS:
            raise FileNotFoundError(f"eval.feature_weights: not set; {name} needs its weights file (torch-fidelity's "
                                    "weights-inception-2015-12-05-6726825d.pth at a local path or s3:// URL); "
                                    "nothing is downloaded at run time")
        weights_url = str(digits_features.WEIGHTS)
    state, sha = read_weights(weights_url)
    with tempfile.TemporaryDirectory(prefix="meanflow-features-") as tmp:
        path = os.path.join(tmp, "weights.pt")
        torch.save(state, path)
        module = registry[name](name, [FID_LAYERS[name], IS_LAYER], feature_extractor_weights_path=path)
    return FeatureExtractor(module.to(device).eval(), name, sha, weights_url)

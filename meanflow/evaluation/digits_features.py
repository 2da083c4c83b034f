"""A feature extractor for the embedded digits, so a laptop run reports a meaningful FID and IS offline.

A small CNN classifier trained on the digits train split (its weights ship with the package:
``digits_cnn.safetensors``), registered with torch-fidelity as ``digits-cnn``. Like inception-v3-compat it takes
uint8 images (N, 1, 8, 8) and provides a feature layer for FID (``"64"``, the penultimate activations) and
``"logits_unbiased"`` for IS. Regenerate the weights (deterministic on CPU) with
``python -m meanflow.evaluation.digits_features --out meanflow/evaluation/digits_cnn.safetensors``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch_fidelity
from safetensors.torch import load_file, save_file
from torch import nn
from torch_fidelity.feature_extractor_base import FeatureExtractorBase

NAME = "digits-cnn"
WEIGHTS = Path(__file__).with_name("digits_cnn.safetensors")
FEATURES = ("64", "logits_unbiased")
IMAGE_SHAPE = (1, 8, 8)


class DigitsCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1),
                                  nn.ReLU(), nn.AvgPool2d(2), nn.Flatten())    # (N, 32·4·4)
        self.features = nn.Sequential(nn.Linear(512, 64), nn.ReLU())
        self.head = nn.Linear(64, 10)

    def forward(self, x):   # x (N, 1, 8, 8) in [-1, 1] -> (features (N, 64), logits (N, 10))
        f = self.features(self.conv(x))
        return f, self.head(f)


def uint8_to_model_range(images: torch.Tensor) -> torch.Tensor:
    """Inverse of the evaluation's uint8 conversion ``clamp(127.5·x + 128, 0, 255)``."""
    return (images.float() - 128.0) / 127.5


class DigitsFeatureExtractor(FeatureExtractorBase):
    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        super().__init__(name, features_list)
        path = Path(feature_extractor_weights_path or WEIGHTS)
        if not path.exists():
            raise FileNotFoundError(f"eval.feature_weights: no digits-cnn weights at {path}")
        self.net = DigitsCNN()
        self.net.load_state_dict(load_file(str(path)) if path.suffix == ".safetensors"
                                 else torch.load(path, weights_only=True, map_location="cpu"))
        self.net.eval()

    @staticmethod
    def get_provided_features_list():
        return FEATURES

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return {"isc": "logits_unbiased", "fid": "64", "kid": "64", "prc": "64"}[metric]

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 1, 8, 8, dtype=torch.uint8)

    def forward(self, images):
        feats, logits = self.net(uint8_to_model_range(images))
        out = {"64": feats, "logits_unbiased": logits}
        return tuple(out[name] for name in self.features_list)


def train(seed: int = 0, epochs: int = 40) -> tuple[dict[str, torch.Tensor], float]:
    """Train the CNN on the digits train split; returns (state dict, test accuracy)."""
    from meanflow.data_pipeline.digits import load_digits_split

    torch.manual_seed(seed)
    x, y = load_digits_split("train")
    x_test, y_test = load_digits_split("test")
    net = DigitsCNN()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=g).split(64):
            loss = nn.functional.cross_entropy(net(x[idx])[1], y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        accuracy = (net(x_test)[1].argmax(1) == y_test).float().mean().item()
    return {k: v.contiguous() for k, v in net.state_dict().items()}, accuracy


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="train the digits feature extractor")
    p.add_argument("--out", default=str(WEIGHTS))
    args = p.parse_args(argv)
    state, accuracy = train()
    save_file(state, args.out)
    print(f"wrote {args.out}: test accuracy {accuracy:.4f}")


if NAME not in torch_fidelity.registry.FEATURE_EXTRACTORS_REGISTRY:
    torch_fidelity.register_feature_extractor(NAME, DigitsFeatureExtractor)


if __name__ == "__main__":
    main()

"""A trained model as one safetensors file: the sampling (EMA) weights, with the ``model:`` config in the file's
metadata, loadable with ``meanflow.models`` alone — no engine, optimizer, data or checkpoint code:

    from meanflow.models.export import load_exported
    model, info = load_exported("model.safetensors")
    x = meanflow.objectives.sample(model, torch.randn(8, 4, 32, 32), steps=1, y=labels)
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import safe_open
from safetensors.torch import save as save_safetensors

from .registry import build_model

CONFIG_KEY = "meanflow.model_config"


def export_bytes(state: dict[str, torch.Tensor], model_config: dict, info: dict) -> bytes:
    """safetensors bytes; ``info`` (run, step, weights kind, ...) is stored as string metadata beside the config."""
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    metadata = {CONFIG_KEY: json.dumps(model_config), **{f"meanflow.{k}": str(v) for k, v in info.items()}}
    return save_safetensors(tensors, metadata=metadata)


def load_exported(path: str, device="cpu") -> tuple[torch.nn.Module, dict]:
    """(model in eval mode, metadata) from a local file written by ``jobs/submit.py export``."""
    with safe_open(path, framework="pt") as f:
        metadata = f.metadata() or {}
    if CONFIG_KEY not in metadata:
        raise ValueError(f"{path}: no {CONFIG_KEY} in its metadata (not written by jobs/submit.py export)")
    config = json.loads(metadata[CONFIG_KEY])
    model = build_model(SimpleNamespace(**config))
    with open(path, "rb") as f:
        model.load_state_dict(load_safetensors(f.read()))
    return model.to(device).eval().requires_grad_(False), metadata

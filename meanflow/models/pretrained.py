"""A trained flow model's weights, from an exported ``.safetensors`` (``jobs/submit.py export``) or a run directory
(its newest committed checkpoint's sampling weights: the EMA where the run kept one, else the model's).

Nothing here unpickles code: exports are safetensors, and the checkpoint store reads with ``weights_only``. Used
for SplitMeanFlow's frozen teacher (``objective.split_mf.teacher``) and for ``model.init_from``.
"""

from __future__ import annotations

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from torch import nn

from meanflow.platform.storage import filesystem, read_bytes

from .registry import build_model


def load_flow_weights(url: str) -> dict[str, torch.Tensor]:
    """The state dict at ``url`` (any fsspec URL): a file is read as an export, a directory as a run directory."""
    if not url:
        raise ValueError("load_flow_weights: no URL given (an exported .safetensors file or a run directory)")
    fs, path = filesystem(url)
    if fs.isfile(path):
        try:
            return load_safetensors(read_bytes(url))
        except SafetensorError as err:
            raise ValueError(f"{url}: not a safetensors export ({err})") from err
    # Imported here: jobs/ builds on models/, and only a run directory needs its config and checkpoint store.
    from meanflow.jobs.run_dir import load_run_config, open_store, resolve_step

    cfg = load_run_config(url)
    store = open_store(cfg, url)
    # The template only shapes a sharded checkpoint's tensors; it is built from the run's own model config.
    state, _ = store.load_weights(resolve_step(store, None), build_model(cfg.model).state_dict())
    return state


def load_teacher(model_cfg, url: str, device) -> nn.Module:
    """A frozen flow model (eval mode, no gradients) built from ``model_cfg`` with the weights at ``url``.

    The weights must fit ``model_cfg`` exactly (strict load): a distillation student is built like its teacher.
    """
    model = build_model(model_cfg)
    model.load_state_dict(load_flow_weights(url))
    return model.to(device).eval().requires_grad_(False)

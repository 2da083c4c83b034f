"""``model.init_from``: start a model from a flow model's weights (docs/objectives.md, dmf).

A decoupled MF-DiT has the standard one's parameters plus the log-variance head. Every block, whether it will see t
or r, loads the same-named block of the flow model: one time embedder serves both, and emb_h is evaluated at 0 as
the flow model evaluated it (it was trained with r = t), so at r = t the decoupled model computes bitwise what the
flow model computes.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

# Parameters a flow checkpoint lacks: they keep the model's (zero) initialisation.
_NEW_IN_DECOUPLED = ("logvar_head.weight", "logvar_head.bias")


@torch.no_grad()
def init_from_flow_model(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> nn.Module:
    """Load a flow model's ``state_dict`` into ``model`` in place and return it; a mismatch names the keys.

    The checkpoint must hold exactly the model's keys and shapes, except that a decoupled model keeps its own
    log-variance head where the checkpoint (a standard MF-DiT) has none.
    """
    own = model.state_dict()
    state = dict(state_dict)
    if getattr(model, "decoupled", False):
        for key in _NEW_IN_DECOUPLED:
            state.setdefault(key, own[key])
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(f"model.init_from: the checkpoint does not fit the model: keys missing {missing}, "
                         f"unexpected {unexpected}")
    for key, value in state.items():
        if value.shape != own[key].shape:
            raise ValueError(f"model.init_from: {key} has shape {tuple(value.shape)} in the checkpoint, "
                             f"{tuple(own[key].shape)} in the model")
    model.load_state_dict(state)
    return model

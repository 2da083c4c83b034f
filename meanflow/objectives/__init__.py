"""Training objectives of the MeanFlow family (docs/objectives.md) and their samplers.

Each objective is ``objective(model, batch, step, ctx) -> (loss, stats)``; build one from config with
``build_objective``. Every JVP goes through ``meanflow.objectives.jvp``.
"""

from __future__ import annotations

from .alphaflow import AlphaFlow
from .base import Objective, ObjectiveContext
from .dmf import DecoupledMeanFlow
from .flow_matching import FlowMatching
from .imf import ImprovedMeanFlow
from .jvp import jvp
from .meanflow import MeanFlow, SGLambda
from .samplers import guidance_conditions, sample, sample_noise
from .split_meanflow import SplitMeanFlow
from .stability import NonExpansivity
from .tangent_beta import TangentBeta

# The registry: ``objective.name`` (and a wrapper's ``base``) accepts exactly these names, which the config reads
# from here (meanflow.platform.config.choices), so adding an objective is one entry.
OBJECTIVES = {"fm": FlowMatching, "mf": MeanFlow, "sg_lambda": SGLambda, "imf": ImprovedMeanFlow,
              "tangent_beta": TangentBeta, "split_mf": SplitMeanFlow,
              "alphaflow": AlphaFlow, "dmf": DecoupledMeanFlow}   # name -> class(objective cfg, num_classes)
WRAPPERS = {"stability": NonExpansivity}     # name -> class(base objective, cfg.<name>); base: cfg.<name>.base
NAMES = (*OBJECTIVES, *WRAPPERS)


def build_objective(cfg, num_classes: int = 0) -> Objective:
    """``cfg`` is the ``objective`` config section; a wrapper (``stability``) wraps ``cfg.<name>.base``."""
    if cfg.name in WRAPPERS:
        section = getattr(cfg, cfg.name)
        if section.base not in OBJECTIVES:
            raise ValueError(f"objective.{cfg.name}.base: unknown {section.base!r}; known: {', '.join(OBJECTIVES)}")
        return WRAPPERS[cfg.name](OBJECTIVES[section.base](cfg, num_classes), section)
    if cfg.name not in OBJECTIVES:
        raise ValueError(f"objective.name: unknown {cfg.name!r}; known: {', '.join(NAMES)}")
    return OBJECTIVES[cfg.name](cfg, num_classes)


__all__ = ["Objective", "ObjectiveContext", "build_objective", "jvp", "sample", "sample_noise",
           "guidance_conditions", "FlowMatching", "MeanFlow", "SGLambda", "NonExpansivity", "ImprovedMeanFlow",
           "TangentBeta", "SplitMeanFlow", "AlphaFlow", "DecoupledMeanFlow",
           "NAMES", "OBJECTIVES", "WRAPPERS"]

"""Model families: MF-DiT (adaLN-zero), iMF-DiT (in-context conditioning, optional v-head), and a toy MLP.

Every model is called as `model(x, *, t, r, y=None, omega=None)` and returns u with the shape of x.
"""

from .attention import attention
from .dit import MFDiT
from .imf_dit import IMFDiT
from .mlp import ToyMLP
from .registry import IMF_DIT_SIZES, MF_DIT_SIZES, build_model, count_parameters

__all__ = [
    "IMFDiT",
    "IMF_DIT_SIZES",
    "MFDiT",
    "MF_DIT_SIZES",
    "ToyMLP",
    "attention",
    "build_model",
    "count_parameters",
]

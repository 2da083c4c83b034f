"""Small, version-gated patches that let ``torch.autograd.forward_ad`` pass the engines' autograd hooks.

Each patch names the upstream report it works around and refuses to apply to versions it was not tested with:
a patch to private internals that silently applied to a changed internal would be worse than a loud error.
"""

from __future__ import annotations

import torch

TESTED_TORCH = ("2.13", "2.14")


class UnsupportedVersion(RuntimeError):
    pass


def _torch_minor() -> str:
    return ".".join(torch.__version__.split("+")[0].split(".")[:2])


def patch_fsdp2_forward_ad() -> None:
    """FSDP2's ``RegisterPostBackwardFunction`` returns its inputs as-is, but its ``jvp`` returns the tangents
    as-is too, which forward-mode AD rejects ("A custom Function's forward is returning a view (or an input as-is)
    but the jvp is not returning a view"). Return views of the tangents (pytorch#182641). ``torch.func.jvp`` works
    either way."""
    if _torch_minor() not in TESTED_TORCH:
        raise UnsupportedVersion(f"the FSDP2 forward-AD patch was tested with torch {TESTED_TORCH}, this is "
                                 f"{torch.__version__}; check pytorch#182641 and re-test before extending it")
    from torch.distributed.fsdp._fully_shard import _fsdp_param_group

    fn = _fsdp_param_group.RegisterPostBackwardFunction
    if getattr(fn, "_meanflow_patched", False):
        return

    def jvp(ctx, param_group_tangent, *tangents):
        return tuple(t.view_as(t) if t is not None else None for t in tangents)

    fn.jvp = staticmethod(jvp)
    fn._meanflow_patched = True

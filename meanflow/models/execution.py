"""How transformer blocks run: compiled (``engine.compile``) and/or activation-checkpointed
(``engine.activation_checkpointing``). Set once per process with ``set_block_execution``; every block class
decorates its forward with ``@managed_block``.

- Compile: each block class's forward is compiled once (torch.compile; the blocks' parameters are graph inputs, so
  one graph serves every block of the class). ``outside_jvp`` runs a call whose input carries a forward-AD tangent
  eagerly, so the no-grad guidance forwards, the plain forward of the rows with r = t, the flow-matching step and
  sampling are compiled while the JVP is not (DESIGN.md: compiling a JVP through a transformer block failed on
  torch 2.13/2.14 in the feasibility study); ``all`` compiles the JVP too (it works on torch 2.14.1 CPU, see
  tests/test_block_execution.py). Nothing is stored on the module, so deepcopy (the EMA copy) stays correct.
- Checkpointing: with gradients on, a block keeps only its inputs and recomputes its activations in the backward
  (non-reentrant ``torch.utils.checkpoint``). Under forward AD that alone is wrong: the backward's recomputation
  runs outside the dual level, so it replays the primal but not the tangent ops ("A different number of tensors
  was saved", torch 2.14.1). So a block with dual inputs is checkpointed as a function of primals and tangents
  that makes its own duals and returns (output, tangent), entering a dual level when the replay needs one; the
  tangent stays differentiable (SG_λ).
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.utils.checkpoint
from torch.autograd import forward_ad as fwAD

from .attention import set_jvp_backend

COMPILE_MODES = ("none", "outside_jvp", "all")
# torch's ladder for telling a compiler fault from a tracing one: inductor (generated kernels), aot_eager (traced
# forward and backward graphs run by eager kernels), eager (Dynamo's capture alone).
COMPILE_BACKENDS = ("inductor", "aot_eager", "eager")

_compile_mode = "none"
_compile_backend = "inductor"
_checkpointing = False
_compiled: dict = {}     # (forward, backend) -> its compiled function


def set_block_execution(compile_mode: str = "none", checkpointing: bool = False,
                        compile_backend: str = "inductor") -> None:
    global _compile_mode, _compile_backend, _checkpointing
    if compile_mode not in COMPILE_MODES:
        raise ValueError(f"engine.compile: {compile_mode!r} is not one of {', '.join(COMPILE_MODES)}")
    if compile_backend not in COMPILE_BACKENDS:
        raise ValueError(f"engine.compile_backend: {compile_backend!r} is not one of {', '.join(COMPILE_BACKENDS)}")
    _compile_mode, _compile_backend, _checkpointing = compile_mode, compile_backend, checkpointing


def configure_execution(jvp_attention: str, compile_mode: str = "none", checkpointing: bool = False,
                        compile_backend: str = "inductor") -> None:
    """A training process's model execution settings: the attention backend under a tangent, and how blocks run."""
    set_jvp_backend(jvp_attention)
    set_block_execution(compile_mode, checkpointing, compile_backend)


def _has_tangent(args) -> bool:
    return any(isinstance(a, torch.Tensor) and fwAD.unpack_dual(a).tangent is not None for a in args)


def managed_block(forward):
    """Decorator for a block's ``forward(self, x, *conditions)``."""

    @functools.wraps(forward)
    def run(self, x, *args):
        fn = forward
        if _compile_mode != "none" and x.shape[0] > 0 and not (_compile_mode == "outside_jvp"
                                                               and _has_tangent((x, *args))):
            key = (forward, _compile_backend)
            fn = _compiled.get(key) or _compiled.setdefault(key, torch.compile(forward, backend=_compile_backend))
        if not (_checkpointing and torch.is_grad_enabled()):
            return fn(self, x, *args)
        if not _has_tangent((x, *args)):
            return torch.utils.checkpoint.checkpoint(fn, self, x, *args, use_reentrant=False)
        return _checkpoint_with_tangents(fn, self, (x, *args))

    return run


def _checkpoint_with_tangents(fn, module, inputs):
    parts = [fwAD.unpack_dual(a) if isinstance(a, torch.Tensor) else (a, None) for a in inputs]
    primals, tangents = [p for p, _ in parts], [t for _, t in parts]

    def replay(*flat):
        ps, ts = flat[:len(inputs)], flat[len(inputs):]
        with _dual_level_for_replay():
            duals = [p if t is None else fwAD.make_dual(p, t) for p, t in zip(ps, ts)]
            out = fwAD.unpack_dual(fn(module, *duals))
            return out.primal, out.tangent

    out, tangent = torch.utils.checkpoint.checkpoint(replay, *primals, *tangents, use_reentrant=False)
    return fwAD.make_dual(out, tangent)


def _dual_level_for_replay():
    """The forward runs inside the objective's dual level; the backward's recomputation needs one of its own."""
    return contextlib.nullcontext() if fwAD._current_level >= 0 else fwAD.dual_level()

"""How transformer blocks run: compiled (``engine.compile``) and/or activation-checkpointed
(``engine.activation_checkpointing``). Set once per process with ``set_block_execution``; every block class
decorates its forward with ``@managed_block``.

- Compile: each block class's forward is compiled once (torch.compile; the blocks' parameters are graph inputs, so
  one graph serves every block of the class). ``outside_jvp`` compiles every call without a forward-AD tangent
  (the no-grad guidance forwards, the plain forward of the rows with r = t, the flow-matching step, sampling) and
  runs the JVP eagerly. ``all`` compiles the JVP too. Dynamo refuses dual tensors as inputs ("Attempted to wrap a
  dual tensor input": it would fall back to eager for that call), so a block with dual inputs is compiled as a
  function of primals and tangents that makes its duals inside and returns (output, tangent); the graph holds
  both passes, its attention is the math one (models/attention.py), and the tangent stays differentiable (SG_λ).
  Nothing is stored on the module, so deepcopy (the EMA copy) stays correct.
- Checkpointing: with gradients on, a block keeps only its inputs and recomputes its activations in the backward
  (non-reentrant ``torch.utils.checkpoint``). Under forward AD that alone is wrong: the backward's recomputation
  runs outside the dual level, so it replays the primal but not the tangent ops ("A different number of tensors
  was saved", torch 2.14.1). So a block with dual inputs is checkpointed as that same function of primals and
  tangents (compiled or not), which enters a dual level when the replay needs one and the attention state
  (``detached_tangents``) its forward ran in.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.utils.checkpoint
from torch.autograd import forward_ad as fwAD

from .attention import detached_tangents, set_jvp_backend, tangents_detached

COMPILE_MODES = ("none", "outside_jvp", "all")
# torch's ladder for telling a compiler fault from a tracing one: inductor (generated kernels), aot_eager (traced
# forward and backward graphs run by eager kernels), eager (Dynamo's capture alone).
COMPILE_BACKENDS = ("inductor", "aot_eager", "eager")

_compile_mode = "none"
_compile_backend = "inductor"
_checkpointing = False
_compiled_fns: dict = {}     # (function, backend) -> its compiled version


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
    if jvp_attention == "fused" and compile_mode == "all":
        raise ValueError("objective.jvp_attention: 'fused' cannot serve a compiled JVP (engine.compile: all traces "
                         "math attention into the graph); use 'auto' or engine.compile=outside_jvp")
    set_jvp_backend(jvp_attention)
    set_block_execution(compile_mode, checkpointing, compile_backend)


def _has_tangent(args) -> bool:
    return any(isinstance(a, torch.Tensor) and fwAD.unpack_dual(a).tangent is not None for a in args)


def managed_block(forward):
    """Decorator for a block's ``forward(self, x, *conditions)``."""

    @functools.wraps(forward)
    def run(self, x, *args):
        inputs = (x, *args)
        if _has_tangent(inputs):
            return _run_with_tangents(forward, self, inputs)
        fn = _compiled(forward) if _compile_mode != "none" and x.shape[0] > 0 else forward
        if _checkpointing and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(fn, self, *inputs, use_reentrant=False)
        return fn(self, *inputs)

    return run


def _compiled(fn):
    key = (fn, _compile_backend)
    return _compiled_fns.get(key) or _compiled_fns.setdefault(key, torch.compile(fn, backend=_compile_backend))


def _run_with_tangents(forward, module, inputs):
    compiled = _compile_mode == "all" and inputs[0].shape[0] > 0
    checkpointed = _checkpointing and torch.is_grad_enabled()
    if not (compiled or checkpointed):
        return forward(module, *inputs)
    parts = [fwAD.unpack_dual(a) if isinstance(a, torch.Tensor) else (a, None) for a in inputs]
    primals, tangents = [p for p, _ in parts], [t for _, t in parts]
    block_jvp = _compiled(_jvp_of(forward)) if compiled else _jvp_of(forward)
    if checkpointed:
        out, tangent = _checkpointed_jvp(block_jvp, module, primals, tangents)
    else:
        out, tangent = _call_jvp(block_jvp, module, primals, tangents)
    return fwAD.make_dual(out, tangent)


@functools.cache
def _jvp_of(forward):
    """``forward`` as a function of primals and tangents that returns (output, tangent); one function object per
    forward, so that torch.compile traces it once per block class."""

    def block_jvp(module, primals, tangents):
        with fwAD._set_fwd_grad_enabled(True):
            duals = [p if t is None else fwAD.make_dual(p, t) for p, t in zip(primals, tangents)]
            out = fwAD.unpack_dual(forward(module, *duals))
        return out.primal, out.tangent

    return block_jvp


def _call_jvp(block_jvp, module, primals, tangents):
    """Forward AD stays off outside ``block_jvp``: AOTAutograd traces the compiled graph's backward right after
    its forward, and under a live dual level it would push tangents through the backward's ops too
    ("Trying to use forward AD with aten::silu_backward that does not support it", torch 2.14.1). A dual level
    is entered where none is (the backward's recomputation)."""
    level = contextlib.nullcontext() if fwAD._current_level >= 0 else fwAD.dual_level()
    with level, fwAD._set_fwd_grad_enabled(False):
        return block_jvp(module, primals, tangents)


def _checkpointed_jvp(block_jvp, module, primals, tangents):
    """torch's checkpoint of the block as a function of primals and tangents, which it recomputes alike. The
    recomputation re-enters the forward's attention state: had the forward used the fused kernel and the replay
    math attention, their saved tensors would differ (CheckpointError)."""
    detached = tangents_detached()

    def replay(*flat):
        with detached_tangents(detached):
            return _call_jvp(block_jvp, module, flat[:len(primals)], flat[len(primals):])

    return torch.utils.checkpoint.checkpoint(replay, *primals, *tangents, use_reentrant=False)

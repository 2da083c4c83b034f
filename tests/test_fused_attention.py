"""The fused JVP attention (jvp-flash-attention's Triton kernel, models/attention.py) against the math one:
primal, tangent and gradients at head dims 64 and 72 and a length that needs padding, and MF/iMF/SG_λ losses and
gradients through a DiT. Without a GPU the kernel runs in Triton's CPU interpreter (float32 only: the interpreter
computes bfloat16 through numpy, which has no such type, and measured primal errors of ~2.8 and NaN gradients)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("jvp_flash_attention")
pytestmark = pytest.mark.timeout(300)

CASES = Path(__file__).with_name("fused_attention_cases.py")
ON_GPU = torch.cuda.is_available()


def run_cases(*args: str) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_VERSION"}   # the kernel picks one config under pytest
    if not ON_GPU:
        env["TRITON_INTERPRET"] = "1"
    out = subprocess.run([sys.executable, str(CASES), *args], capture_output=True, text=True, env=env, timeout=280,
                         cwd=CASES.parent)
    assert out.returncode == 0, out.stderr[-3000:]
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def test_fused_attention_matches_math_in_float32():
    cases = run_cases("attention", "float32")
    assert {(c["head_dim"], c["length"]) for c in cases} == {(64, 64), (64, 68), (72, 64), (72, 68)}
    for c in cases:
        for part in ("primal", "tangent", "grad_q", "grad_k", "grad_v"):
            assert c[part] < 1e-5, c


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU (Triton's CPU interpreter mis-computes bfloat16)")
def test_fused_attention_matches_math_in_bfloat16():
    for c in run_cases("attention", "bfloat16"):
        for part in ("primal", "tangent", "grad_q", "grad_k", "grad_v"):
            assert c[part] < 3e-2, c


def test_objectives_through_the_fused_kernel_equal_math_and_sg_lambda_keeps_math():
    """MF and iMF stop the gradient at the JVP, so the kernel serves them; SG_λ with λ = 1 differentiates through
    the tangent, which the kernel cannot, so it must not be used there."""
    results = {c["objective"]: c for c in run_cases("objectives")}
    for name in ("mf", "imf"):
        assert results[name]["fused_calls"] > 0, results[name]
        assert results[name]["loss"] < 1e-5 and results[name]["grad"] < 1e-5, results[name]
    assert results["sg_lambda"]["fused_calls"] == 0
    assert results["sg_lambda"]["grad"] == 0.0


def test_activation_checkpointing_recomputes_with_the_fused_kernel():
    """The backward's recomputation of a checkpointed block re-enters the attention state of its forward: with math
    attention there, its saved tensors would differ from the fused forward's (torch's CheckpointError)."""
    for c in run_cases("checkpointing"):
        assert c["fused_calls"] > 0, c
        assert c["loss"] < 1e-5 and c["grad"] < 1e-5, c

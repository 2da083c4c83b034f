"""The benchmarks still run (one short pass each; their figures are in bench/RESULTS.md, not asserted), and the
step-cost benchmark's MFU peak and model building."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from meanflow.models import build_model
from meanflow.objectives import ObjectiveContext
from meanflow.platform.config import load_config

pytestmark = pytest.mark.timeout(240)

BENCH = Path(__file__).resolve().parents[1] / "bench"
GPU_SUITE_SECTIONS = {"environment", "pytest_gpu", "step_cost_B2", "step_cost_B2_b128", "step_cost_XL2",
                      "step_cost_XL2_b32", "step_cost_compile_B2", "jvp_attention", "jvp_attention_tma",
                      "eval_throughput", "nccl", "checkpoint_XL2"}
LATENT_XL = ["model.size=XL", "model.width=0", "model.image_size=32", "model.in_channels=4", "model.num_classes=1000"]


def run_bench(script: str, *args: str) -> list[list[str]]:
    out = subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True, timeout=220)
    assert out.returncode == 0, out.stderr[-3000:]
    return [line.split() for line in out.stdout.splitlines() if line and not line.startswith("#")]


def test_step_cost_prints_finite_rows_for_each_variant():
    names = ("fm", "mf", "mf+naive", "mf+two_pass", "mf+ckpt")
    rows = run_bench("step_cost.py", "--steps", "1", "--warmup", "1", "--rounds", "1",
                     "--objectives", ",".join(names), "data.global_batch=8")
    table = {r[0]: r for r in rows if r[0] in names}
    assert set(table) == set(names)
    for row in table.values():   # ms, ÷ fm, floor F, floor ms, ÷ floor, saved MB, (peak MB: '-' on CPU), TFLOP/s
        assert all(math.isfinite(float(v)) for v in [*row[1:7], row[8]]), row
    assert float(table["mf+ckpt"][6]) < float(table["mf"][6])      # kept activations: checkpointing keeps less
    # The peers' MF has no training CFG (tiny_mf's is on): JVP with grad 4F; no-grad JVP 2F + forward, backward 3F
    assert (float(table["mf+naive"][3]), float(table["mf+two_pass"][3])) == (4.0, 5.0)


def test_two_pass_mf_gives_the_naive_loss_and_gradients(monkeypatch, one_thread):
    monkeypatch.syspath_prepend(str(BENCH))
    import step_cost

    cfg = load_config("tiny_mf", ["data.global_batch=8", "objective.weight_p=0.0"])   # plain L2: no loss ≈ 1
    step_cost.configure(cfg, "mf+two_pass")
    torch.manual_seed(0)
    model = build_model(cfg.model)
    with torch.no_grad():   # away from adaLN-zero's initial u ≡ 0, where du/dt = 0 and the JVP would not count
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    batch = step_cost.make_batches(cfg, 1, torch.device("cpu"), synthetic=True)[0]
    ctx = ObjectiveContext.single_process(8, seed=0)

    def loss_and_grads(loss_fn, step):
        model.zero_grad()
        loss = loss_fn(cfg, model, batch, step, ctx)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    naive, naive_grads = loss_and_grads(step_cost.naive_mf_loss, 3)
    two_pass, two_pass_grads = loss_and_grads(step_cost.two_pass_mf_loss, 3)
    other_draw, _ = loss_and_grads(step_cost.two_pass_mf_loss, 4)
    assert not torch.isclose(other_draw, naive, rtol=1e-3)   # the loss tells one step's draws from another's
    torch.testing.assert_close(two_pass, naive)
    for a, b in zip(two_pass_grads, naive_grads):
        torch.testing.assert_close(a, b)


@pytest.mark.timeout(290)
def test_gpu_suite_cpu_smoke_runs_and_reports_every_section(tmp_path):
    # ~90 s on 2 quiet cores; the budget leaves room for a CI machine twice as slow
    out = subprocess.run([sys.executable, str(BENCH / "gpu_suite.py"), "--cpu-smoke", "--out", str(tmp_path),
                          "--budget-s", "250"], capture_output=True, text=True, timeout=280)
    sections = json.loads((tmp_path / "results.json").read_text())["sections"]
    assert set(sections) == GPU_SUITE_SECTIONS
    bad = {name: r for name, r in sections.items() if r["status"] not in ("ok", "skipped")}
    assert not bad, json.dumps(bad, indent=1)[-4000:]
    assert out.returncode == 0, out.stderr[-3000:]
    report = (tmp_path / "report.md").read_text()
    assert all(f"## {name}\n" in report for name in GPU_SUITE_SECTIONS)
    rows = {name: {r["row"]: r for r in sections[name]["figures"]["rows"]}
            for name in ("step_cost_B2", "step_cost_B2_b128", "step_cost_XL2", "step_cost_compile_B2")}
    # dmf and mf+naive would not fit an 80 GB GPU at the full batch: they run at half of it, beside fm and mf
    assert {"fm", "mf", "mf+two_pass"} <= set(rows["step_cost_B2"]) and not {"dmf", "mf+naive"} & set(
        rows["step_cost_B2"])
    assert set(rows["step_cost_B2_b128"]) == {"fm", "mf", "dmf", "mf+naive"}
    assert "batch 128 here, not 256" in report and sections["step_cost_B2_b128"]["note"] in report
    assert sections["step_cost_XL2_b32"]["status"] == "skipped"   # in the smoke, the same command as B2_b128's
    for name, table in rows.items():
        for row in table.values():
            figures = [row[k] for k in ("ms_per_step", "floor_F", "floor_ms", "x_floor", "saved_mb", "tflops")]
            assert all(v is not None and math.isfinite(v) for v in figures), (name, row)
    # the fused kernel with TMA on and off at the padded head dims (the interpreter: no TMA, both the same kernel)
    tma = sections["jvp_attention_tma"]["figures"]
    assert {(r["shape"], r["kernel"], r["tma"], r["status"]) for r in tma["rows"]} >= {
        ("XL/2", "64x128", "on", "pass"), ("XL/2", "64x128", "off", "pass"), ("iMF-XL/2", "96x128", "on", "pass"),
        ("iMF-XL/2", "96x128", "off", "pass")}
    assert tma["tma"].startswith("not available here")
    assert sections["nccl"]["figures"]["backend"] == "gloo"


def test_mfu_divides_by_the_gpu_models_datasheet_peak_or_else_by_the_measured_one(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import step_cost

    monkeypatch.setattr(step_cost, "matmul_flops", lambda device: 500e12)   # a measurement, stubbed: no GPU here
    peaks = {}
    for name in ("NVIDIA H100 80GB HBM3", "NVIDIA H100 PCIe", "NVIDIA H100 NVL", "NVIDIA H200", "NVIDIA RTX 6000"):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, name=name: name)
        peaks[name] = step_cost.mfu_peak(torch.device("cuda", 0))
    assert [flops / 1e12 for flops, _ in peaks.values()] == [989, 756, 835, 989, 500]
    assert "measured" in peaks["NVIDIA RTX 6000"][1] and "not in the datasheet table" in peaks["NVIDIA RTX 6000"][1]
    assert step_cost.mfu_peak(torch.device("cpu"))[0] is None


def test_step_cost_builds_xl2_with_every_tensor_on_the_timed_device(monkeypatch):
    """The meta device stands in for the GPU: a tensor made elsewhere (XL/2's ~7 s CPU initialisation) stays off it."""
    monkeypatch.syspath_prepend(str(BENCH))
    import step_cost

    for overrides in ([], ["model.conditioning=decoupled"]):
        model = step_cost.build_on(torch.device("meta"), load_config("tiny_mf", [*LATENT_XL, *overrides]).model)
        assert {t.device.type for t in [*model.parameters(), *model.buffers()]} == {"meta"}


def test_scaling_estimate_covers_8_64_256_gpus_for_each_engine():
    rows = run_bench("scaling_estimate.py", "--size", "B")
    fm = [" ".join(r) for r in rows if r[0] == "fm"]
    for gpus in ("8", "64", "256"):
        for engine in ("ddp", "fsdp2 full", "fsdp2 grad_op"):
            assert any(line.startswith(f"fm {gpus} ") and f" {engine} " in line for line in fm), (gpus, engine)

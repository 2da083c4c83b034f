"""The fidelity report (bench/fidelity.py) and the pieces it added to the product. The report's claims are
reported, not asserted: this only checks that ``--quick`` produces it with finite numbers."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from meanflow.data_pipeline.toys2d import marginal_velocity_oracle
from meanflow.objectives import ObjectiveContext, build_objective
from meanflow.platform.config import ConfigError, load_config
from objective_testkit import flat_grad, objective_cfg, tiny_mlp, toy_batch

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.timeout(1200)   # 296 s at 200 steps and two processes beside another xdist worker
def test_quick_report_is_written_with_finite_numbers_and_plots(tmp_path):
    # one process: the other core runs the other xdist worker
    out = subprocess.run([sys.executable, str(REPO / "bench" / "fidelity.py"), "--quick", "--workers", "1",
                          "--out", str(tmp_path)], capture_output=True, text=True, timeout=1180)
    assert out.returncode == 0, out.stderr[-3000:]
    report = (tmp_path / "FIDELITY.md").read_text()
    for section in range(1, 8):
        assert f"## {section}." in report
    rows = [line for line in report.splitlines() if line.startswith("| ") and not line.startswith("| setting")
            and not line.startswith("| toy")]
    assert len(rows) == 3 + 4 + 20 + 2 + 5 + 4 + 4 + 5   # the seven tables, and β's fixed-parameter table (4 toys)
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        sw = cells[2:4] if cells[1].replace(".", "").isdigit() else cells[1:3]   # β rows carry β in cell 2
        for cell in sw:
            assert math.isfinite(float(cell.split(" ± ")[0])), row
    assert report.count("Reproduced.") + report.count("Not reproduced.") + report.count("Inconclusive") >= 10
    for image in re.findall(r"\(fidelity/([a-z_]+\.png)\)", report):
        assert (tmp_path / "fidelity" / image).stat().st_size > 1000


def test_only_replaces_the_named_section_of_an_existing_report(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    from fidelity import replace_section

    report = "# title\n\n## 1. a\nold a\n\n## 2. b\nold b\n"
    assert replace_section(report, "## 1. a\nnew a\n") == "# title\n\n## 1. a\nnew a\n## 2. b\nold b\n"
    assert replace_section(report, "## 2. b\nnew b\n") == "# title\n\n## 1. a\nold a\n\n## 2. b\nnew b\n"
    assert replace_section(report, "## 3. c\nc\n").endswith("old b\n\n## 3. c\nc\n")


def test_the_velocity_oracle_is_exact_for_a_one_point_distribution(monkeypatch):
    """With every sample at c, z_t = (1 − t) c + t e gives e = (z − (1 − t) c) / t exactly, so v = e − c."""
    import meanflow.data_pipeline.toys2d as toys

    c = torch.tensor([1.5, -0.5])
    monkeypatch.setattr(toys, "sample_toy", lambda name, n, g: c.expand(n, 2).clone())
    oracle = toys.marginal_velocity_oracle("checkerboard", n=16)
    z, t = torch.randn(5, 2), torch.rand(5) * 0.9 + 0.05
    expected = (z - (1 - t[:, None]) * c) / t[:, None] - c
    torch.testing.assert_close(oracle(z, t), expected)


def test_the_velocity_oracle_points_from_noise_towards_the_data():
    """At t near 1, z is almost pure noise: E[e − x | z] ≈ z − E[x] (the toys are centred)."""
    oracle = marginal_velocity_oracle("eight_gaussians", n=4096)
    z = torch.randn(64, 2)
    v = oracle(z, torch.full((64,), 0.999))
    assert (v - z).norm(dim=1).mean() < 0.2


def test_wrong_time_tangents_change_the_loss_and_a_bad_pair_is_named():
    model, batch = tiny_mlp(), toy_batch(16)
    ctx = ObjectiveContext.single_process(16, 0)
    right = build_objective(objective_cfg("mf"), 0).compute(model, batch, 1, ctx).loss
    wrong = build_objective(objective_cfg("mf", time_tangents=[0.0, 1.0]), 0).compute(model, batch, 1, ctx).loss
    assert not torch.allclose(right, wrong)
    with pytest.raises(ConfigError, match="objective.time_tangents"):
        load_config("toy2d_mf", ["objective.time_tangents=[1.0]"])


def test_stability_measured_while_off_logs_the_ratio_and_leaves_the_gradient_alone():
    model, batch = tiny_mlp(), toy_batch(16)
    ctx = ObjectiveContext.single_process(16, 0)
    base = build_objective(objective_cfg("mf"), 0).compute(model, batch, 1, ctx)
    measured = build_objective(objective_cfg("stability", **{"stability.mu": 0.0,
                                                             "stability.measure_when_off": True}), 0)
    out = measured.compute(model, batch, 1, ctx)
    assert "expansion_max" in out.stats and out.stats["expansion_max"] > 0
    torch.testing.assert_close(out.loss, base.loss)
    torch.testing.assert_close(flat_grad(out.loss, model), flat_grad(base.loss, model))

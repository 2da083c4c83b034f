"""Every objective's stats lie on its loss's device: the trainer stacks them into one tensor for the all-reduce,
which refuses to mix devices.

On a GPU a stat made without a device (``torch.tensor(x)``) is a CPU tensor beside CUDA ones. The CPU shows the
same mistake once the default device differs from the data's: under ``torch.device("meta")`` a tensor made without
a device is a meta tensor, while the model and the batch, built before, stay on the CPU.
"""

from __future__ import annotations

import pytest
import torch

from meanflow.jobs.train import Trainer
from meanflow.objectives import NAMES, ObjectiveContext, build_objective
from meanflow.platform.config import load_config
from objective_testkit import (NUM_CLASSES, gaussian_marginal_velocity, image_batch, objective_cfg,
                               tiny_decoupled_dit, tiny_dit)

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("one_thread")]


ALPHA_SCHEDULE = {"alphaflow.start_step": 2, "alphaflow.end_step": 6, "alphaflow.gamma": 1.0}

CASES = {   # id: (model, objective config, step); every stat-making branch of every registered objective
    "fm": (tiny_dit, objective_cfg("fm"), 3),
    "mf": (tiny_dit, objective_cfg("mf", **{"guidance.kappa": 0.5}), 3),
    "sg_lambda": (tiny_dit, objective_cfg("sg_lambda"), 3),
    "imf": (lambda: tiny_dit("imf_dit", v_head=True), objective_cfg("imf"), 3),
    "tangent_beta": (tiny_dit, objective_cfg("tangent_beta", **{"tangent_beta.proxy": "boundary",
                                                                "tangent_beta.beta_star_every": 1,
                                                                "tangent_beta.fm_anchor": 0.1}), 3),
    "split_mf": (tiny_dit, objective_cfg("split_mf"), 3),
    "alphaflow-trajectory_fm": (tiny_dit, objective_cfg("alphaflow", **ALPHA_SCHEDULE), 1),
    "alphaflow-interval": (tiny_dit, objective_cfg("alphaflow", **ALPHA_SCHEDULE), 4),
    "alphaflow-meanflow": (tiny_dit, objective_cfg("alphaflow", **ALPHA_SCHEDULE), 6),
    "dmf": (tiny_decoupled_dit, objective_cfg("dmf"), 3),
    "stability": (tiny_dit, objective_cfg("stability", **{"stability.base": "sg_lambda"}), 3),
    "stability-off": (tiny_dit, objective_cfg("stability", **{"stability.base": "mf",
                                                              "stability.active_until_step": 2}), 3),
}


def test_every_registered_objective_has_a_case():
    assert {cfg.name for _, cfg, _ in CASES.values()} == set(NAMES)


@pytest.mark.parametrize("case", list(CASES))
def test_stats_lie_on_the_loss_device_when_the_default_device_is_another(case):
    make_model, cfg, step = CASES[case]
    B = 8
    model, batch = make_model(), image_batch(B)
    ctx = ObjectiveContext.single_process(B, 0, marginal_velocity=gaussian_marginal_velocity(1.0))
    with torch.device("meta"):
        loss, stats = build_objective(cfg, NUM_CLASSES)(model, batch, step, ctx)
    assert loss.device == batch["x"].device                  # the objective really ran on the data's device
    misplaced = {key: value.device for key, value in stats.items() if value.device != loss.device}
    assert not misplaced, misplaced


def test_the_trainer_names_a_stat_off_the_loss_device(tmp_path):
    trainer = Trainer(load_config("toy2d_mf", [f"run.run_dir={tmp_path}", "run.steps=1"]))
    objective = trainer.objective

    def misplacing(model, batch, step, ctx):
        loss, stats = objective(model, batch, step, ctx)
        return loss, {**stats, "made_without_a_device": torch.zeros((), device="meta")}

    trainer.objective = misplacing
    with pytest.raises(RuntimeError, match=r"'made_without_a_device': 'meta'.*not on the loss's device \(cpu\)"):
        trainer.train_step(trainer.stream.next_batch())

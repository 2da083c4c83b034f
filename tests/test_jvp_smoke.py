"""The startup JVP check fails fast on a model whose forward-mode AD is missing or wrong."""

import pytest
import torch
from torch import nn

from meanflow.platform.engines import EngineJVPError, jvp_smoke_test
from meanflow.platform.engines.replicated import SingleProcessEngine
from meanflow.platform.config import load_config

pytestmark = pytest.mark.timeout(60)


class ScaleWithWrongJVP(torch.autograd.Function):
    """y = 2x whose forward-mode rule claims dy = dx (half the truth)."""

    @staticmethod
    def forward(x):
        return 2 * x

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, g):
        return 2 * g

    @staticmethod
    def jvp(ctx, dx):
        return dx


class ScaleWithoutJVP(ScaleWithWrongJVP):
    jvp = torch.autograd.Function.jvp   # the base class's: raises NotImplementedError under forward AD


class Toy(nn.Module):
    def __init__(self, scale_fn):
        super().__init__()
        self.lin, self.scale_fn = nn.Linear(3, 3), scale_fn

    def forward(self, x, *, t, r, y=None):
        return self.scale_fn.apply(self.lin(x) * (1 + t - r).view(-1, 1))


def engine_for(model):
    return SingleProcessEngine(model, None, load_config("toy2d_mf").optim, torch.device("cpu"))


def test_a_correct_jvp_passes():
    engine = engine_for(Toy(type("Scale", (ScaleWithWrongJVP,), {"jvp": staticmethod(lambda ctx, dx: 2 * dx)})))
    assert jvp_smoke_test(engine, (3,), 0, torch.device("cpu")) < 1e-3


def test_a_wrong_jvp_is_refused():
    with pytest.raises(EngineJVPError, match="disagrees with a finite difference"):
        jvp_smoke_test(engine_for(Toy(ScaleWithWrongJVP)), (3,), 0, torch.device("cpu"))


def test_a_missing_jvp_rule_is_refused_naming_the_engine():
    with pytest.raises(EngineJVPError, match="engine single: forward-mode JVP through the model failed"):
        jvp_smoke_test(engine_for(Toy(ScaleWithoutJVP)), (3,), 0, torch.device("cpu"))


def test_the_check_leaves_the_weights_bit_for_bit():
    model = Toy(type("Scale", (ScaleWithWrongJVP,), {"jvp": staticmethod(lambda ctx, dx: 2 * dx)}))
    before = [p.clone() for p in model.parameters()]
    jvp_smoke_test(engine_for(model), (3,), 0, torch.device("cpu"))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))

"""weight_norm: function-preserving init, torch's layout, per-output-channel dims, data init, errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations

import lowbit
from lowbit.calibration import calibration_set
from lowbit.errors import CalibrationError, PassConfigError
from lowbit.passes.pipeline import Pipeline
from lowbit.passes.registry import get
from lowbit.passes.reparam import ReparamError, ZeroNormError


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.ConvTranspose2d(8, 6, 2, stride=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(6 * 8 * 8, 10),
    ).eval()


X = torch.randn(4, 3, 4, 4, generator=torch.Generator().manual_seed(1))


def test_function_preserving_per_output_channel_with_torch_layout() -> None:
    model = _net()
    pipeline = Pipeline(["weight_norm"])
    gm = pipeline(lowbit.trace(model, (X,)))
    torch.testing.assert_close(gm(X), model(X), rtol=1e-6, atol=1e-6)
    records = {r.layer: r for r in pipeline.report.passes[0].layers}
    assert [records[p].stats["dim"] for p in ("0", "2", "5")] == [0, 1, 0]  # ConvTranspose: dim=1 is per output
    conv_t = gm.get_submodule("2")
    g = conv_t.parametrizations.weight.original0
    assert g.shape == (1, 6, 1, 1)  # keep-dims, one magnitude per output channel
    reference = parametrizations.weight_norm(nn.ConvTranspose2d(8, 6, 2, stride=2), dim=1)
    assert set(conv_t.state_dict()) == set(reference.state_dict())
    assert gm.get_submodule("5").parametrizations.weight.original0.shape == (10, 1)


def test_dim_none_is_one_norm_and_gradients_reach_g_and_v() -> None:
    gm = Pipeline([get("weight_norm", dim=None)])(lowbit.trace(_net(), (X,)))
    linear = gm.get_submodule("5")
    assert linear.parametrizations.weight.original0.numel() == 1
    gm.train()
    gm(X).square().mean().backward()
    for name in ("original0", "original1"):
        grad = getattr(linear.parametrizations.weight, name).grad
        assert grad is not None and grad.abs().sum() > 0


def test_data_dependent_init_normalizes_pre_activations() -> None:
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).eval()
    x = torch.randn(256, 16, generator=torch.Generator().manual_seed(2)) * 3 + 1
    calib = calibration_set([(x,)], (x,), None)
    gm = Pipeline([get("weight_norm", init="data", init_scale=2.0)])(lowbit.trace(model, (x,)), calibration=calib)
    with torch.no_grad():
        first = gm.get_submodule("0")(x)
        second = gm.get_submodule("2")(torch.relu(first))
    for out in (first, second):  # the second layer was initialized on the first one's new output
        torch.testing.assert_close(out.mean(0), torch.zeros(out.shape[1]), atol=1e-4, rtol=0)
        torch.testing.assert_close(out.std(0, unbiased=False), torch.full((out.shape[1],), 2.0), atol=1e-3, rtol=0)


def test_zero_row_is_a_named_error() -> None:
    model = _net()
    with torch.no_grad():
        model[5].weight[3].zero_()
    with pytest.raises(ZeroNormError, match="layer '5'.*\\[3\\].*undefined"):
        Pipeline(["weight_norm"])(lowbit.trace(model, (X,)))


@pytest.mark.parametrize(
    "options, match",
    [
        ({"dim": -1}, "dim=-1 is ambiguous"),
        ({"dim": "rows"}, "dim='rows' is not supported"),
        ({"init": "data", "dim": None}, "needs dim='output'"),
        ({"init_scale": 0.0}, "init_scale=0.0 is out of range"),
    ],
)
def test_bad_options(options: dict, match: str) -> None:
    with pytest.raises(PassConfigError, match=match):
        get("weight_norm", **options)


def test_dim_out_of_range_names_the_layer() -> None:
    with pytest.raises(ReparamError, match="layer '5' has a 2-D weight; dim=3"):
        Pipeline([get("weight_norm", dim=3)])(lowbit.trace(_net(), (X,)))


def test_data_init_needs_calibration() -> None:
    with pytest.raises(CalibrationError, match="weight_norm"):
        Pipeline([get("weight_norm", init="data")])(lowbit.trace(_net(), (X,)))


def test_no_matching_layer_and_tied_weights_are_reported() -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)
            self.b.weight = self.a.weight

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(torch.relu(self.a(x)))

    x = torch.randn(2, 4)
    pipeline = Pipeline(["weight_norm"])
    pipeline(lowbit.trace(Tied(), (x,)))
    reasons = {r.layer: r.reason for r in pipeline.report.passes[0].skipped}
    assert "tied to b.weight" in reasons["a"] and "tied to a.weight" in reasons["b"]
    pipeline = Pipeline(["weight_norm"])
    pipeline(lowbit.trace(nn.Sequential(nn.ReLU()), (x,)))
    assert pipeline.report.passes[0].stats["reparameterized"] == 0 and not pipeline.report.passes[0].changed

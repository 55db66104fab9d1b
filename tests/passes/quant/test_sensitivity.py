"""sensitivity: per-layer output error ranks a fragile layer first; suggested overrides meet the budget."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lowbit
from lowbit.errors import CalibrationError, LowbitError
from lowbit.passes.pipeline import Pipeline
from lowbit.passes.quant import sensitivity
from lowbit.passes.quant.grid import relative_error
from lowbit.passes.registry import get


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))
    with torch.no_grad():  # one large weight per group stretches layer 2's grid so its other weights round to 0;
        outliers = [0, 32]  # they sit on inputs layer 0 keeps near zero, so the output stays comparable
        model[0].weight[outliers] *= 0.01
        model[0].bias[outliers] = 0
        model[2].weight[:, outliers] = 1.0
    return model.eval()


@pytest.fixture(scope="module")
def measured():
    x = torch.randn(8, 64)
    gm = lowbit.trace(_model(), (x,))
    calibration = [torch.randn(16, 64, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    report = sensitivity(gm, calibration, bits=(2, 3, 4, 8), group_size=32)
    assert all(torch.equal(before[k], v) for k, v in gm.state_dict().items())  # the graph is restored
    return gm, calibration, report


def test_fragile_layer_is_most_sensitive(measured) -> None:
    _, _, report = measured
    assert report.ranking()[0] == "2"
    for layer, errors in report.errors.items():
        assert errors[8] < errors[4] < errors[2], layer
    table = report.table()
    assert table.splitlines()[3].startswith("2 ") and "w8" in table


def test_error_is_the_output_error_of_one_quantized_layer(measured) -> None:
    gm, calibration, report = measured
    quantized = Pipeline([get("rtn", bits=3, group_size=32, ignore=("0", "4"))])(gm)
    with torch.no_grad():
        ref = torch.cat([gm(x) for x in calibration])
        out = torch.cat([quantized(x) for x in calibration])
    assert report.errors["2"][3] == pytest.approx(relative_error(ref, out), rel=1e-5)


def test_suggested_overrides_meet_the_budget(measured) -> None:
    gm, calibration, report = measured
    budget = 0.1
    overrides = report.suggest_overrides(max_error=budget)
    choice = {layer: o["bits"] for layer, o in overrides.items()}
    assert report.estimated_error(choice) <= budget and choice["2"] == 8 and min(choice.values()) < 8
    assert all(o["group_size"] == 32 for o in overrides.values())
    quantized = Pipeline([get("rtn", group_size=32, overrides=overrides)])(gm)
    with torch.no_grad():
        ref = torch.cat([gm(x) for x in calibration])
        out = torch.cat([quantized(x) for x in calibration])
    assert relative_error(ref, out) <= 1.5 * budget  # the joint error is near the √Σe² estimate

    target = report.suggest_overrides(average_bits=4.0)
    choice = {layer: o["bits"] for layer, o in target.items()}
    assert report.average_bits(choice) <= 4.0 and choice["2"] >= max(choice["0"], choice["4"])


def test_plot_writes_a_png(measured, tmp_path) -> None:
    _, _, report = measured
    path = report.plot(tmp_path / "sensitivity.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_inputs(measured) -> None:
    gm, calibration, report = measured
    with pytest.raises(LowbitError, match="bits"):
        sensitivity(gm, calibration, bits=(5,))
    with pytest.raises(LowbitError, match="method"):
        sensitivity(gm, calibration, method="magic")
    with pytest.raises(CalibrationError):
        sensitivity(gm, [])
    with pytest.raises(LowbitError, match="exactly one"):
        report.suggest_overrides()
    with pytest.raises(LowbitError, match="narrowest"):
        report.suggest_overrides(average_bits=1.5)
    with pytest.raises(LowbitError, match="cannot be met"):
        report.suggest_overrides(max_error=1e-9)

"""A real training run: a tiny ViT on scikit-learn's digits with each reparameterization (benchmarks/reparam_digits.py).

The loss goes down, the folded/converted model gives the trained graph's outputs, and the
2-bit QKR+StatsQ+CGA model's accuracy is reported next to the fp32 model's.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

log = logging.getLogger(__name__)
SCRIPT = Path(__file__).resolve().parents[3] / "benchmarks" / "reparam_digits.py"


def _benchmark() -> ModuleType:
    spec = importlib.util.spec_from_file_location("reparam_digits", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


bench = _benchmark()
SCHEDULE = bench.Schedule(epochs=6, qat_epochs=4, cga_epochs=1)


@pytest.fixture(scope="module")
def data() -> tuple:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    x_train, y_train, x_test, y_test = bench.load_digits()
    yield x_train[:480], y_train[:480], x_test, y_test
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def results(data: tuple) -> dict:
    return {v: bench.run_variant(v, 0, SCHEDULE, data) for v in ("weight_norm", "compander", "w2_qkr_statsq_cga")}


@pytest.mark.parametrize("variant", ["weight_norm", "compander", "w2_qkr_statsq_cga"])
def test_loss_goes_down_and_the_deployed_model_matches(results: dict, variant: str) -> None:
    result = results[variant]
    assert result.losses[-1] < 0.9 * result.losses[0]
    assert result.max_output_diff <= 1e-5
    assert result.deployed_accuracy == result.accuracy


def test_two_bit_accuracy_is_reported_against_fp32(results: dict) -> None:
    rows = {row["variant"]: row for row in bench.summarize(list(results.values()))}
    log.info("digits, short schedule:\n%s", bench.table(list(rows.values())))
    w2 = rows["w2_qkr_statsq_cga"]
    assert w2["fp32_accuracy"] == results["w2_qkr_statsq_cga"].start_accuracy > 0.5  # 10 classes: chance is 0.1
    assert w2["accuracy"] > 0.5
    assert w2["vs_fp32"] == pytest.approx(w2["accuracy"] / w2["fp32_accuracy"])

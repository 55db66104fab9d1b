"""Progress bars: drawn on stderr when the command line enables them and stderr is a terminal; log lines only
elsewhere."""

from __future__ import annotations

import io
import logging
import sys
from collections.abc import Iterator

import pytest
import torch

import lowbit
from lowbit import progress
from lowbit.cli import main
from lowbit.ir.trace import trace
from lowbit.passes.pipeline import Pipeline

from helpers import seeded_mlp


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def bars() -> Iterator[None]:
    progress.enable()
    yield
    progress.enable(False)


def _run_passes() -> None:
    model = seeded_mlp(8, 16, 4)
    x = torch.randn(2, 8)
    Pipeline(["rtn:bits=8", "quantize_activations"])(trace(model, (x,)), example_inputs=(x,))


def test_a_terminal_shows_the_pass_list_and_each_pass_layers(monkeypatch, bars) -> None:
    monkeypatch.setattr(sys, "stderr", Terminal())
    _run_passes()
    text = sys.stderr.getvalue()
    # a bar redraws in place (tqdm limits how often, so the last states drawn depend on timing)
    assert "\rpasses:   0%|" in text and "0/2" in text and "quantize_activations" in text
    assert "\rrtn:   0%|" in text  # the rtn pass's two layers, counted in a bar of its own


def test_elsewhere_nothing_is_drawn_and_the_log_lines_stay(monkeypatch, bars, caplog) -> None:
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    with caplog.at_level(logging.INFO, logger="lowbit"):
        _run_passes()
    assert sys.stderr.getvalue() == ""
    assert "pass 1/2: rtn" in caplog.text and "pass 2/2: quantize_activations" in caplog.text


def test_library_calls_draw_nothing_unless_enabled(monkeypatch) -> None:
    monkeypatch.setattr(sys, "stderr", Terminal())
    _run_passes()
    assert sys.stderr.getvalue() == ""


def test_the_command_line_enables_bars_unless_quiet(monkeypatch) -> None:
    monkeypatch.setattr(sys, "stderr", Terminal())
    try:
        assert main(["recipes"]) == 0 and progress.drawing()
        assert main(["-q", "recipes"]) == 0 and not progress.drawing()
    finally:
        progress.enable(False)


def test_a_tvm_target_counts_the_low_bit_layers_it_lowers(monkeypatch, bars) -> None:
    monkeypatch.setattr(sys, "stderr", Terminal())
    model = seeded_mlp(64, 64, 32)
    lowbit.compile(model, (torch.randn(2, 64),), passes=["rtn"], target="x86", tune=False)
    assert "\rlow-bit layers:   0%|          | 0/2" in sys.stderr.getvalue()

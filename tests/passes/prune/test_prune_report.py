"""The sparsity report: target vs achieved per layer and overall, as a table and a PNG plot."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn as nn

import lowbit
from lowbit.passes.pipeline import Pipeline
from lowbit.passes.prune import ApplyMasks, PruneLAMP, plot_sparsity, sparsity_rows, sparsity_table


def pruned() -> torch.fx.GraphModule:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    return Pipeline([PruneLAMP(sparsity=0.75)])(lowbit.trace(net, (torch.randn(1, 16),)))


def test_table_lists_target_and_achieved_per_layer_and_overall() -> None:
    gm = pruned()
    rows = sparsity_rows(gm)
    assert [r.layer for r in rows] == ["0", "2"]
    assert sum(r.achieved * r.params for r in rows) / sum(r.params for r in rows) == pytest.approx(0.75, abs=1e-3)
    assert all(r.zeros == r.achieved for r in rows)
    table = sparsity_table(gm)
    lines = table.splitlines()
    assert lines[0].split() == ["layer", "method", "pattern", "params", "target", "achieved", "zeros"]
    assert lines[-1].startswith("overall") and "75.00%" in lines[-1]
    assert sparsity_table(Pipeline([ApplyMasks()])(gm)) == table  # baked masks report the same


def test_plot_is_a_png(tmp_path: Path) -> None:
    path = plot_sparsity(pruned(), tmp_path / "sparsity.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_table_without_pruned_layers() -> None:
    gm = lowbit.trace(nn.Sequential(nn.Linear(2, 2)), (torch.randn(1, 2),))
    assert sparsity_table(gm) == "no pruned layers"

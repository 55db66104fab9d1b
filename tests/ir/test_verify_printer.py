"""The IR verifier catches broken graphs; the printer shows annotations."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.fx as fx

from lowbit import passes
from lowbit.errors import VerificationError
from lowbit.ir.annotations import Adapter, Reparam, Sparsity, annotate, get_meta, graph_kinds
from lowbit.ir.printer import format_graph, summarize
from lowbit.ir.verify import verify

from helpers import seeded_mlp


def _mlp():
    return fx.symbolic_trace(seeded_mlp(8, 16, 4))


def test_clean_graph_verifies():
    verify(_mlp())


def test_untyped_annotation_is_rejected():
    gm = _mlp()
    next(iter(gm.graph.nodes)).meta["lowbit"] = {"bits": 4}
    with pytest.raises(VerificationError, match="LowbitMeta"):
        verify(gm, after="broken")


def test_missing_module_target_is_rejected():
    gm = _mlp()
    del gm._modules["0"]
    with pytest.raises(VerificationError, match="nonexistent attribute 0"):
        verify(gm)


def test_malformed_graph_is_rejected():
    gm = _mlp()
    placeholder = next(n for n in gm.graph.nodes if n.op == "placeholder")
    placeholder.prepend(next(n for n in gm.graph.nodes if n.op == "call_module"))  # used before defined
    with pytest.raises(VerificationError, match="malformed"):
        verify(gm)


def test_printer_shows_every_annotation_kind():
    gm = passes.Pipeline([passes.get("rtn", bits=4, group_size=8)])(_mlp())
    first = next(n for n in gm.graph.nodes if "lowbit" in n.meta)
    annotate(
        first,
        "0",
        sparsity=Sparsity(0.5, "2:4", "0.mask", "test"),
        reparam=Reparam("weight_norm", "dim=0"),
        adapter=Adapter("lora", rank=8),
    )
    text = format_graph(gm, annotated_only=True)
    for expected in ("w4 g8 sym [rtn]", "50.0% 2:4", "weight_norm (dim=0)", "lora r8"):
        assert expected in text
    assert graph_kinds(gm.graph)["quant"] == ["0", "2"]
    assert "2 annotated" in summarize(gm)
    assert "float32[1,4]" not in text  # no shapes recorded without shape propagation


def test_packed_linear_must_match_its_annotation_and_layout():
    gm = passes.Pipeline([passes.get("rtn", bits=4, group_size=8)])(_mlp())
    verify(gm)
    node = next(n for n in gm.graph.nodes if "lowbit" in n.meta)
    annotate(node, "0", quant=dataclasses.replace(get_meta(node).quant, bits=8))
    with pytest.raises(VerificationError, match="annotated w8"):
        verify(gm)
    gm = passes.Pipeline([passes.get("rtn", bits=4, group_size=8)])(_mlp())
    gm.get_submodule("0").scales = torch.zeros(3, 3)
    with pytest.raises(VerificationError, match="scales must be float32"):
        verify(gm)

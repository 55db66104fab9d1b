"""Pipeline: static ordering rules, calibration requirement, verification, dumps, report."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.fx as fx

from lowbit import passes
from lowbit.calibration import CalibrationSet
from lowbit.errors import CalibrationError, PassOrderError, VerificationError
from lowbit.ir.annotations import Adapter, annotate, get_meta
from lowbit.passes import Pass, PassConfig, PassResult, Pipeline

from helpers import TwoLayerMLP


@dataclass(frozen=True)
class _Empty(PassConfig):
    pass


class _AttachAdapter(Pass):
    """Marks every Linear as carrying an adapter (stands in for a training-time adapter pass)."""

    name = "pipeline_test_attach"
    Config = _Empty
    stage = "prepare"
    produces = frozenset({"adapter"})

    def run(self, gm, ctx):
        for node in gm.graph.nodes:
            if node.op == "call_module":
                annotate(node, node.target, adapter=Adapter("test", rank=1))
        return PassResult(changed=True)


class _MergeAdapter(Pass):
    name = "pipeline_test_merge"
    Config = _Empty
    consumes = frozenset({"adapter"})

    def run(self, gm, ctx):
        for node in gm.graph.nodes:
            if get_meta(node) and get_meta(node).adapter:
                annotate(node, get_meta(node).layer, adapter=Adapter("test", rank=1, merged=True))
        return PassResult(changed=True)


class _NeedsCalibration(Pass):
    name = "pipeline_test_calibrated"
    Config = _Empty
    requires_calibration = True
    requires = ("pipeline_test_merge",)

    def run(self, gm, ctx):
        assert isinstance(ctx.calibration, CalibrationSet)  # built once by the pipeline from the raw batches
        batches = list(ctx.require_calibration(self.name))
        return PassResult(changed=False, stats={"batches": len(batches)})


class _Corrupts(Pass):
    name = "pipeline_test_corrupt"
    Config = _Empty

    def run(self, gm, ctx):
        next(n for n in gm.graph.nodes if n.op == "call_module").meta["lowbit"] = {"bits": 4}
        return PassResult(changed=True)


@pytest.fixture
def gm():
    torch.manual_seed(0)
    return fx.symbolic_trace(TwoLayerMLP(16, 32, 8).eval())


def test_adapter_before_quantization_needs_a_merge(tmp_path):
    with pytest.raises(PassOrderError, match="add 'merge_adapters' before 'rtn'"):
        Pipeline([_AttachAdapter(), passes.get("rtn")], dump_dir=tmp_path / "dump")
    assert not (tmp_path / "dump").exists()
    Pipeline([_AttachAdapter(), _MergeAdapter(), passes.get("rtn")])


def test_graph_state_is_checked_before_any_pass_runs(gm, tmp_path):
    adapted = Pipeline([_AttachAdapter()])(gm)
    pipeline = Pipeline([passes.get("rtn")], dump_dir=tmp_path / "dump")
    with pytest.raises(PassOrderError, match="fc1, fc2"):
        pipeline(adapted)
    assert not (tmp_path / "dump").exists()


def test_nothing_but_packing_or_lowering_after_packing(gm):
    with pytest.raises(PassOrderError, match="after weights are packed"):
        Pipeline([passes.get("rtn"), _MergeAdapter()])
    packed = Pipeline([passes.get("rtn", bits=8, group_size=-1)])(gm)
    with pytest.raises(PassOrderError, match="the input graph"):
        Pipeline([_MergeAdapter()])(packed)
    Pipeline([passes.get("rtn"), passes.get("rtn", bits=8)])  # packing other layers is fine


def test_requires_and_calibration(gm):
    with pytest.raises(PassOrderError, match="requires 'pipeline_test_merge'"):
        Pipeline([_NeedsCalibration()])
    pipeline = Pipeline([_MergeAdapter(), _NeedsCalibration()])
    with pytest.raises(CalibrationError, match="pipeline_test_calibrated"):
        pipeline(gm)
    with pytest.raises(CalibrationError, match="without example inputs"):
        pipeline(gm, calibration=[(torch.randn(2, 16),)] * 3)
    pipeline(gm, calibration=[(torch.randn(2, 16),)] * 3, example_inputs=(torch.randn(1, 16),))
    assert pipeline.report.passes[-1].stats == {"batches": 3}


def test_verifier_names_the_pass_and_node(gm):
    with pytest.raises(VerificationError, match="after pass 'pipeline_test_corrupt'.*fc1"):
        Pipeline([_Corrupts()])(gm)
    Pipeline([_Corrupts()], verify=False)(gm)


def test_run_leaves_input_alone_reports_and_dumps(gm, tmp_path):
    x = torch.randn(4, 16)
    before = gm(x)
    pipeline = Pipeline(["rtn"], dump_dir=tmp_path)
    out = pipeline(gm)
    assert torch.equal(gm(x), before)
    assert all(n.op != "call_module" for n in out.graph.nodes)
    assert (out(x) - before).abs().max() < 0.1
    [result] = pipeline.report.passes
    assert result.name == "rtn" and result.changed and result.time_s > 0
    assert "rtn" in pipeline.report.table()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00-input.txt", "01-rtn.json", "01-rtn.txt"]
    assert "linear_packed" in (tmp_path / "01-rtn.txt").read_text()


def test_pipeline_rejects_non_passes():
    with pytest.raises(TypeError, match="Pass instances"):
        Pipeline([object()])


def test_a_pass_that_matches_nothing_says_so(caplog):
    gm = fx.symbolic_trace(torch.nn.Sequential(torch.nn.ReLU()))
    pipeline = Pipeline(["rtn"])
    with caplog.at_level("WARNING", logger="lowbit.pipeline"):
        pipeline(gm)
    assert "rtn matched no layers (it applies to nn.Linear, nn.Conv1d, nn.Conv2d)" in caplog.text
    assert not pipeline.report.passes[0].changed

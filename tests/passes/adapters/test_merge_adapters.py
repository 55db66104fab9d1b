"""``merge_adapters`` / ``unmerge_adapters``: exact merge, bit-exact unmerge, re-quantizing a packed base."""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx
import torch.nn as nn

import lowbit
from lowbit.errors import VerificationError
from lowbit.ir import ops, packing
from lowbit.ir.annotations import get_meta
from lowbit.ir.verify import verify
from lowbit.passes import Pipeline, get
from lowbit.passes.adapters import SORSA, AdapterError, Bone, LoRA
from lowbit.passes.adapters.common import remove_branches
from lowbit.passes.adapters.merge import requantize
from lowbit.passes.quant import PackedLinear, quantize_weight
from lowbit.passes.quant.grid import relative_error

ADAPTERS = {
    "lora": lambda: LoRA(rank=4, alpha=16),
    "pissa": lambda: LoRA(rank=4, alpha=4, init="pissa"),
    "sorsa": lambda: SORSA(rank=4),
    "bone": lambda: Bone(rank=4),
    "bat": lambda: Bone(rank=4, variant="bat"),
}


@pytest.fixture()
def model():
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(32, 16), nn.SiLU(), nn.Linear(16, 8))
    x = torch.randn(6, 32)
    return module, lowbit.trace(module, (x,)), x


def perturbed(gm: fx.GraphModule) -> fx.GraphModule:
    """Move every adapter parameter away from its init, as training would."""
    with torch.no_grad():
        for p in gm.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    return gm


def adapter_calls(gm: fx.GraphModule) -> list[str]:
    return [
        n.target for n in gm.graph.nodes if n.op == "call_module" and n.target.endswith((".lora", ".sorsa", ".bone"))
    ]


@pytest.mark.parametrize("kind", ADAPTERS)
def test_merge_then_unmerge(model, kind: str) -> None:
    _, gm, x = model
    adapted = perturbed(Pipeline([ADAPTERS[kind]()])(gm))
    expected = adapted(x)
    merged = Pipeline([get("merge_adapters")])(adapted)
    assert adapter_calls(merged) == []
    assert all(get_meta(n).adapter.merged for n in merged.graph.nodes if n.target in ("0", "2"))
    torch.testing.assert_close(merged(x), expected, atol=1e-5, rtol=1e-5)
    restored = Pipeline([get("unmerge_adapters")])(merged)
    assert adapter_calls(restored) == adapter_calls(adapted)
    before, after = adapted.state_dict(), restored.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(restored(x), expected)


def test_merged_graph_quantizes(model) -> None:
    _, gm, x = model
    adapted = perturbed(Pipeline([LoRA(rank=4)])(gm))
    quantized = Pipeline([get("merge_adapters"), get("rtn", bits=8, group_size=16)])(adapted)
    assert sum(n.target is ops.linear_packed for n in quantized.graph.nodes) == 2
    torch.testing.assert_close(quantized(x), adapted(x), atol=2e-2, rtol=2e-2)
    with pytest.raises(AdapterError, match="has no adapter module '0.lora'"):
        Pipeline([get("unmerge_adapters")])(quantized)


@pytest.mark.parametrize("kind", ["lora", "bone"])
def test_merge_into_a_packed_base_requantizes(model, kind: str) -> None:
    _, gm, x = model
    quantized = Pipeline([get("rtn", bits=4, group_size=8)])(gm)
    adapted = perturbed(Pipeline([ADAPTERS[kind]()])(quantized))
    pipeline = Pipeline([get("merge_adapters")])
    merged = pipeline(adapted)
    assert adapter_calls(merged) == []
    for path in ("0", "2"):
        packed = merged.get_submodule(path)
        target = _float_merged(adapted, path, kind)
        got = packing.dequantize(packed.qweight, packed.scales, packed.zeros, packed.g_idx, 4, 8, packed.in_features)
        error = relative_error(target, got)
        # no worse than plain RTN of the merged weight on a fresh grid
        assert error <= relative_error(target, quantize_weight(target, 4, 8, True).dequantize()) + 1e-7
        record = next(r.stats for r in pipeline.report.passes[0].layers if r.layer == path)
        assert record["requant_rel_error"] == pytest.approx(error)
        assert record["update_rel_norm"] > 0
    # the merged model is close to the adapted one: re-quantization is its only error
    assert (merged(x) - adapted(x)).norm() / adapted(x).norm() < 0.15
    restored = Pipeline([get("unmerge_adapters")])(merged)
    assert all(torch.equal(a, b) for a, b in zip(restored.state_dict().values(), adapted.state_dict().values()))
    assert torch.equal(restored(x), adapted(x))


def _float_merged(gm: fx.GraphModule, path: str, kind: str) -> torch.Tensor:
    """The float weight a merge should produce before rounding: dequantized base plus update."""
    base = gm.get_submodule(path)
    weight = packing.dequantize(
        base.qweight, base.scales, base.zeros, base.g_idx, base.bits, base.group_size, base.in_features
    )
    return weight + base.get_submodule(kind).delta_weight(weight)


@pytest.mark.parametrize("symmetric", [True, False])
def test_requantize_keeps_act_order_groups(symmetric: bool) -> None:
    torch.manual_seed(0)
    weight = torch.randn(6, 16)
    perm = torch.randperm(16)
    g_idx = torch.empty(16, dtype=torch.int32)
    g_idx[perm] = (torch.arange(16) // 4).to(torch.int32)
    start = quantize_weight(weight[:, perm], 4, 4, symmetric)
    codes = torch.empty_like(start.codes)
    codes[:, perm] = start.codes
    base = PackedLinear(packing.pack(codes, 4), start.scales, start.zeros, g_idx, None, 4, 4, 16)
    current = packing.dequantize(base.qweight, base.scales, base.zeros, g_idx, 4, 4, 16)
    # a zero update reproduces the packed base exactly
    qweight, scales, zeros = requantize(base, current)
    assert torch.equal(qweight, base.qweight) and torch.equal(scales, base.scales)
    assert zeros is None if symmetric else torch.equal(zeros, base.zeros)
    # a large update gets a grid per group (of the act-order columns) at least as good as fresh RTN
    target = current + torch.randn(6, 16)
    got = packing.dequantize(*requantize(base, target), g_idx, 4, 4, 16)
    fresh = torch.empty_like(target)
    fresh[:, perm] = quantize_weight(target[:, perm], 4, 4, symmetric).dequantize()
    assert relative_error(target, got) <= relative_error(target, fresh) + 1e-7


def test_named_errors(model) -> None:
    _, gm, _ = model
    merged = Pipeline([LoRA(rank=4), get("merge_adapters")])(gm)
    with pytest.raises(AdapterError, match="already merged .*merging twice"):
        Pipeline([get("merge_adapters")])(merged)
    with pytest.raises(AdapterError, match="never merged"):
        Pipeline([get("unmerge_adapters")])(Pipeline([LoRA(rank=4)])(gm))
    with pytest.raises(AdapterError, match="never merged"):
        Pipeline([get("unmerge_adapters")])(gm)


def test_merge_without_adapters_and_per_layer_skip(model) -> None:
    _, gm, x = model
    pipeline = Pipeline([get("merge_adapters")])
    pipeline(gm)
    assert not pipeline.report.passes[0].changed
    adapted = perturbed(Pipeline([LoRA(rank=4)])(gm))
    partly = Pipeline([get("merge_adapters", overrides={"2": "skip"})])(adapted)
    assert adapter_calls(partly) == ["2.lora"]
    torch.testing.assert_close(partly(x), adapted(x), atol=1e-5, rtol=1e-5)


def test_verifier_catches_a_lost_branch(model) -> None:
    _, gm, _ = model
    adapted = Pipeline([LoRA(rank=2)])(gm)
    remove_branches(adapted, "0", adapted.get_submodule("0.lora"))
    with pytest.raises(
        VerificationError, match="layer '0' is annotated lora\\[kaiming\\] r2 but '0.lora' is never called"
    ):
        verify(adapted)

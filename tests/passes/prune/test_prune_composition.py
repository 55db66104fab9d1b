"""Pruning composed with quantization, adapters and the pipeline's ordering rules."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import lowbit
from lowbit.calibration import calibration_set
from lowbit.errors import PassOrderError
from lowbit.inspection import dequantized_weights
from lowbit.ir.annotations import get_meta
from lowbit.passes import registry
from lowbit.passes.pipeline import Pipeline
from lowbit.passes.prune import ApplyMasks, PruneMagnitude, PruneNM, is_nm

from helpers import seeded_mlp


def mlp() -> tuple[nn.Module, torch.Tensor]:
    net = seeded_mlp(64, 64, 16)
    with torch.no_grad():
        net[0].weight.add_(0.3)  # an all-positive-ish range: the asymmetric grid is far from symmetric
    return net.eval(), torch.randn(8, 64)


def masks_of(gm: torch.fx.GraphModule) -> dict[str, torch.Tensor]:
    return {p: gm.get_submodule(p).weight_mask.bool().clone() for p in ("0", "2")}


@pytest.mark.parametrize(("bits", "symmetric"), [(4, True), (2, False), (4, False), (8, False)])
def test_rtn_after_apply_masks_keeps_pruned_weights_exactly_zero(symmetric: bool, bits: int) -> None:
    # GPTQ's grid always contains 0: [xmin, xmax] is widened to include 0 and the zero point is an
    # integer code, so a zero weight maps to code == zero point and dequantizes to exactly 0.0.
    net, x = mlp()
    pruned = Pipeline([PruneMagnitude(sparsity=0.6)])(lowbit.trace(net, (x,)))
    masks = masks_of(pruned)
    out = Pipeline([ApplyMasks(), registry.get("rtn", bits=bits, group_size=16, symmetric=symmetric)])(pruned)
    weights = dequantized_weights(out)
    for path, mask in masks.items():
        assert (weights[path][~mask] == 0).all()
    node = next(n for n in out.graph.nodes if get_meta(n) is not None and get_meta(n).quant is not None)
    assert get_meta(node).sparsity.merged and get_meta(node).sparsity.sparsity == pytest.approx(0.6, abs=1e-3)


def test_nm_with_int4_is_expressible_end_to_end() -> None:
    net, x = mlp()
    pipe = Pipeline([PruneNM(n=2, m=4), ApplyMasks(), registry.get("rtn", bits=4, group_size=32, symmetric=False)])
    out = pipe(lowbit.trace(net, (x,)))
    for weight in dequantized_weights(out).values():
        assert is_nm(weight != 0, 2, 4)
        assert float((weight == 0).float().mean()) >= 0.5
    described = [get_meta(n).describe() for n in out.graph.nodes if get_meta(n) is not None]
    assert described and all("w4 g32 asym" in d and "2:4" in d and "applied" in d for d in described)
    assert out(x).shape == (8, 16)


def test_gptq_with_a_fixed_mask_keeps_pruned_weights_at_zero() -> None:
    net, x = mlp()
    pruned = Pipeline([PruneMagnitude(sparsity=0.5)])(lowbit.trace(net, (x,)))
    masks = masks_of(pruned)
    calibration = calibration_set([torch.randn(32, 64) for _ in range(4)], (x,))
    out = Pipeline([ApplyMasks(), registry.get("gptq", bits=4, group_size=16)])(pruned, calibration=calibration)
    weights = dequantized_weights(out)
    for path, mask in masks.items():
        assert (weights[path][~mask] == 0).all()


@pytest.mark.parametrize("name", ["rtn", "gptq", "lora"])
def test_passes_that_need_plain_linears_refuse_active_masks(name: str) -> None:
    with pytest.raises(PassOrderError, match=f"add 'apply_masks' before '{name}'"):
        Pipeline([PruneMagnitude(), registry.get(name)])


def test_adapter_on_a_pruned_base_stays_sparse_after_merge_when_asked() -> None:
    net, x = mlp()
    pruned = Pipeline([PruneMagnitude(sparsity=0.7)])(lowbit.trace(net, (x,)))
    masks = masks_of(pruned)
    adapted = Pipeline([ApplyMasks(keep_masks=True), registry.get("lora", rank=4, init="gaussian")])(pruned)
    opt = torch.optim.SGD([p for p in adapted.parameters() if p.requires_grad], lr=0.1)
    for _ in range(3):
        loss = adapted(torch.randn(8, 64)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    merged = Pipeline([registry.get("merge_adapters")])(adapted)
    assert (merged.get_submodule("0").weight[~masks["0"]] != 0).any()  # a dense update was merged in
    pipe = Pipeline([ApplyMasks()])
    sparse = pipe(merged)
    for path, mask in masks.items():
        weight = sparse.get_submodule(path).weight
        assert (weight[~mask] == 0).all() and (weight[mask] != 0).all()
        assert not hasattr(sparse.get_submodule(path), "weight_mask")
    assert {r.action for r in pipe.report.passes[0].layers} == {"reapplied"}
    assert all(r.stats["rezeroed"] > 0 for r in pipe.report.passes[0].layers)


def test_apply_masks_restores_plain_layer_calls_and_drops_buffers() -> None:
    net, x = mlp()
    pruned = Pipeline([PruneMagnitude(sparsity=0.5)])(lowbit.trace(net, (x,)))
    pipe = Pipeline([ApplyMasks()])
    out = pipe(pruned)
    assert [n.op for n in out.graph.nodes] == ["placeholder", "call_module", "call_module", "call_module", "output"]
    assert "0.weight_mask" not in out.state_dict()
    torch.testing.assert_close(out(x), pruned(x))
    record = pipe.report.passes[0].layers[0]
    assert record.action == "applied" and record.stats["method"] == "prune_magnitude"
    assert record.stats["target"] == 0.5 and record.stats["achieved"] == 0.5
    assert pipe.report.passes[0].stats["achieved"] == 0.5
    with pytest.raises(PassOrderError, match="prune_magnitude"):
        Pipeline([registry.get("rtn"), PruneMagnitude()])

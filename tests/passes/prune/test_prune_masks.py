"""The mask form shared by the pruning passes: graph rewrite, training keeps zeros, verifier, bad inputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lowbit
from lowbit.errors import PassConfigError, VerificationError
from lowbit.ir.annotations import get_meta
from lowbit.ir.verify import verify
from lowbit.passes import lookup
from lowbit.passes.pipeline import Pipeline
from lowbit.passes.prune import ApplyMasks, PruneMagnitude

from helpers import seeded_mlp


def mlp() -> nn.Module:
    return seeded_mlp(12, 32, 4)


def test_masked_layer_is_weight_times_mask_in_the_graph() -> None:
    model, x = mlp(), torch.randn(3, 12)
    gm = Pipeline([PruneMagnitude(sparsity=0.5)])(lowbit.trace(model, (x,)))
    calls = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is F.linear]
    assert len(calls) == 2
    for node in calls:
        mul = node.args[1]
        assert mul.target is torch.mul and [a.target for a in mul.args] == [
            f"{node.meta['lowbit'].layer}.weight",
            f"{node.meta['lowbit'].layer}.weight_mask",
        ]
        sparsity = get_meta(node).sparsity
        assert sparsity.mask == f"{get_meta(node).layer}.weight_mask" and sparsity.method == "prune_magnitude"
    assert "0.weight_mask" in gm.state_dict()
    expected = F.linear(
        F.relu(F.linear(x, model[0].weight * gm.get_submodule("0").weight_mask.bool(), model[0].bias)),
        model[2].weight * gm.get_submodule("2").weight_mask.bool(),
        model[2].bias,
    )
    torch.testing.assert_close(gm(x), expected)


@pytest.mark.parametrize("optimizer", ["sgd_momentum", "adamw"])
def test_pruned_weights_stay_zero_through_training(optimizer: str) -> None:
    model, x = mlp(), torch.randn(16, 12)
    gm = lowbit.prepare(model.train(), (x,), passes=[PruneMagnitude(sparsity=0.75)])
    masks = {p: gm.get_submodule(p).weight_mask.bool().clone() for p in ("0", "2")}
    params = gm.parameters()
    opt = (
        torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-2)
        if optimizer == "sgd_momentum"
        else torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    )
    for _ in range(5):
        loss = gm(torch.randn(16, 12)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    for path, mask in masks.items():
        weight = gm.get_submodule(path).weight
        assert torch.equal(gm.get_submodule(path).weight_mask.bool(), mask)
        assert (weight[~mask] == 0).all()  # no gradient, no decay: exactly zero
        assert (weight[mask] != 0).all()  # the kept weights trained
    baked = Pipeline([ApplyMasks()])(gm)
    assert ((baked.get_submodule("0").weight == 0) == ~masks["0"]).all()


def test_masks_survive_deepcopy_and_state_dict_roundtrip() -> None:
    import copy

    gm = Pipeline([PruneMagnitude(sparsity=0.5)])(lowbit.trace(mlp(), (torch.randn(2, 12),)))
    clone = copy.deepcopy(gm)
    clone.load_state_dict(gm.state_dict())
    assert torch.equal(clone.get_submodule("0").weight_mask.bool(), gm.get_submodule("0").weight_mask.bool())


def test_verifier_rejects_a_broken_mask_buffer() -> None:
    gm = Pipeline([PruneMagnitude(sparsity=0.5)])(lowbit.trace(mlp(), (torch.randn(2, 12),)))
    gm.get_submodule("0").weight_mask = torch.ones(3, 3, dtype=torch.bool)
    with pytest.raises(VerificationError, match="0.weight_mask"):
        verify(gm)


@pytest.mark.parametrize(
    "name", ["prune_magnitude", "prune_lamp", "prune_random", "prune_rd", "prune_gradual", "prune_channels"]
)
@pytest.mark.parametrize("value", [-0.1, 1.0, 1.5])
def test_sparsity_outside_unit_interval_is_a_config_error(name: str, value: float) -> None:
    with pytest.raises(PassConfigError, match=f"{name}: sparsity={value}"):
        lookup(name)(sparsity=value)


def test_pruning_a_packed_or_adapted_graph_is_refused_by_ordering() -> None:
    from lowbit.errors import PassOrderError

    with pytest.raises(PassOrderError, match="prune_magnitude"):
        Pipeline(["rtn", PruneMagnitude()])
    with pytest.raises(PassOrderError, match="add 'merge_adapters' before 'prune_magnitude'"):
        from lowbit.passes.pipeline import check_order

        check_order([PruneMagnitude()], {"adapter": ["0"]})


def test_ignore_and_overrides_select_layers() -> None:
    gm = lowbit.trace(mlp(), (torch.randn(2, 12),))
    pipe = Pipeline([PruneMagnitude(sparsity=0.5, ignore=[2])])
    out = pipe(gm)
    assert not hasattr(out.get_submodule("2"), "weight_mask")
    assert pipe.report.passes[0].skipped[0].reason.startswith("ignored")
    out = Pipeline([PruneMagnitude(overrides={"0": "skip", "2": {"sparsity": 0.25}})])(gm)
    assert not hasattr(out.get_submodule("0"), "weight_mask")
    assert int((~out.get_submodule("2").weight_mask.bool()).sum()) == 32

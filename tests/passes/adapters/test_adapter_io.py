"""Adapter files: save/load round trip (with PiSSA/SORSA residuals), named errors for foreign files."""

from __future__ import annotations

import json

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

import lowbit
from lowbit.passes import Pipeline, get
from lowbit.passes.adapters import SORSA, AdapterError, Bone, LoRA, import_peft_lora, load_adapters, save_adapters


@pytest.fixture()
def model():
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    x = torch.randn(3, 16)
    return module, lowbit.trace(module, (x,)), x


def trained(gm: fx.GraphModule) -> fx.GraphModule:
    with torch.no_grad():
        for p in gm.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    return gm


def mixed(gm: fx.GraphModule) -> fx.GraphModule:
    return trained(
        Pipeline(
            [
                LoRA(rank=2, alpha=4, targets=("0",)),
                LoRA(rank=2, init="pissa", targets=("2",)),
                Bone(rank=4, variant="bat", targets=("4",)),
            ]
        )(gm)
    )


def test_round_trip(model, tmp_path) -> None:
    _, gm, x = model
    adapted = mixed(gm)
    file = tmp_path / "adapters.safetensors"
    layers = save_adapters(adapted, file)
    assert set(layers) == {"0", "2", "4"}
    with safe_open(str(file), framework="pt") as handle:
        keys = set(handle.keys())
    # adapter parameters only, plus the PiSSA residual of layer 2 (not the original weight)
    assert keys == {"0.lora.A", "0.lora.B", "2.lora.A", "2.lora.B", "2.weight", "4.bone.B"}
    loaded = load_adapters(gm, file)
    assert torch.equal(loaded(x), adapted(x))
    assert {n for n, p in loaded.named_parameters() if p.requires_grad} == {
        n for n, p in adapted.named_parameters() if p.requires_grad
    }
    # a merged graph saves the same adapter (the residual from before the merge)
    merged = Pipeline([get("merge_adapters")])(adapted)
    save_adapters(merged, tmp_path / "merged.safetensors")
    torch.testing.assert_close(load_adapters(gm, tmp_path / "merged.safetensors")(x), adapted(x))


def test_sorsa_round_trip(model, tmp_path) -> None:
    _, gm, x = model
    adapted = trained(Pipeline([SORSA(rank=2, targets=("0", "2"))])(gm))
    save_adapters(adapted, tmp_path / "s.safetensors")
    assert torch.equal(load_adapters(gm, tmp_path / "s.safetensors")(x), adapted(x))


def test_round_trip_on_a_packed_base(model, tmp_path) -> None:
    _, gm, x = model
    quantized = Pipeline([get("rtn", bits=4, group_size=8)])(gm)
    adapted = trained(Pipeline([LoRA(rank=2, init="gaussian")])(quantized))
    save_adapters(adapted, tmp_path / "q.safetensors")
    assert torch.equal(load_adapters(quantized, tmp_path / "q.safetensors")(x), adapted(x))


def test_file_for_another_architecture(model, tmp_path) -> None:
    _, gm, _ = model
    file = tmp_path / "a.safetensors"
    save_adapters(mixed(gm), file)
    other = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 4))
    other_gm = lowbit.trace(other, (torch.randn(3, 16),))
    with pytest.raises(AdapterError, match="key '2.lora.A' is for a 16 -> 8 layer, but '2' is 16 -> 12"):
        load_adapters(other_gm, file)

    class Named(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(16, 16)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.proj(x)

    named = lowbit.trace(Named(), (torch.randn(3, 16),))
    with pytest.raises(
        AdapterError, match="key '0.lora.A' is for layer '0', which this graph does not have; close layer names: proj"
    ):
        load_adapters(named, file)


def test_bad_files(model, tmp_path) -> None:
    _, gm, _ = model
    with pytest.raises(AdapterError, match="does not exist"):
        load_adapters(gm, tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(AdapterError, match="cannot read safetensors"):
        load_adapters(gm, tmp_path / "junk.safetensors")
    save_file({"x": torch.zeros(1)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(AdapterError, match="not a lowbit adapter file"):
        load_adapters(gm, tmp_path / "plain.safetensors")
    file = tmp_path / "extra.safetensors"
    adapted = Pipeline([LoRA(rank=2, targets=("0",))])(gm)
    layers = save_adapters(adapted, file)
    with safe_open(str(file), framework="pt") as handle:
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118 (safe_open is not a dict)
    save_file(
        {**tensors, "0.lora.C": torch.zeros(1)},
        str(file),
        metadata={"format": "lowbit-adapters", "layers": json.dumps(layers)},
    )
    with pytest.raises(AdapterError, match="key '0.lora.C' belongs to no adapter"):
        load_adapters(gm, file)
    with pytest.raises(AdapterError, match="already carries an adapter"):
        load_adapters(adapted, _saved(adapted, tmp_path))
    with pytest.raises(AdapterError, match="carries no adapter"):
        save_adapters(gm, tmp_path / "none.safetensors")


def _saved(gm: fx.GraphModule, tmp_path) -> str:
    path = tmp_path / "again.safetensors"
    save_adapters(gm, path)
    return str(path)


def test_peft_directory_errors(model, tmp_path) -> None:
    _, gm, _ = model
    with pytest.raises(AdapterError, match="adapter_config.json is missing"):
        import_peft_lora(gm, tmp_path)
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "use_dora": True}
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterError, match="use_dora=true"):
        import_peft_lora(gm, tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "use_dora": False}))
    save_file(
        {
            "base_model.model.0.lora_A.weight": torch.zeros(2, 16),
            "base_model.model.0.lora_B.weight": torch.zeros(16, 2),
            "base_model.model.7.lora_A.weight": torch.zeros(2, 16),
            "base_model.model.7.lora_B.weight": torch.zeros(16, 2),
        },
        str(tmp_path / "adapter_model.safetensors"),
    )
    with pytest.raises(AdapterError, match="key 'base_model.model.7.lora_A.weight' is for layer '7'"):
        import_peft_lora(gm, tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "use_dora": False, "peft_type": "IA3"}))
    with pytest.raises(AdapterError, match="only LORA"):
        import_peft_lora(gm, tmp_path)

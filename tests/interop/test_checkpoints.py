"""Quantized checkpoints: GPTQ files written here by an independent numpy packer and compressed-tensors tensors
packed by the compressed-tensors package load into packed linears with the same codes and scales; lowbit's packed
weights export as compressed-tensors that the package reads back bit for bit; bad checkpoints are named errors."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
import transformers
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32
from safetensors.torch import save_file

import lowbit
from lowbit.errors import PassConfigError
from lowbit.interop.checkpoints import CheckpointError, export_compressed_tensors, packed_linears, read_checkpoint
from lowbit.ir import packing
from lowbit.passes.quant import GPTQOptions, LoadCheckpoint, QuantizedWeight, gptq_quantize, quantize_weight

LIMITS = {"input_ids": {0: (1, 2), 1: (1, 32)}}
PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
               "mlp.up_proj", "mlp.down_proj")  # fmt: skip
GPTQ_ACT_ORDER = "gptq:bits=4,group_size=16,act_order=true,act_group_aware=false,mse=0,ignore=[lm_head]"


def llama() -> torch.nn.Module:
    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def ids() -> torch.Tensor:
    return torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(3))


def quantized(weight: torch.Tensor, bits: int, group_size: int, symmetric: bool, act_order: bool) -> QuantizedWeight:
    """lowbit's own GPTQ (act-order: a ``g_idx``) or RTN codes of ``weight``, scales rounded to fp16 as GPTQ files
    hold them."""
    if act_order:
        x = torch.randn(256, weight.shape[1], generator=torch.Generator().manual_seed(1))
        x = x * torch.linspace(0.2, 3.0, weight.shape[1])
        options = GPTQOptions(bits=bits, group_size=group_size, symmetric=symmetric, act_order=True)
        qw = gptq_quantize(weight, x.T @ x, options).quantized
        assert qw.g_idx is not None
    else:
        qw = quantize_weight(weight, bits, group_size, symmetric)
    return dataclasses.replace(qw, scales=qw.scales.half().float())


def dense_words(codes: np.ndarray, bits: int) -> np.ndarray:
    """The GPTQ spec's packing, written out: value ``i`` of each row at bits ``[i·bits, (i+1)·bits)`` of the row's
    little-endian int32 words, a value crossing a word boundary split over both."""
    rows, count = codes.shape
    words = np.zeros((rows, -(-count * bits // 32)), dtype=np.uint64)
    for i in range(count):
        start = i * bits
        value = codes[:, i].astype(np.uint64) << np.uint64(start % 32)
        words[:, start // 32] |= value & np.uint64(0xFFFFFFFF)
        if start % 32 + bits > 32:
            words[:, start // 32 + 1] |= value >> np.uint64(32)
    return words.astype(np.uint32).view(np.int32)


def gptq_tensors(path: str, qw: QuantizedWeight, v2: bool = False) -> dict[str, torch.Tensor]:
    """One layer in the GPTQ layout: qweight (K·bits/32, N), qzeros (groups, N·bits/32) holding zero − 1 (v1),
    scales (groups, N) fp16, g_idx (K,)."""
    zeros = qw.zeros if qw.zeros is not None else torch.full_like(qw.scales, packing.default_zero(qw.bits))
    stored = zeros.T.numpy().astype(np.int64) - (0 if v2 else 1)
    g_idx = qw.g_idx if qw.g_idx is not None else torch.arange(qw.in_features, dtype=torch.int32) // qw.group_size
    return {
        f"{path}.qweight": torch.from_numpy(dense_words(qw.codes.numpy(), qw.bits).T.copy()),
        f"{path}.qzeros": torch.from_numpy(dense_words(stored & ((1 << qw.bits) - 1), qw.bits)),
        f"{path}.scales": qw.scales.T.half().contiguous(),
        f"{path}.g_idx": g_idx.to(torch.int32),
    }


def write_gptq(directory, model, bits, group_size, symmetric, act_order, v2=False):
    """A GPTQ checkpoint of ``model``'s projections: the layer weights and the float tensors, quantize_config.json."""
    directory.mkdir()
    layers, tensors = {}, {}
    for name, tensor in model.state_dict().items():
        path = name.removesuffix(".weight")
        if path.split("layers.0.")[-1] in PROJECTIONS:
            layers[path] = quantized(tensor, bits, group_size, symmetric, act_order)
            tensors.update(gptq_tensors(path, layers[path], v2))
        else:
            tensors[name] = tensor.half()
    save_file(tensors, directory / "model.safetensors")
    config = {"bits": bits, "group_size": group_size, "desc_act": act_order, "sym": symmetric}
    if v2:
        config["checkpoint_format"] = "gptq_v2"
    (directory / "quantize_config.json").write_text(json.dumps(config))
    return layers


def dequantized_model(model, layers: dict[str, QuantizedWeight], halve: bool = True) -> torch.nn.Module:
    """``model`` with each quantized layer's weight replaced by the weight its codes stand for (float tensors
    rounded to fp16 as the checkpoint holds them)."""
    reference = llama()
    state = {k: v.half().float() if halve else v for k, v in model.state_dict().items()}
    state.update({f"{path}.weight": qw.dequantize() for path, qw in layers.items()})
    reference.load_state_dict(state)
    return reference


def assert_same_layers(graph, layers: dict[str, QuantizedWeight]) -> None:
    found = packed_linears(graph)
    assert set(found) == set(layers)
    for path, qw in layers.items():
        arguments = found[path][0]
        assert (arguments["bits"], arguments["group_size"], arguments["in_features"]) == (
            qw.bits, qw.group_size, qw.in_features
        )  # fmt: skip
        assert torch.equal(arguments["qweight"], packing.pack(qw.codes, qw.bits))
        assert torch.equal(arguments["scales"], qw.scales)
        assert (arguments["zeros"] is None) == (qw.zeros is None)
        if qw.zeros is not None:
            assert torch.equal(arguments["zeros"], qw.zeros)
        assert (arguments["g_idx"] is None) == (qw.g_idx is None)
        if qw.g_idx is not None:
            assert torch.equal(arguments["g_idx"], qw.g_idx)


@pytest.mark.parametrize(
    ("bits", "group_size", "symmetric", "act_order", "v2"),
    [(4, 32, True, False, False), (4, 16, False, True, False), (8, -1, False, False, True), (3, 32, True, False, False),
     (2, 32, False, False, False)],
)  # fmt: skip
def test_gptq_checkpoint_loads_bit_exact(tmp_path, bits, group_size, symmetric, act_order, v2):
    model = llama()
    layers = write_gptq(tmp_path / "gptq", model, bits, group_size, symmetric, act_order, v2)
    compiled = lowbit.compile(
        llama(), (ids(),), passes=[LoadCheckpoint(path=str(tmp_path / "gptq"))], target="torch", dynamic_shapes=LIMITS
    )
    assert_same_layers(compiled.graph, layers)
    reference = dequantized_model(model, layers)(ids()).logits
    torch.testing.assert_close(compiled(ids()).logits, reference, rtol=1e-4, atol=1e-4)


def test_gptq_checkpoint_compiles_for_x86(tmp_path):
    """A GPTQ MLP through the TVM x86 kernels: the same outputs as the torch target on the same packed weights."""
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(128, 64), torch.nn.ReLU(), torch.nn.Linear(64, 32)).eval()
    directory = tmp_path / "mlp"
    directory.mkdir()
    layers = {path: quantized(mlp.get_submodule(path).weight.detach(), 4, 32, False, False) for path in ("0", "2")}
    tensors = {name: value for path, qw in layers.items() for name, value in gptq_tensors(path, qw).items()}
    tensors.update({"0.bias": mlp[0].bias.detach(), "2.bias": mlp[2].bias.detach()})
    for shard, prefix in enumerate(("0.", "2.")):  # a sharded checkpoint: one file per layer
        shard_tensors = {name: value for name, value in tensors.items() if name.startswith(prefix)}
        save_file(shard_tensors, directory / f"model-0000{shard + 1}-of-00002.safetensors")
    (directory / "config.json").write_text(json.dumps({"quantization_config": {
        "quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": False, "sym": False}}))  # fmt: skip
    x = torch.randn(4, 128, generator=torch.Generator().manual_seed(2))
    spec = f"load_checkpoint:path={directory}"
    on_torch = lowbit.compile(mlp, (x,), passes=[spec], target="torch")
    on_x86 = lowbit.compile(mlp, (x,), passes=[spec], target="x86")
    assert_same_layers(on_torch.graph, layers)
    torch.testing.assert_close(on_x86(x), on_torch(x), rtol=1e-4, atol=1e-4)


def ct_tensors(path: str, qw: QuantizedWeight) -> dict[str, torch.Tensor]:
    """One layer packed by the compressed-tensors package: signed codes and zero points, int32 words."""
    offset = 1 << (qw.bits - 1)
    tensors = {
        f"{path}.weight_packed": pack_to_int32((qw.codes.to(torch.int32) - offset).to(torch.int8), qw.bits),
        f"{path}.weight_scale": qw.scales.half(),
        f"{path}.weight_shape": torch.tensor([qw.out_features, qw.in_features]),
    }
    if qw.zeros is not None:
        signed = (qw.zeros.to(torch.int32) - offset).to(torch.int8)
        tensors[f"{path}.weight_zero_point"] = pack_to_int32(signed, qw.bits, packed_dim=0)
    return tensors


def ct_config(bits: int, group_size: int, symmetric: bool) -> dict:
    weights = {"num_bits": bits, "type": "int", "symmetric": symmetric,
               "strategy": "channel" if group_size == -1 else "group", "group_size": None if group_size == -1
               else group_size}  # fmt: skip
    group = {"targets": ["Linear"], "weights": weights}
    return {"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {"group_0": group},
            "ignore": ["lm_head"]}  # fmt: skip


@pytest.mark.parametrize(("bits", "group_size", "symmetric"), [(4, 32, False), (8, -1, True), (3, 16, False)])
def test_compressed_tensors_packed_by_the_package_load_bit_exact(bits, group_size, symmetric):
    model = llama()
    tensors, layers = {}, {}
    for name, tensor in model.state_dict().items():
        path = name.removesuffix(".weight")
        if path.split("layers.0.")[-1] in PROJECTIONS:
            layers[path] = quantized(tensor, bits, group_size, symmetric, False)
            tensors.update(ct_tensors(path, layers[path]))
        else:
            tensors[name] = tensor
    checkpoint = read_checkpoint(tensors, ct_config(bits, group_size, symmetric))
    assert checkpoint.format == "compressed-tensors"
    assert set(checkpoint.tensors) == {k for k in model.state_dict() if k.removesuffix(".weight") not in layers}
    for path, qw in layers.items():
        got = checkpoint.layers[path]
        assert torch.equal(got.codes, qw.codes) and torch.equal(got.scales, qw.scales)
        assert (got.zeros is None and qw.zeros is None) or torch.equal(got.zeros, qw.zeros)
        assert got.group_size == qw.group_size and got.g_idx is None


def test_compressed_tensors_act_order_groups_load():
    """A checkpoint with ``weight_g_idx`` (compressed-tensors' former 'group' activation ordering) keeps its groups."""
    weight = torch.randn(16, 64, generator=torch.Generator().manual_seed(5))
    qw = quantized(weight, 4, 16, False, True)
    tensors = {**ct_tensors("fc", qw), "fc.weight_g_idx": qw.g_idx}
    got = read_checkpoint(tensors, ct_config(4, 16, False)).layers["fc"]
    assert torch.equal(got.g_idx, qw.g_idx) and torch.equal(got.codes, qw.codes) and torch.equal(got.zeros, qw.zeros)
    torch.testing.assert_close(got.dequantize(), qw.dequantize(), rtol=0, atol=0)


def compiled_lm(bits: int, group_size: int, symmetric: bool):
    spec = f"rtn:bits={bits},group_size={group_size},symmetric={symmetric},ignore=[lm_head]"
    return lowbit.compile(llama(), (ids(),), passes=[spec], target="torch", dynamic_shapes=LIMITS)


@pytest.mark.parametrize(
    ("bits", "group_size", "symmetric"), [(4, 32, True), (4, 16, False), (8, -1, False), (3, 32, False), (2, 16, True)]
)
def test_compressed_tensors_export_reads_back_in_the_package_and_round_trips(tmp_path, bits, group_size, symmetric):
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig

    compiled = compiled_lm(bits, group_size, symmetric)
    out = export_compressed_tensors(compiled, tmp_path / "ct", config=llama().config)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and config["quantization_config"]["ignore"] == ["lm_head"]
    schema = QuantizationConfig.model_validate(config["quantization_config"])
    scheme = next(iter(schema.config_groups.values()))
    assert scheme.weights.num_bits == bits and scheme.weights.symmetric == symmetric
    from safetensors.torch import load_file

    tensors = load_file(out / "model.safetensors")
    layers = packed_linears(compiled.graph)
    assert len(layers) == len(PROJECTIONS)
    floats = {name for name in llama().state_dict() if name.removesuffix(".weight") not in layers}
    assert {name for name in tensors if ".weight_" not in name} == floats
    for path, (arguments, _) in layers.items():
        shape = tensors[f"{path}.weight_shape"].tolist()
        codes = unpack_from_int32(tensors[f"{path}.weight_packed"], bits, torch.Size(shape)).to(torch.int32)
        expected = packing.unpack(arguments["qweight"], bits, arguments["in_features"])
        assert torch.equal(codes + (1 << (bits - 1)), expected.to(torch.int32))
        assert torch.equal(tensors[f"{path}.weight_scale"], arguments["scales"])
        state = {k.removeprefix(f"{path}."): v for k, v in tensors.items() if k.startswith(f"{path}.weight_")}
        weight = PackedQuantizationCompressor.decompress(state, scheme)["weight"]
        reference = packing.dequantize(*(arguments[k] for k in ("qweight", "scales", "zeros", "g_idx")), bits,
                                       arguments["group_size"], arguments["in_features"])  # fmt: skip
        torch.testing.assert_close(weight, reference, rtol=0, atol=1e-6)
    # lowbit → compressed-tensors → lowbit: the same packed tensors, and the same outputs
    reloaded = lowbit.compile(llama(), (ids(),), passes=[LoadCheckpoint(path=str(out))], target="torch",
                              dynamic_shapes=LIMITS)  # fmt: skip
    for path, (arguments, _) in packed_linears(reloaded.graph).items():
        for name in ("qweight", "scales", "zeros", "g_idx", "bias"):
            a, b = arguments[name], layers[path][0][name]
            assert (a is None and b is None) or torch.equal(a, b), (path, name)
    torch.testing.assert_close(reloaded(ids()).logits, compiled(ids()).logits, rtol=0, atol=0)


@pytest.mark.parametrize(("bits", "group_size", "symmetric"), [(4, 16, False), (8, -1, True)])
def test_compressed_tensors_export_loads_in_transformers(tmp_path, bits, group_size, symmetric):
    """transformers (through compressed-tensors) loads the export with no missing or unexpected tensor and computes
    lowbit's logits."""
    compiled = compiled_lm(bits, group_size, symmetric)
    out = export_compressed_tensors(compiled, tmp_path / "ct", config=llama().config)
    model, info = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    with torch.no_grad():
        torch.testing.assert_close(model(ids()).logits, compiled(ids()).logits, rtol=1e-5, atol=1e-5)


def test_exports_refuse_what_compressed_tensors_cannot_hold_and_leave_no_files(tmp_path, monkeypatch):
    calibration = [torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    act_order = lowbit.compile(llama(), (ids(),), passes=[GPTQ_ACT_ORDER],
                               calibration=calibration, target="torch", dynamic_shapes=LIMITS)  # fmt: skip
    with pytest.raises(CheckpointError, match=r"layer 'model\.layers\.0\..*act-order"):
        export_compressed_tensors(act_order, tmp_path / "a")
    uneven = lowbit.compile(torch.nn.Sequential(torch.nn.Linear(48, 8)), (torch.randn(2, 48),),
                            passes=["rtn:bits=4,group_size=32"])  # fmt: skip
    with pytest.raises(CheckpointError, match=r"layer '0': group_size 32 does not divide in_features 48"):
        export_compressed_tensors(uneven, tmp_path / "b")
    conv = lowbit.compile(torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3)), (torch.randn(1, 4, 8, 8),),
                          passes=["rtn:bits=4,group_size=-1"])  # fmt: skip
    with pytest.raises(CheckpointError, match=r"calls lowbit\.conv_packed\.default: compressed-tensors"):
        export_compressed_tensors(conv, tmp_path / "conv")
    compiled = compiled_lm(4, 32, True)
    with pytest.raises(CheckpointError, match="not exact in torch.float16"):
        export_compressed_tensors(compiled, tmp_path / "c", scale_dtype=torch.float16)

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        export_compressed_tensors(compiled, tmp_path / "d")
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "keep").write_text("x")
    with pytest.raises(CheckpointError, match="already exists"):
        export_compressed_tensors(compiled, tmp_path / "e")


def _one_layer(bits=4, group_size=32, symmetric=False) -> tuple[dict[str, torch.Tensor], QuantizedWeight]:
    weight = torch.randn(16, 64, generator=torch.Generator().manual_seed(5))
    qw = quantized(weight, bits, group_size, symmetric, False)
    return gptq_tensors("fc", qw), qw


@pytest.mark.parametrize(
    ("change", "config", "message"),
    [
        (lambda t: t.pop("fc.qzeros"), {}, r"fc\.qzeros: missing from the checkpoint"),
        (lambda t: t.update({"fc.scales": t["fc.scales"][:1]}), {}, r"fc\.scales: shape \(1, 16\), expected \(2, 16\)"),
        (lambda t: t.update({"fc.qweight": t["fc.qweight"].float()}), {}, r"fc\.qweight: expected a 2-D int32"),
        (lambda t: t.update({"fc.g_idx": torch.full((64,), 7, dtype=torch.int32)}), {}, r"fc\.g_idx: group indices"),
        (lambda t: None, {"bits": 5}, r"fc\.qweight: 5-bit codes; lowbit's packed format holds"),
        (lambda t: None, {"checkpoint_format": "marlin"}, r"checkpoint_format 'marlin'"),
    ],
)
def test_bad_gptq_checkpoints_are_named_errors(change, config, message):
    tensors, _ = _one_layer()
    change(tensors)
    settings = {"quant_method": "gptq", "bits": 4, "group_size": 32, "sym": False, **config}
    with pytest.raises(CheckpointError, match=message):
        read_checkpoint(tensors, settings)


@pytest.mark.parametrize(
    ("weights", "extra", "message"),
    [
        ({"num_bits": 6}, {}, r"fc\.weight_packed: 6-bit codes"),
        ({"strategy": "tensor"}, {}, r"fc\.weight_packed: strategy 'tensor'"),
        ({"type": "float"}, {}, r"fc\.weight_packed: 'float' weights"),
        ({}, {"input_activations": {"num_bits": 8}}, r"fc\.weight_packed: the scheme also quantizes input activ"),
        ({}, {"format": "marlin-24"}, r"fc\.weight_packed: compressed-tensors format 'marlin-24'"),
        ({}, {"targets": ["re:.*other"]}, r"fc\.weight_packed: no config group"),
    ],
)
def test_bad_compressed_tensors_checkpoints_are_named_errors(weights, extra, message):
    qw = quantized(torch.randn(16, 64, generator=torch.Generator().manual_seed(5)), 4, 32, False, False)
    config = ct_config(4, 32, False)
    group = config["config_groups"]["group_0"]
    group["weights"].update(weights)
    group.update(extra)
    with pytest.raises(CheckpointError, match=message):
        read_checkpoint(ct_tensors("fc", qw), config)


def test_compressed_tensors_shape_errors_name_the_tensor():
    qw = quantized(torch.randn(16, 64, generator=torch.Generator().manual_seed(5)), 4, 32, False, False)
    tensors = ct_tensors("fc", qw)
    tensors["fc.weight_shape"] = torch.tensor([16, 96])
    with pytest.raises(CheckpointError, match=r"fc\.weight_packed: 8 int32 words per row; 96 4-bit codes take 12"):
        read_checkpoint(tensors, ct_config(4, 32, False))
    tensors = ct_tensors("fc", qw)
    del tensors["fc.weight_zero_point"]
    with pytest.raises(CheckpointError, match=r"fc\.weight_zero_point: missing"):
        read_checkpoint(tensors, ct_config(4, 32, False))


def test_checkpoint_layers_that_do_not_fit_the_model_are_named_errors(tmp_path):
    tensors, _ = _one_layer()
    directory = tmp_path / "ckpt"
    directory.mkdir()
    save_file({k.replace("fc.", "0."): v for k, v in tensors.items()}, directory / "model.safetensors")
    (directory / "quantize_config.json").write_text(json.dumps({"bits": 4, "group_size": 32, "sym": False}))
    wrong = torch.nn.Sequential(torch.nn.Linear(32, 16))
    with pytest.raises(CheckpointError, match=r"0: the checkpoint's weight is 16x64, the layer's is \(16, 32\)"):
        lowbit.compile(wrong, (torch.randn(2, 32),), passes=[f"load_checkpoint:path={directory}"])
    save_file({"0.weight": torch.zeros(16, 64), "0.bias": torch.zeros(8)}, directory / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"0\.bias: shape \(8,\) in the checkpoint, \(16,\) in the model"):
        lowbit.compile(torch.nn.Sequential(torch.nn.Linear(64, 16)), (torch.randn(2, 64),),
                       passes=[f"load_checkpoint:path={directory}"])  # fmt: skip
    tensors["0.bias"] = torch.ones(16, dtype=torch.float16)
    save_file({k.replace("fc.", "0."): v for k, v in tensors.items()}, directory / "model.safetensors")
    no_bias = torch.nn.Sequential(torch.nn.Linear(64, 16, bias=False))
    with pytest.raises(CheckpointError, match=r"0\.bias: a non-zero bias for a layer of the model that has none"):
        lowbit.compile(no_bias, (torch.randn(2, 64),), passes=[f"load_checkpoint:path={directory}"])
    with pytest.raises(PassConfigError, match="load_checkpoint: path is required"):
        lowbit.compile(wrong, (torch.randn(2, 32),), passes=["load_checkpoint"])
    with pytest.raises(CheckpointError, match="no \\*.safetensors file"):
        read_checkpoint(tmp_path / "nothing")
    (directory / "quantize_config.json").write_text("{bits: 4")
    with pytest.raises(CheckpointError, match=r"quantize_config\.json: not valid JSON"):
        read_checkpoint(directory)
    (directory / "model.safetensors").write_bytes(b"truncated")
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a readable safetensors file"):
        read_checkpoint(directory)

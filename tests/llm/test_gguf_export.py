"""GGUF export: each packed grid written in its GGUF block type with the same codes (read back with the gguf
package's reader and its own dequantization), llama.cpp's tensor names and rotary row order, the tokenizer as a
``gpt2`` vocabulary, and a named error for every grid, model or tokenizer the export cannot represent."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
import transformers
from gguf.quants import dequantize
from llm_models import prompts

import lowbit
from lowbit.cli import main
from lowbit.errors import ArtifactError
from lowbit.ir import packing
from lowbit.llm.gguf_export import GGUFExportError, rotary_rows
from lowbit.llm.model import CompiledCausalLM
from lowbit.llm.weights import read_weights

#: 256 byte symbols, the tokens of `MERGES`, one special token; the model has a few unused rows more.
MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("Ġ", "a"), ("e", "r"), ("o", "n"), ("Ġ", "s")]
VOCAB = 272
LIMITS = {"input_ids": {0: (1, 2), 1: (1, 64)}}
#: fp16 keeps 11 significant bits: a block scale moves by at most 2^-11 of itself.
FP16_STEP = 2.0**-11


def merges_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with a few merges and an end-of-text token (also BOS and padding)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    symbols = sorted(pre_tokenizers.ByteLevel.alphabet()) + ["".join(pair) for pair in MERGES]
    bpe = Tokenizer(models.BPE(vocab={s: i for i, s in enumerate(symbols)}, merges=MERGES))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    special = "<|endoftext|>"
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token=special, eos_token=special, pad_token=special
    )


def llama(model_type: str = "llama", tie: bool = True) -> torch.nn.Module:
    config = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config, "phi3": transformers.Phi3Config}[
        model_type
    ](vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
      num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=tie, bos_token_id=None,
      eos_token_id=None, pad_token_id=None)  # fmt: skip
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def compile_lm(model: torch.nn.Module, passes: list[str], tokenizer=None) -> CompiledCausalLM:
    return lowbit.compile(
        model, (prompts(1, 16),), target="torch", dynamic_shapes=LIMITS, passes=passes,
        tokenizer=tokenizer or merges_tokenizer(),
    )  # fmt: skip


def gguf_codes(tensor, columns: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Codes ``(rows, columns)`` (Q8_0 shifted back to 0..255), per-block d and (Q4_1) m of a GGUF tensor."""
    kind = tensor.tensor_type.name
    blocks = np.asarray(tensor.data).reshape(-1, columns // 32, gguf.GGML_QUANT_SIZES[tensor.tensor_type][1])
    d = blocks[..., :2].copy().view(np.float16)[..., 0]
    if kind == "Q8_0":
        return blocks[..., 2:].view(np.int8).astype(np.int16).reshape(len(blocks), -1) + 128, d, None
    m = blocks[..., 2:4].copy().view(np.float16)[..., 0] if kind == "Q4_1" else None
    body = blocks[..., 4 if m is not None else 2 :]
    codes = np.concatenate([body & 15, body >> 4], axis=-1).reshape(len(blocks), -1)
    return codes.astype(np.int16), d, m


@pytest.mark.parametrize(
    "rtn, kind",
    [("bits=4,group_size=32,symmetric=true", "Q4_0"), ("bits=4,group_size=32,symmetric=false", "Q4_1"),
     ("bits=8,group_size=32,symmetric=true", "Q8_0")],
)  # fmt: skip
def test_grids_written_in_their_gguf_types_with_the_same_codes(tmp_path, rtn, kind):
    compiled = compile_lm(llama(), ["quantize_embeddings", f"rtn:{rtn}"])
    path = compiled.export(tmp_path / "model.gguf", format="gguf")
    reader = gguf.GGUFReader(path)
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    spec = compiled.layout.spec
    weights = read_weights(compiled.graph, spec)
    assert "output.weight" not in tensors  # the tied output reads the packed embedding, as lowbit's does
    assert tensors["token_embd.weight"].tensor_type.name == "Q8_0"
    expected = {"token_embd.weight": weights.embedding.arguments}
    for index in range(spec.layers):
        for local, name in (("self_attn.q_proj", "attn_q"), ("self_attn.k_proj", "attn_k"),
                            ("mlp.down_proj", "ffn_down")):  # fmt: skip
            expected[f"blk.{index}.{name}.weight"] = weights.linears[f"model.layers.{index}.{local}"].arguments
    for name, arguments in expected.items():
        heads = {".attn_q.": spec.q_heads, ".attn_k.": spec.kv_heads}
        heads = next((count for key, count in heads.items() if key in name), None)
        codes, scales, zeros, weight = lowbit_blocks(arguments, heads)
        tensor = tensors[name]
        assert tensor.tensor_type.name == (kind if name != "token_embd.weight" else "Q8_0")
        their_codes, d, m = gguf_codes(tensor, codes.shape[1])
        assert np.array_equal(their_codes, codes), name
        assert np.array_equal(d, scales.astype(np.float16)), name
        zero = 2.0 ** (arguments["bits"] - 1)
        if zeros is not None:
            assert np.array_equal(m, (-(d.astype(np.float32) * zeros)).astype(np.float16)), name
            zero = zeros.repeat(32, axis=1)
        # the fp16 rounding of d (and of m = -d·zero) moves a weight by at most FP16_STEP of d·|q - zero| (d·zero)
        step = np.abs(scales).repeat(32, axis=1) * FP16_STEP
        bound = step * (np.abs(codes - zero) + (zero if zeros is not None else 0))
        theirs = dequantize(tensor.data, tensor.tensor_type).reshape(weight.shape)
        assert np.all(np.abs(theirs - weight) <= bound), name


def lowbit_blocks(arguments: dict, heads: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray]:
    """lowbit's codes, scales, zero points and dequantized weight of a packed layer, q/k rows in llama.cpp's order."""
    columns = arguments.get("in_features", arguments.get("embedding_dim"))
    codes = packing.unpack(arguments["qweight"], arguments["bits"], columns)
    scales, zeros = arguments["scales"], arguments.get("zeros")
    weight = packing.dequantize_codes(codes, scales, zeros, None, arguments["bits"], arguments["group_size"])
    rows = rotary_rows(heads, codes.shape[0]) if heads else torch.arange(codes.shape[0])
    zeros = None if zeros is None else zeros[rows].numpy()
    return codes[rows].numpy().astype(np.int16), scales[rows].numpy(), zeros, weight[rows].numpy()


def test_metadata_names_and_vocabulary(tmp_path):
    tokenizer = merges_tokenizer()
    compiled = compile_lm(llama(tie=False), ["rtn:bits=4,group_size=32"], tokenizer)
    reader = gguf.GGUFReader(compiled.export(tmp_path / "m.gguf", format="gguf"))
    fields = {name: field.contents() for name, field in reader.fields.items()}
    assert fields["general.architecture"] == "llama"
    assert (fields["llama.block_count"], fields["llama.embedding_length"], fields["llama.feed_forward_length"]) == (
        2, 64, 128)  # fmt: skip
    assert (fields["llama.attention.head_count"], fields["llama.attention.head_count_kv"]) == (4, 2)
    assert fields["llama.rope.freq_base"] == pytest.approx(10000.0)
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    tokens = fields["tokenizer.ggml.tokens"]
    assert len(tokens) == VOCAB and tokens[: len(tokenizer)] == sorted(
        tokenizer.get_vocab(), key=tokenizer.get_vocab().get
    )
    assert fields["tokenizer.ggml.merges"] == [" ".join(pair) for pair in MERGES]
    eos = tokenizer.eos_token_id
    assert fields["tokenizer.ggml.token_type"][eos] == 3 and fields["tokenizer.ggml.token_type"][-1] == 5
    assert fields["tokenizer.ggml.eos_token_id"] == eos
    names = {tensor.name: tensor.tensor_type.name for tensor in reader.tensors}
    assert names["token_embd.weight"] == "F32" and names["output.weight"] == "Q4_0"  # untied: its own tensor
    assert names["blk.1.ffn_gate.weight"] == "Q4_0" and names["blk.0.attn_norm.weight"] == "F32"


def test_qwen2_keeps_row_order_and_biases(tmp_path):
    compiled = compile_lm(llama("qwen2"), ["rtn:bits=8,group_size=32"])
    reader = gguf.GGUFReader(compiled.export(tmp_path / "q.gguf", format="gguf"))
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    assert reader.fields["general.architecture"].contents() == "qwen2"
    linear = read_weights(compiled.graph, compiled.layout.spec).linears["model.layers.0.self_attn.q_proj"]
    codes, _, _ = gguf_codes(tensors["blk.0.attn_q.weight"], 64)
    assert np.array_equal(codes, packing.unpack(linear.arguments["qweight"], 8, 64).numpy())
    assert np.array_equal(np.asarray(tensors["blk.0.attn_q.bias"].data), linear.arguments["bias"].numpy())


@pytest.mark.parametrize("rtn, grid", [("bits=2,group_size=32", "2-bit symmetric, groups of 32"),
                                       ("bits=4,group_size=16", "4-bit symmetric, groups of 16")])  # fmt: skip
def test_grid_without_gguf_type_is_refused_naming_the_layer(tmp_path, rtn, grid):
    compiled = compile_lm(llama(), [f"rtn:{rtn}"])
    target = tmp_path / "bad.gguf"
    with pytest.raises(GGUFExportError, match=f"layer 'lm_head': grid {grid} has no GGUF type.*Q4_0.*Q4_1.*Q8_0"):
        compiled.export(target, format="gguf")
    assert list(tmp_path.iterdir()) == []  # nothing written, not even a partial file


def test_act_order_groups_that_are_not_contiguous_are_refused(tmp_path):
    calibration = [prompts(1, 16, seed=100 + index) for index in range(4)]
    compiled = lowbit.compile(
        llama(), (prompts(1, 16),), target="torch", dynamic_shapes=LIMITS, calibration=calibration,
        passes=["gptq:bits=4,group_size=32,act_order=true,act_group_aware=false"], tokenizer=merges_tokenizer(),
    )  # fmt: skip
    with pytest.raises(GGUFExportError, match="4-bit asymmetric, groups of 32, act-order groups that are not contig"):
        compiled.export(tmp_path / "a.gguf", format="gguf")


def test_a_loaded_torch_artifact_exports_the_same_file(tmp_path):
    compiled = compile_lm(llama(), ["quantize_embeddings", "rtn:bits=4,group_size=32"])
    loaded = lowbit.load(compiled.export(tmp_path / "artifact"))
    assert isinstance(loaded, CompiledCausalLM)
    first = gguf.GGUFReader(compiled.export(tmp_path / "a.gguf", format="gguf"))
    second = gguf.GGUFReader(loaded.export(tmp_path / "b.gguf", format="gguf"))
    assert [t.name for t in first.tensors] == [t.name for t in second.tensors]
    assert all(np.array_equal(a.data, b.data) for a, b in zip(first.tensors, second.tensors))
    assert first.fields["tokenizer.ggml.tokens"].contents() == second.fields["tokenizer.ggml.tokens"].contents()
    with pytest.raises(ArtifactError, match="unknown export format 'onnx'"):
        compiled.export(tmp_path / "c", format="onnx")


def test_refusals(tmp_path):
    compiled = compile_lm(llama(), ["rtn:bits=4,group_size=32"])
    with pytest.raises(GGUFExportError, match="needs the tokenizer"):
        type(compiled).export(_without_tokenizer(compiled), tmp_path / "a.gguf", format="gguf")
    (tmp_path / "b.gguf").write_bytes(b"old")
    with pytest.raises(GGUFExportError, match="already exists"):
        compiled.export(tmp_path / "b.gguf", format="gguf")
    assert compiled.export(tmp_path / "b.gguf", format="gguf", overwrite=True).read_bytes()[:4] == b"GGUF"
    compiled.tokenizer.backend_tokenizer.pre_tokenizer = __import__("tokenizers").pre_tokenizers.Whitespace()
    with pytest.raises(GGUFExportError, match="pre-tokenizer .*Whitespace"):
        compiled.export(tmp_path / "c.gguf", format="gguf")
    phi3 = compile_lm(llama("phi3"), [])
    with pytest.raises(GGUFExportError, match="model_type 'phi3'"):
        phi3.export(tmp_path / "d.gguf", format="gguf")


def _without_tokenizer(compiled: CompiledCausalLM) -> CompiledCausalLM:
    clone = object.__new__(type(compiled))
    clone.__dict__.update(compiled.__dict__, tokenizer=None)
    return clone


def test_cli_writes_gguf(tmp_path, capsys):
    merges_tokenizer().save_pretrained(tmp_path / "tokenizer")
    target = tmp_path / "tiny.gguf"
    argv = ["-q", "compile", "llama-tiny", "--pass", "rtn:bits=4,group_size=32,symmetric=false", "--export-gguf"]
    assert main([*argv, str(target), "--tokenizer", str(tmp_path / "tokenizer")]) == 0
    assert f"exported GGUF to {target}" in capsys.readouterr().out
    reader = gguf.GGUFReader(target)
    assert {tensor.tensor_type.name for tensor in reader.tensors if tensor.name.startswith("blk.")} == {"F32", "Q4_1"}
    assert main([*argv, str(tmp_path / "other.gguf")]) == 2
    assert "--tokenizer DIR" in capsys.readouterr().err

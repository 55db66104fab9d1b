"""GGUF export of a compiled Llama-family causal LM (llama, mistral, qwen2), for llama.cpp.

Each packed linear is written in the GGUF block type whose grid is its own (`BLOCK_TYPES`: 4-bit symmetric groups of
32 → Q4_0, 4-bit asymmetric → Q4_1, 8-bit symmetric → Q8_0), its codes copied bit for bit; GGUF holds a block's scale
(and Q4_1's minimum ``−scale·zero``) in fp16, the one rounding the export makes. Float tensors are written F32. The
query and key rows go back to llama.cpp's interleaved rotary layout, and the tokenizer (byte-level BPE) becomes the
``gpt2`` vocabulary. A layer whose grid has no GGUF type, a model or tokenizer llama.cpp would run differently, is
refused by name before anything is written; the file appears whole (written aside, then renamed) or not at all.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.fx as fx

from lowbit.errors import LowbitError
from lowbit.ir import ops_a8, packing
from lowbit.ir.graph import get_attr
from lowbit.llm.family import DecoderSpec
from lowbit.llm.weights import Embedding, Linear, read_weights

log = logging.getLogger(__name__)

#: transformers ``model_type`` → llama.cpp architecture, and whether q/k rows take llama.cpp's rotary permutation.
ARCHITECTURES = {"llama": ("llama", True), "mistral": ("llama", True), "qwen2": ("qwen2", False)}
#: GGUF names of a block's tensors by the transformers module path under the block.
BLOCK_TENSORS = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
#: HF pre-tokenizers (as tokenizers' JSON describes them) → llama.cpp's name for the same splitting.
PRE_TOKENIZERS = {
    ("ByteLevel",): "gpt-2",
    ("Digits", "ByteLevel"): "smollm",
}
#: The largest finite fp16, the type of GGUF block scales.
FP16_MAX = 65504.0
#: GGUF token types.
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5


class GGUFExportError(LowbitError):
    """A compiled model, layer or tokenizer that a GGUF file for llama.cpp cannot represent exactly."""


@dataclass(frozen=True)
class BlockType:
    """A GGUF block type whose grid is one of lowbit's: ``bits``-bit codes in groups of ``group_size``."""

    name: str
    bits: int
    symmetric: bool
    group_size: int = 32

    def describe(self) -> str:
        kind = "symmetric" if self.symmetric else "asymmetric"
        return f"{self.name} ({self.bits}-bit {kind}, groups of {self.group_size})"


BLOCK_TYPES = (BlockType("Q4_0", 4, True), BlockType("Q4_1", 4, False), BlockType("Q8_0", 8, True))


@dataclass(frozen=True)
class GGUFTensor:
    """One GGUF tensor: its bytes (block types) or float32 values, torch layout ``(rows, columns)``."""

    name: str
    data: np.ndarray
    type: str = "F32"
    shape: tuple[int, ...] = ()


def block_type(
    path: str, bits: int, group_size: int, zeros: torch.Tensor | None, g_idx: Any, columns: int
) -> BlockType:
    """The GGUF type of a packed weight's grid; `GGUFExportError` naming the layer, its grid and the types that fit."""
    symmetric = zeros is None
    contiguous = g_idx is None or torch.equal(g_idx.long(), torch.arange(columns) // group_size)
    for candidate in BLOCK_TYPES:
        grid = (candidate.bits, candidate.symmetric, candidate.group_size)
        if grid == (bits, symmetric, group_size) and columns % group_size == 0 and contiguous:
            return candidate
    kind = "symmetric" if symmetric else "asymmetric"
    reason = "" if contiguous else ", act-order groups that are not contiguous columns"
    reason += f", {columns} columns (not whole groups)" if columns % group_size else ""
    fits = "; ".join(candidate.describe() for candidate in BLOCK_TYPES)
    raise GGUFExportError(
        f"layer '{path}': grid {bits}-bit {kind}, groups of {group_size}{reason} has no GGUF type; the GGUF types "
        f"with lowbit grids are {fits} (quantize it with one of those, or leave it in float)"
    )


def encode_blocks(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, kind: BlockType) -> np.ndarray:
    """The GGUF blocks ``(rows, groups · block bytes)`` of codes ``(rows, K)`` with their per-group scales/zeros."""
    rows, columns = codes.shape
    groups = columns // kind.group_size
    q = codes.numpy().reshape(rows, groups, kind.group_size)
    d = scales.numpy().astype(np.float16).reshape(rows, groups, 1).view(np.uint8)
    if kind.bits == 8:  # Q8_0: d, then the codes as int8 around the zero point 128
        body = (q.astype(np.int16) - 128).astype(np.int8).view(np.uint8)
        return np.concatenate([d, body], axis=-1).reshape(rows, -1)
    half = kind.group_size // 2  # Q4: byte j holds code j (low nibble) and code j + 16 (high nibble)
    body = q[..., :half] | (q[..., half:] << 4)
    if kind.symmetric:
        return np.concatenate([d, body], axis=-1).reshape(rows, -1)
    minimum = -(scales.numpy().astype(np.float16).astype(np.float32) * zeros.numpy())
    m = minimum.astype(np.float16).reshape(rows, groups, 1).view(np.uint8)
    return np.concatenate([d, m, body], axis=-1).reshape(rows, -1)


def packed_tensor(name: str, path: str, arguments: dict[str, Any], rows: torch.Tensor | None = None) -> GGUFTensor:
    """The GGUF tensor of a packed weight (its ``rows`` reordered when given)."""
    bits, group_size = arguments["bits"], arguments["group_size"]
    qweight, scales, zeros = arguments["qweight"], arguments["scales"], arguments.get("zeros")
    columns = arguments.get("in_features", arguments.get("embedding_dim"))
    kind = block_type(path, bits, group_size, zeros, arguments.get("g_idx"), columns)
    largest = float(scales.abs().max()) if scales.numel() else 0.0
    if largest > FP16_MAX:
        raise GGUFExportError(f"layer '{path}': a scale of {largest:.3g} exceeds fp16, in which GGUF stores scales")
    codes = packing.unpack(qweight, bits, columns)
    if rows is not None:
        codes, scales = codes[rows], scales[rows]
        zeros = None if zeros is None else zeros[rows]
    return GGUFTensor(name, encode_blocks(codes, scales, zeros, kind), kind.name, (codes.shape[0], columns))


def float_tensor(name: str, value: torch.Tensor, rows: torch.Tensor | None = None) -> GGUFTensor:
    value = value.detach().float() if rows is None else value.detach().float()[rows]
    return GGUFTensor(name, value.contiguous().numpy(), "F32", tuple(value.shape))


def rotary_rows(heads: int, rows: int) -> torch.Tensor:
    """The row order llama.cpp's llama architecture expects of a q/k projection: each head's two rotary halves
    interleaved (row ``2i`` from the first half, ``2i + 1`` from the second)."""
    return torch.arange(rows).reshape(heads, 2, rows // heads // 2).transpose(1, 2).reshape(-1)


def rope_base(graph: fx.GraphModule, head_dim: int) -> float:
    """The rotary base θ of the model's plain rotary table (``inv_freq[i] = θ^(−2i/d)``); scaled tables refused."""
    inv_freq = get_attr(graph, "model.rotary_emb.inv_freq", None)
    if not isinstance(inv_freq, torch.Tensor):
        raise GGUFExportError("the graph holds no rotary frequencies (model.rotary_emb.inv_freq) to read θ from")
    inv_freq = inv_freq.double()
    if 2 * inv_freq.numel() != head_dim:
        raise GGUFExportError(f"rotary dimension {2 * inv_freq.numel()} differs from the head size {head_dim}")
    base = float(inv_freq[1] ** (-head_dim / 2)) if inv_freq.numel() > 1 else 10000.0
    plain = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    if not torch.allclose(inv_freq, plain, rtol=1e-5, atol=0):
        raise GGUFExportError(
            "the rotary frequencies are scaled (rope_type other than 'default'); the export writes plain rotary only"
        )
    return base


@dataclass(frozen=True)
class Vocabulary:
    """A byte-level BPE tokenizer as llama.cpp's ``gpt2`` vocabulary."""

    tokens: list[str]
    types: list[int]
    merges: list[str]
    pre: str
    special: dict[str, int]
    add_bos: bool
    add_eos: bool
    chat_template: str | None = None


def vocabulary(tokenizer: Any, size: int) -> Vocabulary:
    """The GGUF vocabulary of a transformers fast tokenizer (padded to the model's ``size`` rows with unused
    tokens); `GGUFExportError` for one llama.cpp would not tokenize the same way."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise GGUFExportError(f"{type(tokenizer).__name__} is not a fast (tokenizers) tokenizer; GGUF needs its BPE")
    description = json.loads(backend.to_str())
    model, pre, decoder = description["model"], description.get("pre_tokenizer"), description.get("decoder")
    if model.get("type") != "BPE" or (decoder or {}).get("type") != "ByteLevel" or description.get("normalizer"):
        raise GGUFExportError(
            f"tokenizer model {model.get('type')!r} with decoder {(decoder or {}).get('type')!r} and normalizer "
            f"{(description.get('normalizer') or {}).get('type')!r}: the export writes byte-level BPE without "
            "normalizer only"
        )
    steps = pre.get("pretokenizers", []) if pre and pre.get("type") == "Sequence" else [pre] if pre else []
    structure = tuple(step["type"] for step in steps)
    plain = all(_plain(step) for step in steps)
    if structure not in PRE_TOKENIZERS or not plain:
        raise GGUFExportError(
            f"pre-tokenizer {structure} ({json.dumps(pre)}) has no llama.cpp equivalent the export knows; known: "
            f"{', '.join(f'{list(k)} → {v}' for k, v in PRE_TOKENIZERS.items())}"
        )
    ids = tokenizer.get_vocab()
    if sorted(ids.values()) != list(range(len(ids))) or len(ids) > size:
        raise GGUFExportError(f"the tokenizer's {len(ids)} ids are not 0..{len(ids) - 1} within the {size} rows")
    tokens = [""] * len(ids)
    for token, index in ids.items():
        tokens[index] = token
    added = {token.content: token.special for token in tokenizer.added_tokens_decoder.values()}
    types = [(CONTROL if added[token] else USER_DEFINED) if token in added else NORMAL for token in tokens]
    tokens += [f"[PAD{index}]" for index in range(len(tokens), size)]
    types += [UNUSED] * (size - len(types))
    merges = [merge if isinstance(merge, str) else " ".join(merge) for merge in model.get("merges", [])]
    if not merges:
        raise GGUFExportError("the tokenizer has no BPE merges; llama.cpp's gpt2 vocabulary needs at least one")
    special = {
        key: index
        for key, index in (("bos", tokenizer.bos_token_id), ("eos", tokenizer.eos_token_id),
                           ("unknown", tokenizer.unk_token_id), ("padding", tokenizer.pad_token_id))
        if index is not None
    }  # fmt: skip
    probe = tokenizer("a")["input_ids"]
    add_bos = tokenizer.bos_token_id is not None and probe[:1] == [tokenizer.bos_token_id]
    add_eos = tokenizer.eos_token_id is not None and probe[-1:] == [tokenizer.eos_token_id]
    template = getattr(tokenizer, "chat_template", None)
    return Vocabulary(tokens, types, merges, PRE_TOKENIZERS[structure], special, add_bos, add_eos,
                      template if isinstance(template, str) else None)  # fmt: skip


def _plain(step: dict[str, Any]) -> bool:
    """A pre-tokenizer step splits as llama.cpp's named pre-tokenizers do: GPT-2's regex without a prefix space,
    digits one by one."""
    if step["type"] == "ByteLevel":
        return step.get("use_regex", True) and not step.get("add_prefix_space", False)
    return step["type"] != "Digits" or step.get("individual_digits", False)


def decoder_tensors(graph: fx.GraphModule, spec: DecoderSpec, arch_permutes: bool) -> list[GGUFTensor]:
    """Every tensor of the GGUF file, in llama.cpp's names and layouts."""
    weights = read_weights(graph, spec)
    tensors = [_embedding("token_embd.weight", spec.embed, weights.embedding)]
    tensors.append(float_tensor("output_norm.weight", weights.norms[spec.final_norm]))
    head = weights.linears[spec.lm_head]
    if not _shares_table(head, weights.embedding):
        tensors += _linear("output", head)
    for index in range(spec.layers):
        block = spec.block(index)
        for role in ("attn", "mlp"):
            path = spec.norm(index, role)
            name = BLOCK_TENSORS[path.removeprefix(f"{block}.")]
            tensors.append(float_tensor(f"blk.{index}.{name}.weight", weights.norms[path]))
        for path, roles in spec.projections(index, ("q", "k", "v", "o", "gate", "up", "down")):
            name = f"blk.{index}.{BLOCK_TENSORS[path.removeprefix(f'{block}.')]}"
            heads = {"q": spec.q_heads, "k": spec.kv_heads}.get(roles[0])
            rows = rotary_rows(heads, weights.linears[path].out_features) if heads and arch_permutes else None
            tensors += _linear(name, weights.linears[path], rows)
    return tensors


def _embedding(name: str, path: str, table: Embedding) -> GGUFTensor:
    if not table.packed:
        return float_tensor(name, table.table)
    return packed_tensor(name, path, {**table.arguments, "g_idx": None})


def _shares_table(head: Linear, table: Embedding) -> bool:
    """The output projection computes on the embedding's own tensors (llama.cpp then reads ``token_embd``)."""
    mine = head.arguments.get("qweight") if head.packed else head.weight
    theirs = table.arguments.get("qweight") if table.packed else table.table
    return mine is not None and theirs is not None and mine.data_ptr() == theirs.data_ptr()


def _linear(name: str, linear: Linear, rows: torch.Tensor | None = None) -> list[GGUFTensor]:
    if linear.op is ops_a8.linear_packed_a8:
        log.info("%s: written weight-only; llama.cpp quantizes activations its own way", linear.path)
    if linear.packed:
        tensors = [packed_tensor(f"{name}.weight", linear.path, linear.arguments, rows)]
        bias = linear.arguments.get("bias")
    else:
        tensors, bias = [float_tensor(f"{name}.weight", linear.weight, rows)], linear.bias
    return tensors if bias is None else [*tensors, float_tensor(f"{name}.bias", bias, rows)]


def _check_model(spec: DecoderSpec) -> tuple[str, bool]:
    if spec.model_type not in ARCHITECTURES:
        raise GGUFExportError(
            f"GGUF export writes the llama.cpp architectures of {', '.join(sorted(ARCHITECTURES))}; "
            f"model_type {spec.model_type!r} is not one of them"
        )
    if spec.sliding_window is not None and spec.sliding_window < spec.max_positions:
        raise GGUFExportError(
            f"{spec.model_type}: attention window {spec.sliding_window} < context {spec.max_positions}; llama.cpp's "
            f"{ARCHITECTURES[spec.model_type][0]} architecture attends to every earlier position"
        )
    return ARCHITECTURES[spec.model_type]


def write_gguf(
    graph: fx.GraphModule | None, spec: DecoderSpec, tokenizer: Any, path: str | Path, *, name: str | None = None,
    overwrite: bool = False,
) -> Path:  # fmt: skip
    """Write the decoder of ``graph`` and ``tokenizer`` as the GGUF file ``path`` (see the module doc)."""
    import gguf

    path = Path(path)
    if path.exists() and not overwrite:
        raise GGUFExportError(f"{path} already exists; pass overwrite=True to replace it")
    if graph is None:
        raise GGUFExportError("GGUF export reads the transformed graph, which a loaded TVM artifact does not hold")
    if tokenizer is None:
        raise GGUFExportError("GGUF export needs the tokenizer: compile with tokenizer=...")
    arch, permutes = _check_model(spec)
    tensors = decoder_tensors(graph, spec, permutes)
    vocab = vocabulary(tokenizer, spec.vocab)
    base = rope_base(graph, spec.head_dim)
    feed_forward = next(t.shape[0] for t in tensors if t.name == "blk.0.ffn_gate.weight")
    linears = Counter(t.type for t in tensors if t.name.endswith(".weight") and len(t.shape) == 2)
    writer = gguf.GGUFWriter(None, arch)
    writer.add_name(name or spec.model_type)
    writer.add_file_type(_file_type(linears.most_common(1)[0][0]))
    writer.add_context_length(spec.max_positions)
    writer.add_embedding_length(spec.hidden)
    writer.add_block_count(spec.layers)
    writer.add_feed_forward_length(feed_forward)
    writer.add_head_count(spec.q_heads)
    writer.add_head_count_kv(spec.kv_heads)
    writer.add_key_length(spec.head_dim)
    writer.add_value_length(spec.head_dim)
    writer.add_layer_norm_rms_eps(spec.norm_eps)
    writer.add_rope_freq_base(base)
    writer.add_rope_dimension_count(spec.head_dim)
    writer.add_vocab_size(spec.vocab)
    _add_vocabulary(writer, vocab)
    for tensor in tensors:
        raw = None if tensor.type == "F32" else gguf.GGMLQuantizationType[tensor.type]
        writer.add_tensor(tensor.name, tensor.data, raw_dtype=raw)
    staging = path.with_name(f".{path.name}.partial")
    try:
        writer.write_header_to_file(staging)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(staging, path)
    finally:
        writer.close()
        staging.unlink(missing_ok=True)
    log.info("wrote %s: %s", path, ", ".join(f"{count} {kind}" for kind, count in sorted(linears.items())))
    return path


def _file_type(kind: str) -> int:
    import gguf

    return {"F32": gguf.LlamaFileType.ALL_F32, "Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
            "Q4_1": gguf.LlamaFileType.MOSTLY_Q4_1, "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[kind]  # fmt: skip


def _add_vocabulary(writer: Any, vocab: Vocabulary) -> None:
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    writer.add_token_merges(vocab.merges)
    for key, index in vocab.special.items():
        writer.add_uint32(f"tokenizer.ggml.{key}_token_id", index)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)


__all__ = [
    "BLOCK_TYPES",
    "BlockType",
    "GGUFExportError",
    "Vocabulary",
    "block_type",
    "encode_blocks",
    "rope_base",
    "vocabulary",
    "write_gguf",
]

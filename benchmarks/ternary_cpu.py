"""Ternary (BitNet b1.58) Llama decode on this CPU: lowbit w1.58a8 against llama.cpp's TQ1_0 and TQ2_0.

    bash benchmarks/peers/setup_llama_cpp.sh      # once: builds llama-cpp-python (.venv-llama)
    python benchmarks/ternary_cpu.py [--layers 12] [--hidden 1024] [--repeats 5] [--threads 1 2]

Model: a Llama (``LlamaForCausalLM``) with random weights at widths llama.cpp's ternary
types accept (every linear's input width a multiple of 256). Each block linear is
``W = s·T`` with ``T ∈ {−1, 0, 1}`` (uniform) and one scale per tensor; its BitNet b1.58
ternarization (absmean, per tensor) is ``Ŵ = γ·T`` with ``γ = mean|W|``, the same codes.
lowbit compiles the model holding ``W`` with the w1.58a8 recipe, which computes ``Ŵ``;
llama.cpp gets ``Ŵ`` in an F32 GGUF (q/k rows in its rotary order) and quantizes it to
TQ1_0 and TQ2_0 with its own quantizer, which stores ``Ŵ`` exactly (its block scale is
the block's max|Ŵ| = γ, in fp16). Both thus run the same ternary blocks; the token
embedding (tied output) is random fp32, 8-bit in lowbit's recipe and llama.cpp's default
type otherwise. Norm weights are 1. (lowbit's compile warns that its model is far from
the eager one: the eager model holds ``W``, lowbit's the ternary ``Ŵ = P(t ≠ 0)·W``.)

Checks, before measuring: the greedy tokens of transformers (fp32, weights ``Ŵ``) against
llama.cpp's F32 file (the conversion), lowbit's and each TQ type's (the quantized engines).
Measured as in `llm_cpu` (same rounds, one process per engine and thread count): decode
tok/s of ``--new-tokens`` greedy tokens after a ``--prompt``-token prompt of random ids,
prefill tok/s of that prompt, model bytes, perplexity of the transformers continuation.
Writes ``benchmarks/results/ternary_cpu.{json,md}`` (``--out``). llama.cpp spins its
threads: run on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from llm_cpu import (
    LLAMA_PYTHON,
    LLAMA_SCRIPT,
    LLAMA_WORK,
    RESULTS,
    CacheShape,
    Engine,
    Inputs,
    cell,
    cpu_model,
    fmt_load,
    fmt_read,
    llama,
    measure,
    perplexity,
    tensor_types,
    write_report,
)

log = logging.getLogger("ternary_cpu")

LLM_CPU = Path(__file__).resolve().with_name("llm_cpu.py")
#: llama.cpp's ternary types need rows of whole 256-wide blocks.
BLOCK = 256
RECIPE = "w1.58a8-x86"
#: Small against the blocks' outputs, so that the tied head does not just repeat the input token.
EMBEDDING_STD = 0.02
#: transformers' Llama names of a block's linears → GGUF names.
LINEARS = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
NORMS = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


@dataclass(frozen=True)
class Shape:
    """The model's widths; every linear's input width is a multiple of `BLOCK`."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    vocab: int
    context: int

    def config(self) -> Any:
        return transformers.LlamaConfig(
            vocab_size=self.vocab,
            hidden_size=self.hidden,
            intermediate_size=self.intermediate,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.heads,
            max_position_embeddings=self.context,
            rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            tie_word_embeddings=True,
            bos_token_id=1,
            eos_token_id=2,
            use_cache=False,
            attn_implementation="sdpa",
        )

    def as_dict(self) -> dict[str, int]:
        return dict(vars(self))


@dataclass(frozen=True)
class TernaryWeights:
    """Random ternary codes and per-tensor scales of every block linear, and the embedding."""

    codes: dict[str, torch.Tensor]  # transformers parameter name → T (N, K), values in {-1, 0, 1}
    scales: dict[str, float]  # the fp weight's scale s (W = s·T)
    embedding: torch.Tensor

    @classmethod
    def random(cls, model: Any, seed: int) -> TernaryWeights:
        generator = torch.Generator().manual_seed(seed)
        codes, scales = {}, {}
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and name != "lm_head":
                n, k = module.weight.shape
                codes[f"{name}.weight"] = torch.randint(-1, 2, (n, k), generator=generator).float()
                # Ŵ = γ·T keeps the output's variance at the input's: γ² · k · P(t ≠ 0) = 1
                scales[f"{name}.weight"] = 1 / math.sqrt(k * 2 / 3) / (2 / 3)
        shape = model.model.embed_tokens.weight.shape
        return cls(codes, scales, EMBEDDING_STD * torch.randn(shape, generator=generator))

    def gamma(self, name: str) -> float:
        """BitNet's absmean scale of ``W = s·T``: ``mean|W|``, computed as lowbit's pass does (fp32)."""
        return float((self.scales[name] * self.codes[name]).abs().mean())

    def load(self, model: Any, ternarized: bool) -> None:
        """Write ``W`` (or, ``ternarized``, ``Ŵ``) into ``model``; norm weights 1."""
        state = model.state_dict()
        with torch.no_grad():
            for name, code in self.codes.items():
                state[name].copy_(code * (self.gamma(name) if ternarized else self.scales[name]))
            model.model.embed_tokens.weight.copy_(self.embedding)
            for name, value in state.items():
                if "norm" in name:
                    value.fill_(1.0)


# --- llama.cpp GGUF --------------------------------------------------------------------------------------------


def rotary_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    """q/k rows in llama.cpp's order (each head's half-split rotary pairs interleaved), as its converter writes."""
    out = weight.shape[0]
    return weight.reshape(heads, 2, out // heads // 2, -1).swapaxes(1, 2).reshape(weight.shape)


def write_gguf(model: Any, shape: Shape, out: Path) -> None:
    """``model``'s fp32 weights as an F32 llama GGUF with a placeholder SentencePiece vocabulary."""
    import gguf

    tmp = out.with_suffix(".tmp")
    writer = gguf.GGUFWriter(str(tmp), arch="llama")
    writer.add_name("ternary-llama-random")
    writer.add_context_length(shape.context)
    writer.add_embedding_length(shape.hidden)
    writer.add_block_count(shape.layers)
    writer.add_feed_forward_length(shape.intermediate)
    writer.add_head_count(shape.heads)
    writer.add_head_count_kv(shape.heads)
    writer.add_rope_dimension_count(shape.hidden // shape.heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_vocab_size(shape.vocab)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    # <unk>, <s>, </s>, the 256 byte tokens, then placeholders: what llama.cpp's SPM vocabulary needs to load
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{byte:02X}>" for byte in range(256))]
    kinds = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL] + [gguf.TokenType.BYTE] * 256
    tokens += [f"t{index}" for index in range(len(tokens), shape.vocab)]
    kinds += [gguf.TokenType.NORMAL] * (shape.vocab - len(kinds))
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * shape.vocab)
    writer.add_token_types(kinds)
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    state = {name: value.detach().float().numpy() for name, value in model.state_dict().items()}
    writer.add_tensor("token_embd.weight", state["model.embed_tokens.weight"])
    for index in range(shape.layers):
        prefix = f"model.layers.{index}."
        for local, name in NORMS.items():
            writer.add_tensor(f"blk.{index}.{name}.weight", state[f"{prefix}{local}.weight"])
        for local, name in LINEARS.items():
            weight = state[f"{prefix}{local}.weight"]
            if name in ("attn_q", "attn_k"):
                weight = rotary_rows(weight, shape.heads)
            writer.add_tensor(f"blk.{index}.{name}.weight", np.ascontiguousarray(weight))
    writer.add_tensor("output_norm.weight", state["model.norm.weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.rename(out)


# --- greedy agreement ------------------------------------------------------------------------------------------


def torch_greedy(model: Any, ids: list[int], new_tokens: int) -> list[int]:
    prompt = torch.tensor([ids])
    with torch.no_grad():
        out = model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            use_cache=True,
            pad_token_id=0,
        )
    return out[0, len(ids) :].tolist()


def agreement(reference: list[int], tokens: list[int]) -> dict[str, Any]:
    """How many leading tokens match, and how many match overall."""
    prefix = next((i for i, (a, b) in enumerate(zip(reference, tokens)) if a != b), min(len(reference), len(tokens)))
    same = sum(a == b for a, b in zip(reference, tokens))
    return {"tokens": tokens, "matching_prefix": prefix, "matching": same, "of": len(reference)}


# --- engines ---------------------------------------------------------------------------------------------------


def lowbit_engines(
    model: Any, prompt: list[int], new_tokens: int, context: int, threads: list[int], work: Path
) -> tuple[list[Engine], list[int]]:
    """The w1.58a8 artifact's engines (one per thread count) and its greedy tokens."""
    import lowbit

    log.info("lowbit: compiling with %s", RECIPE)
    compiled = lowbit.compile(
        model, (torch.tensor([prompt]),), recipe=RECIPE, dynamic_shapes={"input_ids": {1: (1, context)}}
    )
    tokens = compiled.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, eos_token_id=[])
    tokens = tokens[0, len(prompt) :].tolist()
    artifact = work / RECIPE
    compiled.export(artifact)
    size = sum(path.stat().st_size for path in artifact.rglob("*") if path.is_file())
    command = [sys.executable, str(LLM_CPU), "--worker", "lowbit"]
    engines = [
        Engine(
            "lowbit (TVM)",
            RECIPE,
            count,
            command,
            size,
            env={"TVM_NUM_THREADS": str(count)},
            setup={"artifact": str(artifact)},
            kv_element_bytes=4,  # float32 cache
        )
        for count in threads
    ]
    return engines, tokens


def llama_engines(
    f32: Path, prompt: list[int], new_tokens: int, types: list[str], threads: list[int]
) -> tuple[list[Engine], dict[str, Any]]:
    """One engine per ternary type and thread count; the files, their tensor types and greedy tokens."""
    engines, files = [], {}
    for name in types:
        path = f32.with_name(f32.name.replace(".F32.", f".{name}."))
        log.info("llama.cpp: quantizing to %s", name)
        llama("quantize", str(f32), str(path), name)
        tokens = json.loads(llama("greedy", str(path), str(new_tokens), *map(str, prompt)))
        files[name] = {"file_bytes": path.stat().st_size, "tensor_types": tensor_types(path), "greedy": tokens}
        command = [str(LLAMA_PYTHON), str(LLAMA_SCRIPT), "worker", str(path)]
        size = path.stat().st_size
        engines += [Engine("llama.cpp", name, count, command, size, kv_element_bytes=2) for count in threads]
    return engines, files


# --- results ---------------------------------------------------------------------------------------------------


def ratios(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per thread count: lowbit's median decode tok/s over the best llama.cpp type's."""
    out = {}
    for threads in sorted({row["threads"] for row in rows}):
        mine = [r for r in rows if r["threads"] == threads and r["engine"] == "lowbit (TVM)"]
        peers = [r for r in rows if r["threads"] == threads and r["engine"] == "llama.cpp"]
        if mine and peers:
            best = max(peers, key=lambda r: r["decode_tokens_per_s"]["median"])
            ratio = mine[0]["decode_tokens_per_s"]["median"] / best["decode_tokens_per_s"]["median"]
            out[str(threads)] = {"best_llama_cpp": best["format"], "lowbit_over_best": ratio}
    return out


def markdown(report: dict[str, Any]) -> str:
    args, shape, conditions = report["args"], report["shape"], report["conditions"]
    version, checks = report["llama_cpp"]["version"], report["greedy"]
    lines = [
        "# Ternary (BitNet b1.58) Llama decode on the CPU: lowbit w1.58a8 and llama.cpp TQ1_0 / TQ2_0",
        "",
        f"Model: Llama, {shape['layers']} layers, hidden {shape['hidden']}, intermediate {shape['intermediate']}, "
        f"{shape['heads']} heads (no grouping), vocabulary {shape['vocab']}, tied embedding; "
        f"{report['parameters'] / 1e6:.0f}M parameters. **Weights are random**: every block linear is a random "
        "ternary matrix (T uniform in {−1, 0, 1}) times one scale per tensor, the same codes and scales in both "
        f"engines; the embedding is random normal (std {EMBEDDING_STD}); norm weights 1. Speeds only: the text is "
        "meaningless.",
        f"CPU: {conditions['cpu']}, {conditions['cpus']} hardware threads. Load average (1, 5, 15 min) "
        f"{fmt_load(conditions['load_average_start'])} at the start of the rounds, "
        f"{fmt_load(conditions['load_average_end'])} at their end.",
        f"{args['repeats']} rounds; each round measures every row once, one at a time, each row in its own process "
        "(benchmarks/llm_cpu.py's workers). Cells: median (min–max) over the rounds.",
        f"Decode: greedy new tokens 2..{args['new_tokens']} after a {args['prompt']}-token prompt of random ids. "
        "Prefill: that prompt to its first token.",
        f"lowbit: recipe {RECIPE} (ternary absmean per tensor, int8 per-token activations, 8-bit embedding), "
        "`CompiledCausalLM.generate` on the exported artifact.",
        f"llama.cpp: llama-cpp-python {version['llama_cpp_python']} (ggml {version['ggml']}, commit "
        f"{version['ggml_commit']}), {version['system_info']}; its quantizer from an F32 GGUF of the ternarized "
        "weights (the embedding's type is its default choice, see below).",
        f"Decode ÷ read bound as in llm_cpu ({fmt_read(conditions)}). Perplexity: of the transformers fp32 greedy "
        "continuation (prompt + new tokens), every position scored — an agreement measure with that reference "
        f"(its own: {report['reference_perplexity']:.4g}), not a quality one.",
        "",
        "| engine | format | threads | prefill tok/s | decode tok/s | decode ÷ read bound | model MiB | peak RSS MiB "
        "| perplexity |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        prefill = cell(row["prefill_tokens_per_s"][str(args["prompt"])])
        bound = f"{row['decode_vs_read_bound']:.2f}×" if row.get("decode_vs_read_bound") else "–"
        ppl = f"{row['perplexity']:.4g}" if row["perplexity"] is not None else "–"
        lines.append(
            f"| {row['engine']} | {row['format']} | {row['threads']} | {prefill} | {cell(row['decode_tokens_per_s'])}"
            f" | {bound} | {row['model_bytes'] / 2**20:.1f} | {row['peak_rss_bytes'] / 2**20:.0f} | {ppl} |"
        )
    lines += ["", "| threads | best llama.cpp type | lowbit ÷ best llama.cpp (median decode) |", "|---|---|---|"]
    for threads, entry in report["ratios"].items():
        lines.append(f"| {threads} | {entry['best_llama_cpp']} | {entry['lowbit_over_best']:.2f}× |")
    lines += ["", "## Files and greedy agreement", "", "| type | tensors by type |", "|---|---|"]
    for name, entry in report["llama_cpp"]["files"].items():
        kinds = ", ".join(f"{kind} ×{count}" for kind, count in sorted(entry["tensor_types"].items()))
        lines.append(f"| {name} | {kinds} |")
    lines += [
        "",
        f"Greedy tokens against transformers fp32 (weights Ŵ), {args['new_tokens']} new tokens after the prompt: "
        "matching leading tokens, matching tokens overall. llama.cpp F32 checks the GGUF conversion (rotary row "
        "order included); the others differ from it by their int8 activations (and embedding types).",
        "",
        "| engine | leading | overall |",
        "|---|---|---|",
    ]
    for name, entry in checks.items():
        lines.append(f"| {name} | {entry['matching_prefix']} / {entry['of']} | {entry['matching']} / {entry['of']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=1024, help="a multiple of 256")
    parser.add_argument("--intermediate", type=int, help="a multiple of 256 (default: 8/3 of --hidden, rounded up)")
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--repeats", type=int, default=5, help="rounds (each measures every row once)")
    parser.add_argument("--prompt", type=int, default=128, help="prompt tokens before decode")
    parser.add_argument("--new-tokens", type=int, default=128, help="greedy tokens generated for decode")
    parser.add_argument("--llama-types", nargs="+", default=["TQ1_0", "TQ2_0"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS / "ternary_cpu", help="writes OUT.json and OUT.md")
    args = parser.parse_args()
    intermediate = args.intermediate or -(-args.hidden * 8 // 3 // BLOCK) * BLOCK
    if args.hidden % BLOCK or intermediate % BLOCK:
        raise SystemExit(f"--hidden and --intermediate must be multiples of {BLOCK} (llama.cpp's ternary blocks)")
    if not LLAMA_PYTHON.exists():
        raise SystemExit(f"{LLAMA_PYTHON} is missing: run bash benchmarks/peers/setup_llama_cpp.sh")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    shape = Shape(args.layers, args.hidden, intermediate, args.heads, args.vocab, args.prompt + args.new_tokens)
    torch.manual_seed(args.seed)
    model = transformers.LlamaForCausalLM(shape.config()).eval()
    weights = TernaryWeights.random(model, args.seed)
    prompt = torch.randint(3, shape.vocab, (args.prompt,), generator=torch.Generator().manual_seed(args.seed + 1))
    prompt = prompt.tolist()

    weights.load(model, ternarized=True)
    log.info("transformers: greedy reference")
    reference = torch_greedy(model, prompt, args.new_tokens)
    window = prompt + reference
    reference_perplexity = perplexity(model, torch.tensor([window]))
    inputs = Inputs({len(prompt): prompt}, prompt, args.new_tokens, [window])
    version = json.loads(llama("version"))
    report: dict[str, Any] = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "shape": shape.as_dict(),
        "parameters": sum(p.numel() for p in model.parameters()),
        "reference_tokens": reference,
        "reference_perplexity": reference_perplexity,
    }
    LLAMA_WORK.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=LLAMA_WORK) as work:
        f32 = Path(work) / "ternary.F32.gguf"
        log.info("llama.cpp: writing %s", f32)
        write_gguf(model, shape, f32)
        f32_tokens = json.loads(llama("greedy", str(f32), str(args.new_tokens), *map(str, prompt)))
        checks = {"llama.cpp F32": agreement(reference, f32_tokens)}
        weights.load(model, ternarized=False)
        engines, lowbit_tokens = lowbit_engines(model, prompt, args.new_tokens, shape.context, args.threads, Path(work))
        checks[f"lowbit {RECIPE}"] = agreement(reference, lowbit_tokens)
        del model
        llama_rows, files = llama_engines(f32, prompt, args.new_tokens, args.llama_types, args.threads)
        f32.unlink()
        for name, entry in files.items():
            checks[f"llama.cpp {name}"] = agreement(reference, entry.pop("greedy"))
        report["greedy"] = checks
        report["llama_cpp"] = {"version": version, "files": files}
        for name, entry in checks.items():
            log.info(
                "greedy tokens, %s: the first %d of %d as transformers'", name, entry["matching_prefix"], entry["of"]
            )
        rows, conditions = measure(engines + llama_rows, inputs, args.repeats, CacheShape.of(shape.config()))
    report["conditions"] = {"cpu": cpu_model(), "cpus": os.cpu_count(), **conditions}
    report["rows"] = rows
    report["ratios"] = ratios(rows)
    write_report(report, args.out, markdown(report))


if __name__ == "__main__":
    main()

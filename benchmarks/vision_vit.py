"""ViT inference on this CPU: torch eager against lowbit on x86, fp32 (no passes) and w8a8 (recipe ``w8a8-x86``).

    python benchmarks/vision_vit.py [--threads 1 2] [--repeats 5] [--calls 5]

Models, random weights, one 224×224 image (197 tokens):

* ``hf_vit``: transformers ``ViTModel``, hidden 384, 4 layers, 6 heads, MLP 1536, patch 16 (traced by
  torch.export);
* ``timm_vit_small``: timm ``vit_small_patch16_224`` (12 layers; traced by torch.fx with its optional
  ``attn_mask=None`` bound and its ``torch._assert`` checks).

Each thread count runs in its own process (TVM sizes its thread pool once per process: ``TVM_NUM_THREADS``;
torch gets ``torch.set_num_threads``). There every model is compiled both ways, checked against eager (relative
error of the output), then timed in ``--repeats`` rounds, each round taking the median of ``--calls`` calls of
every engine in turn; min/median/max are over rounds. The load average is recorded at start and end: on a
shared machine the times move with it, the ratios measured in the same rounds less so. Writes
``benchmarks/results/vision_vit.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).parent / "results"
ENGINES = ("eager", "lowbit_fp32", "lowbit_w8a8")


def hf_vit() -> torch.nn.Module:
    from transformers import ViTConfig, ViTModel

    config = ViTConfig(
        hidden_size=384,
        num_hidden_layers=4,
        num_attention_heads=6,
        intermediate_size=1536,
        image_size=224,
        patch_size=16,
    )
    return ViTModel(config, add_pooling_layer=False)


def timm_vit_small() -> torch.nn.Module:
    import timm

    return timm.create_model("vit_small_patch16_224", pretrained=False)


MODELS: dict[str, Callable[[], torch.nn.Module]] = {"hf_vit": hf_vit, "timm_vit_small": timm_vit_small}


def tensor_of(output: Any) -> torch.Tensor:
    """The model's main output: a tensor, or a ModelOutput's first field (``last_hidden_state``)."""
    return output if isinstance(output, torch.Tensor) else output[0]


def spread(values: list[float]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def median_ms(call: Callable[[], Any], calls: int) -> float:
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def run_model(name: str, repeats: int, calls: int) -> dict[str, Any]:
    """Compile ``name`` both ways, check it against eager and time the three engines (this process's threads)."""
    import lowbit

    torch.manual_seed(0)
    model, image = MODELS[name]().eval(), torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        eager = tensor_of(model(image))
    engines: dict[str, Callable[[], Any]] = {"eager": lambda: model(image)}
    row: dict[str, Any] = {"compile_s": {}, "rel_error": {}, "tracer": None}
    for engine, options in (("lowbit_fp32", {"passes": []}), ("lowbit_w8a8", {"recipe": "w8a8-x86"})):
        start = time.perf_counter()
        compiled = lowbit.compile(model, (image,), target="x86", **options)
        row["compile_s"][engine] = round(time.perf_counter() - start, 1)
        row["tracer"] = compiled.report.tracer
        got = tensor_of(compiled(image))
        row["rel_error"][engine] = float((got - eager).norm() / eager.norm())
        engines[engine] = lambda compiled=compiled: compiled(image)
    rounds: dict[str, list[float]] = {engine: [] for engine in ENGINES}
    with torch.no_grad():
        for call in engines.values():
            call()  # warm-up
        for _ in range(repeats):
            for engine, call in engines.items():
                rounds[engine].append(median_ms(call, calls))
    row["ms"] = {engine: spread(times) for engine, times in rounds.items()}
    row["ratio_to_eager"] = {
        engine: spread([t / e for t, e in zip(rounds[engine], rounds["eager"])]) for engine in ENGINES[1:]
    }
    return row


def child(threads: int, repeats: int, calls: int, out: Path) -> None:
    torch.set_num_threads(threads)
    out.write_text(json.dumps({name: run_model(name, repeats, calls) for name in MODELS}))


def run_threads(threads: int, args: argparse.Namespace) -> dict[str, Any]:
    """`child` in a fresh process with ``threads`` threads for TVM and torch."""
    out = args.out.with_suffix(f".{threads}.tmp.json")
    env = {**os.environ, "TVM_NUM_THREADS": str(threads), "OMP_NUM_THREADS": str(threads)}
    command = [sys.executable, __file__, "--child", str(threads), "--repeats", str(args.repeats)]
    subprocess.run([*command, "--calls", str(args.calls), "--out", str(out)], env=env, check=True)
    result = json.loads(out.read_text())
    out.unlink()
    return result


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def table(results: dict[str, dict[str, Any]]) -> str:
    lines = [
        f"{'model':16} {'threads':>7} {'eager ms':>9} {'fp32 ms':>9} {'w8a8 ms':>9} {'fp32/eager':>10} "
        f"{'w8a8/eager':>10} {'fp32 err':>9} {'w8a8 err':>9}"
    ]
    for threads, models in results.items():
        for name, row in models.items():
            ms, ratio, error = row["ms"], row["ratio_to_eager"], row["rel_error"]
            lines.append(
                f"{name:16} {threads:>7} {ms['eager']['median']:9.1f} {ms['lowbit_fp32']['median']:9.1f} "
                f"{ms['lowbit_w8a8']['median']:9.1f} {ratio['lowbit_fp32']['median']:10.2f} "
                f"{ratio['lowbit_w8a8']['median']:10.2f} {error['lowbit_fp32']:9.1e} {error['lowbit_w8a8']:9.1e}"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=5, help="timing rounds (min/median/max are over them)")
    parser.add_argument("--calls", type=int, default=5, help="calls per engine and round (their median)")
    parser.add_argument("--out", type=Path, default=RESULTS / "vision_vit.json")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        child(args.child, args.repeats, args.calls, args.out)
        return
    load_start = os.getloadavg()
    results = {str(threads): run_threads(threads, args) for threads in args.threads}
    report = {
        "cpu": cpu_model(),
        "torch": torch.__version__,
        "repeats": args.repeats,
        "calls": args.calls,
        "load_average_start": list(load_start),
        "load_average_end": list(os.getloadavg()),
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(table(results))
    print(f"load average (1/5/15 min): start {load_start}, end {os.getloadavg()}; written to {args.out}")


if __name__ == "__main__":
    main()

"""Speed of pruned models against the dense model, and the sparsity report of a global pruning.

* ``structured``: ``prune_channels`` removes 50% of the hidden units of every MLP block
  (the layers really shrink), on a wide MLP and on DeiT-tiny (random weights; speed only).
* ``nm``: 2:4 masks on the wide MLP. PyTorch's CPU build has no semi-structured (N:M)
  kernel (``to_sparse_semi_structured`` needs CUDA), so the table shows what a CPU user
  gets: the masked training form (an extra multiply per layer), the baked deployment
  form (the same dense matmul as the dense model) and, for reference, the 50%-sparse
  weights as a CSR matrix (``torch.sparse.mm``), which unstructured CPU kernels need far
  higher sparsity to profit from.
* ``report``: LAMP at 80% on DeiT-tiny; the per-layer target vs achieved table, and
  a plot written to ``benchmarks/results/pruning_sparsity.png``.

Latencies are medians of ``--repeats`` timed runs after warm-up, the dense and the pruned
model run alternately in one run; ratios are dense / pruned (above 1 means faster).
Run: ``python benchmarks/pruning.py``.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

import lowbit
from lowbit import zoo
from lowbit.passes.pipeline import Pipeline
from lowbit.passes.prune import (
    ApplyMasks,
    PruneChannels,
    PruneLAMP,
    PruneNM,
    plot_sparsity,
    sparsity_rows,
    sparsity_table,
)

log = logging.getLogger("benchmarks.pruning")

RESULTS = Path(__file__).parent / "results" / "pruning.json"
PLOT = Path(__file__).parent / "results" / "pruning_sparsity.png"


def paired_ms(dense: Callable[[], Any], pruned: Callable[[], Any], repeats: int) -> tuple[float, float]:
    """Median wall times (ms) of ``dense()`` and ``pruned()``, run alternately after warm-up.

    Alternating the two keeps load changes on a shared machine from favouring either side.
    """
    times: dict[int, list[float]] = {0: [], 1: []}
    with torch.no_grad():
        for fn in (dense, pruned, dense, pruned):
            fn()
        for _ in range(repeats):
            for side, fn in enumerate((dense, pruned)):
                start = time.perf_counter()
                fn()
                times[side].append((time.perf_counter() - start) * 1e3)
    return statistics.median(times[0]), statistics.median(times[1])


def wide_mlp() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Linear(1024, 4096),
        nn.GELU(),
        nn.Linear(4096, 1024),
        nn.ReLU(),
        nn.Linear(1024, 4096),
        nn.GELU(),
        nn.Linear(4096, 1024),
    )
    return net.eval(), torch.randn(64, 1024)


def params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def structured(repeats: int) -> list[dict[str, Any]]:
    rows = []
    deit = zoo.build("deit_tiny")
    cases = [
        ("wide MLP (64x1024)", *wide_mlp(), ()),
        ("deit_tiny (1x3x224x224)", deit.model, deit.example_inputs[0], ("re:.*attn.*", "head", "patch_embed.proj")),
    ]
    for name, model, x, ignore in cases:
        log.info("structured: %s", name)
        gm = lowbit.trace(model, (x,))
        pipe = Pipeline([PruneChannels(sparsity=0.5, ignore=list(ignore))])
        pruned = pipe(gm)
        dense_ms, pruned_ms = paired_ms(functools.partial(gm, x), functools.partial(pruned, x), repeats)
        shrunk = [r.layer for r in pipe.report.passes[0].layers if r.action == "pruned"]
        rows.append(
            {
                "model": name,
                "variant": "prune_channels 50%",
                "layers_shrunk": len(shrunk),
                "params_dense": params(gm),
                "params_pruned": params(pruned),
                "dense_ms": dense_ms,
                "pruned_ms": pruned_ms,
                "speedup": dense_ms / pruned_ms,
            }
        )
    return rows


def nm(repeats: int) -> tuple[list[dict[str, Any]], str]:
    model, x = wide_mlp()
    gm = lowbit.trace(model, (x,))
    masked = Pipeline([PruneNM(n=2, m=4)])(gm)
    baked = Pipeline([ApplyMasks()])(masked)
    variants = {"2:4 masked (training form)": masked, "2:4 baked (deployment form, dense kernel)": baked}
    rows = []
    for variant, g in variants.items():
        dense_ms, pruned_ms = paired_ms(lambda: gm(x), lambda g=g: g(x), repeats)
        rows.append(
            {
                "model": "wide MLP (64x1024)",
                "variant": variant,
                "dense_ms": dense_ms,
                "pruned_ms": pruned_ms,
                "speedup": dense_ms / pruned_ms,
            }
        )
    layers = [baked.get_submodule(p) for p in ("0", "2", "4", "6")]
    csr = [(l.weight.detach().to_sparse_csr(), l.bias.detach()) for l in layers]

    def run_csr() -> torch.Tensor:
        h = x
        for i, (w, b) in enumerate(csr):
            h = torch.sparse.mm(w, h.t()).t() + b
            h = torch.nn.functional.gelu(h) if i % 2 == 0 else torch.relu(h)
        return h

    dense_ms, pruned_ms = paired_ms(lambda: gm(x), run_csr, repeats)
    rows.append(
        {
            "model": "wide MLP (64x1024)",
            "variant": "2:4 weights as CSR (torch.sparse.mm)",
            "dense_ms": dense_ms,
            "pruned_ms": pruned_ms,
            "speedup": dense_ms / pruned_ms,
        }
    )
    try:
        from torch.sparse import to_sparse_semi_structured

        to_sparse_semi_structured(layers[0].weight.detach().half())
        kernel = "available"
    except Exception as exc:  # the CPU build refuses; record its reason verbatim
        kernel = f"unavailable on this build: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
    return rows, kernel


def report() -> tuple[str, list[dict[str, Any]]]:
    deit = zoo.build("deit_tiny")
    gm = Pipeline([PruneLAMP(sparsity=0.8)])(lowbit.trace(deit.model, deit.example_inputs))
    plot_sparsity(gm, PLOT)
    return sparsity_table(gm), [r.__dict__ for r in sparsity_rows(gm)]


def table(rows: list[dict[str, Any]]) -> str:
    header = ("model", "variant", "dense ms", "pruned ms", "speedup", "params")
    lines = [header]
    for r in rows:
        size = f"{r['params_dense'] / 1e6:.2f}M -> {r['params_pruned'] / 1e6:.2f}M" if "params_dense" in r else "same"
        lines.append(
            (r["model"], r["variant"], f"{r['dense_ms']:.2f}", f"{r['pruned_ms']:.2f}", f"{r['speedup']:.2f}x", size)
        )
    widths = [max(len(l[i]) for l in lines) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(l, widths)).rstrip() for l in lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    rows = structured(args.repeats)
    log.info("N:M")
    nm_rows, kernel = nm(args.repeats)
    rows += nm_rows
    log.info("sparsity report (LAMP 80%s on deit_tiny)", "%")
    sparsity, layers = report()
    print(table(rows))
    print(f"\nload average (1, 5, 15 min): {', '.join(f'{v:.1f}' for v in os.getloadavg())} on {os.cpu_count()} CPUs")
    print(f"\nsemi-structured (2:4) kernel: {kernel}")
    print(f"\nLAMP 80% on deit_tiny, target vs achieved (plot: {PLOT}):\n{sparsity}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "machine": {
                    "platform": platform.platform(),
                    "torch": torch.__version__,
                    "threads": torch.get_num_threads(),
                    "load_average_1_5_15": os.getloadavg(),
                },
                "repeats": args.repeats,
                "speed": rows,
                "semi_structured_kernel": kernel,
                "lamp_80_deit_tiny": layers,
            },
            indent=2,
        )
    )
    log.info("wrote %s", RESULTS)


if __name__ == "__main__":
    main()

"""What pruning did to a graph: per-layer target vs achieved sparsity as a table, a plot, and weights.

Reads the ``Sparsity`` annotations (active masks and baked ones alike) and the weights
the graph actually computes with (`lowbit.dequantized_weights`), so it works after any
pruning pass, after `apply_masks`, and after quantization.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch.fx as fx

from lowbit.inspection import dequantized_weights
from lowbit.ir.annotations import annotated_nodes

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LayerSparsity:
    """One pruned layer: what was asked, what the recorded mask says, and the zeros actually computed with."""

    layer: str
    method: str
    pattern: str
    params: int
    target: float | None
    achieved: float
    zeros: float


def sparsity_rows(gm: fx.GraphModule) -> list[LayerSparsity]:
    """One row per pruned layer, in graph order."""
    weights = dequantized_weights(gm)
    rows, seen = [], set()
    for _, meta in annotated_nodes(gm.graph):
        if meta.sparsity is None or meta.layer in seen:
            continue
        seen.add(meta.layer)
        weight = weights[meta.layer]
        s = meta.sparsity
        rows.append(
            LayerSparsity(
                meta.layer,
                s.method,
                s.pattern,
                weight.numel(),
                s.target,
                s.sparsity,
                float((weight == 0).sum()) / weight.numel(),
            )
        )
    return rows


def overall(rows: list[LayerSparsity]) -> LayerSparsity:
    """The size-weighted totals of ``rows`` as one row named "overall"."""
    total = sum(r.params for r in rows) or 1
    targets = [r for r in rows if r.target is not None]
    target = sum(r.target * r.params for r in targets) / total if len(targets) == len(rows) else None
    return LayerSparsity(
        "overall",
        ",".join(sorted({r.method for r in rows})),
        "",
        total,
        target,
        sum(r.achieved * r.params for r in rows) / total,
        sum(r.zeros * r.params for r in rows) / total,
    )


def sparsity_table(gm: fx.GraphModule) -> str:
    """A text table of target vs achieved sparsity per layer and overall."""
    rows = sparsity_rows(gm)
    if not rows:
        return "no pruned layers"
    header = ("layer", "method", "pattern", "params", "target", "achieved", "zeros")
    lines = [header]
    for r in [*rows, overall(rows)]:
        lines.append(
            (
                r.layer,
                r.method,
                r.pattern,
                str(r.params),
                "-" if r.target is None else f"{r.target:.2%}",
                f"{r.achieved:.2%}",
                f"{r.zeros:.2%}",
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines)


def plot_sparsity(gm: fx.GraphModule, path: str | Path) -> Path:
    """Save a bar chart of target vs achieved sparsity per layer (PNG); needs matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sparsity_rows(gm)
    rows = [*rows, overall(rows)]
    positions = range(len(rows))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.35 * len(rows)), 4.0))
    ax.bar([p - 0.2 for p in positions], [r.target or 0.0 for r in rows], width=0.4, label="target")
    ax.bar([p + 0.2 for p in positions], [r.achieved for r in rows], width=0.4, label="achieved")
    ax.set_xticks(list(positions), [r.layer for r in rows], rotation=90, fontsize=7)
    ax.set_ylim(0, 1)
    ax.set_ylabel("sparsity")
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    log.info("sparsity plot written to %s", path)
    return path


__all__ = ["LayerSparsity", "overall", "plot_sparsity", "sparsity_rows", "sparsity_table"]

"""Trainable parameters and training-step time of each adapter against full fine-tuning.

The model is the real all-MiniLM-L6-v2 (``zoo.load_minilm``), traced by lowbit; the task is
a frozen-prototype sentiment classifier (cross-entropy on the cosine similarity between a
sentence's embedding and each label description's embedding). Variants:

* ``full``: every parameter of the traced graph trains (the reference).
* ``lora``, ``lora_pissa``, ``sorsa``, ``bone``, ``bat``: the adapter passes on the
  attention ``query`` and ``value`` layers (rank 8), everything else frozen.
* ``qlora``: ``rtn`` 4-bit (group 32) on every linear layer, then LoRA on the packed base.

For each variant the table gives trainable parameters (and the share of the model), the
median AdamW step time (forward, backward, optimizer) over ``--steps`` steps after one
warm-up step, its ratio to full fine-tuning measured in the same run, the loss before and
after, and the merge: time, and the relative embedding change it causes (0 up to float
rounding, except ``qlora``, whose merge re-quantizes the packed base).
Run: ``python benchmarks/adapters.py`` (``--steps 3`` for a short run).
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.fx as fx

import lowbit
from lowbit import zoo
from lowbit.passes import Pipeline, get
from lowbit.passes.adapters import SORSA, Bone, LoRA

log = logging.getLogger("benchmarks.adapters")

RESULTS = Path(__file__).parent / "results" / "adapters.json"
TARGETS = ("query", "value")
RANK = 8
LABELS = ("This sentence expresses a positive feeling.", "This sentence expresses a negative feeling.")
SENTENCES = (
    ("What a lovely sunny morning.", 0),
    ("The fresh bread smells wonderful.", 0),
    ("I really enjoyed that soup.", 0),
    ("The spring breeze feels delightful.", 0),
    ("This cake is absolutely perfect.", 0),
    ("We had a great picnic in the sun.", 0),
    ("The storm ruined our whole weekend.", 1),
    ("This pasta tastes awful.", 1),
    ("The freezing rain is miserable.", 1),
    ("The soup was cold and bland.", 1),
    ("I hate this gloomy weather.", 1),
    ("The burnt toast was disgusting.", 1),
)


@dataclass(frozen=True)
class Variant:
    name: str
    passes: Callable[[], list]
    lr: float


VARIANTS = (
    Variant("full", lambda: [], 2e-5),
    Variant("lora", lambda: [LoRA(rank=RANK, alpha=2 * RANK, targets=TARGETS)], 5e-3),
    Variant("lora_pissa", lambda: [LoRA(rank=RANK, alpha=RANK, init="pissa", targets=TARGETS)], 2e-3),
    Variant("sorsa", lambda: [SORSA(rank=RANK, targets=TARGETS)], 2e-3),
    Variant("bone", lambda: [Bone(rank=RANK, targets=TARGETS)], 2e-3),
    Variant("bat", lambda: [Bone(rank=RANK, variant="bat", targets=TARGETS)], 2e-3),
    Variant(
        "qlora",
        lambda: [get("rtn", bits=4, group_size=32), LoRA(rank=RANK, alpha=2 * RANK, init="gaussian", targets=TARGETS)],
        5e-3,
    ),
)


@dataclass
class Result:
    variant: str
    trainable: int
    total: int
    step_ms: float
    step_ratio: float
    loss_first: float
    loss_last: float
    merge_s: float
    merge_rel_change: float
    max_requant_rel_error: float | None


def embed(gm: fx.GraphModule, batch: dict) -> torch.Tensor:
    return zoo.minilm_embed(gm(**batch), batch["attention_mask"])


def run_variant(
    variant: Variant, base: fx.GraphModule, batch: dict, prototypes: torch.Tensor, labels: torch.Tensor, steps: int
) -> Result:
    pipeline = Pipeline(variant.passes())
    gm = pipeline(base)
    if variant.name == "full":
        for p in gm.parameters():
            p.requires_grad_(True)
    params = [p for p in gm.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=variant.lr, weight_decay=0.0)
    times, losses = [], []
    for step in range(steps + 1):
        start = time.perf_counter()
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(20.0 * embed(gm, batch) @ prototypes.T, labels)
        loss.backward()
        optimizer.step()
        if step:  # the first step warms up allocators and autograd
            times.append(time.perf_counter() - start)
        losses.append(loss.item())
        log.info("%s: step %d/%d loss %.4f", variant.name, step, steps, loss.item())
    merge_s, change, requant = 0.0, 0.0, None
    if variant.name != "full":
        merge = Pipeline([get("merge_adapters")])
        start = time.perf_counter()
        merged = merge(gm)
        merge_s = time.perf_counter() - start
        with torch.no_grad():
            before, after = embed(gm, batch), embed(merged, batch)
        change = float((after - before).norm() / before.norm())
        requant = merge.report.passes[0].stats.get("max_requant_rel_error")
    return Result(
        variant.name,
        sum(p.numel() for p in params),
        sum(p.numel() for p in gm.parameters()),
        1e3 * statistics.median(times),
        0.0,
        losses[0],
        losses[-1],
        merge_s,
        change,
        requant,
    )


def table(results: list[Result]) -> str:
    rows = [
        (
            "variant",
            "trainable",
            "share",
            "step ms",
            "vs full",
            "loss first",
            "loss last",
            "merge s",
            "merge change",
            "requant err",
        )
    ]
    for r in results:
        rows.append(
            (
                r.variant,
                f"{r.trainable:,}",
                f"{r.trainable / r.total:.3%}",
                f"{r.step_ms:.1f}",
                f"{r.step_ratio:.2f}x",
                f"{r.loss_first:.4f}",
                f"{r.loss_last:.4f}",
                f"{r.merge_s:.2f}",
                f"{r.merge_rel_change:.2e}",
                "-" if r.max_requant_rel_error is None else f"{r.max_requant_rel_error:.3f}",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="timed training steps per variant")
    parser.add_argument("--variants", nargs="*", default=[v.name for v in VARIANTS])
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.manual_seed(0)
    minilm = zoo.load_minilm()
    batch = minilm.tokenize([s for s, _ in SENTENCES])
    labels = torch.tensor([label for _, label in SENTENCES])
    label_batch = minilm.tokenize(list(LABELS))
    with torch.no_grad():
        prototypes = minilm.embed(minilm.model(**label_batch), label_batch["attention_mask"])
    base = lowbit.trace(minilm.model, (), example_kwargs=batch)
    results = [run_variant(v, base, batch, prototypes, labels, args.steps) for v in VARIANTS if v.name in args.variants]
    full = next((r.step_ms for r in results if r.variant == "full"), None)
    for r in results:
        r.step_ratio = r.step_ms / full if full else float("nan")
    print(table(results))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "model": "all-MiniLM-L6-v2",
                "batch": list(batch["input_ids"].shape),
                "rank": RANK,
                "targets": TARGETS,
                "steps": args.steps,
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
                "machine": platform.machine(),
                "results": [asdict(r) for r in results],
            },
            indent=2,
        )
    )
    log.info("wrote %s", RESULTS)


if __name__ == "__main__":
    main()

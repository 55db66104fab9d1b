"""Train a tiny ViT on scikit-learn's digits (8×8) with each reparameterization and report accuracy.

Variants, each traced with lowbit and trained with a plain AdamW loop on the GraphModule:

* ``fp32``: the model as is (the reference).
* ``weight_norm``: ``weight_norm`` (function-preserving init), folded by ``fold_reparam``.
* ``compander``: ``weight_compander`` (learnable a, b per layer), paper weight-decay
  placement (`compander_param_groups`) and Adam step rescaling (`CompanderStepRescaling`).
* ``w2_qkr_statsq_cga``: OFQ's recipe at 2 bits: start from the trained fp32 model, ``qkr``
  + ``statsq`` (2-bit weights in every block linear and the QKR product; patch embedding and
  head stay fp32), QAT, then a low-learning-rate CGA phase; deployed with ``fold_reparam`` +
  ``convert_statsq`` (packed 2-bit weights, ``lowbit.linear_packed``).
* ``w2_statsq``: the same 2-bit QAT without QKR and CGA, for comparison.

For each variant the table gives the test accuracy of the trained graph and of its
folded/converted deployment, the largest output difference between the two, and the
first/last epoch training loss; the numbers are medians over ``--seeds`` runs.
Run: ``python benchmarks/reparam_digits.py`` (``--quick`` for a short run).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.fx as fx
import torch.nn.functional as F

import lowbit
from lowbit.passes.pipeline import Pipeline
from lowbit.passes.registry import get
from lowbit.passes.reparam import CGA, CompanderStepRescaling, compander_param_groups

log = logging.getLogger("benchmarks.reparam_digits")

RESULTS = Path(__file__).parent / "results" / "reparam_digits.json"
VARIANTS = ("fp32", "weight_norm", "compander", "w2_statsq", "w2_qkr_statsq_cga")
#: Layers OFQ keeps out of the 2-bit quantizer (it uses 8-bit LSQ there); here they stay fp32.
W2_IGNORE = ("patch_embed.*", "head")


@dataclass(frozen=True)
class Schedule:
    """Epochs and learning rates of one run."""

    epochs: int = 20
    qat_epochs: int = 20
    cga_epochs: int = 5
    lr: float = 1e-2
    qat_lr: float = 2e-3
    cga_lr: float = 2e-4
    weight_decay: float = 0.05
    batch_size: int = 32


@dataclass
class RunResult:
    """One variant, one seed."""

    variant: str
    seed: int
    losses: list[float] = field(default_factory=list)
    accuracy: float = 0.0
    deployed_accuracy: float = 0.0
    max_output_diff: float = 0.0
    train_s: float = 0.0
    start_accuracy: float | None = None  # 2-bit variants: the fp32 model their QAT started from


def load_digits(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """scikit-learn's bundled digits as ``[N, 1, 8, 8]`` floats in [0, 1]: a fixed 80/20 train/test split."""
    from sklearn.datasets import load_digits as sklearn_digits

    data = sklearn_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    split = int(0.8 * len(labels))
    train, test = order[:split], order[split:]
    return images[train], labels[train], images[test], labels[test]


def tiny_vit(seed: int) -> torch.nn.Module:
    """A timm ViT for 8×8 digits: four 4×4 patches, width 32, 2 blocks of 4 heads, mean-pooled tokens."""
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(seed)
    return VisionTransformer(
        img_size=8,
        patch_size=4,
        in_chans=1,
        num_classes=10,
        embed_dim=32,
        depth=2,
        num_heads=4,
        mlp_ratio=2.0,
        class_token=False,
        global_pool="avg",
    )


def train(
    gm: fx.GraphModule,
    data: tuple,
    epochs: int,
    lr: float,
    weight_decay: float,
    batch_size: int,
    seed: int,
    param_groups: list | None = None,
    hooks: Callable[[torch.optim.Optimizer], list] | None = None,
) -> list[float]:
    """AdamW on ``gm``; returns the mean training loss of each epoch."""
    x, y = data[0], data[1]
    optimizer = torch.optim.AdamW(
        param_groups if param_groups is not None else gm.parameters(), lr=lr, weight_decay=weight_decay
    )
    attached = hooks(optimizer) if hooks else []
    generator = torch.Generator().manual_seed(seed)
    losses = []
    gm.train()
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=generator)
        total = 0.0
        for start in range(0, len(y), batch_size):
            batch = order[start : start + batch_size]
            loss = F.cross_entropy(gm(x[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * len(batch)
        losses.append(total / len(y))
    for handle in attached:
        handle.remove()
    gm.eval()
    return losses


@torch.no_grad()
def accuracy(model: Callable, x: torch.Tensor, y: torch.Tensor) -> float:
    return (model(x).argmax(-1) == y).float().mean().item()


@torch.no_grad()
def max_diff(a: Callable, b: Callable, x: torch.Tensor) -> float:
    return (a(x) - b(x)).abs().max().item()


def run_variant(variant: str, seed: int, schedule: Schedule, data: tuple | None = None) -> RunResult:
    """Train one variant from scratch (2-bit variants: from a freshly trained fp32 model) and deploy it."""
    data = data or load_digits()
    x_train, y_train, x_test, y_test = data
    example = (x_train[:8],)
    result = RunResult(variant, seed)
    start = time.perf_counter()
    gm = lowbit.trace(tiny_vit(seed), example)
    fit = dict(data=data, lr=schedule.lr, weight_decay=schedule.weight_decay, batch_size=schedule.batch_size, seed=seed)
    if variant == "fp32":
        result.losses = train(gm, epochs=schedule.epochs, **fit)
        deployed = gm
    elif variant == "weight_norm":
        gm = Pipeline(["weight_norm"])(gm)
        result.losses = train(gm, epochs=schedule.epochs, **fit)
        deployed = Pipeline(["fold_reparam"])(gm)
    elif variant == "compander":
        gm = Pipeline([get("weight_compander", learnable=True)])(gm)
        groups = compander_param_groups(gm, schedule.weight_decay)
        result.losses = train(
            gm, epochs=schedule.epochs, param_groups=groups, hooks=lambda opt: [CompanderStepRescaling(gm, opt)], **fit
        )
        deployed = Pipeline(["fold_reparam"])(gm)
    else:
        train(gm, epochs=schedule.epochs, **fit)  # the fp32 "pretrained" start, as OFQ starts from DeiT
        result.start_accuracy = accuracy(gm, x_test, y_test)
        qkr = variant == "w2_qkr_statsq_cga"
        passes = (["qkr"] if qkr else []) + [get("statsq", bits=2, ignore=W2_IGNORE)]
        gm = Pipeline(passes)(gm)
        qat = dict(fit, lr=schedule.qat_lr)
        result.losses = train(gm, epochs=schedule.qat_epochs, **qat)
        if qkr:
            result.losses += train(
                gm, epochs=schedule.cga_epochs, hooks=lambda opt: [CGA(gm).attach(opt)], **dict(qat, lr=schedule.cga_lr)
            )
        deployed = Pipeline((["fold_reparam"] if qkr else []) + ["convert_statsq"])(gm)
    result.train_s = time.perf_counter() - start
    result.accuracy = accuracy(gm, x_test, y_test)
    result.deployed_accuracy = accuracy(deployed, x_test, y_test)
    result.max_output_diff = max_diff(gm, deployed, x_test)
    log.info(
        "%s seed %d: loss %.3f -> %.3f, accuracy %.3f (deployed %.3f), %.1fs",
        variant,
        seed,
        result.losses[0],
        result.losses[-1],
        result.accuracy,
        result.deployed_accuracy,
        result.train_s,
    )
    return result


def summarize(results: list[RunResult]) -> list[dict]:
    """Median over seeds per variant, with the accuracy ratio to fp32.

    A 2-bit variant is compared with the fp32 model its QAT started from (same seed and
    schedule as the ``fp32`` variant); the others with the ``fp32`` variant.
    """
    rows = []
    fp32_runs = [r.accuracy for r in results if r.variant == "fp32"]
    for variant in dict.fromkeys(r.variant for r in results):
        runs = [r for r in results if r.variant == variant]
        acc = statistics.median(r.accuracy for r in runs)
        starts = [r.start_accuracy for r in runs if r.start_accuracy is not None]
        fp32 = statistics.median(starts) if starts else statistics.median(fp32_runs) if fp32_runs else None
        rows.append(
            {
                "variant": variant,
                "seeds": len(runs),
                "accuracy": acc,
                "deployed_accuracy": statistics.median(r.deployed_accuracy for r in runs),
                "fp32_accuracy": fp32,
                "vs_fp32": acc / fp32 if fp32 else None,
                "max_output_diff": max(r.max_output_diff for r in runs),
                "first_loss": statistics.median(r.losses[0] for r in runs),
                "last_loss": statistics.median(r.losses[-1] for r in runs),
                "train_s": statistics.median(r.train_s for r in runs),
            }
        )
    return rows


def table(rows: list[dict]) -> str:
    header = ("variant", "acc", "deployed acc", "fp32 acc", "vs fp32", "max |Δout|", "loss first→last", "train s")
    lines = [header] + [
        (
            r["variant"],
            f"{r['accuracy']:.3f}",
            f"{r['deployed_accuracy']:.3f}",
            "-" if r["fp32_accuracy"] is None else f"{r['fp32_accuracy']:.3f}",
            "-" if r["vs_fp32"] is None else f"{r['vs_fp32']:.3f}",
            f"{r['max_output_diff']:.2g}",
            f"{r['first_loss']:.3f}→{r['last_loss']:.3f}",
            f"{r['train_s']:.1f}",
        )
        for r in rows
    ]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="a few epochs per phase (a smoke run)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (a model this small runs best on one)"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    schedule = Schedule(epochs=5, qat_epochs=5, cga_epochs=2) if args.quick else Schedule()
    data = load_digits()
    results = [run_variant(v, seed, schedule, data) for seed in range(args.seeds) for v in args.variants]
    rows = summarize(results)
    print(table(rows))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "dataset": "sklearn.datasets.load_digits (1797 8x8 images), fixed 80/20 split",
        "model": "timm VisionTransformer img 8, patch 4, width 32, depth 2, 4 heads, avg pool",
        "schedule": asdict(schedule),
        "torch": torch.__version__,
        "threads": args.threads,
        "rows": rows,
        "runs": [asdict(r) for r in results],
    }
    RESULTS.write_text(json.dumps(payload, indent=2))
    log.info("wrote %s", RESULTS)


if __name__ == "__main__":
    main()

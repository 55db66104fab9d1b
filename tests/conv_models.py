"""Small CNNs for the convolution tests: every geometry the packed convolution takes, and ones it does not."""

from __future__ import annotations

import torch
import torch.nn as nn


class TinyCNN(nn.Module):
    """A stem, a grouped, a depthwise, a strided, a dilated and a padded convolution, then a classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.grouped = nn.Conv2d(16, 16, 3, padding=1, groups=4)
        self.depthwise = nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False)
        self.strided = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.dilated = nn.Conv2d(32, 32, 3, padding=2, dilation=2)
        self.padded = nn.Conv2d(32, 32, (1, 3), padding=(0, 1))
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.stem(x)))
        x = torch.relu(self.grouped(x))
        x = torch.relu(self.depthwise(x))
        x = torch.relu(self.strided(x))
        x = torch.relu(self.dilated(x))
        x = self.padded(x)
        return self.fc(x.mean(dim=(2, 3)))


class TinyConv1d(nn.Module):
    """Conv1d layers (plain, strided and grouped) over a sequence, then a linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(4, 16, 5, padding=2)
        self.conv2 = nn.Conv1d(16, 16, 3, stride=2, padding=1, groups=2)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.head(x.mean(dim=2))


class Unsupported(nn.Module):
    """A 3-D and a transposed convolution next to a supported one."""

    def __init__(self) -> None:
        super().__init__()
        self.conv3d = nn.Conv3d(2, 4, 3, padding=1)
        self.up = nn.ConvTranspose2d(4, 4, 2, stride=2)
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv3d(x).mean(dim=2)
        return self.conv(self.up(x))


def images(batches: int = 2, size: int = 12, seed: int = 0) -> list[tuple[torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(2, 3, size, size, generator=generator),) for _ in range(batches)]


def sequences(batches: int = 2, seed: int = 0) -> list[tuple[torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(2, 4, 20, generator=generator),) for _ in range(batches)]


def trained(model: nn.Module, seed: int = 0) -> nn.Module:
    """``model`` in eval mode with non-trivial batch-norm statistics."""
    torch.manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 1.5)
    return model.eval()

"""Residual convnets with GroupNorm, as DP-SGD papers train them (no BatchNorm: its statistics mix
the examples of a batch, which per-example clipping forbids).

- ``ResNet``: He et al.'s CIFAR ResNet-(6n+2) (ResNet-20: n = 3 basic blocks per stage; ResNet-8: n = 1), a 3x3
  stem, stages of basic blocks (conv-GN-ReLU-conv-GN, plus the shortcut, then ReLU), each stage
  after the first halving the map with stride 2; a 1x1 convolution with GroupNorm on the
  shortcut where the shape changes.
- ``WideResNet``: Zagoruyko & Komodakis's WRN-(6n+4)-k with pre-activation blocks
  (GN-ReLU-conv-GN-ReLU-conv), the network of De et al. 2022 (WRN-16-4, GroupNorm with 16 groups)
  without their weight standardisation.

Both end with the mean over the map and a linear head, and run on the batched engine through
their ``torch.fx`` graph (models/graph.py).
"""
from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn


def _groups(channels: int, most: int) -> int:
    return math.gcd(channels, most)


class BasicBlock(nn.Module):
    """conv3x3(stride) - GN - ReLU - conv3x3 - GN, plus the (projected) input, then ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, groups: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.norm1 = nn.GroupNorm(_groups(out_channels, groups), out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.norm2 = nn.GroupNorm(_groups(out_channels, groups), out_channels)
        self.shortcut = None
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                                          nn.GroupNorm(_groups(out_channels, groups), out_channels))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return F.relu(out + (x if self.shortcut is None else self.shortcut(x)))


class ResNet(nn.Module):
    def __init__(self, in_channels: int, widths: tuple[int, ...], blocks: int, n_classes: int, groups: int = 8):
        super().__init__()
        self.stem = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        self.stem_norm = nn.GroupNorm(_groups(widths[0], groups), widths[0])
        layers, channels = [], widths[0]
        for stage, width in enumerate(widths):
            for b in range(blocks):
                layers.append(BasicBlock(channels, width, 2 if stage > 0 and b == 0 else 1, groups))
                channels = width
        self.blocks = nn.Sequential(*layers)
        self.head = nn.Linear(channels, n_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = self.blocks(F.relu(self.stem_norm(self.stem(x))))
        return self.head(out.mean((2, 3)))


class PreActBlock(nn.Module):
    """GN - ReLU - conv3x3(stride) - GN - ReLU - conv3x3, plus the input (a 1x1 convolution of
    the pre-activated input where the shape changes)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(in_channels, groups), in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.norm2 = nn.GroupNorm(_groups(out_channels, groups), out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.shortcut = None
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        pre = F.relu(self.norm1(x))
        out = self.conv2(F.relu(self.norm2(self.conv1(pre))))
        return out + (x if self.shortcut is None else self.shortcut(pre))


class WideResNet(nn.Module):
    def __init__(self, in_channels: int, widths: tuple[int, ...], blocks: int, n_classes: int, stem: int = 16,
                 groups: int = 16):
        super().__init__()
        self.stem = nn.Conv2d(in_channels, stem, 3, padding=1, bias=False)
        layers, channels = [], stem
        for stage, width in enumerate(widths):
            for b in range(blocks):
                layers.append(PreActBlock(channels, width, 2 if stage > 0 and b == 0 else 1, groups))
                channels = width
        self.blocks = nn.Sequential(*layers)
        self.norm = nn.GroupNorm(_groups(channels, groups), channels)
        self.head = nn.Linear(channels, n_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.norm(self.blocks(self.stem(x))))
        return self.head(out.mean((2, 3)))

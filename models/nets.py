"""The architectures: logistic regression, MLP and a small GroupNorm CNN, as ``torch.nn`` modules.

These modules are what the per-model Opacus path trains; the batched engine trains the same
logistic regression and MLP as stacked tensors and converts to and from these modules
(``models.batched.export_params`` / ``import_params``), so the layer order here is part of that
contract: ``Flatten`` followed by ``Linear`` (and ``ReLU``) layers, nothing else.
"""
from __future__ import annotations

import math

from torch import nn

from dpmem.models.spec import ARCHITECTURES, TrainSpec

# The CNN halves the spatial size after a block only while it stays at least this large, so
# 8x8 digits keep a 2x2 map after two blocks and 28x28 / 32x32 images shrink to 7x7 / 8x8.
_MIN_POOLED_SIZE = 2
# The classifier head sees a fixed 2x2 map whatever the input size.
_HEAD_SIZE = 2


def flat_dim(spec: TrainSpec) -> int:
    return math.prod(spec.input_shape)


def layer_widths(spec: TrainSpec) -> list[int]:
    """Input, hidden and output widths of the fully connected stack (logreg / mlp)."""
    if spec.arch == "logreg":
        return [flat_dim(spec), spec.n_classes]
    if spec.arch == "mlp":
        return [flat_dim(spec), *spec.hidden, spec.n_classes]
    raise ValueError(f"layer_widths: {spec.arch!r} is not a fully connected architecture")


def group_count(channels: int) -> int:
    """GroupNorm groups for a conv layer: up to 8, always dividing the channel count."""
    return math.gcd(channels, 8)


def build_model(spec: TrainSpec) -> nn.Module:
    """A freshly initialised (torch default init, global RNG) model for ``spec``."""
    if spec.arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {spec.arch!r}; choose from {', '.join(ARCHITECTURES)}")
    if spec.arch in ("logreg", "mlp"):
        widths = layer_widths(spec)
        layers: list[nn.Module] = [nn.Flatten()]
        for j, (fan_in, fan_out) in enumerate(zip(widths[:-1], widths[1:])):
            if j > 0:
                layers.append(nn.ReLU())
            layers.append(nn.Linear(fan_in, fan_out))
        return nn.Sequential(*layers)
    return _build_cnn(spec)


def _build_cnn(spec: TrainSpec) -> nn.Module:
    if len(spec.input_shape) != 3:
        raise ValueError(f"cnn needs (C, H, W) inputs, got input_shape={spec.input_shape}")
    if not spec.hidden:
        raise ValueError("cnn needs at least one channel width in hidden")
    channels, height, width = spec.input_shape
    layers: list[nn.Module] = []
    for out_channels in spec.hidden:
        layers += [
            nn.Conv2d(channels, out_channels, kernel_size=3, padding=1),
            nn.GroupNorm(group_count(out_channels), out_channels),
            nn.ReLU(),
        ]
        if min(height, width) // 2 >= _MIN_POOLED_SIZE:
            layers.append(nn.MaxPool2d(2))
            height, width = height // 2, width // 2
        channels = out_channels
    layers += [
        nn.AdaptiveAvgPool2d(_HEAD_SIZE),
        nn.Flatten(),
        nn.Linear(channels * _HEAD_SIZE * _HEAD_SIZE, spec.n_classes),
    ]
    return nn.Sequential(*layers)

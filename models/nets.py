"""The architectures: a registry of built-in ones and user factories, as ``torch.nn`` modules.

``build_model(spec)`` is the one way to get a freshly initialised module for a ``TrainSpec``:
``spec.arch`` is a name in ``ARCHITECTURES`` (logistic regression, MLP, a small GroupNorm CNN and its 1-D twin,
ResNet-20 and WRN-16-k with GroupNorm) or a
user factory ``"package.module:factory"`` called as ``factory(input_shape, n_classes)``. Every
module is checked with Opacus's ``ModuleValidator`` (BatchNorm and other layers that mix examples
are refused with Opacus's reason), so no engine ever trains a module DP-SGD cannot handle.

The batched engine trains ``Flatten`` + ``Linear``/``ReLU`` stacks (logreg, mlp) as stacked tensors
and converts to and from these modules (``models.stack.export_params`` / ``import_params``), so
the layer order of those two is part of that contract.

Adding an architecture: one builder ``(spec) -> nn.Module`` here and one entry in ``ARCHITECTURES``.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from functools import cache
from typing import TYPE_CHECKING

from dpmem.models.plugins import is_import_path, load_callable, one_line
from dpmem.models.spec import TrainSpec
from dpmem.privacy.errors import ConfigError

# torch and Opacus are imported inside the functions: the config checks model names against
# ARCHITECTURES, and `dpmem check` / `dpmem report` should not pay for importing them.
if TYPE_CHECKING:
    from torch import nn

# The CNN halves the spatial size after a block only while it stays at least this large, so
# 8x8 digits keep a 2x2 map after two blocks and 28x28 / 32x32 images shrink to 7x7 / 8x8.
_MIN_POOLED_SIZE = 2
# The classifier head sees a fixed 2x2 map whatever the input size.
_HEAD_SIZE = 2


def flat_dim(spec: TrainSpec) -> int:
    return math.prod(spec.input_shape)


def layer_widths(spec: TrainSpec) -> list[int]:
    """Input, hidden and output widths of a fully connected stack (logreg, mlp, or such a factory)."""
    return list(_layer_widths(spec))


@cache
def _layer_widths(spec: TrainSpec) -> tuple[int, ...]:
    from torch import nn
    modules = list(build_model(spec).modules())
    linears = [m for m in modules if isinstance(m, nn.Linear)]
    if not linears or any(type(m) not in (nn.Sequential, nn.Flatten, nn.Linear, nn.ReLU) for m in modules):
        raise ValueError(f"layer_widths: {spec.arch!r} is not a fully connected architecture")
    return (linears[0].in_features, *(m.out_features for m in linears))


def group_count(channels: int) -> int:
    """GroupNorm groups for a conv layer: up to 8, always dividing the channel count."""
    return math.gcd(channels, 8)


def build_model(spec: TrainSpec) -> nn.Module:
    """A freshly initialised (torch default init, global RNG) model for ``spec``.

    Raises ConfigError on field 'model' for an unknown name, a factory that does not import,
    raises or returns something other than an ``nn.Module``, and a module Opacus cannot train."""
    from opacus.validators import ModuleValidator
    from torch import nn

    if spec.arch in ARCHITECTURES:
        try:
            module = ARCHITECTURES[spec.arch](spec)
        except ValueError as e:
            raise ConfigError("model", str(e)) from None
    elif is_import_path(spec.arch):
        factory = load_callable(spec.arch, "model")
        try:
            module = factory(tuple(spec.input_shape), spec.n_classes)
        except KeyboardInterrupt:
            raise
        except BaseException as e:  # noqa: BLE001 - sys.exit() in user code included: reported, not raised
            raise ConfigError("model", f"factory {spec.arch} raised {one_line(e)}") from None
        if not isinstance(module, nn.Module):
            raise ConfigError("model", f"factory {spec.arch} returned a {type(module).__name__}, "
                                       "not a torch.nn.Module")
    else:
        raise ConfigError("model", f"unknown model {spec.arch!r}; choose from {', '.join(ARCHITECTURES)} "
                                   "or give a factory as package.module:function")
    problems = ModuleValidator.validate(module, strict=False)
    if problems:
        raise ConfigError("model", f"{spec.arch} cannot be trained with DP-SGD: {one_line(problems[0])}")
    return module


def _fully_connected(spec: TrainSpec) -> nn.Module:
    """Flatten, then Linear layers with ReLU between them (no hidden layer: logistic regression)."""
    from torch import nn
    widths = [flat_dim(spec), *(spec.hidden if spec.arch == "mlp" else ()), spec.n_classes]
    layers: list[nn.Module] = [nn.Flatten()]
    for j, (fan_in, fan_out) in enumerate(zip(widths[:-1], widths[1:])):
        if j > 0:
            layers.append(nn.ReLU())
        layers.append(nn.Linear(fan_in, fan_out))
    return nn.Sequential(*layers)


# The 1-D CNN's convolutions see this many positions; the head sees a fixed-length map.
_KERNEL_1D = 5
_HEAD_LENGTH_1D = 4


def _build_cnn1d(spec: TrainSpec) -> nn.Module:
    """Conv1d (kernel 5, same length) + GroupNorm + ReLU (+ MaxPool1d(2) while the sequence
    stays at least 2 * head length) per width in ``hidden``, then an adaptive average pool to
    length 4 and a linear head: for (C, L) sequences such as MNIST-1D's (1, 40)."""
    from torch import nn
    if len(spec.input_shape) != 2:
        raise ValueError(f"cnn1d needs (C, L) inputs, got input_shape={spec.input_shape}")
    if not spec.hidden:
        raise ValueError("cnn1d needs at least one channel width in hidden")
    channels, length = spec.input_shape
    layers: list[nn.Module] = []
    for out_channels in spec.hidden:
        layers += [
            nn.Conv1d(channels, out_channels, kernel_size=_KERNEL_1D, padding=_KERNEL_1D // 2),
            nn.GroupNorm(group_count(out_channels), out_channels),
            nn.ReLU(),
        ]
        if length // 2 >= 2 * _HEAD_LENGTH_1D:
            layers.append(nn.MaxPool1d(2))
            length //= 2
        channels = out_channels
    layers += [
        nn.AdaptiveAvgPool1d(_HEAD_LENGTH_1D),
        nn.Flatten(),
        nn.Linear(channels * _HEAD_LENGTH_1D, spec.n_classes),
    ]
    return nn.Sequential(*layers)


def _build_cnn(spec: TrainSpec) -> nn.Module:
    from torch import nn
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


# Residual nets: basic blocks per stage (ResNet-20: 6 * 3 + 2 layers; WRN-16-k: 6 * 2 + 4).
_RESNET20_BLOCKS = 3
_WRN16_BLOCKS = 2


def _image_widths(spec: TrainSpec) -> tuple[int, ...]:
    if len(spec.input_shape) != 3:
        raise ValueError(f"{spec.arch} needs (C, H, W) inputs, got input_shape={spec.input_shape}")
    if not spec.hidden:
        raise ValueError(f"{spec.arch} needs at least one stage width in hidden")
    return tuple(spec.hidden)


def _build_resnet20(spec: TrainSpec) -> nn.Module:
    """ResNet-20 with GroupNorm (models/residual.py): a stage of 3 basic blocks per width in
    ``hidden`` (He et al.: 16, 32, 64), each stage after the first at half the resolution."""
    from dpmem.models.residual import ResNet
    return ResNet(spec.input_shape[0], _image_widths(spec), _RESNET20_BLOCKS, spec.n_classes)


def _build_resnet8(spec: TrainSpec) -> nn.Module:
    """ResNet-8, the smallest of He et al.'s ResNet-(6n+2) family (n = 1): ResNet-20 with one basic
    block per stage, a third of its cost; for runs of thousands of models on a CPU."""
    from dpmem.models.residual import ResNet
    return ResNet(spec.input_shape[0], _image_widths(spec), 1, spec.n_classes)


def _build_wrn16(spec: TrainSpec) -> nn.Module:
    """WRN-16-k with GroupNorm (models/residual.py): ``hidden`` = (16k, 32k, 64k), e.g. 64, 128, 256
    for De et al.'s WRN-16-4; 2 pre-activation blocks per stage after a 16-channel stem."""
    from dpmem.models.residual import WideResNet
    return WideResNet(spec.input_shape[0], _image_widths(spec), _WRN16_BLOCKS, spec.n_classes)


# The built-in architectures by config name.
ARCHITECTURES: dict[str, Callable[[TrainSpec], nn.Module]] = {
    "logreg": _fully_connected,
    "mlp": _fully_connected,
    "cnn": _build_cnn,
    "cnn1d": _build_cnn1d,
    "resnet8": _build_resnet8,
    "resnet20": _build_resnet20,
    "wrn16": _build_wrn16,
}

"""Bring your own architecture: factory(input_shape, n_classes) -> torch.nn.Module.

GroupNorm, not BatchNorm: DP-SGD needs every example's gradient on its own, and dpmem refuses
modules that Opacus's ModuleValidator refuses.
"""
from torch import nn


def small_convnet(input_shape, n_classes):
    channels = input_shape[0]
    return nn.Sequential(
        nn.Conv2d(channels, 16, kernel_size=3, padding=1),
        nn.GroupNorm(4, 16),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * 2 * 2, n_classes),
    )


def wide_mlp(input_shape, n_classes):
    """Flatten, Linear and ReLU only: trained on the many-model engine."""
    width = 1
    for size in input_shape:
        width *= size
    return nn.Sequential(nn.Flatten(), nn.Linear(width, 256), nn.ReLU(), nn.Linear(256, n_classes))


def layernorm_mlp(input_shape, n_classes):
    """LayerNorm is per-example (Opacus trains it) but not a layer of the many-model engine: Opacus path."""
    width = 1
    for size in input_shape:
        width *= size
    return nn.Sequential(nn.Flatten(), nn.Linear(width, 64), nn.LayerNorm(64), nn.ReLU(), nn.Linear(64, n_classes))

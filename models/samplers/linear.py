"""Linear layers: the ghost norm ||a_i||^2 ||g_i||^2 (+ ||g_i||^2 for the bias); the clipped sum is one bmm."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from dpmem.models.samplers.registry import register, sq_sum


@register(nn.Linear)
class LinearSampler:
    """a [K, B, in], g [K, B, out]."""

    def __init__(self, layer: nn.Linear, K: int, saved: Tensor, grad: Tensor, frozen: frozenset = frozenset()):
        self.a, self.g, self.bias = saved, grad, layer.bias is not None
        self.frozen = frozen

    def sq_norms(self) -> Tensor:
        g_sq = sq_sum(self.g, (2,))
        total = sq_sum(self.a, (2,)) * g_sq if "weight" not in self.frozen else torch.zeros_like(g_sq)
        return total + g_sq if self.bias and "bias" not in self.frozen else total

    def clipped(self, c: Tensor) -> list[Tensor]:
        gc = self.g * c.unsqueeze(2)
        out = [torch.bmm(gc.transpose(1, 2), self.a)]
        if self.bias:
            out.append(gc.sum(dim=1))
        return out

"""Linear layers: the ghost norm ||a_i||^2 ||g_i||^2 (+ ||g_i||^2 for the bias); the clipped sum is one bmm."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from dpmem.models.samplers.registry import register, sq_sum


@register(nn.Linear)
class LinearSampler:
    """a [K, B, in], g [K, B, out]."""

    def __init__(self, layer: nn.Linear, K: int, saved: Tensor, grad: Tensor, copies: int = 1,
                 frozen: frozenset = frozenset()):
        self.a, self.g, self.bias, self.copies = saved, grad, layer.bias is not None, copies
        self.frozen = frozen

    def sq_norms(self) -> Tensor:
        if self.copies > 1:
            # ||sum_j g_j a_j^T||^2 = sum_jj' (a_j . a_j')(g_j . g_j') over an example's m copies
            K, R = self.g.shape[:2]
            a = self.a.view(K, R // self.copies, self.copies, -1)
            g = self.g.view(K, R // self.copies, self.copies, -1)
            bias_sq = sq_sum(g.sum(dim=2), (2,))
            weight_sq = ((torch.matmul(a, a.transpose(2, 3)) * torch.matmul(g, g.transpose(2, 3))).sum(dim=(2, 3))
                         if "weight" not in self.frozen else torch.zeros_like(bias_sq))
        else:
            bias_sq = sq_sum(self.g, (2,))
            weight_sq = sq_sum(self.a, (2,)) * bias_sq if "weight" not in self.frozen else torch.zeros_like(bias_sq)
        return weight_sq + bias_sq if self.bias and "bias" not in self.frozen else weight_sq

    def clipped(self, c: Tensor) -> list[Tensor]:
        if self.copies > 1:
            c = c.repeat_interleave(self.copies, dim=1)
        gc = self.g * c.unsqueeze(2)
        out = [torch.bmm(gc.transpose(1, 2), self.a)]
        if self.bias:
            out.append(gc.sum(dim=1))
        return out

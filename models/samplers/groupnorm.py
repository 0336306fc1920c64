"""GroupNorm: Opacus's rule, the normalised input times g summed over positions (weight) and g (bias)."""
from __future__ import annotations

import functools
import operator

import torch
from torch import Tensor, nn

from dpmem.models.samplers.registry import register, sq_sum


@register(nn.GroupNorm)
class GroupNormSampler:
    """saved (the normalised input) and g, both [B, K*C, *S]; Opacus's GroupNorm rule
    (normalised input * g summed over positions for the weight, g for the bias)."""

    def __init__(self, layer: nn.GroupNorm, K: int, saved: Tensor, grad: Tensor, copies: int = 1,
                 frozen: frozenset = frozenset()):
        B = grad.shape[0]
        dims = tuple(range(2, grad.dim()))
        self.gw = (saved * grad).sum(dim=dims).reshape(B, K, -1)   # [B, K, C]
        self.gb = grad.sum(dim=dims).reshape(B, K, -1)
        if copies > 1:  # an example's gradient: the sum over its copies' rows
            self.gw = self.gw.view(B // copies, copies, K, -1).sum(dim=1)
            self.gb = self.gb.view(B // copies, copies, K, -1).sum(dim=1)
        self.frozen = frozen

    def sq_norms(self) -> Tensor:
        parts = [sq_sum(g, (2,)) for name, g in (("weight", self.gw), ("bias", self.gb)) if name not in self.frozen]
        return functools.reduce(operator.add, parts).transpose(0, 1)

    def clipped(self, c: Tensor) -> list[Tensor]:
        weights = c.transpose(0, 1)
        return [torch.einsum("bk,bkc->kc", weights, self.gw), torch.einsum("bk,bkc->kc", weights, self.gb)]

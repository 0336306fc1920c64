"""Conv1d and Conv2d (after Bu et al. 2022's mixed rule): per layer, per-example gradients or the ghost
norm <u u^T, g g^T> over output positions, whichever costs fewer multiply-adds (``_direct_is_cheaper``;
T output positions, d = C_in/groups * kernel size, p = C_out/groups). Ghost norms take the padded
input's own Gram matrix, never the unfolded input; their clipped sum is a grouped-convolution weight
gradient of the clip-scaled output gradient. A lowered convolution (``wide.lowered``) leaves its
unfolded input, and its per-example gradients are one batched matmul with it."""
from __future__ import annotations

import math
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.grad import conv1d_weight, conv2d_weight

from dpmem.models.samplers.registry import register, sq_sum
from dpmem.models.wide import lowered


@register(nn.Conv1d, nn.Conv2d)
class ConvSampler:
    """a [B, K*C_in, *S_in], g [B, K*C_out, *S_out]; per-example gradients or ghost norms.

    For ghost norms the unfolded input (d * T floats per example and model) is formed a block of
    rows at a time (``row_block_floats``), so it stays in cache instead of streaming through memory."""

    # "mixed": per-example gradients when 2 T^2 > d p, else ghost norms; "per_example" / "ghost": always
    rule = "mixed"
    row_block_floats = 1 << 18

    def __init__(self, layer: nn.Conv1d | nn.Conv2d, K: int, saved: Tensor, grad: Tensor, copies: int = 1,
                 frozen: frozenset = frozenset()):
        self.layer, self.K, self.a, self.g = layer, K, saved, grad
        # numbers by now: the engine runs padding="same"/"valid" layers as copies with numeric padding
        self.padding = cast(tuple[int, ...], layer.padding)
        self.bias = layer.bias is not None
        self.copies = copies
        self.frozen = frozen
        B = grad.shape[0]
        G = layer.groups
        self.p = layer.out_channels // G
        self.d = layer.in_channels // G * math.prod(layer.kernel_size)
        self.T = math.prod(grad.shape[2:])
        self.gk = grad.reshape(B, K, G, self.p, self.T)
        # saved: [B, K * G, d, T], the unfolded input, which only per-example gradients use
        self.unfolded = lowered(layer, saved.device)
        # augmentation copies (rows = copies x examples) take per-example gradients, summed over
        # each example's copies (a ghost norm would need the Gram matrices across copies)
        self.direct = (self.unfolded or copies > 1 or self.rule == "per_example"
                       or self.rule == "mixed" and self._direct_is_cheaper())
        self.per_example: Tensor | None = None
        self.bias_grads: Tensor | None = None
        if self.bias:
            bias_grads = self.gk.sum(dim=4).reshape(B, K, -1)   # [B, K, C_out]
            self.bias_grads = bias_grads.view(B // copies, copies, K, -1).sum(dim=1) if copies > 1 else bias_grads

    def _direct_is_cheaper(self) -> bool:
        """The mixed rule, by multiply-adds per example and group: ghost norms cost the two Gram
        matrices (P^2 C_in/G for the padded input's P positions, T^2 p for g) plus the clipped sum
        (one weight gradient, T d p); per-example gradients cost T d p, but as a convolution with
        B * K * G groups they run at about half the speed of one weight gradient, so count 2 T d p.
        Ghost norms win only where the output map is small against the channels (ResNet-20's last
        stage: 4x cheaper Gram matrices than per-example gradients, 1.8x faster in all)."""
        positions = math.prod(s + 2 * p for s, p in zip(self.a.shape[2:], self.padding))
        ghost = positions * positions * (self.layer.in_channels // self.layer.groups) + self.T * self.T * self.p
        return ghost > self.T * self.d * self.p

    def _padded(self, a: Tensor) -> Tensor:
        """Rows of the input, zero-padded, positions flattened: [rows, K, G, C_in/G, P]."""
        pad = [p for p in reversed(self.padding) for _ in (0, 1)]   # F.pad's order: last dim first
        a = F.pad(a, pad) if any(pad) else a
        return a.reshape(a.shape[0], self.K, self.layer.groups, -1, math.prod(a.shape[2:]))

    def _position_gram(self, r0: int, r1: int) -> Tensor:
        """u_t . u_t' between the unfolded input's positions, rows r0:r1: [rows, K, G, T, T].

        Without unfolding: u_t . u_t' is the sum over kernel taps j of the padded input's own Gram
        matrix at (stride * t + dilation * j, stride * t' + dilation * j), so the Gram matrix of the
        (C/G x P) padded input replaces the one of the (C/G * kernel x T) unfolded one, and the
        unfolded input (kernel-size times larger) is never written (3x faster for the second
        convolution of cnn1d, 4x for ResNet-20's last stage)."""
        a = self._padded(self.a[r0:r1])
        gram = torch.matmul(a.transpose(3, 4), a)   # [rows, K, G, P, P]
        layer = self.layer
        padded = [s + 2 * p for s, p in zip(self.a.shape[2:], self.padding)]
        n = len(padded)
        gram = gram.view(*gram.shape[:3], *padded, *padded)
        # one spatial axis at a time, last first (for a 3x3 kernel 3 + 3 shifted sums, not 9)
        for axis in reversed(range(n)):
            k, dil, stride, out = layer.kernel_size[axis], layer.dilation[axis], layer.stride[axis], self.g.shape[2 + axis]

            # tap is called only within the iteration that defines it, so the loop's values are the ones meant
            def tap(j: int) -> Tensor:
                index: list[Any] = [slice(None)] * (2 * n)
                index[axis] = index[n + axis] = slice(j * dil, j * dil + stride * (out - 1) + 1, stride)  # noqa: B023
                return gram[(..., *index)]  # noqa: B023
            total = tap(0)
            for j in range(1, k):
                total = total + tap(j)
            gram = total
        return gram.reshape(*gram.shape[:3], self.T, self.T)

    def _row_blocks(self):
        """Blocks of rows whose Gram matrices' inputs hold about ``row_block_floats`` floats."""
        B = self.gk.shape[0]
        positions = math.prod(s + 2 * p for s, p in zip(self.a.shape[2:], self.layer.padding))
        rows = max(1, self.row_block_floats // (self.K * self.layer.groups * positions * positions))
        return [(r, min(B, r + rows)) for r in range(0, B, rows)]

    def _weight_grad(self, a: Tensor, weight_shape: tuple[int, ...], grad: Tensor, groups: int) -> Tensor:
        grad_fn = conv2d_weight if isinstance(self.layer, nn.Conv2d) else conv1d_weight
        layer = self.layer
        return grad_fn(a, weight_shape, grad, layer.stride, layer.padding, layer.dilation, groups)

    def sq_norms(self) -> Tensor:
        B, K, G = self.gk.shape[:3]
        if "weight" in self.frozen:
            total = torch.zeros(B // self.copies, K, dtype=self.g.dtype, device=self.g.device)
        elif self.direct:
            # Per-example gradients [B, K, G, p, d], kept for the clipped sum: the weight gradient of
            # one convolution whose groups are the B * K * G (example, model, group) triples, which
            # the convolution kernels compute 2.5-4x faster than unfold + batched matmul.
            layer = self.layer
            if self.unfolded:
                self.per_example = torch.matmul(self.gk.view(B, K * G, self.p, self.T),
                                                self.a.transpose(2, 3)).view(B, K, G, self.p, self.d)
            else:
                self.per_example = self._weight_grad(
                    self.a.reshape(1, -1, *self.a.shape[2:]),
                    (B * K * layer.out_channels, layer.in_channels // G, *layer.kernel_size),
                    self.g.reshape(1, -1, *self.g.shape[2:]), B * K * G).view(B, K, G, self.p, self.d)
            if self.copies > 1:
                B //= self.copies
                self.per_example = self.per_example.view(B, self.copies, K, G, self.p, self.d).sum(dim=1)
            total = sq_sum(self.per_example.view(B, K, -1), (2,))
        else:
            total = torch.empty(B, K, dtype=self.g.dtype, device=self.g.device)
            for r0, r1 in self._row_blocks():
                g = self.gk[r0:r1]
                gg = torch.matmul(g.transpose(3, 4), g)   # [rows, K, G, T, T]
                total[r0:r1] = (self._position_gram(r0, r1) * gg).view(r1 - r0, K, -1).sum(dim=2)
        if self.bias_grads is not None and "bias" not in self.frozen:
            total += sq_sum(self.bias_grads, (2,))
        return total.transpose(0, 1)

    def clipped(self, c: Tensor) -> list[Tensor]:
        B, K = self.gk.shape[0] // self.copies, self.gk.shape[1]
        layer = self.layer
        shape = (K, layer.out_channels, layer.in_channels // layer.groups, *layer.kernel_size)
        weights = c.transpose(0, 1)  # [B, K]
        if "weight" in self.frozen:   # no gradient: the step leaves it alone
            dw = torch.zeros(shape, dtype=self.g.dtype, device=self.g.device)
        elif self.per_example is not None:
            dw = torch.einsum("bk,bkm->km", weights, self.per_example.view(B, K, -1)).reshape(shape)
        else:  # the weight gradient of the wide convolution with each row's output gradient scaled
            scaled = (self.gk * weights.reshape(B, K, 1, 1, 1)).view_as(self.g)
            dw = self._weight_grad(self.a, (K * layer.out_channels, *shape[2:]), scaled, K * layer.groups).view(shape)
        out = [dw]
        if self.bias:
            out.append(torch.einsum("bk,bkm->km", weights, self.bias_grads))
        return out

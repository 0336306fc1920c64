"""The many-model engine: K copies of one module trained in one step, as one wide module.

Any ``nn.Sequential`` (nested ones too) of supported layers trains here (``supports``). The K
copies' parameters are stacked, ``[K, *shape]`` per parameter, and run as one wide network:

- tensors with channels travel as ``[B, K*C, *spatial]``: a convolution is one grouped
  convolution (``groups = K * groups``), GroupNorm normalises ``K * groups`` groups, pooling
  and elementwise layers act on the wide tensor unchanged;
- vectors travel as ``[K, B, F]``: a Linear layer is one batched matmul (``baddbmm``);
  ``Flatten`` turns the first layout into the second.
Row b of model k is model k's b-th example of its own Poisson batch; batches are padded to the
largest with rows whose loss weight is zero.

A non-private step is ordinary autograd on the wide module (parameter gradients of the summed,
normalised loss). A DP step takes autograd only for the gradients with respect to each
parametrised layer's *output* (``torch.autograd.grad`` on the saved outputs; the parameters'
own gradients are never formed), and a per-layer rule (``GRAD_SAMPLERS``, as Opacus registers
grad samplers) turns a layer's saved input and output gradient into per-example squared norms
and then, once the clip factors are known, into the clipped gradient sum (book-keeping; no
second backward pass):
- Linear: ghost norm ``||a_i||^2 ||g_i||^2`` (+ ``||g_i||^2`` for the bias), clipped sum one
  ``bmm``;
- Conv: per-example gradients from ``unfold`` (one batched GEMM) when ``2 T^2 > d p`` (T output
  positions, d = C_in/groups * kernel size, p = C_out/groups), else the ghost norm
  ``<u u^T, g g^T>`` over positions (for Conv1d from the padded input's Gram matrix, without
  unfolding) and the clipped sum as a grouped-convolution weight gradient
  (Bu et al. 2022's mixed rule);
- GroupNorm: Opacus's rule, ``sum over positions of normalised input * g`` (weight) and of ``g``
  (bias).
Clipping, noise and normalisation follow Opacus exactly (see ``models/spec.py``), then a
``torch.optim.SGD`` step (weight decay added to the noisy gradient, momentum buffer
``buf = m * buf + grad``, dampening 0).

Randomness is per model (contract in ``models/spec.py``): model k is ``build_model(spec)``
under a seed from ``(seed, stream_id)``, its Poisson coins come from a generator seeded from the
same sequence, its noise from ``(noise_seed, stream_id)``. Each model's coins and noise are
drawn by its own generator, so its numbers do not depend on K or on its neighbours.
"""
from __future__ import annotations

import copy
import ctypes
import math
import os
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dpmem.models.nets import build_model
from dpmem.models.spec import (CANARY_STREAM, CLIP_EPS, TrainRequest, TrainSpec, canary_grad_norm, canary_layout,
                               expected_batch_sizes, model_streams, stream_seeds)

# Evaluation runs at least this many rows per forward pass when the budget allows.
EVAL_ROWS = 256
# How often (in steps) the progress callback is called at most.
PROGRESS_EVERY = 10
# Background threads that draw DP noise one step ahead (on CPUs with more than one core).
NOISE_WORKERS = 2
# A step runs the K models in groups whose largest activation holds about this many floats:
# on a CPU, tensors that stay in cache (4 MiB) run several times faster than tensors that
# stream through memory; a GPU wants them as wide as memory allows.
CHUNK_FLOATS = {"cpu": 1 << 20, "cuda": 1 << 28}

DEVICES = ("auto", "cpu", "cuda")

# Layers without parameters that act on each channel (or each coordinate) alone: on the wide
# tensor they are the module itself. Pooling needs the channel layout; the others take any.
CHANNELWISE = (nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d,
               nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d)
ELEMENTWISE = (nn.ReLU, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Identity)


# Batches are padded to a multiple of this many rows (see sample_batch).
WIDTH_BLOCK = 16

def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """"auto": CUDA when a GPU is visible, else the CPU; "cuda" without a GPU is an error."""
    name = str(device)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError("device 'cuda' was asked for but torch sees no CUDA device")
        return torch.device(name)
    if name != "cpu":
        raise ValueError(f"unknown device {name!r}; choose from {', '.join(DEVICES)}")
    return torch.device("cpu")


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
_MEMORY_RETAINED = False


def retain_freed_memory() -> None:
    """Ask glibc's malloc to keep freed memory for reuse rather than return it to the system.

    A training step frees and re-allocates the same large tensors every step; by default glibc
    maps blocks above a moving threshold straight from the system and trims the heap's free top,
    so each step page-faults its memory back in. Measured on a 2-core CPU, 1 thread, for the
    built-in CNN (K=16, batch 64): DP step 47 -> 25 ms per model, non-private 25 -> 22, a plain
    single-model step 30 -> 21. Process-wide and idempotent; nothing happens off glibc."""
    global _MEMORY_RETAINED
    if _MEMORY_RETAINED:
        return
    _MEMORY_RETAINED = True
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)   # glibc's largest: blocks up to 32 MiB come from the heap
        libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30)    # keep up to 1 GiB of free heap top
    except (OSError, AttributeError):
        pass


# -- which modules the engine trains -----------------------------------------------------------

def leaf_layers(module: nn.Module) -> list[nn.Module]:
    """The layers of a (possibly nested) ``nn.Sequential``, in order."""
    if isinstance(module, nn.Sequential):
        return [leaf for child in module for leaf in leaf_layers(child)]
    return [module]


def _layer_problem(layer: nn.Module) -> str | None:
    name = type(layer).__name__
    if isinstance(layer, nn.Linear):
        return None
    if isinstance(layer, (nn.Conv1d, nn.Conv2d)):
        if isinstance(layer.padding, str):
            return f"{name} with padding={layer.padding!r} (give the padding as numbers)"
        if layer.padding_mode != "zeros":
            return f"{name} with padding_mode={layer.padding_mode!r}"
        return None
    if isinstance(layer, nn.GroupNorm):
        return None if layer.affine else "GroupNorm without affine parameters"
    if isinstance(layer, nn.Flatten):
        return None if (layer.start_dim, layer.end_dim) == (1, -1) else "Flatten other than Flatten(1, -1)"
    if isinstance(layer, CHANNELWISE):
        if getattr(layer, "return_indices", False):
            return f"{name} with return_indices"
        return None
    if isinstance(layer, ELEMENTWISE):
        return None
    return f"layer {name} is not supported by the batched engine"


def supports(module: nn.Module, input_shape: tuple[int, ...] | None = None) -> str | None:
    """None when the engine can train K copies of ``module``; otherwise why not.

    With ``input_shape`` the layer sequence is also traced on one example (layouts, shapes)."""
    if not isinstance(module, nn.Sequential):
        return f"the batched engine trains nn.Sequential modules, not {type(module).__name__}"
    layers = leaf_layers(module)
    for layer in layers:
        problem = _layer_problem(layer)
        if problem is not None:
            return problem
    covered = {id(p) for layer in layers for p in layer.parameters(recurse=False)}
    if any(id(p) not in covered for p in module.parameters()):
        return "the module has parameters outside its layers"
    if any(True for _ in module.buffers()):
        return "the module has buffers (running statistics are not per-example)"
    if input_shape is not None:
        try:
            WideNet(module, 1).trace(input_shape)
        except ValueError as e:
            return str(e)
    return None


# -- the wide network --------------------------------------------------------------------------

def _out_of_place(layer: nn.Module) -> nn.Module:
    """An in-place activation would overwrite a layer output that the DP step differentiates
    against; the engine runs a copy that computes out of place."""
    if getattr(layer, "inplace", False):
        layer = copy.copy(layer)
        layer.inplace = False
    return layer


@dataclass
class Record:
    """What a parametrised layer leaves for the DP step: its input (for GroupNorm, its
    normalised input) and its output, whose gradient autograd returns."""
    layer: int
    saved: Tensor
    output: Tensor


def _tiled_max_pool_window(layer: nn.Module) -> int | None:
    """The window of a 1-D max pool whose windows tile the sequence (kernel = stride, no padding
    or dilation): it runs as a reshape and a max over the window, 1.5x faster than PyTorch's
    pooling kernel on the CPU with the same gradient (to the window's first maximum)."""
    if not isinstance(layer, nn.MaxPool1d) or layer.ceil_mode:
        return None
    k, stride = (v[0] if isinstance(v, tuple) else v for v in (layer.kernel_size, layer.stride or layer.kernel_size))
    pad, dil = (v[0] if isinstance(v, tuple) else v for v in (layer.padding, layer.dilation))
    return k if (k == stride and pad == 0 and dil == 1) else None


class _MaxPool2dChannelsLast(torch.autograd.Function):
    """``F.max_pool2d`` on a CPU tensor [B, C, H, W], computed in channels-last layout: PyTorch's
    CPU kernel is several times faster there (per model of the built-in CNN, forward and
    backward: 6.6 -> 3.0 ms for the first pool, 3.4 -> 1.7 ms for the second, the layout copies
    included). The indices (positions within each H x W plane) mean the same in both layouts,
    so the backward pass is the ordinary one, gradients to the same first maximum of each window."""

    @staticmethod
    def forward(ctx, a: Tensor, kernel: list[int], stride: list[int], padding: list[int], dilation: list[int],
                ceil_mode: bool) -> Tensor:
        out, index = torch.ops.aten.max_pool2d_with_indices(a.contiguous(memory_format=torch.channels_last), kernel,
                                                              stride, padding, dilation, ceil_mode)
        ctx.args = (kernel, stride, padding, dilation, ceil_mode)
        ctx.save_for_backward(a, index.contiguous())
        return out.contiguous()

    @staticmethod
    def backward(ctx, grad: Tensor):
        a, index = ctx.saved_tensors
        grad_a = torch.ops.aten.max_pool2d_with_indices_backward(grad.contiguous(), a, *ctx.args, index)
        return grad_a, None, None, None, None, None


def _max_pool2d(layer: nn.MaxPool2d, a: Tensor) -> Tensor:
    def pair(v):
        return list(v) if isinstance(v, tuple) else [v, v]
    kernel = pair(layer.kernel_size)
    stride = pair(layer.stride if layer.stride is not None else layer.kernel_size)
    return _MaxPool2dChannelsLast.apply(a, kernel, stride, pair(layer.padding), pair(layer.dilation), layer.ceil_mode)


def _tiled_max_pool1d(a: Tensor, k: int) -> Tensor:
    n = a.shape[-1] // k
    return a[..., :n * k].unflatten(-1, (n, k)).max(dim=-1).values


def _average_matrix(length: int, out: int, like: Tensor) -> Tensor:
    """[length, out]: column j averages positions floor(j L / out) .. ceil((j + 1) L / out) - 1,
    PyTorch's adaptive average pooling windows."""
    m = torch.zeros(length, out, dtype=like.dtype, device=like.device)
    for j in range(out):
        start, end = (j * length) // out, -(-((j + 1) * length) // out)
        m[start:end, j] = 1.0 / (end - start)
    return m


def _adaptive_avg_pool(layer: nn.Module, a: Tensor, cache: dict) -> Tensor:
    """Adaptive average pooling as products with averaging matrices (one per pooled axis): far
    faster on the CPU than PyTorch's kernel on the wide tensor, and differentiable as is."""
    sizes = layer.output_size if isinstance(layer.output_size, tuple) else (layer.output_size,) * (a.dim() - 2)
    mats = []
    for axis, size in zip(range(2, a.dim()), sizes, strict=True):
        size = a.shape[axis] if size is None else size
        key = (a.shape[axis], size, a.dtype, a.device)
        if key not in cache:
            cache[key] = _average_matrix(a.shape[axis], size, a)
        mats.append(cache[key])
    if a.dim() == 3:
        return torch.matmul(a, mats[0])
    return torch.matmul(mats[0].T, torch.matmul(a, mats[1]))


class WideNet:
    """The layer sequence of one module, run as K copies at once on stacked parameters.

    Two rewrites keep the numbers and save time: a ReLU directly before a max pool runs after it
    (ReLU is monotone, so values and gradients are the same, ties included, on a quarter or half
    of the elements), and some pooling layers run as cheaper equivalent operations
    (``_tiled_max_pool_window``, ``_MaxPool2dChannelsLast`` on the CPU, ``_adaptive_avg_pool``)."""

    def __init__(self, module: nn.Module, K: int):
        self.layers = [_out_of_place(layer) for layer in leaf_layers(module)]
        self.order = list(range(len(self.layers)))
        for j in range(len(self.layers) - 1):
            if (type(self.layers[j]) is nn.ReLU and isinstance(self.layers[j + 1], (nn.MaxPool1d, nn.MaxPool2d))
                    and self.order[j] == j):
                self.order[j], self.order[j + 1] = j + 1, j
        self._matrices: dict = {}
        self.K = K
        # (layer index, parameter name) of every parameter, in module.parameters() order
        self.param_slots: list[tuple[int, str]] = []
        for j, layer in enumerate(self.layers):
            for name, _ in layer.named_parameters(recurse=False):
                self.param_slots.append((j, name))
        self.param_layers = sorted({j for j, _ in self.param_slots})

    def layer_param_names(self, j: int) -> frozenset:
        return frozenset(name for layer, name in self.param_slots if layer == j)

    def frozen_names(self, trainable: list[bool] | None) -> dict[int, frozenset]:
        """layer index -> names of its frozen parameters (``trainable`` per parameter; None: all trainable)."""
        if trainable is None or all(trainable):
            return {}
        out: dict[int, set] = {}
        for (j, name), t in zip(self.param_slots, trainable, strict=True):
            if not t:
                out.setdefault(j, set()).add(name)
        return {j: frozenset(names) for j, names in out.items()}

    def layer_params(self, params: list[Tensor]) -> dict[int, dict[str, Tensor]]:
        out: dict[int, dict[str, Tensor]] = {}
        for (j, name), p in zip(self.param_slots, params, strict=True):
            out.setdefault(j, {})[name] = p
        return out

    @staticmethod
    def to_wide(x: Tensor) -> Tensor:
        """Per-model batches [K, B, *input_shape] in the network's input layout."""
        if x.dim() == 3:  # vectors: [K, B, d]
            return x
        K, B = x.shape[:2]
        return x.transpose(0, 1).reshape(B, K * x.shape[2], *x.shape[3:])

    def forward(self, params: list[Tensor], x: Tensor, records: list[Record] | None = None) -> Tensor:
        """Logits [K, B, classes] of per-model batches ``x`` [K, B, *input_shape].

        With ``records``, every parametrised layer's input and output are kept and each output
        is made part of the autograd graph (DP step)."""
        K = self.K
        by_layer = self.layer_params(params)
        a = self.to_wide(x)
        vector = x.dim() == 3
        for j in self.order:
            layer = self.layers[j]
            p = by_layer.get(j)
            saved = a
            if isinstance(layer, nn.Linear):
                if not vector:
                    raise ValueError("a Linear layer must follow Flatten (or take vector inputs)")
                w, b = p["weight"], p.get("bias")
                out = torch.bmm(a, w.transpose(1, 2)) if b is None else torch.baddbmm(b.unsqueeze(1), a, w.transpose(1, 2))
            elif isinstance(layer, (nn.Conv1d, nn.Conv2d)):
                if vector or a.dim() != (3 if isinstance(layer, nn.Conv1d) else 4):
                    raise ValueError(f"{type(layer).__name__} got an input of the wrong rank")
                w, b = p["weight"], p.get("bias")
                conv = F.conv1d if isinstance(layer, nn.Conv1d) else F.conv2d
                out = conv(a, w.reshape(-1, *w.shape[2:]), None if b is None else b.reshape(-1), layer.stride,
                           layer.padding, layer.dilation, K * layer.groups)
            elif isinstance(layer, nn.GroupNorm):
                if vector:
                    raise ValueError("GroupNorm must act on channels, not on flattened vectors")
                if records is None:
                    out = F.group_norm(a, K * layer.num_groups, p["weight"].reshape(-1), p["bias"].reshape(-1),
                                       layer.eps)
                else:  # the DP rule needs the normalised input: keep it instead of computing it twice
                    saved = F.group_norm(a, K * layer.num_groups, eps=layer.eps)
                    shape = (1, -1) + (1,) * (a.dim() - 2)
                    out = torch.addcmul(p["bias"].reshape(shape), saved, p["weight"].reshape(shape))
            elif isinstance(layer, nn.Flatten):
                if not vector:
                    B = a.shape[0]
                    a = a.reshape(B, K, -1).transpose(0, 1)
                    vector = True
                continue
            elif isinstance(layer, CHANNELWISE):
                if vector:
                    raise ValueError(f"{type(layer).__name__} must act on channels, not on flattened vectors")
                window = _tiled_max_pool_window(layer)
                if window is not None and a.dim() == 3:
                    a = _tiled_max_pool1d(a, window)
                elif isinstance(layer, nn.MaxPool2d) and a.device.type == "cpu" and a.dim() == 4:
                    a = _max_pool2d(layer, a)
                elif isinstance(layer, (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)):
                    a = _adaptive_avg_pool(layer, a, self._matrices)
                else:
                    a = layer(a)
                continue
            else:  # elementwise
                a = layer(a)
                continue
            if records is not None:
                if not out.requires_grad:  # the first parametrised layer: start the graph here
                    out.requires_grad_(True)
                records.append(Record(layer=j, saved=saved, output=out))
            a = out
        if not vector or a.dim() != 3:
            raise ValueError("the module must end in a vector of logits per example (Flatten + Linear)")
        return a

    def trace(self, input_shape: tuple[int, ...]) -> int:
        """Run one example through K=1 copies with dummy parameters; returns the largest number
        of floats per example and model held by one activation (for evaluation block sizes)."""
        if self.K != 1:
            raise ValueError("trace runs a single copy")
        params = [p.detach().unsqueeze(0) for layer in self.layers for p in layer.parameters(recurse=False)]
        x = torch.zeros(1, 1, *input_shape)
        widest = [math.prod(input_shape)]
        records: list[Record] = []
        with torch.no_grad():
            logits = self.forward(params, x, records)
        widest += [r.output.numel() for r in records]
        return max(widest + [logits.numel()])


# -- per-example norms and clipped sums, one rule per parametrised layer ------------------------

def _sq_sum(t: Tensor, dims: tuple[int, ...]) -> Tensor:
    return t.square().sum(dim=dims)


class LinearSampler:
    """a [K, B, in], g [K, B, out]."""

    def __init__(self, layer: nn.Linear, K: int, saved: Tensor, grad: Tensor, frozen: frozenset = frozenset()):
        self.a, self.g, self.bias = saved, grad, layer.bias is not None
        self.frozen = frozen

    def sq_norms(self) -> Tensor:
        g_sq = _sq_sum(self.g, (2,))
        total = _sq_sum(self.a, (2,)) * g_sq if "weight" not in self.frozen else torch.zeros_like(g_sq)
        return total + g_sq if self.bias and "bias" not in self.frozen else total

    def clipped(self, c: Tensor) -> list[Tensor]:
        gc = self.g * c.unsqueeze(2)
        out = [torch.bmm(gc.transpose(1, 2), self.a)]
        if self.bias:
            out.append(gc.sum(dim=1))
        return out


class ConvSampler:
    """a [B, K*C_in, *S_in], g [B, K*C_out, *S_out]; per-example gradients or ghost norms.

    For ghost norms the unfolded input (d * T floats per example and model) is formed a block of
    rows at a time (``row_block_floats``), so it stays in cache instead of streaming through memory."""

    # "mixed": per-example gradients when 2 T^2 > d p, else ghost norms; "per_example" / "ghost": always
    rule = "mixed"
    row_block_floats = 1 << 18

    def __init__(self, layer: nn.Conv1d | nn.Conv2d, K: int, saved: Tensor, grad: Tensor,
                 frozen: frozenset = frozenset()):
        self.layer, self.K, self.a, self.g = layer, K, saved, grad
        self.bias = layer.bias is not None
        self.frozen = frozen
        B = grad.shape[0]
        G = layer.groups
        self.p = layer.out_channels // G
        self.d = layer.in_channels // G * math.prod(layer.kernel_size)
        self.T = math.prod(grad.shape[2:])
        self.gk = grad.reshape(B, K, G, self.p, self.T)
        self.direct = (self.rule == "per_example"
                       or self.rule == "mixed" and 2 * self.T * self.T > self.d * self.p)
        self.per_example: Tensor | None = None
        self.bias_grads = self.gk.sum(dim=4).reshape(B, K, -1) if self.bias else None   # [B, K, C_out]

    def _unfold(self, a: Tensor) -> Tensor:
        layer = self.layer
        if isinstance(layer, nn.Conv2d):
            u = F.unfold(a, layer.kernel_size, layer.dilation, layer.padding, layer.stride)
        else:
            u = F.unfold(a.unsqueeze(2), (1, layer.kernel_size[0]), (1, layer.dilation[0]),
                         (0, layer.padding[0]), (1, layer.stride[0]))
        return u.view(a.shape[0], self.K, self.layer.groups, self.d, self.T)

    def _padded_1d(self, a: Tensor) -> Tensor:
        """Rows of a Conv1d's input, zero-padded, as [rows, K, G, C_in/G, L + 2 * padding]."""
        pad = self.layer.padding[0]
        a = F.pad(a, (pad, pad)) if pad else a
        return a.view(a.shape[0], self.K, self.layer.groups, -1, a.shape[-1])

    def _position_gram(self, r0: int, r1: int) -> Tensor:
        """u_t . u_t' between the unfolded input's positions, rows r0:r1: [rows, K, G, T, T].

        For a Conv1d without unfolding: u_t . u_t' is the sum over kernel taps j of the padded
        input's own Gram matrix at (stride t + dil j, stride t' + dil j), so the Gram matrix of the
        (C/G x L) input replaces the one of the (C/G * kernel x T) unfolded one (3x faster for the
        second convolution of cnn1d)."""
        if isinstance(self.layer, nn.Conv1d):
            (k,), (stride,), (dil,) = self.layer.kernel_size, self.layer.stride, self.layer.dilation
            a = self._padded_1d(self.a[r0:r1])
            gram = torch.matmul(a.transpose(3, 4), a)   # [rows, K, G, L_pad, L_pad]
            span = stride * (self.T - 1) + 1
            return sum(gram[..., j * dil:j * dil + span:stride, j * dil:j * dil + span:stride] for j in range(k))
        u = self._unfold(self.a[r0:r1])
        return torch.matmul(u.transpose(3, 4), u)

    def _row_blocks(self):
        """Blocks of rows whose Gram matrices' inputs hold about ``row_block_floats`` floats."""
        B = self.gk.shape[0]
        if isinstance(self.layer, nn.Conv1d):
            width = (self.a.shape[-1] + 2 * self.layer.padding[0]) ** 2
        else:
            width = self.d * self.T
        rows = max(1, self.row_block_floats // (self.K * self.layer.groups * width))
        return [(r, min(B, r + rows)) for r in range(0, B, rows)]

    def _weight_grad(self, a: Tensor, weight_shape: tuple[int, ...], grad: Tensor, groups: int) -> Tensor:
        grad_fn = torch.nn.grad.conv2d_weight if isinstance(self.layer, nn.Conv2d) else torch.nn.grad.conv1d_weight
        layer = self.layer
        return grad_fn(a, weight_shape, grad, layer.stride, layer.padding, layer.dilation, groups)

    def sq_norms(self) -> Tensor:
        B, K, G = self.gk.shape[:3]
        if "weight" in self.frozen:
            total = torch.zeros(B, K, dtype=self.g.dtype, device=self.g.device)
        elif self.direct:
            # Per-example gradients [B, K, G, p, d], kept for the clipped sum: the weight gradient of
            # one convolution whose groups are the B * K * G (example, model, group) triples, which
            # the convolution kernels compute 2.5-4x faster than unfold + batched matmul.
            layer = self.layer
            self.per_example = self._weight_grad(
                self.a.reshape(1, -1, *self.a.shape[2:]),
                (B * K * layer.out_channels, layer.in_channels // G, *layer.kernel_size),
                self.g.reshape(1, -1, *self.g.shape[2:]), B * K * G).view(B, K, G, self.p, self.d)
            total = _sq_sum(self.per_example.view(B, K, -1), (2,))
        else:
            total = torch.empty(B, K, dtype=self.g.dtype, device=self.g.device)
            for r0, r1 in self._row_blocks():
                g = self.gk[r0:r1]
                gg = torch.matmul(g.transpose(3, 4), g)   # [rows, K, G, T, T]
                total[r0:r1] = (self._position_gram(r0, r1) * gg).view(r1 - r0, K, -1).sum(dim=2)
        if self.bias and "bias" not in self.frozen:
            total += _sq_sum(self.bias_grads, (2,))
        return total.transpose(0, 1)

    def clipped(self, c: Tensor) -> list[Tensor]:
        B, K = self.gk.shape[:2]
        layer = self.layer
        shape = (K, layer.out_channels, layer.in_channels // layer.groups, *layer.kernel_size)
        weights = c.transpose(0, 1)  # [B, K]
        if self.per_example is not None:
            dw = torch.einsum("bk,bkm->km", weights, self.per_example.view(B, K, -1)).reshape(shape)
        else:  # the weight gradient of the wide convolution with each row's output gradient scaled
            scaled = (self.gk * weights.reshape(B, K, 1, 1, 1)).view_as(self.g)
            dw = self._weight_grad(self.a, (K * layer.out_channels, *shape[2:]), scaled, K * layer.groups).view(shape)
        out = [dw]
        if self.bias:
            out.append(torch.einsum("bk,bkm->km", weights, self.bias_grads))
        return out


class GroupNormSampler:
    """saved (the normalised input) and g, both [B, K*C, *S]; Opacus's GroupNorm rule
    (normalised input * g summed over positions for the weight, g for the bias)."""

    def __init__(self, layer: nn.GroupNorm, K: int, saved: Tensor, grad: Tensor, frozen: frozenset = frozenset()):
        B = grad.shape[0]
        dims = tuple(range(2, grad.dim()))
        self.gw = (saved * grad).sum(dim=dims).reshape(B, K, -1)   # [B, K, C]
        self.gb = grad.sum(dim=dims).reshape(B, K, -1)
        self.frozen = frozen

    def sq_norms(self) -> Tensor:
        parts = [_sq_sum(g, (2,)) for name, g in (("weight", self.gw), ("bias", self.gb)) if name not in self.frozen]
        return sum(parts).transpose(0, 1)

    def clipped(self, c: Tensor) -> list[Tensor]:
        weights = c.transpose(0, 1)
        return [torch.einsum("bk,bkc->kc", weights, self.gw), torch.einsum("bk,bkc->kc", weights, self.gb)]


GRAD_SAMPLERS: dict[type, type] = {nn.Linear: LinearSampler, nn.Conv1d: ConvSampler, nn.Conv2d: ConvSampler,
                                   nn.GroupNorm: GroupNormSampler}


def _sampler(layer: nn.Module, K: int, record: Record, grad: Tensor, frozen: frozenset = frozenset()):
    for kind, sampler in GRAD_SAMPLERS.items():
        if isinstance(layer, kind):
            return sampler(layer, K, record.saved, grad, frozen) if frozen else sampler(layer, K, record.saved, grad)
    raise ValueError(f"no per-example rule for {type(layer).__name__}")


def _loss(logits: Tensor, y: Tensor, weight: Tensor) -> Tensor:
    """sum over models and rows of weight * cross-entropy (weight 0 on padded rows)."""
    K, B, C = logits.shape
    ce = F.cross_entropy(logits.reshape(K * B, C), y.reshape(K * B), reduction="none").view(K, B)
    return (ce * weight).sum()


def clip_factors(sq_norms: Tensor, max_grad_norm: float) -> Tensor:
    return (max_grad_norm / (sq_norms.sqrt() + CLIP_EPS)).clamp(max=1.0)


def dp_gradients(net: WideNet, params: list[Tensor], x: Tensor, y: Tensor, valid: Tensor,
                 max_grad_norm: float, trainable: list[bool] | None = None) -> tuple[list[Tensor], Tensor]:
    """Clipped per-example gradient sums (one per parameter, [K, *shape]) and the per-example
    gradient norms [K, B] (zero on padded rows) of the summed cross-entropy.

    ``trainable`` (per parameter; None: all) marks frozen parameters as Opacus treats them: they
    add nothing to the norms and their sums are zero."""
    frozen = net.frozen_names(trainable)
    records: list[Record] = []
    logits = net.forward([p.detach() for p in params], x, records)
    loss = _loss(logits, y, valid.to(logits.dtype))
    records = [r for r in records if r.layer not in frozen or frozen[r.layer] != net.layer_param_names(r.layer)]
    if not records:   # every parameter frozen: nothing to clip or sum
        return [torch.zeros_like(p) for p in params], torch.zeros(valid.shape, dtype=logits.dtype, device=logits.device)
    grads = torch.autograd.grad(loss, [r.output for r in records])
    with torch.no_grad():
        samplers = {r.layer: _sampler(net.layers[r.layer], net.K, r, g, frozen.get(r.layer, frozenset()))
                    for r, g in zip(records, grads)}
        del records, grads, logits, loss
        sq = None
        for s in samplers.values():
            term = s.sq_norms()
            sq = term if sq is None else sq + term
        factors = clip_factors(sq, max_grad_norm) * valid
        sums: dict[int, list[Tensor]] = {j: s.clipped(factors) for j, s in samplers.items()}
    out = []
    position: dict[int, int] = {}
    for slot, ((j, name), p) in enumerate(zip(net.param_slots, params, strict=True)):
        i = position.get(j, 0)
        position[j] = i + 1
        out.append(torch.zeros_like(p) if name in frozen.get(j, ()) else sums[j][i])
    return out, sq.sqrt()


def sgd_gradients(net: WideNet, params: list[Tensor], x: Tensor, y: Tensor, weight: Tensor,
                  trainable: list[bool] | None = None) -> list[Tensor]:
    """Gradients of sum_k sum_b weight[k, b] * CE by ordinary autograd on the wide network
    (zero for parameters that ``trainable`` marks frozen)."""
    trainable = [True] * len(params) if trainable is None else trainable
    leaves = [p.detach().requires_grad_(t) for p, t in zip(params, trainable, strict=True)]
    wanted = [leaf for leaf, t in zip(leaves, trainable) if t]
    if not wanted:
        return [torch.zeros_like(p) for p in params]
    loss = _loss(net.forward(leaves, x), y, weight)
    grads = iter(torch.autograd.grad(loss, wanted))
    return [next(grads) if t else torch.zeros_like(p) for p, t in zip(params, trainable)]


# -- randomness --------------------------------------------------------------------------------

def initial_params(spec: TrainSpec, streams: np.ndarray, seed: int) -> list[Tensor]:
    """Stacked parameters [K, *shape] of ``build_model(spec)`` built under each model's seed."""
    per_model = [initial_model(spec, seed, int(s)) for s in streams]
    return [torch.stack([p.detach() for p in ps]).float().contiguous()
            for ps in zip(*(m.parameters() for m in per_model), strict=True)]


def initial_model(spec: TrainSpec, seed: int, stream_id: int) -> nn.Module:
    """Model ``stream_id``'s initial module: ``build_model(spec)`` under its own torch seed."""
    init_seed, _ = stream_seeds(seed, stream_id, count=2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        return build_model(spec)


def coin_generator(seed: int, stream_id: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(stream_seeds(seed, stream_id, count=2)[1])


def _generator(seed: int, stream_id: int, *extra: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(stream_seeds(seed, stream_id, *extra)[0])


def _cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


class GaussianNoise:
    """Standard normal noise [K, size] for one step, row k drawn by model k's own generator (so
    values never depend on timing, threads or neighbours). On a CPU with more than one core,
    background threads draw the next step's rows into a second buffer while the current step
    computes: drawing is a fixed cost per parameter (about 4 ns a float) that would otherwise
    add to every DP step. Each generator still draws its steps in order, so the numbers are the
    same as drawn inline."""

    def __init__(self, generators: list[torch.Generator], size: int, device: torch.device):
        self.generators = generators
        workers = min(NOISE_WORKERS, len(generators)) if device.type == "cpu" and _cpu_count() > 1 else 0
        self.buffers = [torch.empty(len(generators), size, device=device) for _ in range(2 if workers else 1)]
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="dp-noise") if workers else None
        self._parts = np.array_split(np.arange(len(generators)), max(1, workers))
        self._pending: tuple[int, list] | None = None  # (buffer index, futures drawing into it)

    def _draw(self, buffer: Tensor, rows: np.ndarray) -> None:
        for k in rows:
            buffer[k].normal_(generator=self.generators[k])

    def _submit(self, index: int) -> None:
        self._pending = (index, [self._pool.submit(self._draw, self.buffers[index], part) for part in self._parts])

    def begin(self) -> None:
        """A step starts: make sure its noise is being drawn (in the background)."""
        if self._pool is not None and self._pending is None:
            self._submit(0)

    def take(self) -> Tensor:
        """This step's noise. The buffer is valid until the next call of ``take``."""
        if self._pool is None:
            self._draw(self.buffers[0], np.arange(len(self.generators)))
            return self.buffers[0]
        self.begin()
        index, futures = self._pending
        for future in futures:
            future.result()
        self._submit(1 - index)  # the next step's noise, while this step uses this buffer
        return self.buffers[index]

    def close(self) -> None:
        if self._pool is not None:
            for future in self._pending[1] if self._pending else []:
                future.result()
            self._pool.shutdown()
            self._pool = None
            self._pending = None

    def __del__(self):
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.shutdown(wait=False)


@dataclass(frozen=True, kw_only=True)
class PoissonBatch:
    x: Tensor       # float32 [K, B, *input_shape], padded rows hold example 0
    y: Tensor       # int64 [K, B]
    valid: Tensor   # bool [K, B]


# -- training ----------------------------------------------------------------------------------

class BatchedTrainer:
    """K copies of ``build_model(spec)`` trained together. ``step()`` draws the K Poisson batches
    and takes one DP-SGD (or SGD) step; ``step_on(batch)`` takes the step on a given batch.

    ``x_train``, ``y_train`` and ``masks`` hold real examples only (gradient canaries are given
    as ``canary_members`` [K, m_c] and never reach the network)."""

    def __init__(self, spec: TrainSpec, x_train: np.ndarray | Tensor, y_train: np.ndarray | Tensor,
                 masks: np.ndarray | Tensor, *, seed: int, noise_seed: int, stream_ids: np.ndarray | None = None,
                 canary_members: np.ndarray | None = None, device: str | torch.device = "cpu"):
        self.spec = spec
        self.device = resolve_device(device)
        retain_freed_memory()
        module = build_model(spec)
        problem = supports(module, spec.input_shape)
        if problem is not None:
            raise ValueError(f"the batched engine cannot train this model: {problem}")
        masks = np.asarray(masks, dtype=bool)
        self.K, self.n = masks.shape
        self.x_train = torch.as_tensor(np.asarray(x_train, dtype=np.float32)).reshape(-1, *spec.input_shape).to(self.device)
        self.y_train = torch.as_tensor(np.asarray(y_train, dtype=np.int64)).to(self.device)
        if self.x_train.shape[0] != self.n or self.y_train.shape[0] != self.n:
            raise ValueError(f"masks cover {self.n} examples, x_train has {self.x_train.shape[0]}, "
                             f"y_train {self.y_train.shape[0]}")
        self.masks = torch.as_tensor(masks).to(self.device)
        self.streams = (np.arange(self.K, dtype=np.int64) if stream_ids is None
                        else np.asarray(stream_ids, dtype=np.int64).reshape(-1))
        if self.streams.shape != (self.K,):
            raise ValueError(f"stream_ids must have shape ({self.K},), got {self.streams.shape}")
        self.module = module
        self._nets: dict[int, WideNet] = {}
        self.net = self._net(self.K)
        self.widest = WideNet(module, 1).trace(spec.input_shape)
        self.params = [p.to(self.device) for p in initial_params(spec, self.streams, seed)]
        # requires_grad=False, as Opacus: no gradient, no share of the clipping norm, no noise, no update
        self.trainable = [p.requires_grad for p in module.parameters()]
        self.coins = [coin_generator(seed, s, self.device) for s in self.streams]
        ebs = torch.tensor(expected_batch_sizes(masks, spec.sample_rate), dtype=torch.float32, device=self.device)
        self.inv_ebs = ebs.reciprocal()
        self.momentum_bufs = [torch.zeros_like(p) for p in self.params] if spec.momentum else None
        self.steps_done = 0
        self._uniform = torch.empty(self.K, self.n, device=self.device)
        self.noise = None
        if spec.dp is not None:
            size = sum(p[0].numel() for p, t in zip(self.params, self.trainable) if t)
            self.noise = GaussianNoise([_generator(noise_seed, s, device=self.device) for s in self.streams],
                                       size, self.device)
        self.canaries = None
        if spec.canaries:
            members = np.zeros((self.K, spec.canaries), bool) if canary_members is None else np.asarray(canary_members, bool)
            if members.shape != (self.K, spec.canaries):
                raise ValueError(f"canary_members must have shape ({self.K}, {spec.canaries}), got {members.shape}")
            self.canaries = GradientCanaries(spec, members, seed=seed, noise_seed=noise_seed, streams=self.streams,
                                             inv_ebs=self.inv_ebs, device=self.device)

    # -- sampling --
    def sample_batch(self) -> PoissonBatch:
        """Each model's Poisson batch: i in T_k included with probability q, padded to the largest."""
        for k, generator in enumerate(self.coins):
            torch.rand(self.n, generator=generator, out=self._uniform[k])
        draw = (self._uniform < self.spec.sample_rate).logical_and_(self.masks)
        counts = draw.sum(dim=1)
        # padded to a multiple of WIDTH_BLOCK rows: elementwise kernels treat a tensor's last partial
        # vector differently from full ones, and the width depends on the other models of the call
        width = -(-max(1, int(counts.max())) // WIDTH_BLOCK) * WIDTH_BLOCK
        rows, cols = draw.nonzero(as_tuple=True)  # row-major: each model's picks in order
        starts = counts.cumsum(0) - counts
        slots = rows * width + (torch.arange(rows.numel(), device=self.device) - starts[rows])
        index = torch.zeros(self.K * width, dtype=torch.long, device=self.device)
        index[slots] = cols
        x = self.x_train.index_select(0, index).view(self.K, width, *self.x_train.shape[1:])
        y = self.y_train.index_select(0, index).view(self.K, width)
        valid = torch.arange(width, device=self.device).unsqueeze(0) < counts.unsqueeze(1)
        return PoissonBatch(x=x, y=y, valid=valid)

    # -- one step --
    def _chunks(self, batch: PoissonBatch):
        """Groups of models that a step computes together, as (index, x, y, valid) with ``index``
        a slice or a tensor of model indices, each batch trimmed to the group's largest Poisson
        batch. When a step takes several groups, models are grouped by batch size, so that little
        of each group is padding: for Poisson batches of 56 rows on average, groups of 16 models
        in index order compute 22% more rows than there are examples, in size order 2%. A
        model's numbers do not depend on its group (tested), so the grouping changes only time."""
        B = batch.valid.shape[1]
        budget = CHUNK_FLOATS.get(self.device.type, CHUNK_FLOATS["cuda"])
        size = max(1, min(self.K, budget // max(1, B * self.widest)))
        counts = batch.valid.sum(dim=1).cpu()
        if size >= self.K:
            width = max(1, int(counts.max()))
            yield slice(0, self.K), batch.x[:, :width], batch.y[:, :width], batch.valid[:, :width]
            return
        order = torch.argsort(counts, stable=True)
        for start in range(0, self.K, size):
            members = order[start:start + size]
            width = max(1, int(counts[members].max()))
            index = members.to(self.device)
            yield (index, batch.x.index_select(0, index)[:, :width], batch.y.index_select(0, index)[:, :width],
                   batch.valid.index_select(0, index)[:, :width])

    def _net(self, K: int) -> WideNet:
        if K not in self._nets:
            self._nets[K] = WideNet(self.module, K)
        return self._nets[K]

    def gradients(self, batch: PoissonBatch) -> list[Tensor]:
        """The step's normalised gradient per parameter (clipped and noised for DP), before weight decay."""
        dp = self.spec.dp
        if dp is not None:
            self.noise.begin()
        grads = [torch.empty_like(p) for p in self.params]
        for index, x, y, valid in self._chunks(batch):
            params = [p[index] for p in self.params]
            net = self._net(len(x))
            if dp is None:
                part = sgd_gradients(net, params, x, y, valid.float() * self.inv_ebs[index].unsqueeze(1),
                                     self.trainable)
            else:
                part, _ = dp_gradients(net, params, x, y, valid, dp.max_grad_norm, self.trainable)
            for g, q in zip(grads, part, strict=True):
                g[index] = q
        if dp is None:
            return grads
        noise = self.noise.take()
        std = dp.noise_multiplier * dp.max_grad_norm
        offset = 0
        for g, t in zip(grads, self.trainable, strict=True):
            if not t:
                continue
            size = g[0].numel()
            z = noise[:, offset:offset + size].view_as(g)
            offset += size
            g.add_(z, alpha=std).mul_(self.inv_ebs.view(-1, *(1,) * (g.dim() - 1)))
        return grads

    @torch.no_grad()
    def apply(self, params: list[Tensor], grads: list[Tensor], bufs: list[Tensor] | None,
              trainable: list[bool] | None = None) -> None:
        """torch.optim.SGD's update (weight decay, momentum with dampening 0) in place; parameters
        that ``trainable`` marks frozen are left alone (SGD skips a parameter without a gradient)."""
        spec = self.spec
        for j, (p, g) in enumerate(zip(params, grads, strict=True)):
            if trainable is not None and not trainable[j]:
                continue
            if spec.weight_decay:
                g = g.add(p, alpha=spec.weight_decay)
            if bufs is not None:
                g = bufs[j].mul_(spec.momentum).add_(g)
            p.add_(g, alpha=-spec.lr)

    def step_on(self, batch: PoissonBatch) -> None:
        grads = self.gradients(batch)
        self.apply(self.params, grads, self.momentum_bufs, self.trainable)
        if self.canaries is not None:
            self.canaries.step(self)
        self.steps_done += 1

    def step(self) -> None:
        self.step_on(self.sample_batch())

    def train(self, steps: int, progress: Callable[[int], None] | None = None) -> None:
        """``steps`` steps; ``progress(model_steps_done)`` gets the running count of model-steps
        (K per step) now and then and at the end."""
        for s in range(steps):
            self.step()
            if progress is not None and ((s + 1) % PROGRESS_EVERY == 0 or s + 1 == steps):
                progress(self.steps_done * self.K)

    # -- outputs --
    @torch.no_grad()
    def predict(self, x: np.ndarray | Tensor, y: np.ndarray | Tensor) -> tuple[np.ndarray, np.ndarray]:
        """(correct bool [K, m], margin float16 [K, m]) of all K models, in blocks of models and
        rows whose largest activation stays within the step's budget."""
        x = torch.as_tensor(np.asarray(x, dtype=np.float32)).reshape(-1, *self.spec.input_shape)
        y = torch.as_tensor(np.asarray(y, dtype=np.int64))
        K, m = self.K, x.shape[0]
        budget = CHUNK_FLOATS.get(self.device.type, CHUNK_FLOATS["cuda"])
        group = max(1, min(K, budget // (EVAL_ROWS * self.widest)))
        rows = max(1, budget // (group * self.widest))
        correct = np.empty((K, m), dtype=bool)
        margin = np.empty((K, m), dtype=np.float16)
        for start in range(0, m, rows):
            xb = x[start:start + rows].to(self.device)
            yb = y[start:start + rows].to(self.device)
            for k0 in range(0, K, group):
                k1 = min(K, k0 + group)
                params = [p[k0:k1] for p in self.params]
                logits = self._net(k1 - k0).forward(params, xb.unsqueeze(0).expand(k1 - k0, *xb.shape))  # [k, B, C]
                label = yb.view(1, -1, 1).expand(k1 - k0, -1, 1)
                true_logit = logits.gather(2, label).squeeze(2)
                best_other = logits.scatter(2, label, -math.inf).amax(dim=2)
                correct[k0:k1, start:start + len(yb)] = (logits.argmax(dim=2) == label.squeeze(2)).cpu().numpy()
                margin[k0:k1, start:start + len(yb)] = (true_logit - best_other).to(torch.float16).cpu().numpy()
        return correct, margin

    def evaluate(self, evals: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        for name, (x, y) in evals.items():
            out[f"{name}_correct"], out[f"{name}_margin"] = self.predict(x, y)
        if self.canaries is not None:
            out["canary_score"] = self.canaries.theta.detach().cpu().numpy().astype(np.float32)
        return out

    def model_state(self, k: int) -> dict[str, Tensor]:
        """Model k as a state_dict of ``build_model(spec)``."""
        return export_params(self.spec, self.params, k)

    def close(self) -> None:
        """Stop the background noise threads (also done when the trainer is collected)."""
        if self.noise is not None:
            self.noise.close()


def export_params(spec: TrainSpec, params: list[Tensor], k: int) -> dict[str, Tensor]:
    """Model k of stacked parameters as a state_dict for ``build_model(spec)``."""
    names = [name for name, _ in build_model(spec).named_parameters()]
    return {name: p[k].detach().cpu().clone() for name, p in zip(names, params, strict=True)}


def import_params(spec: TrainSpec, state_dicts: list[Mapping[str, Tensor]]) -> list[Tensor]:
    """The converse of ``export_params``: stack the state_dicts of K models from build_model."""
    names = [name for name, _ in build_model(spec).named_parameters()]
    return [torch.stack([sd[name].detach() for sd in state_dicts]).float().contiguous() for name in names]


class GradientCanaries:
    """The canaries' parameters theta_c [K, m_c] and their DP-SGD steps (contract in models/spec.py).

    Canary j's per-example gradient is ``-s e_j`` (s = ``canary_grad_norm``), zero on the
    network, so its whole-gradient clip factor is ``min(1, C / (s + 1e-6))`` and a step's clipped
    sum is ``-s * factor`` on every sampled member canary. Coins and noise come from the canary
    streams; normalisation by the model's expected batch size of real examples."""

    def __init__(self, spec: TrainSpec, members: np.ndarray, *, seed: int, noise_seed: int, streams: np.ndarray,
                 inv_ebs: Tensor, device: torch.device):
        self.spec = spec
        self.members = torch.as_tensor(members).to(device)
        K, m = members.shape
        self.theta = torch.zeros(K, m, device=device)
        self.buf = torch.zeros(K, m, device=device) if spec.momentum else None
        self.coins = [_generator(seed, s, CANARY_STREAM, device=device) for s in streams]
        self.noise = ([_generator(noise_seed, s, CANARY_STREAM, device=device) for s in streams]
                      if spec.dp is not None else None)
        self.inv_ebs = inv_ebs
        self._uniform = torch.empty(K, m, device=device)

    def clipped_sum(self, sampled: Tensor) -> Tensor:
        """The clipped per-example gradient sum on theta_c of the sampled canaries [K, m_c]."""
        s = canary_grad_norm(self.spec)
        factor = 1.0 if self.spec.dp is None else min(1.0, self.spec.dp.max_grad_norm / (s + CLIP_EPS))
        return sampled.float() * (-s * factor)

    @torch.no_grad()
    def step(self, trainer: BatchedTrainer) -> None:
        for k, generator in enumerate(self.coins):
            torch.rand(self._uniform.shape[1], generator=generator, out=self._uniform[k])
        sampled = (self._uniform < self.spec.sample_rate).logical_and_(self.members)
        grad = self.clipped_sum(sampled)
        dp = self.spec.dp
        if dp is not None:
            z = torch.empty_like(self._uniform)
            for k, generator in enumerate(self.noise):
                z[k].normal_(generator=generator)
            grad.add_(z, alpha=dp.noise_multiplier * dp.max_grad_norm)
        grad.mul_(self.inv_ebs.unsqueeze(1))
        trainer.apply([self.theta], [grad], None if self.buf is None else [self.buf])


def trainer_class(spec: TrainSpec) -> type[BatchedTrainer]:
    """The hand-written MLP trainer for MLPs and logistic regression (faster on them), else the general one."""
    from dpmem.models.batched_mlp import MLPTrainer, is_mlp
    module = build_model(spec)
    # the fast path's fused update trains every parameter; a partly frozen MLP takes the general one
    return MLPTrainer if is_mlp(module) and all(p.requires_grad for p in module.parameters()) else BatchedTrainer


def train(spec: TrainSpec, req: TrainRequest, *, device: str | torch.device = "cpu",
          progress: Callable[[int], None] | None = None) -> dict[str, np.ndarray]:
    """Train the K models of ``req.masks`` for ``spec.steps`` steps; predict on ``req.evals``."""
    layout = canary_layout(spec, req)
    masks = np.asarray(req.masks, dtype=bool)
    trainer = trainer_class(spec)(spec, np.asarray(req.x_train)[layout.real], np.asarray(req.y_train)[layout.real],
                             masks[:, layout.real], seed=req.seed, noise_seed=req.noise_seed,
                             stream_ids=model_streams(req), canary_members=layout.members, device=device)
    # One model's batched products become single matrix products, which the BLAS splits across
    # threads in a way that changes their rounding; a lone model trains on one thread, so its arrays
    # equal those it gets as part of a larger unit (whose products split by model).
    threads = torch.get_num_threads()
    if trainer.K == 1:
        torch.set_num_threads(1)
    try:
        trainer.train(spec.steps, progress)
        return trainer.evaluate(req.evals)
    finally:
        trainer.close()
        torch.set_num_threads(threads)

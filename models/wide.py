"""The wide network: K copies of one ``nn.Sequential`` run as one module on stacked parameters.

The K copies' parameters are stacked, ``[K, *shape]`` per parameter:

- tensors with channels travel as ``[B, K*C, *spatial]``: a convolution is one grouped
  convolution (``groups = K * groups``), GroupNorm normalises ``K * groups`` groups, pooling
  and elementwise layers act on the wide tensor unchanged;
- vectors travel as ``[K, B, F]``: a Linear layer is one batched matmul (``baddbmm``);
  ``Flatten`` turns the first layout into the second.
Row b of model k is model k's b-th example of its own Poisson batch.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Layers without parameters that act on each channel (or each coordinate) alone: on the wide
# tensor they are the module itself. Pooling needs the channel layout; the others take any.
CHANNELWISE = (nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d,
               nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d)
ELEMENTWISE = (nn.ReLU, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Identity)


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
        if isinstance(layer.padding, str) and _numeric_padding(layer) is None:
            return f"{name} with padding={layer.padding!r} needs an even total padding per axis (odd kernel)"
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

def _numeric_padding(layer: nn.Conv1d | nn.Conv2d) -> tuple[int, ...] | None:
    """A convolution's padding as numbers: ``"valid"`` is 0; ``"same"`` (stride 1) is
    ``dilation * (kernel - 1) / 2`` per axis when that is a whole number (PyTorch pads an odd
    total unevenly, which one padding per axis cannot express: None)."""
    if not isinstance(layer.padding, str):
        return tuple(layer.padding)
    if layer.padding == "valid":
        return (0,) * len(layer.kernel_size)
    totals = [d * (k - 1) for d, k in zip(layer.dilation, layer.kernel_size, strict=True)]
    if any(t % 2 for t in totals):
        return None
    return tuple(t // 2 for t in totals)


def _out_of_place(layer: nn.Module) -> nn.Module:
    """An in-place activation would overwrite a layer output that the DP step differentiates
    against; the engine runs a copy that computes out of place. A convolution with
    ``padding="same"`` or ``"valid"`` runs as a copy with the same padding as numbers (which the
    grouped convolution and the per-example rules take)."""
    if getattr(layer, "inplace", False):
        activation: Any = copy.copy(layer)
        activation.inplace = False
        layer = activation
    if isinstance(layer, (nn.Conv1d, nn.Conv2d)) and isinstance(layer.padding, str):
        padding = _numeric_padding(layer)
        conv: Any = copy.copy(layer)
        conv.padding = padding
        layer = conv
    return layer


@dataclass
class Record:
    """What a parametrised layer leaves for the DP step: its input (for GroupNorm, its
    normalised input) and its output, whose gradient autograd returns."""
    layer: int
    saved: Tensor
    output: Tensor


@dataclass(frozen=True, kw_only=True)
class Footprint:
    """Floats per example and model of a wide network's pass: ``widest``, the largest single
    activation (what sizes evaluation blocks); ``kept``, what a DP step holds until its rules have
    run, every parametrised layer's saved input and output (what sizes a CPU step's groups)."""
    widest: int
    kept: int


def kept_floats(records: list[Record]) -> int:
    return sum(r.saved.numel() + r.output.numel() for r in records)


def _tiled_max_pool_window(layer: nn.Module) -> int | None:
    """The window of a 1-D max pool whose windows tile the sequence (kernel = stride, no padding
    or dilation): it runs as ``_TiledMaxPool1d``, elementwise maxima over the window's positions,
    with the same values and gradient (to the window's first maximum) as PyTorch's pooling kernel."""
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


class _TiledMaxPool1d(torch.autograd.Function):
    """The max over each window of k positions, as k - 1 elementwise maxima of strided views (a
    reduction over an innermost axis of 2 runs several times slower on the CPU), remembering each
    window's first maximum; the backward pass puts the gradient there, as ``max(dim=-1)``'s does.
    NaN propagates as in PyTorch's pooling; where a window holding a NaN sends its gradient may
    differ, which cannot matter: the loss is then NaN."""

    @staticmethod
    def forward(ctx, a: Tensor, k: int) -> Tensor:
        n = a.shape[-1] // k
        windows = a[..., :n * k].unflatten(-1, (n, k))
        out, index = windows[..., 0], None
        for j in range(1, k):
            candidate = windows[..., j]
            later = candidate > out
            out = torch.maximum(out, candidate)
            index = later.long() if index is None else index.masked_fill_(later, j)
        ctx.save_for_backward(index)
        ctx.shape, ctx.k = a.shape, k
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        (index,) = ctx.saved_tensors
        n, k = index.shape[-1], ctx.k
        windows = grad.new_zeros(*index.shape, k).scatter_(-1, index.unsqueeze(-1), grad.unsqueeze(-1)).flatten(-2)
        if n * k == ctx.shape[-1]:
            return windows, None
        full = grad.new_zeros(ctx.shape)   # positions after the last whole window get no gradient
        full[..., :n * k] = windows
        return full, None


def _tiled_max_pool1d(a: Tensor, k: int) -> Tensor:
    return _TiledMaxPool1d.apply(a, k)


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


def channels_to_vectors(a: Tensor, K: int) -> Tensor:
    """Flatten: [B, K*C, *spatial] -> [K, B, C * prod(spatial)]."""
    return a.reshape(a.shape[0], K, -1).transpose(0, 1)


def lowered(layer: nn.Module, device: torch.device) -> bool:
    """Whether a convolution runs lowered: its unfolded input times the K models' weights, one
    batched matmul. On the CPU, PyTorch's kernels run a grouped convolution with one input channel
    per group (the first layer of a net on grayscale images or 1-D signals) at about 5 GFLOP/s;
    lowered, the built-in CNN's first layer takes 0.8 ms per model at batch 64 instead of 2.4, and
    the DP step's per-example gradients reuse the unfolded input (samplers/conv.py). Convolutions
    with more input channels per group are faster as convolutions (3 channels: 0.6 ms against 2.6)."""
    return (device.type == "cpu" and isinstance(layer, (nn.Conv1d, nn.Conv2d))
            and layer.in_channels // layer.groups == 1)


def unfold(layer: nn.Conv1d | nn.Conv2d, a: Tensor, K: int) -> Tensor:
    """The input's patches [B, K * groups, d, T] (d = C_in / groups * kernel size in PyTorch's weight
    order, T output positions); a 1-D convolution is unfolded as a 2-D one of height 1."""
    one_d = isinstance(layer, nn.Conv1d)

    def as_2d(v, height_value):   # a 1-D setting as (height axis, length axis)
        return (height_value, v[0]) if one_d else tuple(v)
    image = a.unsqueeze(2) if one_d else a
    patches = F.unfold(image, as_2d(layer.kernel_size, 1), as_2d(layer.dilation, 1), as_2d(layer.padding, 0),
                       as_2d(layer.stride, 1))
    return patches.view(a.shape[0], K * layer.groups, -1, patches.shape[-1])


def _lowered_conv(layer: nn.Conv1d | nn.Conv2d, w: Tensor, b: Tensor | None, a: Tensor, K: int) -> tuple[Tensor, Tensor]:
    """(unfolded input, output) of a convolution computed as a batched matmul (``lowered``)."""
    u = unfold(layer, a, K)
    groups = K * layer.groups
    out = torch.matmul(w.reshape(groups, -1, u.shape[2]), u)   # [B, K * groups, C_out / groups, T]
    if b is not None:
        out = out.add_(b.reshape(groups, -1, 1))
    padding = cast(tuple[int, ...], layer.padding)   # numbers: the engine runs copies with numeric padding
    spatial = [(s + 2 * pad - dil * (k - 1) - 1) // stride + 1 for s, pad, dil, k, stride in
               zip(a.shape[2:], padding, layer.dilation, layer.kernel_size, layer.stride, strict=True)]
    return u, out.view(a.shape[0], -1, *spatial)


def parametrised_layer(layer: nn.Module, p: dict[str, Tensor], a: Tensor, vector: bool, K: int,
                       keep_normalised: bool) -> tuple[Tensor, Tensor]:
    """(saved, output) of a Linear, Conv1d, Conv2d or GroupNorm on the wide tensor ``a`` with the
    K models' parameters ``p`` (name -> [K, *shape]). ``saved`` is the layer's input, for a lowered
    convolution its unfolded input, for GroupNorm with ``keep_normalised`` its normalised input
    (what the DP rule needs)."""
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
        if lowered(layer, a.device):
            saved, out = _lowered_conv(layer, w, b, a, K)
        else:
            conv = F.conv1d if isinstance(layer, nn.Conv1d) else F.conv2d
            out = conv(a, w.reshape(-1, *w.shape[2:]), None if b is None else b.reshape(-1), layer.stride,
                       layer.padding, layer.dilation, K * layer.groups)
    elif isinstance(layer, nn.GroupNorm):
        if vector:
            raise ValueError("GroupNorm must act on channels, not on flattened vectors")
        if not keep_normalised:
            out = F.group_norm(a, K * layer.num_groups, p["weight"].reshape(-1), p["bias"].reshape(-1), layer.eps)
        else:  # the DP rule needs the normalised input: keep it instead of computing it twice
            saved = F.group_norm(a, K * layer.num_groups, eps=layer.eps)
            shape = (1, -1) + (1,) * (a.dim() - 2)
            out = torch.addcmul(p["bias"].reshape(shape), saved, p["weight"].reshape(shape))
    else:
        raise ValueError(f"layer {type(layer).__name__} is not supported by the batched engine")
    return saved, out


def channelwise_layer(layer: nn.Module, a: Tensor, cache: dict) -> Tensor:
    """A pooling layer on the wide channel tensor, through the faster equivalent forms where they apply."""
    window = _tiled_max_pool_window(layer)
    if window is not None and a.dim() == 3:
        return _tiled_max_pool1d(a, window)
    if isinstance(layer, nn.MaxPool2d) and a.device.type == "cpu" and a.dim() == 4:
        return _max_pool2d(layer, a)
    if isinstance(layer, (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)):
        return _adaptive_avg_pool(layer, a, cache)
    return layer(a)


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
            if p is not None:
                saved, out = parametrised_layer(layer, p, a, vector, K, records is not None)
            elif isinstance(layer, nn.Flatten):
                if not vector:
                    a = channels_to_vectors(a, K)
                    vector = True
                continue
            elif isinstance(layer, CHANNELWISE):
                if vector:
                    raise ValueError(f"{type(layer).__name__} must act on channels, not on flattened vectors")
                a = channelwise_layer(layer, a, self._matrices)
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

    def trace(self, input_shape: tuple[int, ...]) -> Footprint:
        """Run one example through K=1 copies with dummy parameters: its ``Footprint``."""
        if self.K != 1:
            raise ValueError("trace runs a single copy")
        params = [p.detach().unsqueeze(0) for layer in self.layers for p in layer.parameters(recurse=False)]
        x = torch.zeros(1, 1, *input_shape)
        widest = [math.prod(input_shape)]
        records: list[Record] = []
        with torch.no_grad():
            logits = self.forward(params, x, records)
        widest += [r.output.numel() for r in records]
        return Footprint(widest=max(widest + [logits.numel()]), kept=kept_floats(records))


def frozen_layers(param_slots: list[tuple[int, str]], trainable: list[bool] | None) -> dict[int, frozenset]:
    """layer index -> names of its frozen parameters, for a wide network's ``param_slots`` (layer,
    name) and ``trainable`` per parameter (None: all trainable)."""
    if trainable is None or all(trainable):
        return {}
    out: dict[int, set] = {}
    for (j, name), t in zip(param_slots, trainable, strict=True):
        if not t:
            out.setdefault(j, set()).add(name)
    return {j: frozenset(names) for j, names in out.items()}


"""The wide network of a module that is not a plain sequence: its ``torch.fx`` graph, run on the
K models' stacked parameters (residual networks, concatenations, functional activations).

``torch.fx.symbolic_trace`` turns the module's ``forward`` into a graph of leaf-module calls and
functions. The engine runs that graph on wide tensors, tracking each value's layout as wide.py
does for sequences: channels ``[B, K*C, *spatial]`` or vectors ``[K, B, F]``. A graph is accepted
when every parametrised leaf is a supported layer called exactly once (its per-example rule needs
one input and one output), every other leaf is a supported pooling, activation or ``Flatten``,
and every function acts on each example alone:

- addition, subtraction and multiplication of two values of one layout and shape (a residual
  add of two ``[B, K*C, H, W]`` tensors is the add of the K models), or of a value and a number;
  division by a number;
- concatenation on channels (``torch.cat(dim=1)``: per model, so the wide tensor is viewed as
  ``[B, K, C, *spatial]`` and joined on C) or on a vector's features;
- elementwise activations (``F.relu``, ``torch.sigmoid``, ``x.relu()``, ...; in-place ones run
  out of place), pooling functions, ``torch.flatten(x, 1)`` / ``x.flatten(1)`` /
  ``x.view(x.size(0), -1)``, and ``mean`` over spatial axes (over all of them a vector per example).

Anything else (reading a parameter directly, indexing, ``x.shape``, reductions over examples or
channels, a module called twice, buffers) is refused with the reason, and ``engine = "auto"``
then trains the module with Opacus. ``nn.Sequential`` modules keep the sequence path (``WideNet``).
"""
from __future__ import annotations

import math
import operator
from collections import Counter
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn

from dpmem.models.wide import (
    CHANNELWISE,
    ELEMENTWISE,
    Footprint,
    Record,
    WideNet,
    _layer_problem,
    _out_of_place,
    channels_to_vectors,
    channelwise_layer,
    kept_floats,
    parametrised_layer,
)
from dpmem.models.wide import supports as sequence_supports

PARAMETRISED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.GroupNorm)

# Functions that act on each coordinate alone: the same function on the wide tensor.
ELEMENTWISE_FUNCTIONS = {F.relu, torch.relu, F.relu6, F.leaky_relu, F.elu, F.gelu, F.silu, F.mish, F.hardtanh,
                         F.softplus, torch.sigmoid, F.sigmoid, torch.tanh, F.tanh, torch.nn.functional.hardswish}
ELEMENTWISE_METHODS = {"relu", "sigmoid", "tanh", "contiguous", "clone"}
# Pooling functions: act on each channel of each example, so on the wide channel tensor as is.
POOLING_FUNCTIONS = {F.max_pool1d, F.max_pool2d, F.avg_pool1d, F.avg_pool2d, F.adaptive_avg_pool1d,
                     F.adaptive_avg_pool2d, F.adaptive_max_pool1d, F.adaptive_max_pool2d}
ARITHMETIC = {operator.add: "add", torch.add: "add", operator.sub: "sub", torch.sub: "sub",
              operator.mul: "mul", torch.mul: "mul", operator.truediv: "div", torch.div: "div"}
ARITHMETIC_METHODS = {"add": "add", "sub": "sub", "mul": "mul", "div": "div"}

CHANNELS, VECTORS = "channels", "vectors"
# The value of ``x.size(0)``: the batch dimension, only for ``x.view(x.size(0), -1)``.
_BATCH = object()


class Wide:
    """A wide tensor and its layout."""
    __slots__ = ("t", "layout")

    def __init__(self, t: Tensor, layout: str):
        self.t, self.layout = t, layout


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _trace(module: nn.Module) -> torch.fx.GraphModule:
    try:
        return torch.fx.symbolic_trace(module)
    except Exception as e:  # noqa: BLE001 - any tracing failure is a reason to refuse, not an error
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"torch.fx cannot trace {type(module).__name__}: {first}") from None


def _node_problem(node: torch.fx.Node, modules: dict[str, nn.Module]) -> str | None:
    """Why the engine cannot run this node (None: it can), from the graph alone."""
    if node.op in ("placeholder", "output"):
        return None
    if node.op == "get_attr":
        return f"forward reads {node.target} directly (only supported layers may hold parameters)"
    if node.op == "call_module":
        layer = modules[str(node.target)]
        problem = _layer_problem(layer)
        return None if problem is None else f"{problem} (at {node.target})"
    if node.op == "call_function":
        target = node.target
        if (target in ELEMENTWISE_FUNCTIONS or target in POOLING_FUNCTIONS or target in ARITHMETIC
                or target in (torch.cat, torch.flatten, torch.mean)):
            return None
        return f"function {getattr(target, '__name__', target)} in forward is not supported by the batched engine"
    if node.op == "call_method":
        if node.target in ELEMENTWISE_METHODS or node.target in ARITHMETIC_METHODS or node.target in (
                "flatten", "mean", "view", "reshape", "size"):
            return None
        return f"method .{node.target}() in forward is not supported by the batched engine"
    return f"graph node {node.op} is not supported by the batched engine"


def graph_problem(module: nn.Module) -> str | None:
    """None when the module's traced graph has only what the engine runs; otherwise why not."""
    try:
        traced = _trace(module)
    except ValueError as e:
        return str(e)
    modules = dict(traced.named_modules())
    placeholders = [n for n in traced.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        return f"forward takes {len(placeholders)} inputs; the batched engine feeds one"
    for node in traced.graph.nodes:
        problem = _node_problem(node, modules)
        if problem is not None:
            return problem
    calls = Counter(n.target for n in traced.graph.nodes if n.op == "call_module")
    for name, layer in module.named_modules():
        if any(True for _ in layer.parameters(recurse=False)):
            if not isinstance(layer, PARAMETRISED):
                return f"layer {type(layer).__name__} ({name}) is not supported by the batched engine"
            if calls[name] != 1:
                return (f"{type(layer).__name__} {name} is called {calls[name]} times in forward; the batched "
                        "engine needs each parametrised layer called once")
    owned = sum(sum(1 for _ in m.parameters(recurse=False)) for _, m in module.named_modules())
    if owned != sum(1 for _ in module.parameters()):
        return "the module shares parameters between layers"
    if any(True for _ in module.buffers()):
        return "the module has buffers (running statistics are not per-example)"
    return None


class GraphNet:
    """K copies of a traced module run as one graph on wide tensors. Same interface as
    ``WideNet``: ``layers`` (the parametrised layers, in ``module.parameters()`` order of their
    parameters), ``param_slots``, ``forward(params, x, records)`` and ``trace``."""

    def __init__(self, module: nn.Module, K: int):
        traced = _trace(module)
        self.K = K
        self.nodes = list(traced.graph.nodes)
        self.modules = {name: _out_of_place(m) for name, m in module.named_modules()}
        self.layers: list[nn.Module] = []
        self.param_slots: list[tuple[int, str]] = []
        self._layer_index: dict[str, int] = {}
        for name, layer in module.named_modules():
            own = [p_name for p_name, _ in layer.named_parameters(recurse=False)]
            if own:
                self._layer_index[name] = len(self.layers)
                self.layers.append(self.modules[name])
                self.param_slots += [(self._layer_index[name], p_name) for p_name in own]
        self.param_layers = list(range(len(self.layers)))
        self._matrices: dict = {}
        self.widest = 0

    layer_params = WideNet.layer_params
    to_wide = staticmethod(WideNet.to_wide)

    def forward(self, params: list[Tensor], x: Tensor, records: list[Record] | None = None) -> Tensor:
        """Logits [K, B, classes] of per-model batches ``x`` [K, B, *input_shape] (see WideNet.forward)."""
        by_layer = self.layer_params(params)  # type: ignore[misc]  # WideNet's method, duck-typed
        env: dict[torch.fx.Node, object] = {}

        def value(arg):
            return torch.fx.node.map_arg(arg, lambda n: env[n])

        for node in self.nodes:
            if node.op == "placeholder":
                out = Wide(self.to_wide(x), VECTORS if x.dim() == 3 else CHANNELS)
            elif node.op == "output":
                result = value(node.args[0])
                if not isinstance(result, Wide) or result.layout != VECTORS or result.t.dim() != 3:
                    raise ValueError("the module must end in a vector of logits per example (e.g. Flatten + Linear)")
                return result.t
            elif node.op == "call_module":
                out = self._call_module(node, value(node.args[0]), by_layer, records)
            elif node.op == "call_function":
                out = self._call(node, node.target, value(node.args), value(node.kwargs))
            elif node.op == "call_method":
                out = self._call_method(node, value(node.args), value(node.kwargs))
            else:
                raise ValueError(_node_problem(node, self.modules) or f"graph node {node.op} is not supported")
            if isinstance(out, Wide):
                self.widest = max(self.widest, out.t.numel())
            env[node] = out
        raise ValueError("the traced graph has no output")

    # -- nodes --
    def _call_module(self, node, a, by_layer, records) -> Wide:
        layer = self.modules[node.target]
        if not isinstance(a, Wide) or len(node.args) != 1 or node.kwargs:
            raise ValueError(f"{node.target} must take one tensor")
        if node.target in self._layer_index:
            j = self._layer_index[node.target]
            saved, out = parametrised_layer(layer, by_layer[j], a.t, a.layout == VECTORS, self.K, records is not None)
            if records is not None:
                if not out.requires_grad:  # a layer that sees only the input: start the graph here
                    out.requires_grad_(True)
                records.append(Record(layer=j, saved=saved, output=out))
            return Wide(out, a.layout)
        if isinstance(layer, nn.Flatten):
            return self._flatten(a)
        if isinstance(layer, CHANNELWISE):
            return Wide(channelwise_layer(layer, self._channels(a, type(layer).__name__), self._matrices), CHANNELS)
        if isinstance(layer, ELEMENTWISE):
            return Wide(layer(a.t), a.layout)
        raise ValueError(f"layer {type(layer).__name__} is not supported by the batched engine")

    def _channels(self, a, what: str) -> Tensor:
        if not isinstance(a, Wide) or a.layout != CHANNELS:
            raise ValueError(f"{what} must act on channels, not on flattened vectors")
        return a.t

    def _flatten(self, a: Wide) -> Wide:
        return a if a.layout == VECTORS else Wide(channels_to_vectors(a.t, self.K), VECTORS)

    def _call(self, node, target, args, kwargs):
        name = getattr(target, "__name__", str(target))
        if target in ELEMENTWISE_FUNCTIONS:
            a = args[0]
            if not isinstance(a, Wide):
                raise ValueError(f"{name} must take a tensor")
            kwargs = {**kwargs, "inplace": False} if "inplace" in kwargs else kwargs
            if target in (F.relu, F.relu6, F.leaky_relu, F.elu, F.hardtanh, F.hardswish) and len(args) > 1:
                # inplace given by position (F.relu(x, True)): run out of place
                args = tuple(False if isinstance(v, bool) else v for v in args)
            return Wide(target(a.t, *args[1:], **kwargs), a.layout)
        if target in POOLING_FUNCTIONS:
            return Wide(target(self._channels(args[0], name), *args[1:], **kwargs), CHANNELS)
        if target in ARITHMETIC:
            return self._arithmetic(ARITHMETIC[target], args, kwargs, name)
        if target is torch.cat:
            return self._cat(*args, **kwargs)
        if target is torch.flatten:
            return self._flatten_call(args[0], *args[1:], **kwargs)
        if target is torch.mean:
            return self._mean(args[0], *args[1:], **kwargs)
        raise ValueError(_node_problem(node, self.modules) or f"function {name} is not supported")

    def _call_method(self, node, args, kwargs):
        method, a = node.target, args[0]
        if method == "size":
            if args[1:] == (0,) and not kwargs:
                return _BATCH
            raise ValueError("x.size() is supported only as x.size(0) in x.view(x.size(0), -1)")
        if not isinstance(a, Wide):
            raise ValueError(f".{method}() must be called on a tensor")
        if method in ELEMENTWISE_METHODS:
            if args[1:] or kwargs:
                raise ValueError(f".{method}() with arguments is not supported")
            return Wide(getattr(a.t, method)(), a.layout)
        if method in ARITHMETIC_METHODS:
            return self._arithmetic(ARITHMETIC_METHODS[method], args, kwargs, f".{method}()")
        if method == "flatten":
            return self._flatten_call(a, *args[1:], **kwargs)
        if method == "mean":
            return self._mean(a, *args[1:], **kwargs)
        if method in ("view", "reshape"):
            shape = args[1:] if len(args) > 2 or not isinstance(args[1:][0] if args[1:] else None, (tuple, list)) \
                else tuple(args[1])
            if tuple(shape) == (_BATCH, -1):
                return self._flatten(a)
            raise ValueError(f".{method}() is supported only as x.{method}(x.size(0), -1)")
        raise ValueError(_node_problem(node, self.modules) or f"method .{method}() is not supported")

    def _arithmetic(self, op: str, args, kwargs, name: str) -> Wide:
        if kwargs.get("alpha", 1) != 1 or set(kwargs) - {"alpha"} or len(args) != 2:
            raise ValueError(f"{name} is supported with two operands only")
        a, b = args
        fn: Any = {"add": torch.add, "sub": torch.sub, "mul": torch.mul, "div": torch.div}[op]
        if isinstance(a, Wide) and isinstance(b, Wide):
            if op == "div":
                raise ValueError("dividing two tensors is not supported by the batched engine")
            if a.layout != b.layout or a.t.shape != b.t.shape:
                raise ValueError(f"{name} of two tensors needs equal shapes per example and one layout "
                                 f"(got {a.layout} {tuple(a.t.shape)} and {b.layout} {tuple(b.t.shape)})")
            return Wide(fn(a.t, b.t), a.layout)
        if isinstance(a, Wide) and _number(b):
            return Wide(fn(a.t, b), a.layout)
        if isinstance(b, Wide) and _number(a) and op in ("add", "mul", "sub"):
            return Wide(fn(a, b.t), b.layout)
        raise ValueError(f"{name} needs tensors of the network or numbers")

    def _cat(self, tensors, dim: int = 1) -> Wide:
        if not tensors or not all(isinstance(t, Wide) for t in tensors):
            raise ValueError("torch.cat needs tensors of the network")
        layouts = {t.layout for t in tensors}
        if len(layouts) != 1:
            raise ValueError("torch.cat of channel tensors and flattened vectors")
        layout = layouts.pop()
        rank = tensors[0].t.dim()
        if layout == VECTORS:
            if dim not in (1, -1):
                raise ValueError("torch.cat of vectors is supported on their features (dim=1) only")
            return Wide(torch.cat([t.t for t in tensors], dim=2), VECTORS)
        if dim not in (1, 1 - rank):
            raise ValueError("torch.cat of channel tensors is supported on channels (dim=1) only")
        B, K = tensors[0].t.shape[0], self.K
        # per model: [B, K*C, *S] -> [B, K, C, *S], joined on C, back to [B, K*C', *S]
        parts = [t.t.reshape(B, K, -1, *t.t.shape[2:]) for t in tensors]
        if any(p.shape[3:] != parts[0].shape[3:] for p in parts):
            raise ValueError("torch.cat of channel tensors with different spatial sizes")
        joined = torch.cat(parts, dim=2)
        return Wide(joined.reshape(B, -1, *joined.shape[3:]), CHANNELS)

    def _flatten_call(self, a, start_dim: int = 0, end_dim: int = -1) -> Wide:
        if not isinstance(a, Wide) or start_dim != 1 or end_dim != -1:
            raise ValueError("flatten is supported as flatten(x, 1) (start_dim=1, end_dim=-1) only")
        return self._flatten(a)

    def _mean(self, a, dim=None, keepdim: bool = False, **kwargs) -> Wide:
        if not isinstance(a, Wide) or kwargs or dim is None:
            raise ValueError("mean is supported over spatial axes only (give dim)")
        rank = a.t.dim()
        if a.layout == VECTORS:
            raise ValueError("mean over a vector's features is not supported by the batched engine")
        dims = sorted({d % rank for d in ((dim,) if isinstance(dim, int) else tuple(dim))})
        if not dims or dims[0] < 2:
            raise ValueError("mean is supported over spatial axes only (not over examples or channels)")
        out = a.t.mean(dim=dims, keepdim=keepdim)
        if keepdim or len(dims) < rank - 2:
            return Wide(out, CHANNELS)
        return Wide(channels_to_vectors(out, self.K), VECTORS)

    def trace(self, input_shape: tuple[int, ...]) -> Footprint:
        """One example through K=1 copies with dummy parameters: its ``Footprint`` (see WideNet.trace)."""
        if self.K != 1:
            raise ValueError("trace runs a single copy")
        params = [p.detach().unsqueeze(0) for layer in self.layers for p in layer.parameters(recurse=False)]
        x = torch.zeros(1, 1, *input_shape)
        self.widest = math.prod(input_shape)
        records: list[Record] = []
        with torch.no_grad():
            self.forward(params, x, records)
        return Footprint(widest=self.widest, kept=kept_floats(records))


def wide_network(module: nn.Module, K: int) -> WideNet | GraphNet:
    """K copies of ``module`` as one wide network: the sequence path for ``nn.Sequential``, else its graph."""
    return WideNet(module, K) if isinstance(module, nn.Sequential) else GraphNet(module, K)


def supports(module: nn.Module, input_shape: tuple[int, ...] | None = None) -> str | None:
    """None when the engine can train K copies of ``module``; otherwise why not.

    ``nn.Sequential`` modules are checked layer by layer (wide.py); other modules through their
    ``torch.fx`` graph. With ``input_shape`` the network also runs on one example (layouts, shapes)."""
    if isinstance(module, nn.Sequential):
        return sequence_supports(module, input_shape)
    problem = graph_problem(module)
    if problem is None and input_shape is not None:
        try:
            GraphNet(module, 1).trace(input_shape)
        except (ValueError, RuntimeError) as e:
            return str(e).strip().splitlines()[0]
    return problem

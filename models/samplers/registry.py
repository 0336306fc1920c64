"""The per-layer rules of the DP step, registered by layer type as Opacus registers its grad samplers.

A rule is a class built from (layer, K, saved input, output gradient, copies=m, frozen=names) with
two methods:
``sq_norms()`` -> [K, B] per-example squared gradient norms of the layer's parameters, and
``clipped(factors)`` -> the clip-weighted sum over examples, one [K, *shape] tensor per parameter
(in ``named_parameters`` order). Frozen parameters (``requires_grad=False``) add nothing to the
norms, as in Opacus. A new rule is one module that calls ``register``.
"""
from __future__ import annotations

from torch import Tensor, nn

GRAD_SAMPLERS: dict[type, type] = {}


def register(*layer_types: type):
    """Class decorator: the rule for these layer types (and their subclasses)."""
    def add(rule: type) -> type:
        for layer_type in layer_types:
            GRAD_SAMPLERS[layer_type] = rule
        return rule
    return add


def sampler_for(layer: nn.Module, K: int, saved: Tensor, grad: Tensor, copies: int = 1,
                frozen: frozenset = frozenset()):
    """The layer's rule. With ``copies`` m > 1 the rows are m augmented copies per example
    (example-major): the rule's per-example gradient is the sum over the example's copies.
    ``frozen``: names of the layer's parameters with requires_grad=False (no share of the norm)."""
    for kind, sampler in GRAD_SAMPLERS.items():
        if isinstance(layer, kind):
            return sampler(layer, K, saved, grad, copies=copies, frozen=frozen)
    raise ValueError(f"no per-example rule for {type(layer).__name__}")


def sq_sum(t: Tensor, dims: tuple[int, ...]) -> Tensor:
    return t.square().sum(dim=dims)

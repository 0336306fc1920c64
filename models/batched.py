"""The many-model engine: K copies of one module trained in one step, as one wide module.

Any ``nn.Sequential`` (nested ones too) of supported layers trains here (wide.py), and any module
whose ``torch.fx`` graph has only supported layers and per-example functions (graph.py; ``supports``).
``ModelStack`` (stack.py) steps the K models; MLPs and logistic regression take the hand-written
``MLPStack`` (batched_mlp.py). The per-layer rules of the DP step live in samplers/, the noise in
noise.py, the gradient canaries in canaries.py, the per-model random streams in streams.py.

Randomness is per model (contract in ``models/spec.py``): model k is ``build_model(spec)``
under a seed from ``(seed, stream_id)``, its Poisson coins come from a generator seeded from the
same sequence, its noise from ``(noise_seed, stream_id)``. Each model's coins and noise are
drawn by its own generator, so its numbers do not depend on K or on its neighbours.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from dpmem.models.batched_mlp import MLPStack, is_mlp
from dpmem.models.graph import supports
from dpmem.models.nets import build_model
from dpmem.models.spec import TrainRequest, TrainSpec, canary_layout, model_streams
from dpmem.models.stack import ModelStack

__all__ = ["stack_class", "supports", "train"]


def stack_class(spec: TrainSpec) -> type[ModelStack]:
    """The hand-written MLP stack for MLPs and logistic regression (faster on them), else the general
    one (which alone augments data and freezes parameters)."""
    plain = spec.augment == "none" and spec.augment_multiplicity == 1
    module = build_model(spec)
    # the fast path's fused update trains every parameter; a partly frozen MLP takes the general one
    return MLPStack if plain and is_mlp(module) and all(p.requires_grad for p in module.parameters()) else ModelStack


def train(spec: TrainSpec, req: TrainRequest, *, device: str | torch.device = "cpu",
          progress: Callable[[int], None] | None = None) -> dict[str, np.ndarray]:
    """Train the K models of ``req.masks`` for ``spec.steps`` steps; predict on ``req.evals``."""
    layout = canary_layout(spec, req)
    masks = np.asarray(req.masks, dtype=bool)
    stack = stack_class(spec)(spec, np.asarray(req.x_train)[layout.real], np.asarray(req.y_train)[layout.real],
                             masks[:, layout.real], seed=req.seed, noise_seed=req.noise_seed,
                             stream_ids=model_streams(req), canary_members=layout.members, device=device)
    # One model's batched products become single matrix products, which the BLAS splits across
    # threads in a way that changes their rounding; a lone model trains on one thread, so its arrays
    # equal those it gets as part of a larger unit (whose products split by model).
    threads = torch.get_num_threads()
    if stack.K == 1:
        torch.set_num_threads(1)
    try:
        stack.train(spec.steps, progress)
        return stack.evaluate(req.evals)
    finally:
        stack.close()
        torch.set_num_threads(threads)

"""The contract between the benchmark and its training engines.

Both engines (the batched many-model engine and the per-model Opacus reference) take a
``TrainSpec`` and the same arrays, and return the same ``Outputs``; the pipeline never needs to
know which one ran.

Semantics shared by both engines (Opacus's, see DESIGN.md):
- Each model k trains on its own subset ``T_k = {i : masks[k, i]}``.
- Every step draws a Poisson batch: each i in T_k is included independently with probability
  ``sample_rate`` (variable batch sizes; an empty batch is a step with zero data gradient).
- The update is ``(sum of per-example gradients [clipped] + noise) / expected_batch_size`` with
  ``expected_batch_size = max(1, int(sample_rate * |T_k|))`` (Opacus rounds the same way) for
  private *and* non-private variants, so a
  paired comparison differs only by clipping and noise.
- DP-SGD clips each example's whole gradient (all layers together) to ``max_grad_norm`` with
  factor ``min(1, C / (||g_i|| + 1e-6))`` and adds Gaussian noise of std
  ``noise_multiplier * max_grad_norm`` to every coordinate of the summed gradient.
- Initialisation and batch sampling depend only on ``seed`` (not on the variant), so the
  non-private and DP models of one model index start identically and see identical batches;
  the DP noise depends on ``noise_seed``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True, kw_only=True)
class DPParams:
    noise_multiplier: float
    max_grad_norm: float


@dataclass(frozen=True, kw_only=True)
class TrainSpec:
    arch: str                         # a name in models.nets.ARCHITECTURES or "package.module:factory"
    input_shape: tuple[int, ...]      # (d,) for vectors, (C, H, W) for images
    n_classes: int
    hidden: tuple[int, ...] = (128,)  # MLP widths; CNN channel widths
    steps: int                        # optimisation steps per model
    sample_rate: float                # Poisson inclusion probability per step
    lr: float
    momentum: float = 0.0
    weight_decay: float = 0.0         # L2, torch.optim.SGD semantics (added to the noisy gradient)
    dp: DPParams | None = None        # None: non-private SGD
    trainer: str | None = None        # "package.module:fit": user code trains the models (models.trainer)


@dataclass(frozen=True, kw_only=True)
class Outputs:
    """Per-model predictions on one evaluation split, models in eval mode."""
    correct: np.ndarray   # bool [K, m]: argmax prediction equals the label
    margin: np.ndarray    # float16 [K, m]: true-label logit minus the largest other logit


@dataclass(frozen=True, kw_only=True)
class TrainRequest:
    """Everything a training call needs besides the spec."""
    x_train: np.ndarray                  # float32 [n, *input_shape]
    y_train: np.ndarray                  # int64 [n]
    masks: np.ndarray                    # bool [K, n]: the subsets of these K models
    seed: int                            # init + batch sampling (shared across variants)
    noise_seed: int                      # DP noise (differs per variant)
    evals: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    stream_ids: np.ndarray | None = None  # int64 [K]: global model indices (None: arange(K))
    groups: np.ndarray | None = None     # int [K]: models with equal ids share their initialisation and
    # their batch-sampling randomness (leave-one-out pairs: the model on S \ {i} sees the batches of its
    # partner on S minus i); None: every model is its own group
    # name -> (x, y): splits to predict on after training, e.g. {"train": ..., "test": ...}

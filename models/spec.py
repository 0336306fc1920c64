"""The contract between the benchmark and its training engines.

Both engines (the batched many-model engine and the per-model Opacus reference) take a
``TrainSpec`` and the same arrays, and return the same flat ``dict[str, np.ndarray]``
(``"{split}_correct"`` bool [K, m], ``"{split}_margin"`` float16 [K, m] for every split of
``TrainRequest.evals``, plus ``"canary_score"`` float32 [K, m_c] when the spec has gradient
canaries, plus the per-example training statistics of models/example_stats.py: ``"train_loss_sum"``
and ``"train_draws"``, and for DP ``"train_grad_norm_sum"`` and ``"train_clips"``, [K, n real
examples]); the pipeline never needs to know which one ran.

Semantics shared by every engine (Opacus's; models/README.md, "The semantics every engine shares"):
- Each model k trains on its own subset ``T_k = {i : masks[k, i]}``.
- Every step draws a Poisson batch: each i in T_k is included independently with probability
  ``sample_rate`` (variable batch sizes; an empty batch is a step with zero data gradient).
- The update is ``(sum of per-example gradients [clipped] + noise) / expected_batch_size`` with
  ``expected_batch_size = max(1, int(sample_rate * |T_k|))`` (Opacus rounds the same way; |T_k|
  counts real examples only) for private *and* non-private variants, so a paired comparison
  differs only by clipping and noise.
- DP-SGD clips each example's whole gradient (all layers together) to ``max_grad_norm`` with
  factor ``min(1, C / (||g_i|| + 1e-6))`` and adds Gaussian noise of std
  ``noise_multiplier * max_grad_norm`` to every coordinate of the summed gradient.
- A parameter with ``requires_grad=False`` is frozen, as in Opacus: no gradient, no share of the
  per-example norm that clipping uses, no noise, no update (weight decay and momentum included).
- Randomness is per model (``stream_seeds``): model k's initialisation and Poisson coins come
  only from ``SeedSequence([seed, stream_ids[k]])``, its DP noise only from
  ``SeedSequence([noise_seed, stream_ids[k]])``. A model's arrays therefore do not depend on
  which other models share its call, the non-private and DP variants of one model start
  identically and see identical batches, and models with equal stream ids (leave-one-out pairs)
  share initialisation, coins and noise.
- Gradient canaries (``TrainSpec.canaries`` > 0): scalar parameters ``theta_c`` [m_c] that the
  network never uses; canary j's per-example gradient is ``-canary_norm * C * e_j`` (C = 1 for
  the non-private variant), clipped, noised, normalised and updated like every other coordinate,
  with coins and noise from their own streams (``CANARY_STREAM``), so real examples train bit
  for bit as without canaries. ``canary_score[k, j]`` is model k's ``theta_c[j]`` after training.
- Augmentation (``TrainSpec.augment``, models/augment.py): every step each sampled example becomes
  ``augment_multiplicity`` randomly cropped and/or flipped copies, drawn from the model's own
  stream ``SeedSequence([seed, stream_id, AUGMENT_STREAM])``; the example's gradient is the mean
  of its copies' gradients, clipped as one (De et al. 2022). Sampling and accounting are unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# The third SeedSequence word of the gradient canaries' coin and noise streams.
CANARY_STREAM = 7
# The third SeedSequence word of each model's data-augmentation stream (models/augment.py).
AUGMENT_STREAM = 11
# Data augmentations (models/augment.py): random crop with zero padding, horizontal flip, both.
AUGMENTS = ("none", "crop", "flip", "crop-flip")
# Opacus's constant in the clip factor C / (norm + eps).
CLIP_EPS = 1e-6


@dataclass(frozen=True, kw_only=True)
class DPParams:
    noise_multiplier: float
    max_grad_norm: float


@dataclass(frozen=True, kw_only=True)
class TrainSpec:
    arch: str                         # a name in models.nets.ARCHITECTURES or "package.module:factory"
    input_shape: tuple[int, ...]      # (d,) for vectors, (C, L) for sequences, (C, H, W) for images
    n_classes: int
    hidden: tuple[int, ...] = (128,)  # MLP widths; CNN channel widths
    steps: int                        # optimisation steps per model
    sample_rate: float                # Poisson inclusion probability per step
    lr: float
    momentum: float = 0.0
    weight_decay: float = 0.0         # L2, torch.optim.SGD semantics (added to the noisy gradient)
    dp: DPParams | None = None        # None: non-private SGD
    trainer: str | None = None        # "package.module:fit": user code trains the models (models.trainer)
    canaries: int = 0                 # m_c gradient canaries (scalar parameters theta_c, see above)
    canary_norm: float = 1.0          # canary gradient norm, a multiple of max_grad_norm (of 1 without DP)
    augment: str = "none"             # "none" | "crop" | "flip" | "crop-flip" (models/augment.py)
    augment_multiplicity: int = 1     # augmented copies per example, gradients averaged before clipping


@dataclass(frozen=True, kw_only=True)
class TrainRequest:
    """Everything a training call needs besides the spec."""
    x_train: np.ndarray                  # float32 [n, *input_shape]
    y_train: np.ndarray                  # int64 [n]
    masks: np.ndarray                    # bool [K, n]: the subsets of these K models
    seed: int                            # init + batch sampling (shared across variants)
    noise_seed: int                      # DP noise (differs per variant)
    # name -> (x, y): splits to predict on after training, e.g. {"train": ..., "test": ...}
    evals: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    stream_ids: np.ndarray | None = None  # int64 [K]: each model's random stream; None: arange(K)
    canary: np.ndarray | None = None     # int64 [n]: -1 for a real example, j for gradient canary j


def stream_seeds(seed: int, stream_id: int, *extra: int, count: int = 1) -> list[int]:
    """``count`` torch seeds drawn from ``SeedSequence([seed, stream_id, *extra])``."""
    states = np.random.SeedSequence([int(seed), int(stream_id), *map(int, extra)]).generate_state(count, dtype=np.uint64)
    return [int(s) >> 1 for s in states]


def model_streams(req: TrainRequest) -> np.ndarray:
    """The stream id of each of the K models (int64 [K])."""
    K = np.asarray(req.masks).shape[0]
    if req.stream_ids is None:
        return np.arange(K, dtype=np.int64)
    ids = np.asarray(req.stream_ids, dtype=np.int64).reshape(-1)
    if ids.shape != (K,):
        raise ValueError(f"stream_ids must have shape ({K},), got {np.asarray(req.stream_ids).shape}")
    return ids


@dataclass(frozen=True, kw_only=True)
class CanaryLayout:
    """Where the gradient canaries sit in a request: real rows, and canary membership per model."""
    real: np.ndarray      # int64 [n_real]: the rows that are real examples
    members: np.ndarray   # bool [K, m_c]: canary j is in model k's subset


def canary_layout(spec: TrainSpec, req: TrainRequest) -> CanaryLayout:
    masks = np.asarray(req.masks, dtype=bool)
    n = masks.shape[1]
    if req.canary is None:
        if spec.canaries:
            raise ValueError(f"the spec has {spec.canaries} gradient canaries but the request marks none (canary=None)")
        return CanaryLayout(real=np.arange(n), members=np.zeros((masks.shape[0], 0), dtype=bool))
    canary = np.asarray(req.canary, dtype=np.int64).reshape(-1)
    if canary.shape != (n,):
        raise ValueError(f"canary must have shape ({n},), got {canary.shape}")
    if canary.max(initial=-1) >= spec.canaries or canary.min(initial=-1) < -1:
        raise ValueError(f"canary ids must be -1 or in [0, {spec.canaries}), got range "
                         f"[{canary.min()}, {canary.max()}]")
    rows = np.flatnonzero(canary >= 0)
    members = np.zeros((masks.shape[0], spec.canaries), dtype=bool)
    for row in rows:  # a canary listed on several rows is a member where any of them is
        members[:, canary[row]] |= masks[:, row]
    return CanaryLayout(real=np.flatnonzero(canary < 0), members=members)


def expected_batch_sizes(masks: np.ndarray, sample_rate: float) -> list[int]:
    """``max(1, int(q * |T_k|))`` per model, rounded as Opacus does."""
    sizes = np.asarray(masks).sum(axis=1)
    return [max(1, int(sample_rate * int(s))) for s in sizes]


def canary_grad_norm(spec: TrainSpec) -> float:
    """The norm of one canary's per-example gradient: canary_norm * C (C = 1 without DP)."""
    return spec.canary_norm * (spec.dp.max_grad_norm if spec.dp is not None else 1.0)

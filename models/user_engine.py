"""Training code that dpmem does not run itself: the trainer protocol (``trainer = "package.module:fit"``).

dpmem keeps the subsets, seeds, calibration, store, estimators, audit and reports; the user's
``fit`` trains one model. It is called once per model, with keyword arguments only::

    def fit(*, index, train_indices, x_train, y_train, evals, seed, noise_seed, params) -> Mapping:
        ...

- ``index`` (int): the model's index in its variant, 0 .. models-1.
- ``train_indices`` (int64 [|T_k|]): the model's training subset, rows of ``x_train`` / ``y_train``.
- ``x_train`` (float32 [n, *input_shape]), ``y_train`` (int64 [n]): the whole training set.
- ``evals``: split name -> (x, y) to predict on after training: ``"train"`` (the whole training
  set) and ``"test"``.
- ``seed``, ``noise_seed`` (ints): the model's initialisation/batch-sampling seed, shared by every
  variant, and its DP-noise seed, proper to the variant. Both derive from (run seed, model index)
  only, so a model's result does not depend on how the models are split into units.
- ``params`` (``TrainerParams``): what to train with, as dpmem calibrated it.

``fit`` returns, for every split in ``evals``, ``"{split}_correct"`` (bool [m]: the prediction is
the label) and ``"{split}_margin"`` (float [m]: true-label logit minus the largest other logit,
no NaN), with the model in eval mode. dpmem checks every return; a wrong key, shape, dtype, a NaN
margin, or an exception inside ``fit`` (``sys.exit()`` included) stops the run with one line naming
the model index. Units already stored stay stored: fix the trainer and rerun the same command to
resume. Margins beyond float16's range (infinite ones included) are stored as +-65504, and the
run says so in one line. The arrays ``fit`` gets are read-only copies of dpmem's.

Honest DP-SGD on the user's side means: Poisson sampling of ``train_indices`` at
``params.sample_rate`` for ``params.steps`` steps, per-example clipping to
``params.max_grad_norm`` and Gaussian noise ``params.noise_multiplier * params.max_grad_norm``
(for instance Opacus's ``PrivacyEngine.make_private`` with those values and
``poisson_sampling=True``). ``dpmem check`` then audits the claim.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
from torch import nn

from dpmem.privacy.errors import UsageError
from dpmem.models.plugins import load_callable, one_line
from dpmem.models.spec import TrainRequest, TrainSpec


@dataclass(frozen=True, kw_only=True)
class TrainerParams:
    """The training and DP-SGD parameters dpmem calibrated for one model (None: non-private)."""
    noise_multiplier: float | None   # Gaussian noise std as a multiple of max_grad_norm
    max_grad_norm: float | None      # per-example clipping norm
    sample_rate: float               # Poisson inclusion probability of each example per step
    steps: int                       # optimisation steps
    expected_batch_size: int         # max(1, int(sample_rate * len(train_indices))), Opacus's rounding
    lr: float
    momentum: float
    weight_decay: float

    @property
    def private(self) -> bool:
        return self.noise_multiplier is not None


def model_seeds(seed: int, noise_seed: int, stream_id: int) -> tuple[int, int]:
    """(seed, noise_seed) of one model: from (seed, stream id) and (noise seed, stream id) only."""
    def child(base: int) -> int:
        return int(np.random.SeedSequence([int(base), int(stream_id)]).generate_state(1)[0])
    return child(seed), child(noise_seed)


def supports(module: nn.Module) -> str | None:
    """User code trains what it likes; dpmem's module is not used."""
    return None


def train(spec: TrainSpec, req: TrainRequest, *, device: str = "cpu",
          progress: Callable[[int], None] | None = None) -> dict[str, np.ndarray]:
    """Call the user's ``fit`` (``spec.trainer``) once per model; stack and check what it returns."""
    if not spec.trainer:
        raise ValueError("the user engine needs spec.trainer = 'package.module:fit'")
    fit = load_callable(spec.trainer, "trainer")
    masks = np.asarray(req.masks, dtype=bool)
    K = masks.shape[0]
    stream_ids = np.arange(K) if req.stream_ids is None else np.asarray(req.stream_ids, dtype=np.int64)
    out = {f"{split}_{key}": np.empty((K, len(y)), dtype=dtype)
           for split, (_, y) in req.evals.items() for key, dtype in (("correct", bool), ("margin", np.float16))}
    for k in range(K):
        index = int(stream_ids[k])
        train_indices = read_only(np.flatnonzero(masks[k]).astype(np.int64))
        seed, noise_seed = model_seeds(req.seed, req.noise_seed, index)
        params = TrainerParams(
            noise_multiplier=None if spec.dp is None else spec.dp.noise_multiplier,
            max_grad_norm=None if spec.dp is None else spec.dp.max_grad_norm,
            sample_rate=spec.sample_rate, steps=spec.steps,
            expected_batch_size=max(1, int(spec.sample_rate * len(train_indices))),
            lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay)
        # Each fit gets its own read-only copies: a trainer that writes into its inputs (numpy raises;
        # through torch.as_tensor, which cannot see the flag, it changes this model's copy only)
        # never changes the data of later models.
        x_train, y_train = read_only(req.x_train), read_only(req.y_train)
        evals = {split: (read_only(x), read_only(y)) for split, (x, y) in req.evals.items()}
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
                result = fit(index=index, train_indices=train_indices, x_train=x_train, y_train=y_train,
                             evals=evals, seed=seed, noise_seed=noise_seed, params=params)
        except KeyboardInterrupt:
            raise
        except BaseException as e:  # noqa: BLE001 - sys.exit() in user code included: reported, not raised
            raise UsageError(f"trainer {spec.trainer} failed on model {index}: {one_line(e)}") from None
        for key, value in checked_result(result, req.evals, index=index, trainer=spec.trainer).items():
            out[key][k] = value
        if progress is not None:
            progress((k + 1) * spec.steps)
    return out


def read_only(array) -> np.ndarray:
    """A copy of ``array`` that cannot be written."""
    copy = np.array(array, copy=True)
    copy.setflags(write=False)
    return copy


def checked_result(result, evals: Mapping[str, tuple[np.ndarray, np.ndarray]], *, index: int,
                   trainer: str) -> dict[str, np.ndarray]:
    """The arrays of one ``fit`` return, or a UsageError naming the model index and the problem."""
    def fail(msg: str) -> UsageError:
        return UsageError(f"trainer {trainer} returned a bad result for model {index}: {msg}")

    if not isinstance(result, Mapping):
        raise fail(f"expected a mapping of arrays, got {type(result).__name__}")
    expected = {f"{split}_{key}" for split in evals for key in ("correct", "margin")}
    if set(result) != expected:
        missing, extra = sorted(expected - set(result)), sorted(set(result) - expected)
        raise fail(f"keys must be {sorted(expected)}" + (f"; missing {missing}" if missing else "")
                   + (f"; unexpected {extra}" if extra else ""))
    out = {}
    for split, (_, y) in evals.items():
        for key in ("correct", "margin"):
            name = f"{split}_{key}"
            value = np.asarray(result[name])
            if value.shape != (len(y),):
                raise fail(f"{name} has shape {value.shape}, expected ({len(y)},)")
            if key == "correct":
                if value.dtype != np.bool_:
                    raise fail(f"{name} has dtype {value.dtype}, expected bool")
            else:
                if not np.issubdtype(value.dtype, np.floating):
                    raise fail(f"{name} has dtype {value.dtype}, expected a float dtype")
                if np.isnan(value).any():
                    raise fail(f"{name} holds NaN")
                with np.errstate(over="ignore"):   # beyond float16: +-inf, clipped and reported when stored
                    value = value.astype(np.float16)
            out[name] = value
    return out

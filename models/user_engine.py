"""Training code that dpmem does not run itself: the trainer protocol (``trainer = "package.module:fit"``).

dpmem keeps the subsets, seeds, calibration, store, estimators, audit and reports; the user's
``fit`` trains one model. It is called once per model, with keyword arguments only::

    def fit(*, index, train_indices, x_train, y_train, evals, seed, noise_seed, params,
            canaries=None) -> Mapping:
        ...

- ``index`` (int): the model's index in its variant, 0 .. models-1.
- ``train_indices`` (int64 [|T_k|]): the model's training subset, rows of ``x_train`` / ``y_train``.
- ``x_train`` (float32 [n, *input_shape]), ``y_train`` (int64 [n]): the whole training set (real
  examples only; gradient canaries come as ids, below).
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
``params.max_grad_norm``, Gaussian noise ``params.noise_multiplier * params.max_grad_norm`` on
every coordinate of the clipped sum, and the noisy sum divided by ``params.expected_batch_size``
(for instance Opacus's ``PrivacyEngine.make_private`` with those values and
``poisson_sampling=True``). ``dpmem check`` then audits the claim.

Gradient canaries (``gradient_canaries = m``). ``fit`` then also receives ``canaries``, a
``TrainerCanaries``: ``ids`` (int64: the canaries in this model's subset, drawn by dpmem as
Bernoulli(q) from their own stream, the rows of ``canary_masks.npy``), ``count`` (m),
``grad_norm`` (s, the canary gradient norm: ``canary_norm`` times the claimed
``params.max_grad_norm``, times 1 without DP) and ``seed`` (for any randomness the trainer
spends on canaries, apart from the model's own streams). Without canaries ``fit`` is called
exactly as above, with no ``canaries`` argument.
- A canary j in 0 .. m-1 is an extra trainable scalar theta_c[j], initialised to 0, that the
  network never reads, and a training "example" whose per-example gradient is ``-s * e_j``: s on
  theta_c[j] alone, 0 on every other parameter. Every canary has its theta_c[j], member or not.
- Honest DP-SGD treats the member canaries (``ids``) as examples of the subset: each is
  Poisson-sampled at ``params.sample_rate`` like any example, its whole gradient is clipped to
  ``params.max_grad_norm``, the clipped gradients are summed with everything else's, the same
  Gaussian noise goes onto every theta_c[j] (members and non-members) as onto every other
  coordinate, and the update divides by ``params.expected_batch_size`` (which counts real
  examples only) with the same lr, momentum and weight decay.
- ``fit`` returns ``"canary_score"`` (float [m]): theta_c[j] after the last step, for every j.
  A missing, misshapen, non-float or non-finite ``canary_score`` stops the run like any bad
  return (one line naming the model, exit code 2, stored units kept).
- ``fit`` may also return ``"canary_update"`` (float [5]: rule, lr, momentum, weight decay, steps;
  privacy/parametric.py ``UPDATE_FIELDS``), the form of its update; ``dpmem.canaries`` records it
  (``kit.update()``). With rule 1 (torch.optim.SGD with those constant settings for that many
  steps) ``dpmem check`` adds the parametric bound; without it, or with rule 2 (another
  optimizer), check says in one line why the variant has none.
- The audit multiplies model k's scores by ``params.expected_batch_size`` (the 1/(expected batch
  size) every update carried) before its test, so the scores of all models share one scale.
``dpmem.canaries`` (models/canaries.py) does all of this inside a plain Opacus loop.

Per-example training statistics (optional; models/example_stats.py). ``fit`` may also return,
over the whole training set (float or int [n], zero outside ``train_indices``):
``"train_loss_sum"`` (each example's cross-entropy summed over the steps that sampled it) and
``"train_draws"`` (how many steps sampled it), and under DP ``"train_grad_norm_sum"`` (its
pre-clip gradient norm summed over those steps) and ``"train_clips"`` (how many of them clipped
it). ``ExampleStats(1, n, dp=params.private)`` adds them up: ``add_rows(0, rows, losses, norms,
params.max_grad_norm)`` after each step's backward pass (the rows of ``x_train`` in the batch, the
``reduction="none"`` losses, under DP the per-example norms, e.g. ``dpmem.canaries``' Opacus
loop's ``optimizer.grad_samples``), then ``**stats.model(0)`` in the return. The keys come as a
set (the loss and draws; with DP also the norms and clips) from every model of a run or from none:
``dpmem proxies`` then names what is missing instead of showing a zero column.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
from torch import nn

from dpmem.models.example_stats import STAT_DTYPES, stat_arrays
from dpmem.models.plugins import load_callable, one_line
from dpmem.models.spec import CANARY_STREAM, TrainRequest, TrainSpec, canary_grad_norm, canary_layout
from dpmem.privacy.errors import UsageError
from dpmem.privacy.parametric import RULE_SGD, RULES, UPDATE_FIELDS


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


@dataclass(frozen=True, kw_only=True)
class TrainerCanaries:
    """The gradient canaries of one model (see the module docstring)."""
    ids: np.ndarray      # int64 [members]: the canaries in this model's subset, ascending
    count: int           # m: canaries per model, members or not (canary_score has this length)
    grad_norm: float     # s: the norm of a canary's per-example gradient -s * e_j
    seed: int            # for randomness the trainer spends on canaries


def model_seeds(seed: int, noise_seed: int, stream_id: int, *extra: int) -> tuple[int, int]:
    """(seed, noise_seed) of one model: from (seed, stream id) and (noise seed, stream id) only
    (``extra`` words give further streams of the same model, e.g. its canaries')."""
    def child(base: int) -> int:
        return int(np.random.SeedSequence([int(base), int(stream_id), *map(int, extra)]).generate_state(1)[0])
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
    layout = canary_layout(spec, req)
    masks = np.asarray(req.masks, dtype=bool)
    K = masks.shape[0]
    # gradient canaries are placeholder rows of the request: fit sees real rows only, canaries by id
    x_train, y_train = req.x_train, req.y_train
    if len(layout.real) < masks.shape[1]:
        x_train, y_train = np.asarray(x_train)[layout.real], np.asarray(y_train)[layout.real]
    stream_ids = np.arange(K) if req.stream_ids is None else np.asarray(req.stream_ids, dtype=np.int64)
    out = {f"{split}_{key}": np.empty((K, len(y)), dtype=dtype)
           for split, (_, y) in req.evals.items() for key, dtype in (("correct", bool), ("margin", np.float16))}
    if spec.canaries:
        out["canary_score"] = np.empty((K, spec.canaries), dtype=np.float32)
        out["canary_update"] = np.zeros((K, len(UPDATE_FIELDS)), dtype=np.float64)   # rule 0: not reported
    for k in range(K):
        index = int(stream_ids[k])
        train_indices = read_only(np.flatnonzero(masks[k, layout.real]).astype(np.int64))
        seed, noise_seed = model_seeds(req.seed, req.noise_seed, index)
        params = TrainerParams(
            noise_multiplier=None if spec.dp is None else spec.dp.noise_multiplier,
            max_grad_norm=None if spec.dp is None else spec.dp.max_grad_norm,
            sample_rate=spec.sample_rate, steps=spec.steps,
            expected_batch_size=max(1, int(spec.sample_rate * len(train_indices))),
            lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay)
        extra = {}
        if spec.canaries:
            extra["canaries"] = TrainerCanaries(
                ids=read_only(np.flatnonzero(layout.members[k]).astype(np.int64)), count=spec.canaries,
                grad_norm=canary_grad_norm(spec), seed=model_seeds(req.seed, req.noise_seed, index, CANARY_STREAM)[0])
        # Each fit gets its own read-only copies: a trainer that writes into its inputs (numpy raises;
        # through torch.as_tensor, which cannot see the flag, it changes this model's copy only)
        # never changes the data of later models.
        x_fit, y_fit = read_only(x_train), read_only(y_train)
        evals = {split: (read_only(x), read_only(y)) for split, (x, y) in req.evals.items()}
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
                result = fit(index=index, train_indices=train_indices, x_train=x_fit, y_train=y_fit,
                             evals=evals, seed=seed, noise_seed=noise_seed, params=params, **extra)
        except KeyboardInterrupt:
            raise
        except BaseException as e:  # noqa: BLE001 - sys.exit() in user code included: reported, not raised
            raise UsageError(f"trainer {spec.trainer} failed on model {index}: {one_line(e)}") from None
        checked = checked_result(result, req.evals, index=index, trainer=spec.trainer, canaries=spec.canaries,
                                 n_train=len(layout.real), dp=spec.dp is not None)
        stats = [key for key in stat_arrays(spec.dp is not None) if key in checked]
        if k == 0:
            for key in stats:
                out[key] = np.zeros((K, len(layout.real)), dtype=STAT_DTYPES[key])
        elif (stats and stats[0] not in out) or (not stats and "train_loss_sum" in out):
            which = (f"model {index} but not the models before it" if stats
                     else f"earlier models but not model {index}")
            raise UsageError(f"trainer {spec.trainer} returned per-example statistics for {which}; return them "
                             "from every model or from none")
        for key, value in checked.items():
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
                   trainer: str, canaries: int = 0, n_train: int | None = None, dp: bool = False) -> dict[str, np.ndarray]:
    """The arrays of one ``fit`` return, or a UsageError naming the model index and the problem."""
    def fail(msg: str) -> UsageError:
        return UsageError(f"trainer {trainer} returned a bad result for model {index}: {msg}")

    if not isinstance(result, Mapping):
        raise fail(f"expected a mapping of arrays, got {type(result).__name__}")
    expected = {f"{split}_{key}" for split in evals for key in ("correct", "margin")}
    if canaries:
        expected.add("canary_score")
    optional = ({"canary_update"} if canaries else set()) | set(stat_arrays(dp))
    if not expected <= set(result) <= expected | optional:
        missing, extra = sorted(expected - set(result)), sorted(set(result) - expected - optional)
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
    if canaries:
        value = np.asarray(result["canary_score"])
        if value.shape != (canaries,):
            raise fail(f"canary_score has shape {value.shape}, expected ({canaries},)")
        if not np.issubdtype(value.dtype, np.floating):
            raise fail(f"canary_score has dtype {value.dtype}, expected a float dtype")
        if not np.isfinite(value).all():
            raise fail("canary_score holds NaN or inf")
        out["canary_score"] = value.astype(np.float32)
    if "canary_update" in result:
        value = np.asarray(result["canary_update"])
        if value.shape != (len(UPDATE_FIELDS),) or not np.issubdtype(value.dtype, np.number):
            raise fail(f"canary_update has shape {value.shape} and dtype {value.dtype}, expected {len(UPDATE_FIELDS)} "
                       f"numbers ({', '.join(UPDATE_FIELDS)})")
        value = value.astype(np.float64)
        if not np.isfinite(value).all() or int(value[0]) != value[0] or int(value[0]) not in RULES:
            raise fail(f"canary_update's rule must be one of {sorted(RULES)} and every field finite, got {value.tolist()}")
        if value[0] == RULE_SGD and not (value[1] > 0 and value[2] >= 0 and value[3] >= 0 and value[4] >= 1
                                         and int(value[4]) == value[4]):
            raise fail(f"canary_update {value.tolist()}: SGD needs lr > 0, momentum >= 0, weight decay >= 0 and a "
                       "whole number of steps >= 1")
        out["canary_update"] = value
    out |= _checked_stats(result, n_train, dp, fail)
    return out


def _checked_stats(result: Mapping, n_train: int | None, dp: bool, fail: Callable[[str], UsageError]) -> dict:
    """The optional per-example statistics of a ``fit`` return: all of them or none (module docstring)."""
    wanted = stat_arrays(dp)
    given = [key for key in wanted if key in result]
    if not given:
        return {}
    if len(given) < len(wanted):
        raise fail(f"per-example statistics come together: got {given}, missing {sorted(set(wanted) - set(given))}")
    out = {}
    for key in wanted:
        value = np.asarray(result[key])
        if n_train is not None and value.shape != (n_train,):
            raise fail(f"{key} has shape {value.shape}, expected ({n_train},)")
        if not np.issubdtype(value.dtype, np.number) or not np.isfinite(value).all() or (value < 0).any():
            raise fail(f"{key} must hold finite numbers >= 0")
        if key in ("train_draws", "train_clips") and (value != np.round(value)).any():
            raise fail(f"{key} must hold whole numbers")
        out[key] = value.astype(STAT_DTYPES[key])
    if (out["train_loss_sum"][out["train_draws"] == 0] != 0).any():
        raise fail("train_loss_sum is nonzero for an example that train_draws says was never sampled")
    if dp and (out["train_clips"] > out["train_draws"]).any():
        raise fail("train_clips exceeds train_draws for some example")
    return out

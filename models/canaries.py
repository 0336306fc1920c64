"""Gradient canaries inside your own PyTorch / Opacus training loop (``from dpmem import canaries``).

dpmem's canary audit (privacy/canary_audit.py) needs, per model, the final value of one extra
trainable scalar theta_c[j] per canary j, trained by the very DP-SGD step that trains the model.
This module adds them to a user's model and data so that the user's own ``PrivacyEngine``
samples, clips, noises and normalises them; it computes no clipping or noise itself.

- ``CanaryModel(module, count)`` holds the user's module and theta_c as ``nn.Linear(count, 1)``
  (no bias, initialised to 0). ``model(x)`` returns the module's logits unchanged;
  ``model(x, ids)`` also returns, for every row, theta_c . selector(row), where the selector of
  canary row j is the unit vector e_j and that of a real row (id -1) is 0. Opacus computes the
  per-example gradients (or, in ghost clipping, the per-example norms) of a Linear layer itself,
  so it clips and noises theta_c like any other weight (tests: grad_sample_mode "hooks" and
  "ghost").
- ``CanaryLoss(criterion, grad_norm)`` is the per-row loss: the criterion's loss on a real row,
  ``-grad_norm * theta_c[j]`` on canary row j. A canary row's per-example gradient is therefore
  exactly ``-grad_norm * e_j`` on theta_c and 0 on the network (its logits are not in the loss);
  a real row's is exactly its gradient without canaries and 0 on theta_c (its selector is 0).
  Reductions follow Opacus's ``loss_reduction``: "mean" divides by the number of rows the module
  saw (the batch, canary rows included), which Opacus multiplies back before clipping; "none"
  is what the ghost-clipping criterion wrapper asks for. Without DP (no GradSampleModule) "mean"
  averages the real rows over the real rows, as the criterion alone would, and the canary rows
  over the expected batch size.
- ``Canaries(canaries, params)`` ties them to one ``fit`` call of the trainer protocol
  (models/user_engine.py): ``model``, ``dataset`` (appends one row per member canary: zero input,
  label 0, id j; real rows get id -1), ``loss``, ``attach`` (the DP optimizer divides by
  ``params.expected_batch_size``, the real examples' expected batch, as without canaries; it
  also records the update form and counts the optimizer's steps), ``scores`` (theta_c, float32
  [count]) and ``update`` (the form, float64 [5], for the parametric bound). With
  ``canaries=None`` every method leaves the training as it was (rows get id -1, no theta_c).

The update form. The parametric bound (privacy/parametric.py) needs the linear response of a
canary coordinate to its gradients, which torch.optim.SGD with constant lr, momentum and weight
decay (dampening 0, no nesterov) has. ``attach`` reads these from the optimizer that Opacus's DP
optimizer wraps, and a step hook counts the steps that really updated the parameters and checks
that the settings never change (a scheduler would change lr). Any other optimizer, or a change,
is recorded as "other", and ``dpmem check`` then says in one line why the variant has no
parametric bound; the rigorous audits still run.

The canary rows go through the user's data loader and the user's network (with a zero input),
so whatever the loop does to examples (sampling, clipping, noise, normalisation) it does to the
canaries. Real examples keep their per-example gradients and their normalisation; their batches
are drawn by the same sampler as the canary rows, so a run is not step-for-step the run without
canaries.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from dpmem.privacy.parametric import RULE_OTHER, RULE_SGD, UPDATE_FIELDS

if TYPE_CHECKING:
    from dpmem.models.user_engine import TrainerCanaries, TrainerParams

__all__ = ["CanaryLoss", "CanaryModel", "CanaryOutput", "CanaryRows", "Canaries", "with_canary_rows"]


class CanaryOutput(NamedTuple):
    """What ``CanaryModel(x, ids)`` returns: the network's logits, theta_c per row, the row ids."""
    logits: Tensor   # [B, ...] the user's module on x (canary rows: on a zero input)
    theta: Tensor    # [B] theta_c[j] on canary row j, 0 on real rows
    ids: Tensor      # int64 [B]: j on canary row j, -1 on real rows


class CanaryModel(nn.Module):
    """The user's module plus theta_c, an ``nn.Linear(count, 1, bias=False)`` initialised to 0."""

    def __init__(self, module: nn.Module, count: int):
        super().__init__()
        self.module = module
        self.count = int(count)
        self.canary_theta = None
        if self.count:
            self.canary_theta = nn.Linear(self.count, 1, bias=False)
            nn.init.zeros_(self.canary_theta.weight)

    def forward(self, x: Tensor, ids: Tensor | None = None):
        logits = self.module(x)
        if ids is None or self.canary_theta is None:
            return logits
        ids = ids.reshape(-1).long()
        canary = ids >= 0
        # a real row's selector is all zero, so theta_c gets exactly no gradient from it
        selector = nn.functional.one_hot(ids.clamp(min=0), self.count).to(logits.dtype) * canary.unsqueeze(1)
        return CanaryOutput(logits, self.canary_theta(selector).squeeze(1), ids)

    def scores(self) -> np.ndarray:
        """theta_c after training (float32 [count])."""
        if self.canary_theta is None:
            return np.zeros(0, dtype=np.float32)
        return self.canary_theta.weight.detach().reshape(-1).cpu().numpy().astype(np.float32)


class CanaryLoss(nn.Module):
    """The criterion on real rows and ``-grad_norm * theta_c[j]`` on canary row j (see the module docstring).

    ``criterion`` is a torch loss module with a ``reduction`` attribute (e.g. ``nn.CrossEntropyLoss()``);
    this loss takes over its reduction, so Opacus's ghost-clipping wrapper can set it to "none".
    ``private``: the model trains under Opacus (which rescales a "mean" loss by the rows it saw);
    ``expected_batch_size`` normalises the canary rows without DP."""

    def __init__(self, criterion: nn.Module, grad_norm: float, *, private: bool = True,
                 expected_batch_size: int = 1):
        super().__init__()
        if not hasattr(criterion, "reduction"):
            raise TypeError("criterion must be a torch loss module with a 'reduction' attribute, "
                            f"got {type(criterion).__name__}")
        if not grad_norm > 0:
            raise ValueError(f"grad_norm must be > 0, got {grad_norm}")
        self.criterion = criterion
        self.reduction: str = str(criterion.reduction)
        self.grad_norm = float(grad_norm)
        self.private = private
        self.expected_batch_size = max(1, int(expected_batch_size))

    def _criterion(self, logits: Tensor, target: Tensor, reduction: str) -> Tensor:
        criterion: Any = self.criterion   # a torch loss module: its reduction is a plain attribute
        saved = criterion.reduction
        criterion.reduction = reduction
        try:
            return self.criterion(logits, target)
        finally:
            criterion.reduction = saved

    def forward(self, output, target: Tensor) -> Tensor:
        if not isinstance(output, CanaryOutput):
            return self._criterion(output, target, self.reduction)
        per_row = self._criterion(output.logits, target, "none")
        if per_row.shape != output.ids.shape:
            raise ValueError(f"the criterion must give one loss per row with reduction='none'; got shape "
                             f"{tuple(per_row.shape)} for {len(output.ids)} rows")
        canary = output.ids >= 0
        # where() passes no gradient to the branch it does not pick: a canary row's logits and a
        # real row's theta term get exactly zero
        per_row = torch.where(canary, -self.grad_norm * output.theta, per_row)
        if self.reduction == "none":
            return per_row
        if self.reduction == "sum":
            return per_row.sum()
        if self.reduction != "mean":
            raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {self.reduction!r}")
        if self.private:
            # Opacus multiplies the gradient of a "mean" loss by the rows the module saw, then clips
            return per_row.sum() / len(per_row)
        real = ~canary
        return (per_row[real].sum() / max(1, int(real.sum())) + per_row[canary].sum() / self.expected_batch_size)


class CanaryRows(TensorDataset):
    """A TensorDataset of (x, y, canary id) that fetches a batch of rows with one index per tensor
    (torch's ``__getitems__``), so thousands of canary rows per batch cost no Python loop per row."""

    def __getitems__(self, indices):
        index = torch.as_tensor(indices, dtype=torch.int64)
        return list(zip(*(t[index].unbind(0) for t in self.tensors)))


def with_canary_rows(dataset: TensorDataset, ids) -> TensorDataset:
    """``dataset`` (a TensorDataset of (x, y)) with one row per canary id appended and an id column.

    Canary rows have a zero input and label 0 (the loss never reads either); real rows get id -1."""
    if not isinstance(dataset, TensorDataset) or len(dataset.tensors) != 2:
        raise TypeError("with_canary_rows takes a TensorDataset of (inputs, labels)")
    x, y = dataset.tensors
    ids = torch.as_tensor(np.asarray(ids, dtype=np.int64).reshape(-1))
    m = len(ids)
    return CanaryRows(torch.cat([x, x.new_zeros((m, *x.shape[1:]))]),
                      torch.cat([y, y.new_zeros((m, *y.shape[1:]))]),
                      torch.cat([torch.full((len(x),), -1, dtype=torch.int64), ids]))


class Canaries:
    """The gradient canaries of one ``fit`` call (``canaries`` None: no canaries, training unchanged)."""

    def __init__(self, canaries: TrainerCanaries | None, params: TrainerParams):
        self.params = params
        self.count = 0 if canaries is None else int(canaries.count)
        self.ids = np.zeros(0, np.int64) if canaries is None else np.asarray(canaries.ids, dtype=np.int64).reshape(-1)
        if self.ids.size and (self.ids.min() < 0 or self.ids.max() >= self.count):
            raise ValueError(f"canary ids must lie in [0, {self.count}), got [{self.ids.min()}, {self.ids.max()}]")
        self.grad_norm = 1.0 if canaries is None else float(canaries.grad_norm)
        self._model: CanaryModel | None = None
        self._update = np.zeros(len(UPDATE_FIELDS), dtype=np.float64)    # rule "not reported" until attach

    def model(self, module: nn.Module) -> CanaryModel:
        """The user's module with theta_c; call it as ``model(x, ids)`` in training, ``model(x)`` otherwise."""
        self._model = CanaryModel(module, self.count)
        return self._model

    def dataset(self, dataset: TensorDataset) -> TensorDataset:
        """The model's training rows plus one row per member canary, with an id column."""
        return with_canary_rows(dataset, self.ids)

    def loss(self, criterion: nn.Module | None = None) -> CanaryLoss:
        """``criterion`` (default ``nn.CrossEntropyLoss()``) with the canary rows' loss added."""
        return CanaryLoss(nn.CrossEntropyLoss() if criterion is None else criterion, self.grad_norm,
                          private=self.params.private, expected_batch_size=self.params.expected_batch_size)

    def attach(self, optimizer) -> None:
        """Make the DP optimizer divide by ``params.expected_batch_size``, the real examples' expected batch.

        ``make_private`` derives it from the dataset's length, which the canary rows inflate; the
        protocol's normalisation counts real examples only, so real examples step as without
        canaries and every model's scores share one known scale."""
        if not hasattr(optimizer, "expected_batch_size"):
            raise TypeError(f"attach takes the optimizer make_private returned, got {type(optimizer).__name__}")
        optimizer.expected_batch_size = self.params.expected_batch_size
        inner = getattr(optimizer, "original_optimizer", optimizer)
        settings = _sgd_settings(inner)
        self._update[:] = 0.0
        if settings is None:
            self._update[0] = RULE_OTHER
            return
        self._update[:4] = (RULE_SGD, *settings)
        update = self._update

        def count_step(opt, args, kwargs) -> None:
            # Opacus calls the wrapped optimizer's step only for a real (noisy) update
            update[4] += 1
            if _sgd_settings(opt) != settings:
                update[0] = RULE_OTHER

        inner.register_step_post_hook(count_step)

    def update(self) -> np.ndarray:
        """The update form, float64 [5]: rule (0 not reported, 1 torch.optim.SGD, 2 another optimizer
        or changed settings), lr, momentum, weight decay, steps taken: the ``canary_update`` fit returns."""
        return self._update.copy()

    def scores(self) -> np.ndarray:
        """theta_c after training, float32 [count]: the ``canary_score`` fit returns."""
        if self._model is None:
            raise RuntimeError("Canaries.model(...) was never called: there is no theta_c to read")
        return self._model.scores()


def _sgd_settings(optimizer) -> tuple[float, float, float] | None:
    """(lr, momentum, weight_decay) of a plain torch.optim.SGD whose parameter groups all share them
    (dampening 0, no nesterov, not maximising); None for anything else."""
    if type(optimizer) is not torch.optim.SGD or not optimizer.param_groups:
        return None
    settings = set()
    for group in optimizer.param_groups:
        if group.get("dampening", 0) != 0 or group.get("nesterov") or group.get("maximize"):
            return None
        settings.add((float(group["lr"]), float(group["momentum"]), float(group["weight_decay"])))
    return settings.pop() if len(settings) == 1 else None

"""Per-example training statistics that a training step already has, summed over the steps that
sampled each example: the memorization proxies' raw material (bench/estimators/proxies.py).

For every model k and training example i (rows of the request's real examples, the ``"train"``
split), over the steps whose Poisson batch held i:

- ``train_loss_sum`` (float32 [K, n]): the sum of i's cross-entropy at the step's pre-update
  parameters (the loss the step differentiates; with augmentation multiplicity, the mean over
  i's copies) - the cumulative sample loss (CSL);
- ``train_draws`` (int32 [K, n]): how many steps sampled i (0 outside T_k);

and, for DP-SGD only, where the step computes every per-example gradient norm to clip it:

- ``train_grad_norm_sum`` (float32 [K, n]): the sum of i's pre-clip gradient norm ||g_i||
  (the cumulative sample gradient, CSG);
- ``train_clips`` (int32 [K, n]): how many of those steps clipped i (clip factor below 1).

Non-private training records the loss and the draws only: it never forms per-example gradients,
and recording must not make it. Sums accumulate in float64 in step order and are stored as
float32, so a plain loop that adds the same per-step float32 values in the same order gets the
same numbers bit for bit.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from dpmem.models.spec import CLIP_EPS

# The arrays every engine returns, and those only DP variants have.
STAT_ARRAYS = ("train_loss_sum", "train_draws")
DP_STAT_ARRAYS = ("train_grad_norm_sum", "train_clips")
STAT_DTYPES = {"train_loss_sum": np.float32, "train_draws": np.int32,
               "train_grad_norm_sum": np.float32, "train_clips": np.int32}


def stat_arrays(dp: bool) -> tuple[str, ...]:
    """The statistics a variant records: the loss and draws, plus the gradient norms under DP."""
    return STAT_ARRAYS + (DP_STAT_ARRAYS if dp else ())


def clipped(norms: Tensor, max_grad_norm: float) -> Tensor:
    """Opacus's clip factor min(1, C / (||g|| + 1e-6)) is below 1 (the same arithmetic as the factor)."""
    return (max_grad_norm / (norms + CLIP_EPS)) < 1.0


class ExampleStats:
    """The K x n running sums of one training call (see the module docstring)."""

    def __init__(self, K: int, n: int, *, dp: bool, device: torch.device | str = "cpu"):
        self.K, self.n, self.dp = K, n, dp
        zeros = lambda dtype: torch.zeros(K, n, dtype=dtype, device=device)   # noqa: E731
        self.loss_sum = zeros(torch.float64)
        self.draws = zeros(torch.int32)
        self.grad_norm_sum = zeros(torch.float64) if dp else None
        self.clips = zeros(torch.int32) if dp else None

    def add(self, models: slice | Tensor, index: Tensor, valid: Tensor, loss: Tensor,
            norms: Tensor | None = None, max_grad_norm: float | None = None) -> None:
        """One step of the models ``models`` (a slice or model indices, k of them): ``index`` int64
        [k, B] the examples in each batch row, ``valid`` bool [k, B] (padding rows False), ``loss``
        [k, B] per-example losses; under DP ``norms`` [k, B] pre-clip gradient norms and the clip norm.

        Padding rows add zero (to whichever example they repeat), so no index is chosen twice with
        a value; an example is in a model's batch at most once per step."""
        with torch.no_grad():
            zero = torch.zeros((), dtype=torch.float64, device=index.device)
            add = self._adder(models, index)
            add(self.loss_sum, torch.where(valid, loss.detach().double(), zero))
            add(self.draws, valid.to(torch.int32))
            if self.dp:
                assert norms is not None and max_grad_norm is not None, "a DP step records its gradient norms"
                assert self.grad_norm_sum is not None and self.clips is not None
                add(self.grad_norm_sum, torch.where(valid, norms.double(), zero))
                add(self.clips, (clipped(norms, max_grad_norm) & valid).to(torch.int32))

    def _adder(self, models: slice | Tensor, index: Tensor):
        """total[models][k, index[k, b]] += values[k, b]: a scatter along the rows of a slice (a view;
        5x faster than indexing both axes), else both axes indexed."""
        if isinstance(models, slice):
            return lambda total, values: total[models].scatter_add_(1, index, values)
        rows = torch.arange(self.K, device=index.device)[models].view(-1, 1).expand_as(index)
        return lambda total, values: total.index_put_((rows, index), values, accumulate=True)

    def add_rows(self, k: int, index: Tensor, loss: Tensor, norms: Tensor | None = None,
                 max_grad_norm: float | None = None) -> None:
        """One step of model k alone, its batch as example indices (no padding)."""
        valid = torch.ones(1, len(index), dtype=torch.bool, device=index.device)
        self.add(slice(k, k + 1), index.view(1, -1), valid, loss.view(1, -1),
                 None if norms is None else norms.view(1, -1), max_grad_norm)

    def model(self, k: int) -> dict[str, np.ndarray]:
        """Model k's arrays ([n] each): what a user's ``fit`` returns (models/user_engine.py)."""
        return {key: value[k] for key, value in self.arrays().items()}

    def arrays(self) -> dict[str, np.ndarray]:
        out = {"train_loss_sum": self.loss_sum, "train_draws": self.draws}
        if self.dp:
            assert self.grad_norm_sum is not None and self.clips is not None
            out |= {"train_grad_norm_sum": self.grad_norm_sum, "train_clips": self.clips}
        return {key: value.cpu().numpy().astype(STAT_DTYPES[key]) for key, value in out.items()}

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
and recording must not make it. Sums accumulate in float32 in step order, so a plain loop that
adds the same per-step float32 values in the same order gets the same numbers bit for bit. (A
float64 accumulator costs twice the memory traffic: its scatter into a cache-cold [K, n] array
took 2x as long, 3% of a small MLP's step; float32 rounds a sum of N losses by about
sqrt(N) * 6e-8 of it, far below what ranks examples.)
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


def clipped_by(norms: Tensor, max_grad_norm: float) -> Tensor:
    """Opacus's clip factor min(1, C / (||g|| + 1e-6)) is below 1 (the same arithmetic as the factor)."""
    return (max_grad_norm / (norms + CLIP_EPS)) < 1.0


# On a CPU, a step's values wait for this many steps and go in with one scatter per array: the
# [K, n] sums are cold in cache after a step's large products, and one scatter per step cost about
# 2% of a small MLP's step, several steps at once a quarter of that. A scatter walks each row's
# columns in order, so every sum still adds its values in step order (the same float32 result as a
# scatter per step). On a GPU, whose scatter adds by atomics in no fixed order, every step goes in
# at once (each example at most once per call, so the order cannot matter).
PENDING_STEPS = {"cpu": 16}


class ExampleStats:
    """The K x n running sums of one training call (see the module docstring)."""

    def __init__(self, K: int, n: int, *, dp: bool, device: torch.device | str = "cpu"):
        self.K, self.n, self.dp = K, n, dp
        self.device = torch.device(device)
        zeros = lambda dtype: torch.zeros(K, n, dtype=dtype, device=self.device)   # noqa: E731
        self.loss_sum = zeros(torch.float32)
        self.draws = zeros(torch.int32)
        self.grad_norm_sum = zeros(torch.float32) if dp else None
        self.clips = zeros(torch.int32) if dp else None
        # steps of all K models not yet added: (index [K, B], values per sum [K, B])
        self._pending: list[tuple[Tensor, dict[str, Tensor]]] = []
        self._pending_steps = PENDING_STEPS.get(self.device.type, 1)

    def _sums(self) -> dict[str, Tensor]:
        out = {"train_loss_sum": self.loss_sum, "train_draws": self.draws}
        if self.dp:
            assert self.grad_norm_sum is not None and self.clips is not None
            out |= {"train_grad_norm_sum": self.grad_norm_sum, "train_clips": self.clips}
        return out

    def add_draws(self, drawn: Tensor) -> None:
        """One step's Poisson draws of all K models, bool [K, n]: a dense add, cheaper than scattering
        the batch rows (the sampling already makes several passes over [K, n] per step)."""
        self.draws.add_(drawn)

    def add(self, models: slice, index: Tensor, valid: Tensor, loss: Tensor,
            norms: Tensor | None = None, max_grad_norm: float | None = None, *, clipped: Tensor | None = None,
            draws: bool = True) -> None:
        """One step of the models ``models`` (a slice of the K, k of them): ``index`` int64
        [k, B] the examples in each batch row, ``valid`` bool [k, B] (padding rows False), ``loss``
        [k, B] per-example losses; under DP ``norms`` [k, B] pre-clip gradient norms and the clip norm.
        ``clipped`` (bool [k, B]), if the step has it, replaces the clip test on ``norms``;
        ``draws=False``: the step's draws were counted by ``add_draws``.

        Padding rows add zero (to whichever example they repeat); an example is in a model's batch
        at most once per step."""
        with torch.no_grad():
            zero = torch.zeros((), dtype=torch.float32, device=index.device)
            values = {"train_loss_sum": torch.where(valid, loss.detach().float(), zero)}
            if draws:
                values["train_draws"] = valid.to(torch.int32)
            if self.dp:
                assert norms is not None, "a DP step records its gradient norms"
                if clipped is None:
                    assert max_grad_norm is not None, "the clip test needs the clip norm"
                    clipped = clipped_by(norms, max_grad_norm)
                values["train_grad_norm_sum"] = torch.where(valid, norms.detach().float(), zero)
                values["train_clips"] = (clipped & valid).to(torch.int32)
            if models.indices(self.K) == (0, self.K, 1):
                if self._pending and set(self._pending[-1][1]) != set(values):
                    self._flush()
                self._pending.append((index, values))
                if len(self._pending) >= self._pending_steps:
                    self._flush()
                return
            self._flush()
            sums = self._sums()
            for key, value in values.items():   # the rows of a slice are a view: one scatter each
                sums[key][models].scatter_add_(1, index, value)

    def _flush(self) -> None:
        """The pending steps, one scatter per sum: columns in step order."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        index = pending[0][0] if len(pending) == 1 else torch.cat([i for i, _ in pending], dim=1)
        sums = self._sums()
        for key in pending[0][1]:
            parts = [v[key] for _, v in pending]
            sums[key].scatter_add_(1, index, parts[0] if len(parts) == 1 else torch.cat(parts, dim=1))

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
        self._flush()
        return {key: value.cpu().numpy().astype(STAT_DTYPES[key]) for key, value in self._sums().items()}

"""Feldman & Zhang's subset-sampling estimators of memorization and influence.

Model k was trained on T_k = {i : masks[k, i]}. For example i the "in" models are those with
i in T_k and the "out" models the rest; every estimate is a difference of two means normalised by
the in and out counts (never by K), with its binomial standard error.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from dpmem.privacy.audit import per_example_counts


@dataclass(frozen=True, kw_only=True)
class Memorization:
    k_in: np.ndarray    # int [n]: in-models that classify i correctly
    n_in: np.ndarray    # int [n]: models trained with i
    k_out: np.ndarray
    n_out: np.ndarray

    @property
    def p_in(self) -> np.ndarray:
        return _ratio(self.k_in, self.n_in)

    @property
    def p_out(self) -> np.ndarray:
        return _ratio(self.k_out, self.n_out)

    @property
    def mem(self) -> np.ndarray:
        return self.p_in - self.p_out

    @property
    def se(self) -> np.ndarray:
        p_in, p_out = self.p_in, self.p_out
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.sqrt(p_in * (1 - p_in) / self.n_in + p_out * (1 - p_out) / self.n_out)

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame({"p_in": self.p_in, "p_out": self.p_out, "n_in": self.n_in,
                             "n_out": self.n_out, "mem": self.mem, "mem_se": self.se})


def _ratio(k: np.ndarray, n: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(n > 0, k / np.maximum(n, 1), np.nan)


def indicator(array, name: str) -> np.ndarray:
    """``array`` as a bool array, accepting bool or integer 0/1 only; a ValueError naming ``name``
    otherwise. Casting floats to bool would read a probability of 0.3 (and NaN) as True."""
    a = np.asarray(array)
    if a.dtype == np.bool_:
        return a
    if np.issubdtype(a.dtype, np.integer):
        if a.size and (a.min() < 0 or a.max() > 1):
            raise ValueError(f"{name} must hold only 0 and 1 (or be bool), found values in [{a.min()}, {a.max()}]")
        return a.astype(bool)
    what = f"dtype {a.dtype}"
    if np.issubdtype(a.dtype, np.floating) and np.isnan(a).any():
        what += " with NaN"
    raise ValueError(f"{name} must be a bool (or 0/1 integer) array, got {what}; threshold scores or "
                     f"probabilities yourself (e.g. {name} = probs > 0.5)")


def checked_pair(masks, outcomes, name: str, *, same_n: bool) -> tuple[np.ndarray, np.ndarray]:
    """(masks [K, n], outcomes [K, m]) as bool arrays with matching model counts (and m = n with
    ``same_n``), or a ValueError naming the argument."""
    masks, outcomes = indicator(masks, "masks"), indicator(outcomes, name)
    if masks.ndim != 2 or masks.shape[0] < 1 or masks.shape[1] < 1:
        raise ValueError(f"masks must be [K models, n examples] with K, n >= 1, got shape {masks.shape}")
    if outcomes.ndim != 2 or outcomes.shape[0] != masks.shape[0]:
        raise ValueError(f"{name} must be [K, ...] with the K = {masks.shape[0]} models of masks, "
                         f"got shape {outcomes.shape}")
    if same_n and outcomes.shape != masks.shape:
        raise ValueError(f"{name} must have the shape of masks {masks.shape}, got {outcomes.shape}")
    return masks, outcomes


def comparable(masks: np.ndarray) -> np.ndarray:
    """bool [n]: examples with at least one in-model and one out-model (the others cannot be estimated)."""
    n_in = masks.sum(axis=0)
    return (n_in > 0) & (n_in < masks.shape[0])


def memorization(masks: np.ndarray, correct: np.ndarray) -> Memorization:
    """mem(i) = mean over in-models of correct[k, i] minus the mean over out-models."""
    return Memorization(**per_example_counts(*checked_pair(masks, correct, "correct", same_n=True)))


def influence_blocks(masks: np.ndarray, correct_test: np.ndarray, *, block: int = 1024):
    """Yield (train_indices, infl[b, m]) blocks of infl(i, j) = P(correct_j | i in) - P(correct_j | i out).

    Two matrix products per block (masks^T @ correct / n_in minus the complement), so the n x m matrix
    never has to be held at once.
    """
    masks, correct_test = checked_pair(masks, correct_test, "correct_test", same_n=False)
    m = masks.astype(np.float32)
    c = correct_test.astype(np.float32)
    total = c.sum(0)                                   # [m]
    n_in = m.sum(0)
    n_out = m.shape[0] - n_in
    for start in range(0, m.shape[1], block):
        stop = min(start + block, m.shape[1])
        hits_in = m[:, start:stop].T @ c               # [b, m]
        with np.errstate(divide="ignore", invalid="ignore"):
            infl = hits_in / n_in[start:stop, None] - (total[None, :] - hits_in) / n_out[start:stop, None]
        yield np.arange(start, stop), infl


def influence(masks: np.ndarray, correct_test: np.ndarray) -> np.ndarray:
    """The full influence matrix [n, m]; use influence_blocks when it would not fit in memory."""
    return np.concatenate([b for _, b in influence_blocks(masks, correct_test)], axis=0)


def max_influence_per_test(masks: np.ndarray, correct_test: np.ndarray, *, block: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """For every test example: the largest influence any training example has on it, and which one."""
    best: Any = None
    arg: Any = None
    for idx, infl in influence_blocks(masks, correct_test, block=block):
        b_arg = np.nanargmax(np.nan_to_num(infl, nan=-np.inf), axis=0)
        b_best = infl[b_arg, np.arange(infl.shape[1])]
        if best is None:
            best, arg = b_best, idx[b_arg]
        else:
            better = b_best > best
            best = np.where(better, b_best, best)
            arg = np.where(better, idx[b_arg], arg)
    return best, arg

"""The random training subsets: model k trains on T_k = {i : masks[k, i]} (bench/README.md, "What a run does").

- ``bernoulli``: every entry independently with probability q. Given i in T_k or not, the rest of
  T_k has the same distribution, so "in" and "out" models are add/remove neighbours.
- ``fixed``: every row has exactly m = round(q n) ones, a uniform subset (Feldman & Zhang). "In" and
  "out" models then differ by a replacement: the DP bound must use replace-one adjacency.
- ``balanced``: every column has exactly round(q K) ones, a uniform set of models per example
  (LiRA-style): the same number of in and out models for every example, hence lower variance.
  Columns are independent of each other, so the adjacency is still add/remove.

Masks depend only on (sampling, models, n, q, seed), through their own random stream.
"""
from __future__ import annotations

import numpy as np

from dpmem.privacy.audit import SAMPLINGS
from dpmem.privacy.errors import ConfigError

_MASK_STREAM = 101   # distinct from the data's streams (bench/data.py) under the same seed
CANARY_MASK_STREAM = 102   # the gradient canaries' memberships


def make_masks(*, sampling: str, models: int, n: int, q: float, seed: int, stream: int = _MASK_STREAM) -> np.ndarray:
    """bool [models, n]. Raises ConfigError where some example could have no "in" or no "out" model."""
    if sampling not in SAMPLINGS:
        raise ConfigError("sampling", f"unknown sampling {sampling!r}; choose from {', '.join(SAMPLINGS)}")
    if not 0.0 < q < 1.0:
        raise ConfigError("q", f"must be in (0, 1), got {q}")
    if models < 1 or n < 0:
        raise ValueError(f"need models >= 1 and n >= 0, got models={models}, n={n}")
    rng = np.random.default_rng(np.random.SeedSequence([seed % 2**63, stream]))
    if sampling == "bernoulli":
        return rng.random((models, n)) < q
    if sampling == "fixed":
        m = int(round(q * n))
        if n and not 0 < m < n:
            raise ConfigError("q", f"fixed sampling keeps round(q*n) = {m} of n = {n} examples per model; "
                                   "every example needs models with and without it")
        return _exact_row_sums(rng, models, n, m)
    per_example = int(round(q * models))
    if not 0 < per_example < models:
        raise ConfigError("models", f"balanced sampling puts each example in round(q*models) = {per_example} "
                                    f"of {models} models; every example needs models with and without it")
    return _exact_row_sums(rng, n, models, per_example).T.copy()


def _exact_row_sums(rng: np.random.Generator, rows: int, cols: int, ones: int) -> np.ndarray:
    """Each row a uniformly random subset of exactly ``ones`` columns (smallest i.i.d. uniform keys)."""
    mask = np.zeros((rows, cols), dtype=bool)
    if ones == 0 or rows == 0:
        return mask
    keys = rng.random((rows, cols))
    chosen = np.argpartition(keys, ones - 1, axis=1)[:, :ones]
    np.put_along_axis(mask, chosen, True, axis=1)
    return mask


def subset_sizes(masks: np.ndarray) -> np.ndarray:
    """int64 [K]: |T_k| for every model."""
    return masks.sum(axis=1, dtype=np.int64)

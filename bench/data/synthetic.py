"""Feldman's models: the ``synthetic`` Gaussian mixture and the discrete ``feldman`` model, both with
exactly known subgroup probabilities."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dpmem.bench.config import Config

import numpy as np

from dpmem.bench.data.longtail import (
    DEFAULT_N_TEST_SYNTHETIC,
    DEFAULT_N_TRAIN,
    SYNTHETIC_CLASSES,
    SYNTHETIC_NOISE_PER_UNIT,
    flip_labels,
    label_noise,
    rng_for,
    standardise,
    zipf_probabilities,
    zipf_ranks,
)
from dpmem.bench.data.registry import Dataset, dataset


@dataset("synthetic")
def _synthetic(cfg: Config) -> Dataset:
    n_groups, dim = cfg.n_subgroups, cfg.dim
    mix = rng_for(cfg.seed, "synthetic_mixture")
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
    x_tr, g_tr = draw(n_train, rng_for(cfg.seed, "synthetic_train"))
    x_te, g_te = draw(n_test, rng_for(cfg.seed, "synthetic_test"))
    canary_rng = rng_for(cfg.seed, "canaries")
    x_can, g_can = draw(cfg.canaries, canary_rng)       # fresh draws: in neither split
    y_can = flip_labels(subgroup_label[g_can], SYNTHETIC_CLASSES, canary_rng)
    y_tr, noisy = label_noise(subgroup_label[g_tr], cfg, SYNTHETIC_CLASSES)

    mean, std = standardise(x_tr, image=False)
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
    domain = rng_for(cfg.seed, "feldman_domain")
    ranks = zipf_ranks(t, domain)
    prob = zipf_probabilities(ranks, cfg.zipf_a) if cfg.feldman_prior == "zipf" else np.full(t, 1.0 / t)
    label = domain.integers(SYNTHETIC_CLASSES, size=t).astype(np.int64)
    if cfg.feldman_inputs == "onehot":
        points = np.eye(t, dtype=np.float32)
    else:
        points = domain.standard_normal((t, cfg.dim)).astype(np.float32)
    n_train = cfg.n_train or DEFAULT_N_TRAIN["feldman"]
    n_test = cfg.n_test or DEFAULT_N_TEST_SYNTHETIC
    g_tr = rng_for(cfg.seed, "feldman_train").choice(t, size=n_train, p=prob).astype(np.int64)
    g_te = rng_for(cfg.seed, "feldman_test").choice(t, size=n_test, p=prob).astype(np.int64)
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

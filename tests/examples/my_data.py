"""Bring your own data: write the arrays dpmem reads with dataset = "file".

Any arrays work; these are 8x8 digit images from scikit-learn, shaped [n, channels, height, width].
"""
import numpy as np
from sklearn.datasets import load_digits


def write_npz(path, *, with_subgroups=False):
    digits = load_digits()
    x = digits.images[:, None].astype(np.float32) / 16.0      # [1797, 1, 8, 8]
    y = digits.target.astype(np.int64)                         # labels 0..9
    order = np.random.default_rng(0).permutation(len(y))
    train, test = order[:300], order[300:700]
    arrays = dict(x_train=x[train], y_train=y[train], x_test=x[test], y_test=y[test])
    if with_subgroups:
        # Your own subpopulations, e.g. writers or sources; here: label and ink level together.
        ink = (x.reshape(len(x), -1).mean(1) > np.median(x)).astype(np.int64)
        arrays.update(subgroup_train=2 * y[train] + ink[train], subgroup_test=2 * y[test] + ink[test])
    np.savez(path, **arrays)

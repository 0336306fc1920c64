"""Accuracy per subgroup and its loss under DP, as a function of the subgroup's training frequency."""
from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats


def frequency_bin(count: np.ndarray) -> np.ndarray:
    """Bins 0, 1, 2-3, 4-7, 8-15, ... (powers of two) as labels."""
    count = np.asarray(count)
    out = np.empty(count.shape, dtype=object)
    for i, c in enumerate(count.ravel()):
        if c <= 0:
            out.flat[i] = "0"
        else:
            lo = 1 << int(np.floor(np.log2(c)))
            hi = 2 * lo - 1
            out.flat[i] = f"{lo}" if lo == hi else f"{lo}-{hi}"
    return out


def bin_order(labels) -> list[str]:
    return sorted(set(labels), key=lambda s: int(str(s).split("-")[0]))


def per_model_subgroup_accuracy(correct_test: np.ndarray, g_test: np.ndarray, n_subgroups: int) -> np.ndarray:
    """acc[k, g]: model k's accuracy on the test examples of subgroup g (nan where g has none)."""
    onehot = np.zeros((len(g_test), n_subgroups), np.float32)
    onehot[np.arange(len(g_test)), g_test] = 1.0
    hits = np.asarray(correct_test, np.float32) @ onehot
    counts = onehot.sum(0)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(counts > 0, hits / np.maximum(counts, 1), np.nan)


def mean_ci(values: np.ndarray, axis: int = 0, level: float = 0.95) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean over models with a t-interval (models are independent draws of the training run)."""
    k = values.shape[axis]
    mean = values.mean(axis)
    sem = values.std(axis, ddof=1) / np.sqrt(k)
    half = stats.t.ppf(0.5 + level / 2, df=k - 1) * sem
    return mean, mean - half, mean + half


def subgroup_table(*, variant: str, epsilon: float | None, correct_test: np.ndarray, g_test: np.ndarray,
                   subgroup_label: np.ndarray, train_count: np.ndarray, mem: np.ndarray,
                   g_train: np.ndarray, is_canary: np.ndarray) -> pd.DataFrame:
    """One row per subgroup: accuracy with its interval over models, and the mean memorization of its members."""
    n_sub = len(subgroup_label)
    acc = per_model_subgroup_accuracy(correct_test, g_test, n_sub)
    with np.errstate(invalid="ignore"):
        mean, lo, hi = mean_ci(acc)
    real = ~np.asarray(is_canary, bool)
    mem_sum = np.bincount(g_train[real], weights=np.nan_to_num(mem[real]), minlength=n_sub)
    mem_cnt = np.bincount(g_train[real], minlength=n_sub)
    with np.errstate(divide="ignore", invalid="ignore"):
        mean_mem = np.where(mem_cnt > 0, mem_sum / np.maximum(mem_cnt, 1), np.nan)
    return pd.DataFrame({
        "variant": variant, "epsilon": epsilon, "subgroup": np.arange(n_sub), "label": subgroup_label,
        "train_count": train_count, "test_count": np.bincount(g_test, minlength=n_sub),
        "frequency": train_count / max(1, int(train_count.sum())), "freq_bin": frequency_bin(train_count),
        "test_acc": mean, "test_acc_lo": lo, "test_acc_hi": hi, "mean_mem": mean_mem,
    })


def add_accuracy_loss(table: pd.DataFrame, reference: str = "nonprivate") -> pd.DataFrame:
    """acc_loss(g, variant) = acc(g, reference) - acc(g, variant)."""
    ref = table.loc[table["variant"] == reference].set_index("subgroup")["test_acc"]
    out = table.copy()
    out["acc_loss"] = out["subgroup"].map(ref).to_numpy() - out["test_acc"].to_numpy()
    return out


def bin_table(subgroups: pd.DataFrame, memorization: pd.DataFrame) -> pd.DataFrame:
    """Per variant and frequency bin: test accuracy (test-example weighted), its loss, mean memorization."""
    sub = subgroups.copy()
    sub["hits"] = sub["test_acc"] * sub["test_count"]
    grouped = sub.groupby(["variant", "freq_bin"], sort=False)
    table = grouped.agg(epsilon=("epsilon", "first"), subgroups=("subgroup", "size"),
                        train_examples=("train_count", "sum"), test_examples=("test_count", "sum"),
                        hits=("hits", "sum")).reset_index()
    table["test_acc"] = table["hits"] / table["test_examples"].where(table["test_examples"] > 0)
    ref = table.loc[table["variant"] == "nonprivate"].set_index("freq_bin")["test_acc"]
    table["acc_loss"] = table["freq_bin"].map(ref) - table["test_acc"]
    mem = memorization.loc[~memorization["is_canary"]].copy()
    mem["freq_bin"] = frequency_bin(mem["subgroup_count"].to_numpy())
    mean_mem = mem.groupby(["variant", "freq_bin"])["mem"].mean()
    table["mean_mem"] = [mean_mem.get((v, b), np.nan) for v, b in zip(table["variant"], table["freq_bin"])]
    order = {b: i for i, b in enumerate(bin_order(table["freq_bin"]))}
    table["_o"] = table["freq_bin"].map(order)
    variants = list(dict.fromkeys(subgroups["variant"]))
    table["_v"] = table["variant"].map({v: i for i, v in enumerate(variants)})
    return table.sort_values(["_v", "_o"]).drop(columns=["hits", "_o", "_v"]).reset_index(drop=True)

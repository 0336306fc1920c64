"""Accuracy per subgroup and its loss under DP, as a function of the subgroup's training frequency."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import sparse, stats


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


def _onehot(groups: np.ndarray, n_groups: int) -> sparse.csr_matrix:
    groups = np.asarray(groups, np.int64)
    return sparse.csr_matrix((np.ones(len(groups), np.float32), (np.arange(len(groups)), groups)),
                             shape=(len(groups), n_groups))


def per_model_group_mean(values: np.ndarray, groups: np.ndarray, n_groups: int) -> np.ndarray:
    """mean[k, g]: the mean of values[k, j] over the columns j of group g (nan where g has none)."""
    onehot = _onehot(groups, n_groups)
    sums = np.asarray(onehot.T @ np.asarray(values, np.float32).T).T      # [K, G], sparse: O(K m)
    counts = np.bincount(np.asarray(groups, np.int64), minlength=n_groups)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def crossed_mean_ci(values: np.ndarray, groups: np.ndarray, n_groups: int, *, value_range: tuple[float, float],
                    level: float = 0.95) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per group: the mean of values[k, j] over models k and the group's test examples j, with an interval
    that counts both sources of noise: which models were trained (K of them) and which test examples the
    group happened to get (n_g of them).

    The models and the test examples are crossed random factors. The variance of the grand mean is
    s_models^2 / K + s_examples^2 / n_g, where s_models^2 is the variance over models of the per-model
    group means and s_examples^2 the variance over the group's test examples of their means over models
    (each carries the interaction term once, so the sum is slightly conservative; Owen 2007, "The
    pigeonhole bootstrap"). The interval is a t-interval with Satterthwaite's degrees of freedom, clipped
    to ``value_range``. With one test example the example variance cannot be estimated: its worst case,
    (range/2)^2, is used, so the interval says honestly that one test example shows little. When every
    value of a group is the same, a Clopper-Pearson bound on the share of its test examples that could
    differ replaces the point interval.
    Feed the paired differences c_nonprivate[k, j] - c_dp[k, j] to get a paired interval on accuracy loss.
    """
    values = np.asarray(values, np.float32)
    groups = np.asarray(groups, np.int64)
    k = values.shape[0]
    per_model = per_model_group_mean(values, groups, n_groups)             # [K, G]
    mean = per_model.mean(0) if k else np.full(n_groups, np.nan)
    with np.errstate(invalid="ignore", divide="ignore"):
        var_models = per_model.var(0, ddof=1) if k > 1 else np.zeros(n_groups)
        column = values.mean(0).astype(np.float64)                          # [m]
        n_g = np.bincount(groups, minlength=n_groups).astype(float)
        col_mean = np.bincount(groups, weights=column, minlength=n_groups) / n_g
        col_ss = np.bincount(groups, weights=(column - col_mean[groups]) ** 2, minlength=n_groups)
        worst = ((value_range[1] - value_range[0]) / 2) ** 2
        var_examples = np.where(n_g > 1, col_ss / np.maximum(n_g - 1, 1), worst)
        a, b = var_models / k, var_examples / n_g
        se = np.sqrt(a + b)
        df_examples = np.where(n_g > 1, n_g - 1, 1.0)
        df = (a + b) ** 2 / (a ** 2 / max(k - 1, 1) + b ** 2 / df_examples)
        df = np.where(np.isfinite(df) & (df > 0), df, max(k - 1, 1))
        half = stats.t.ppf(0.5 + level / 2, df) * se
    lo = np.clip(mean - half, *value_range)
    hi = np.clip(mean + half, *value_range)
    # Every model gives every test example the same value (all right, say): the variances are 0 and the
    # interval above would be a point. The test examples still bound it: with n_g of them all alike, the
    # share of the subgroup's examples that differ is at most u = 1 - ((1 - level) / 2)^(1 / n_g)
    # (Clopper-Pearson), and the mean can move at most that share of the way to either end of the range.
    constant = (n_g > 1) & (var_models == 0) & (var_examples == 0)
    if constant.any():
        u = 1 - ((1 - level) / 2) ** (1 / np.where(constant, n_g, 1))
        lo = np.where(constant, mean - u * (mean - value_range[0]), lo)
        hi = np.where(constant, mean + u * (value_range[1] - mean), hi)
    empty = n_g == 0
    return mean, np.where(empty, np.nan, lo), np.where(empty, np.nan, hi)


@dataclass(frozen=True, kw_only=True)
class Trend:
    """Weighted least-squares slope of a per-subgroup quantity on log2 of the subgroup's training frequency."""
    slope: float
    lo: float
    hi: float
    se: float
    se_subgroups: float     # heteroskedasticity-robust part (test examples, subgroups' scatter)
    se_models: float        # part from the K models shared by every subgroup
    subgroups: int
    level: float

    def to_dict(self, prefix: str) -> dict:
        return {f"{prefix}_slope": self.slope, f"{prefix}_slope_lo": self.lo, f"{prefix}_slope_hi": self.hi,
                f"{prefix}_slope_se": self.se, f"{prefix}_slope_subgroups": self.subgroups}


def wls_trend(y: np.ndarray, train_count: np.ndarray, weights: np.ndarray, *,
              per_model: np.ndarray | None = None, level: float = 0.95) -> Trend:
    """Slope of y on log2(train_count / n) by weighted least squares, with its interval.

    Only subgroups with a training example, a positive weight and a finite y enter. The standard error
    adds two parts: statsmodels' HC1 (heteroskedasticity-robust) covariance of the WLS fit, which counts the
    sampling of each subgroup's test (or training) examples and the subgroups' own scatter about the line;
    and the variance over models of each model's contribution to the slope, ``per_model`` [K, G] (the
    slope is linear in it), which the robust covariance misses because every subgroup shares the same K
    models. Their sum counts the model-by-subgroup interaction twice, so it is slightly conservative.
    The interval is a t-interval with (subgroups - 2) degrees of freedom. A negative slope means rarer
    subgroups have larger y.
    """
    import statsmodels.api as sm
    y, w, c = (np.asarray(a, float) for a in (y, weights, train_count))
    use = (c > 0) & (w > 0) & np.isfinite(y)
    nan = Trend(slope=np.nan, lo=np.nan, hi=np.nan, se=np.nan, se_subgroups=np.nan, se_models=np.nan,
                subgroups=int(use.sum()), level=level)
    if use.sum() < 3 or np.ptp(c[use]) == 0:
        return nan
    x = np.log2(c[use] / c[use].sum())
    fit = sm.WLS(y[use], sm.add_constant(x), weights=w[use]).fit(cov_type="HC1")
    slope, se_sub = float(fit.params[1]), float(fit.bse[1])
    se_models = 0.0
    if per_model is not None and per_model.shape[0] > 1:
        xc = x - np.average(x, weights=w[use])
        coef = w[use] * xc / np.sum(w[use] * xc ** 2)                 # slope = sum_g coef_g * y_g
        contrib = np.nan_to_num(np.asarray(per_model, float)[:, use]) @ coef   # per-model slopes
        se_models = float(contrib.std(ddof=1) / np.sqrt(len(contrib)))
    se = float(np.hypot(se_sub, se_models))
    half = float(stats.t.ppf(0.5 + level / 2, int(use.sum()) - 2)) * se
    return Trend(slope=slope, lo=slope - half, hi=slope + half, se=se, se_subgroups=se_sub,
                 se_models=se_models, subgroups=int(use.sum()), level=level)


def subgroup_table(*, variant: str, epsilon: float | None, correct_test: np.ndarray, g_test: np.ndarray,
                   subgroup_label: np.ndarray, train_count: np.ndarray, mem: np.ndarray,
                   g_train: np.ndarray, is_canary: np.ndarray, reference_correct: np.ndarray | None = None,
                   level: float = 0.95) -> pd.DataFrame:
    """One row per subgroup: accuracy and its loss against the reference (non-private) models, each with
    an interval over models and test examples (``crossed_mean_ci``; the loss pairs the two models with the
    same index; ``reference_correct=None`` for the reference itself), and the mean memorization of its
    members with how many examples it covers."""
    n_sub = len(subgroup_label)
    correct = np.asarray(correct_test, np.float32)
    acc, acc_lo, acc_hi = crossed_mean_ci(correct, g_test, n_sub, value_range=(0.0, 1.0), level=level)
    loss, loss_lo, loss_hi = _paired_loss(reference_correct, correct, g_test, n_sub, level)
    mean_mem, mem_count = _group_mean(mem, g_train, n_sub, ~np.asarray(is_canary, bool))
    return pd.DataFrame({
        "variant": variant, "epsilon": epsilon, "subgroup": np.arange(n_sub), "label": subgroup_label,
        "train_count": train_count, "test_count": np.bincount(g_test, minlength=n_sub),
        "frequency": train_count / max(1, int(train_count.sum())), "freq_bin": frequency_bin(train_count),
        "test_acc": acc, "test_acc_lo": acc_lo, "test_acc_hi": acc_hi,
        "acc_loss": loss, "acc_loss_lo": loss_lo, "acc_loss_hi": loss_hi,
        "mean_mem": mean_mem, "mem_examples": mem_count,
    })


def _paired_loss(reference: np.ndarray | None, correct: np.ndarray, groups: np.ndarray, n_groups: int,
                 level: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """acc(reference) - acc(variant) per group on paired models; None: the variant is the reference, whose
    loss is 0 by definition (no interval to estimate)."""
    if reference is None:
        zero = np.where(np.bincount(np.asarray(groups, np.int64), minlength=n_groups) > 0, 0.0, np.nan)
        return zero, zero, zero
    return crossed_mean_ci(np.asarray(reference, np.float32) - correct, groups, n_groups,
                           value_range=(-1.0, 1.0), level=level)


def _group_mean(values: np.ndarray, groups: np.ndarray, n_groups: int, use: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean of the finite values per group, and how many values it covers."""
    ok = use & np.isfinite(values)
    total = np.bincount(groups[ok], weights=values[ok], minlength=n_groups)
    count = np.bincount(groups[ok], minlength=n_groups)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan), count


def bin_table(*, variant: str, epsilon: float | None, correct_test: np.ndarray, g_test: np.ndarray,
              train_count: np.ndarray, mem: np.ndarray, g_train: np.ndarray, is_canary: np.ndarray,
              reference_correct: np.ndarray | None = None, level: float = 0.95) -> pd.DataFrame:
    """Per frequency bin: test accuracy and its loss (test-example weighted, with intervals over models and
    test examples as in ``subgroup_table``), and the mean memorization of the bin's training examples."""
    labels = frequency_bin(train_count)
    order = bin_order(labels)
    bin_of_subgroup = np.array([order.index(b) for b in labels], np.int64)
    n_bins = len(order)
    b_test = bin_of_subgroup[np.asarray(g_test, np.int64)]
    correct = np.asarray(correct_test, np.float32)
    acc, acc_lo, acc_hi = crossed_mean_ci(correct, b_test, n_bins, value_range=(0.0, 1.0), level=level)
    loss, loss_lo, loss_hi = _paired_loss(reference_correct, correct, b_test, n_bins, level)
    real = ~np.asarray(is_canary, bool)
    b_train = bin_of_subgroup[np.asarray(g_train, np.int64)]
    mean_mem, mem_count = _group_mean(mem, b_train, n_bins, real)
    return pd.DataFrame({
        "variant": variant, "epsilon": epsilon, "freq_bin": order,
        "subgroups": np.bincount(bin_of_subgroup, minlength=n_bins),
        "train_examples": np.bincount(b_train[real], minlength=n_bins),
        "test_examples": np.bincount(b_test, minlength=n_bins),
        "test_acc": acc, "test_acc_lo": acc_lo, "test_acc_hi": acc_hi,
        "acc_loss": loss, "acc_loss_lo": loss_lo, "acc_loss_hi": loss_hi,
        "mean_mem": mean_mem, "mem_examples": mem_count,
    })

"""Statistics of the DP memorization bound: Clopper-Pearson bounds, violations, epsilon lower bounds.

(epsilon, delta)-DP under add/remove adjacency gives, for every training example,
    p_in <= e^eps * p_out + delta   and   (1 - p_out) <= e^eps * (1 - p_in) + delta,
where p_in / p_out are the probabilities that a model trained with / without the example
classifies it correctly. With finitely many models these are tested: L_in is a one-sided lower
Clopper-Pearson bound on p_in, U_out a one-sided upper bound on p_out, each missing with
probability <= ``level``. If the example's true p_in, p_out obey the inequality, a violation
``L_in > e^eps * U_out + delta`` (or the mirrored form) needs one of the two bounds to miss, so its
probability is <= 2 * level. With ``level = alpha / (2 n)`` (Bonferroni over n examples and the
two bounds, see ``per_test_level``) a DP mechanism shows any violation with probability <= alpha.

All functions are vectorised over numpy arrays and broadcast their arguments.
"""
from __future__ import annotations

import numpy as np
from scipy import stats


def per_test_level(alpha: float, n: int) -> float:
    """Level of each one-sided bound: alpha / (2 n), Bonferroni over n examples and two bounds."""
    if not (0.0 < alpha < 1.0):
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if int(n) != n or n < 1:
        raise ValueError(f"the number of audited examples must be a positive integer, got {n}")
    return float(alpha) / (2.0 * int(n))


def _check_level(level) -> None:
    level = np.asarray(level, dtype=float)
    if not np.all((level > 0) & (level < 1)):
        raise ValueError(f"level must be in (0, 1), got {level}")


def _counts(k, n) -> tuple[np.ndarray, np.ndarray]:
    k, n = np.broadcast_arrays(np.asarray(k, dtype=float), np.asarray(n, dtype=float))
    if np.any(n < 0) or np.any(k < 0) or np.any(k > n):
        raise ValueError("counts must satisfy 0 <= k <= n")
    return k, n


def cp_lower(k, n, level) -> np.ndarray:
    """One-sided Clopper-Pearson lower bound on p: P(bound > p) <= level. 0 when k = 0 (or n = 0)."""
    _check_level(level)
    k, n = _counts(k, n)
    with np.errstate(invalid="ignore", divide="ignore"):
        lo = stats.beta.ppf(level, k, n - k + 1)
    return np.where(k > 0, lo, 0.0)


def cp_upper(k, n, level) -> np.ndarray:
    """One-sided Clopper-Pearson upper bound on p: P(bound < p) <= level. 1 when k = n (or n = 0)."""
    _check_level(level)
    k, n = _counts(k, n)
    with np.errstate(invalid="ignore", divide="ignore"):
        hi = stats.beta.ppf(1.0 - level, k + 1, n - k)
    return np.where(k < n, hi, 1.0)


def dp_bound(p_out, epsilon, delta) -> np.ndarray:
    """Largest memorization (p_in - p_out) that (epsilon, delta)-DP allows: (e^eps - 1) p_out + delta."""
    return np.expm1(np.asarray(epsilon, dtype=float)) * np.asarray(p_out, dtype=float) + delta


def replace_one(epsilon: float, delta: float) -> tuple[float, float]:
    """(eps, delta)-DP under add/remove implies (2 eps, (1 + e^eps) delta) under replace-one.

    Replacing z by z' is removing z then adding z' (group privacy of 2). Used when the subsets
    have a fixed size, so that "in" and "out" models differ by a replacement.
    """
    return 2.0 * float(epsilon), (1.0 + float(np.exp(epsilon))) * float(delta)


def eps_lb_from_bounds(l_in, u_out, delta) -> np.ndarray:
    """Largest epsilon the confidence bounds refute at this delta (-inf where they refute none).

    max(ln((L_in - delta) / U_out), ln(((1 - U_out) - delta) / (1 - L_in))); a branch whose
    numerator is <= 0 contributes -inf. Denominators are > 0 for Clopper-Pearson bounds with
    level > 0 (U_out >= 1 - level^(1/n_out) > 0 and L_in <= level^(1/n_in) < 1).
    """
    l_in, u_out, delta = np.broadcast_arrays(*(np.asarray(a, dtype=float) for a in (l_in, u_out, delta)))
    with np.errstate(divide="ignore", invalid="ignore"):
        num_a, den_a = l_in - delta, u_out
        num_b, den_b = (1.0 - u_out) - delta, 1.0 - l_in
        a = np.where((num_a > 0) & (den_a > 0),
                     np.log(np.where(num_a > 0, num_a, 1.0) / np.where(den_a > 0, den_a, 1.0)), -np.inf)
        b = np.where((num_b > 0) & (den_b > 0),
                     np.log(np.where(num_b > 0, num_b, 1.0) / np.where(den_b > 0, den_b, 1.0)), -np.inf)
        # a zero denominator with a positive numerator refutes every epsilon
        a = np.where((num_a > 0) & (den_a <= 0), np.inf, a)
        b = np.where((num_b > 0) & (den_b <= 0), np.inf, b)
    return np.maximum(a, b)


def eps_lower_bounds(k_in, n_in, k_out, n_out, *, delta: float, level) -> np.ndarray:
    """Per-example empirical lower bound on epsilon under add/remove adjacency at this delta.

    With probability >= 1 - 2 * level the example's true epsilon is >= the returned value.
    """
    return eps_lb_from_bounds(cp_lower(k_in, n_in, level), cp_upper(k_out, n_out, level), delta)


def violations(k_in, n_in, k_out, n_out, *, epsilon: float, delta: float, level) -> np.ndarray:
    """True where the counts refute (epsilon, delta)-DP for that example (add/remove adjacency)."""
    l_in, u_out = cp_lower(k_in, n_in, level), cp_upper(k_out, n_out, level)
    e = np.exp(epsilon)
    return (l_in > e * u_out + delta) | ((1.0 - u_out) > e * (1.0 - l_in) + delta)


def replace_one_eps_lb(l_in, u_out, delta: float, *, iterations: int = 80) -> np.ndarray:
    """Per-individual epsilon lower bound when "in" and "out" differ by a replacement.

    A per-individual (e, delta) guarantee gives the pair (2 e, (1 + e^e) delta). The bounds refute
    that pair when ``eps_lb_from_bounds(l_in, u_out, (1 + e^e) delta) > 2 e``. The left side falls and
    the right side rises with e, so the refuted e form a half-line (-inf, e*); e* is returned, found
    by bisection. Hence "(eps, delta) is refuted under replace-one" holds exactly when e* > eps,
    whatever eps is claimed. With delta = 0 this is half the add/remove bound.
    """
    l_in, u_out = np.broadcast_arrays(np.asarray(l_in, dtype=float), np.asarray(u_out, dtype=float))

    def gap(e):  # increasing in e; its root is e*
        with np.errstate(over="ignore"):
            return 2.0 * e - eps_lb_from_bounds(l_in, u_out, (1.0 + np.exp(e)) * delta)

    top = eps_lb_from_bounds(l_in, u_out, delta)   # the pair bound at the smallest delta
    finite = np.isfinite(top)
    # gap(top / 2) >= 0 because the pair bound only falls as delta grows; 100 below it gap < 0
    hi = np.where(finite, top / 2.0, 0.0)
    lo = hi - 100.0
    below_bracket = gap(lo) >= 0   # e* < lo: only for vacuous (hugely negative) bounds
    for _ in range(iterations):
        mid = 0.5 * (lo + hi)
        up = gap(mid) >= 0
        hi = np.where(up, mid, hi)
        lo = np.where(up, lo, mid)
    return np.where(finite & ~below_bracket, hi, np.where(finite, -np.inf, top))


def audit_power(n_in, n_out, *, delta: float, level, adjacency: str = "add/remove") -> np.ndarray | float:
    """Largest epsilon these model counts could ever refute.

    That is the bound of a perfectly separating example (every in-model right, every out-model
    wrong). A claim above it cannot be refuted by this run, so "no violation" says nothing there.
    """
    n_in, n_out = np.broadcast_arrays(np.asarray(n_in, dtype=float), np.asarray(n_out, dtype=float))
    l_in, u_out = cp_lower(n_in, n_in, level), cp_upper(np.zeros_like(n_out), n_out, level)
    if adjacency == "add/remove":
        out = eps_lb_from_bounds(l_in, u_out, delta)
    elif adjacency == "replace-one":
        out = replace_one_eps_lb(l_in, u_out, delta)
    else:
        raise ValueError(f"unknown adjacency {adjacency!r}; use 'add/remove' or 'replace-one'")
    return float(out) if out.ndim == 0 else out

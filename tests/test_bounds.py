"""Clopper-Pearson bounds, the DP bound, epsilon lower bounds and audit power."""
import math

import numpy as np
import pytest
from scipy import stats

from dpmem.privacy.bounds import (
    audit_power,
    cp_lower,
    cp_upper,
    dp_bound,
    eps_lb_from_bounds,
    eps_lower_bounds,
    per_test_level,
    replace_one,
    replace_one_eps_lb,
    violations,
)


@pytest.mark.parametrize("n", [1, 5, 40, 700])
@pytest.mark.parametrize("level", [0.05, 1e-4])
def test_cp_closed_forms_at_the_edges(n, level):
    assert cp_lower(n, n, level) == pytest.approx(level ** (1 / n), rel=1e-10)
    assert cp_upper(0, n, level) == pytest.approx(1 - level ** (1 / n), rel=1e-10)
    assert cp_lower(0, n, level) == 0.0
    assert cp_upper(n, n, level) == 1.0


def test_cp_without_observations_says_nothing():
    assert cp_lower(0, 0, 0.05) == 0.0
    assert cp_upper(0, 0, 0.05) == 1.0


@pytest.mark.parametrize("level", [0.025, 0.001])
def test_cp_matches_scipy_exact_interval(level):
    # a two-sided exact interval at confidence 1 - 2 level is the two one-sided bounds at level
    for n in (1, 7, 30, 300):
        for k in sorted({0, 1, n // 3, n // 2, n - 1, n}):
            ci = stats.binomtest(k, n).proportion_ci(confidence_level=1 - 2 * level, method="exact")
            assert cp_lower(k, n, level) == pytest.approx(ci.low, abs=1e-12)
            assert cp_upper(k, n, level) == pytest.approx(ci.high, abs=1e-12)


def test_cp_is_vectorised_and_broadcasts():
    k = np.array([0, 3, 10])
    lo, hi = cp_lower(k, 10, 0.05), cp_upper(k, 10, 0.05)
    assert lo.shape == hi.shape == (3,)
    assert np.all(lo <= k / 10) and np.all(hi >= k / 10) and np.all(np.diff(lo) > 0)
    with pytest.raises(ValueError):
        cp_lower(11, 10, 0.05)
    with pytest.raises(ValueError):
        cp_upper(1, 10, 0.0)


@pytest.mark.parametrize("n", [10, 60])
def test_cp_one_sided_miss_probability_is_at_most_level_exactly(n):
    # Enumerate every outcome: P(L(k) > p) and P(U(k) < p) under Binomial(n, p) for many p.
    level = 0.05
    k = np.arange(n + 1)
    lo, hi = cp_lower(k, n, level), cp_upper(k, n, level)
    worst_lo = worst_hi = 0.0
    for p in np.linspace(0.001, 0.999, 499):
        pmf = stats.binom.pmf(k, n, p)
        worst_lo = max(worst_lo, pmf[lo > p].sum())
        worst_hi = max(worst_hi, pmf[hi < p].sum())
    assert worst_lo <= level + 1e-12 and worst_hi <= level + 1e-12
    # and not needlessly conservative: some p comes within a factor 2 of the level
    assert worst_lo > level / 2 and worst_hi > level / 2


def test_cp_coverage_by_simulation():
    rng = np.random.default_rng(1)
    n, level, reps = 50, 0.1, 40_000
    for p in (0.05, 0.3, 0.8):
        k = rng.binomial(n, p, size=reps)
        miss_lo = np.mean(cp_lower(k, n, level) > p)
        miss_hi = np.mean(cp_upper(k, n, level) < p)
        slack = 4 * math.sqrt(level * (1 - level) / reps)
        assert miss_lo <= level + slack and miss_hi <= level + slack


def test_dp_bound_and_replace_one_numbers():
    assert dp_bound(0.1, 1.0, 1e-5) == pytest.approx((math.e - 1) * 0.1 + 1e-5)
    assert dp_bound(0.0, 3.0, 0.0) == 0.0
    np.testing.assert_allclose(dp_bound(np.array([0.0, 0.5]), math.log(2), 0.01), [0.01, 0.51])
    eps2, delta2 = replace_one(1.0, 1e-5)
    assert eps2 == 2.0 and delta2 == pytest.approx((1 + math.e) * 1e-5)
    assert replace_one(0.0, 0.1) == (0.0, pytest.approx(0.2))


def test_per_test_level_is_bonferroni_over_examples_and_sides():
    assert per_test_level(0.05, 1000) == pytest.approx(2.5e-5)
    with pytest.raises(ValueError):
        per_test_level(0.05, 0)
    with pytest.raises(ValueError):
        per_test_level(1.5, 10)


def test_eps_lb_of_a_perfectly_separating_example_by_hand():
    # 10 in-models all right, 10 out-models all wrong, level 0.05, delta 0:
    # L_in = 0.05^(1/10), U_out = 1 - 0.05^(1/10); both sides give ln(L / (1 - L)).
    L = 0.05 ** 0.1
    expected = math.log(L / (1 - L))
    assert expected == pytest.approx(1.0519, abs=1e-4)
    assert eps_lower_bounds(10, 10, 0, 10, delta=0.0, level=0.05) == pytest.approx(expected, rel=1e-10)
    # delta eats into the first side's numerator and the mirror's numerator alike
    d = 0.01
    expected_d = math.log((L - d) / (1 - L))
    assert eps_lower_bounds(10, 10, 0, 10, delta=d, level=0.05) == pytest.approx(expected_d, rel=1e-10)


def test_eps_lb_asymmetric_example_by_hand():
    # k_in=8/10, k_out=1/20 at level 0.025 (two-sided 95% exact intervals give the bounds)
    L = stats.binomtest(8, 10).proportion_ci(confidence_level=0.95, method="exact").low
    U = stats.binomtest(1, 20).proportion_ci(confidence_level=0.95, method="exact").high
    first, mirror = math.log((L - 1e-5) / U), math.log((1 - U - 1e-5) / (1 - L))
    assert first > mirror
    assert eps_lower_bounds(8, 10, 1, 20, delta=1e-5, level=0.025) == pytest.approx(first, rel=1e-9)
    # the mirrored side wins when the out-models are almost always right and in-models never wrong
    L2, U2 = 0.05 ** (1 / 30), cp_upper(15, 30, 0.05)
    assert eps_lower_bounds(30, 30, 15, 30, delta=0.0, level=0.05) == pytest.approx(
        max(math.log(L2 / U2), math.log((1 - U2) / (1 - L2))), rel=1e-10)
    assert math.log((1 - U2) / (1 - L2)) > math.log(L2 / U2)


def test_eps_lb_boundaries_are_well_defined():
    # no evidence at all (k_in = 0, k_out = n_out) gives -inf on both sides
    assert eps_lower_bounds(0, 10, 10, 10, delta=1e-5, level=0.05) == -np.inf
    # no models on one side: finite or -inf, never NaN
    out = eps_lower_bounds(np.array([0, 5, 10]), np.array([0, 10, 10]), np.array([0, 0, 3]),
                           np.array([0, 0, 10]), delta=1e-5, level=0.05)
    assert not np.any(np.isnan(out))
    # a delta above L_in kills the first side; the mirror is left
    assert eps_lb_from_bounds(0.3, 0.1, 0.4) == pytest.approx(math.log(0.5 / 0.7))
    assert eps_lb_from_bounds(0.3, 0.65, 0.4) == -np.inf


def test_violation_iff_eps_lb_exceeds_the_claim():
    rng = np.random.default_rng(3)
    n_in = rng.integers(1, 200, size=2000)
    n_out = rng.integers(1, 200, size=2000)
    k_in, k_out = rng.binomial(n_in, rng.random(2000)), rng.binomial(n_out, rng.random(2000))
    level, delta = 1e-3, 1e-4
    lb = eps_lower_bounds(k_in, n_in, k_out, n_out, delta=delta, level=level)
    for eps in (0.0, 0.5, 1.0, 2.0):
        v = violations(k_in, n_in, k_out, n_out, epsilon=eps, delta=delta, level=level)
        assert v.any() and not v.all()
        np.testing.assert_array_equal(v, lb > eps)


def test_power_is_the_bound_of_a_perfect_example_and_grows_with_models():
    level, delta = 2.5e-5, 1e-5
    assert audit_power(700, 300, delta=delta, level=level) == pytest.approx(
        float(eps_lower_bounds(700, 700, 0, 300, delta=delta, level=level)))
    counts = [10, 30, 100, 300, 1000, 3000]
    by_in = [audit_power(n, 300, delta=delta, level=level) for n in counts]
    by_out = [audit_power(700, n, delta=delta, level=level) for n in counts]
    assert np.all(np.diff(by_in) > 0) and np.all(np.diff(by_out) > 0)
    # and no observed example can beat it
    rng = np.random.default_rng(0)
    k_in, k_out = rng.integers(0, 701, 500), rng.integers(0, 301, 500)
    assert np.all(eps_lower_bounds(k_in, 700, k_out, 300, delta=delta, level=level)
                  <= audit_power(700, 300, delta=delta, level=level) + 1e-12)
    # the replace-one power is per individual: half, up to the delta adjustment
    r1 = audit_power(700, 300, delta=0.0, level=level, adjacency="replace-one")
    assert r1 == pytest.approx(audit_power(700, 300, delta=0.0, level=level) / 2, rel=1e-9)


def test_replace_one_eps_lb_is_the_largest_refuted_individual_epsilon():
    rng = np.random.default_rng(5)
    k_in, k_out = rng.integers(0, 301, 400), rng.integers(0, 301, 400)
    level, delta = 1e-3, 1e-3
    l_in, u_out = cp_lower(k_in, 300, level), cp_upper(k_out, 300, level)
    e_star = replace_one_eps_lb(l_in, u_out, delta)
    # with delta = 0 it is exactly half the pair bound
    np.testing.assert_allclose(replace_one_eps_lb(l_in, u_out, 0.0)[np.isfinite(e_star)],
                               eps_lb_from_bounds(l_in, u_out, 0.0)[np.isfinite(e_star)] / 2, rtol=1e-12)
    # a per-individual claim eps is refuted through (2 eps, (1 + e^eps) delta) iff eps < e*
    for eps in (0.05, 0.3, 0.8):
        eps2, delta2 = replace_one(eps, delta)
        refuted = violations(k_in, 300, k_out, 300, epsilon=eps2, delta=delta2, level=level)
        assert refuted.any() and not refuted.all()
        np.testing.assert_array_equal(refuted, e_star > eps)

"""Statistics of gradient-canary scores: the rigorous threshold bound, the Gaussian estimate, the alpha split."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import special, stats

from dpmem.privacy import bounds
from dpmem.privacy.canary_audit import (
    CanaryAudit,
    canary_audit,
    counts_above,
    gaussian_mu,
    gdp_delta,
    gdp_epsilon,
    oracle_eps_lb,
)
from dpmem.privacy.family import bonferroni_share
from dpmem.privacy.one_run import gdp_mu


def gaussian_scores(rng, K, m, mu, q=0.5):
    masks = rng.random((K, m)) < q
    return rng.normal(size=(K, m)) + mu * masks, masks


# -- Gaussian DP, closed form ---------------------------------------------------------------------

def test_gdp_epsilon_inverts_the_closed_form_delta():
    for mu in (0.1, 0.5, 1.0, 2.0, 4.0):
        for delta in (1e-2, 1e-5, 1e-8):
            eps = gdp_epsilon(mu, delta)
            assert eps > 0
            assert gdp_delta(eps, mu) == pytest.approx(delta, rel=1e-6)
    # delta at eps = 0 is the total variation 2 Phi(mu/2) - 1: a larger delta needs no epsilon
    assert gdp_epsilon(1.0, 2 * stats.norm.cdf(0.5) - 1 + 1e-9) == 0.0
    assert gdp_epsilon(0.0, 1e-5) == 0.0 and gdp_epsilon(-1.0, 1e-5) == 0.0
    # epsilon grows with mu
    assert gdp_epsilon(1.0, 1e-5) < gdp_epsilon(1.1, 1e-5)


def test_gdp_epsilon_matches_the_gaussian_mechanism_by_dp_accounting():
    # one Gaussian mechanism with sensitivity 1 and noise sigma is exactly (1/sigma)-GDP;
    # dp-accounting's privacy-loss-distribution accountant computes its epsilon independently
    dp_accounting = pytest.importorskip("dp_accounting")
    for sigma in (0.5, 1.0, 3.0):
        acct = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-4)
        acct.compose(dp_accounting.GaussianDpEvent(noise_multiplier=sigma))
        assert gdp_epsilon(1.0 / sigma, 1e-5) == pytest.approx(acct.get_epsilon(1e-5), abs=2e-3)


def test_gaussian_mu_recovers_the_shift_and_pure_noise_gives_about_zero():
    rng = np.random.default_rng(0)
    for mu in (0.3, 1.0, 2.5):
        a, b = rng.normal(mu, 1.0, 200_000), rng.normal(0.0, 1.0, 200_000)
        assert gaussian_mu(a, b) == pytest.approx(mu, abs=0.02)
        # scale and location free
        assert gaussian_mu(3 * a + 7, 3 * b + 7) == pytest.approx(gaussian_mu(a, b), rel=1e-9)
    scores, masks = gaussian_scores(rng, 400, 250, 0.0)
    audit = canary_audit(variant="v", scores=scores, masks=masks, epsilon=1.0, delta=1e-5, alpha=0.05)
    assert abs(audit.gdp_mu) < 0.02 and audit.eps_gdp < 0.1
    assert audit.eps_lb is None or audit.eps_lb < 0.2
    assert gaussian_mu(np.ones(5), np.zeros(5)) == math.inf and gaussian_mu(np.ones(5), np.ones(5)) == 0.0


def test_gaussian_estimate_of_a_gdp_mechanism_is_its_epsilon():
    rng = np.random.default_rng(1)
    mu = 0.923   # DP-SGD, sample rate 1, calibrated to about (4, 1e-5)
    scores, masks = gaussian_scores(rng, 500, 400, mu)
    audit = canary_audit(variant="v", scores=scores, masks=masks, epsilon=4.0, delta=1e-5, alpha=0.05)
    assert audit.gdp_mu == pytest.approx(mu, abs=0.02)
    assert audit.eps_gdp == pytest.approx(gdp_epsilon(mu, 1e-5), abs=0.1)


# -- the rigorous bound ---------------------------------------------------------------------------

def test_bound_is_the_clopper_pearson_test_on_the_evaluation_models():
    rng = np.random.default_rng(2)
    scores, masks = gaussian_scores(rng, 40, 30, 2.0)
    audit = canary_audit(variant="v", scores=scores, masks=masks, epsilon=1.0, delta=1e-5, alpha=0.1)
    assert isinstance(audit, CanaryAudit)
    assert audit.selection_models == 2 and audit.evaluation_models == 38 and audit.models == 40   # 5% select
    ev_s, ev_m = scores[2:], masks[2:]
    assert audit.n_in == ev_m.sum() and audit.n_out == (~ev_m).sum()
    k_in, k_out = (int(c[0]) for c in counts_above(ev_s[ev_m], ev_s[~ev_m], [audit.threshold]))
    assert audit.tpr == k_in / audit.n_in and audit.fpr == k_out / audit.n_out
    assert audit.tpr_lo == pytest.approx(float(bounds.cp_lower(k_in, audit.n_in, 0.05)))
    assert audit.fpr_hi == pytest.approx(float(bounds.cp_upper(k_out, audit.n_out, 0.05)))
    assert audit.eps_lb == pytest.approx(float(bounds.eps_lb_from_bounds(audit.tpr_lo, audit.fpr_hi, 1e-5)))
    assert audit.consistent == (audit.eps_lb <= 1.0)
    # a threshold fixed in advance uses every model
    fixed = canary_audit(variant="v", scores=scores, masks=masks, epsilon=1.0, delta=1e-5, alpha=0.1, threshold=1.0)
    assert fixed.selection_models == 0 and fixed.n_in + fixed.n_out == scores.size and fixed.threshold == 1.0
    # perfect separation reaches the power
    perfect = canary_audit(variant="v", scores=masks.astype(float), masks=masks, epsilon=None, delta=1e-5, alpha=0.1)
    assert perfect.eps_lb == pytest.approx(perfect.power_eps) and perfect.consistent


def test_honest_gaussian_mechanism_rarely_refutes_and_half_noise_is_caught():
    rng = np.random.default_rng(3)
    eps, delta, alpha, reps = 2.0, 1e-5, 0.2, 100
    mu = 1.0
    while gdp_epsilon(mu, delta) > eps:   # the mu whose exact epsilon is the claim
        mu -= 1e-3
    alarms, lbs = 0, []
    for _ in range(reps):
        scores, masks = gaussian_scores(rng, 60, 100, mu)
        audit = canary_audit(variant="v", scores=scores, masks=masks, epsilon=eps, delta=delta, alpha=alpha)
        alarms += not audit.consistent
        lbs.append(-np.inf if audit.eps_lb is None else audit.eps_lb)
    assert alarms / reps <= alpha + 3 * math.sqrt(alpha * (1 - alpha) / reps)
    assert np.median(lbs) > 0.3 * eps      # and the test is not vacuous
    # half the noise doubles mu: refuted
    scores, masks = gaussian_scores(rng, 400, 500, 2 * mu)
    audit = canary_audit(variant="v", scores=scores, masks=masks, epsilon=eps, delta=delta, alpha=0.05)
    assert not audit.consistent and audit.eps_lb > eps


def test_randomised_response_exceeds_its_epsilon_at_most_alpha_of_400_repetitions():
    """Randomised response on the membership bit (reports it truthfully with probability
    e^eps / (1 + e^eps)) is eps-DP, and the threshold test between its two outputs is tight for
    it: the bound must exceed eps in at most alpha of the runs, and get close to eps."""
    rng = np.random.default_rng(6)
    eps, reps, alpha, K, m = 1.0, 400, 0.2, 20, 500
    lbs = []
    for _ in range(reps):
        masks = rng.random((K, m)) < 0.5
        truthful = rng.random((K, m)) < special.expit(eps)
        scores = np.where(truthful, masks, ~masks).astype(float)
        audit = canary_audit(variant="v", scores=scores, masks=masks, epsilon=eps, delta=0.0, alpha=alpha)
        lbs.append(-np.inf if audit.eps_lb is None else audit.eps_lb)
    lbs = np.array(lbs)
    assert np.mean(lbs > eps) <= alpha
    assert np.median(lbs) > 0.85 * eps


def test_oracle_reference_is_the_best_threshold_at_expected_counts():
    # the figures: all 5 x 10^5 in- and out-observations of the audit config, 11 tests at alpha 0.05
    level = 0.05 / 11 / 2
    for eps, expected in ((4.0, 2.79), (8.0, 5.03)):
        mu = gdp_mu(eps, 1e-5)
        assert gdp_epsilon(mu, 1e-5) == pytest.approx(eps, abs=1e-6)
        assert oracle_eps_lb(5e5, 5e5, mu, delta=1e-5, level=level) == pytest.approx(expected, abs=0.02)
    # below the truth, and rising with the counts towards it
    mu = gdp_mu(4.0, 1e-5)
    refs = [oracle_eps_lb(n, n, mu, delta=1e-5, level=level) for n in (1e4, 1e5, 1e6, 1e8)]
    assert all(a < b for a, b in zip(refs, refs[1:])) and refs[-1] < 4.0


def test_bad_inputs_are_refused():
    scores, masks = np.zeros((6, 3)), np.zeros((6, 3), dtype=bool)
    masks[:, 0] = True
    with pytest.raises(ValueError, match="\\[K, m\\]"):
        canary_audit(variant="v", scores=scores[:, :2], masks=masks, epsilon=1.0, delta=1e-5, alpha=0.05)
    with pytest.raises(ValueError, match="bool"):
        canary_audit(variant="v", scores=scores, masks=masks.astype(int), epsilon=1.0, delta=1e-5, alpha=0.05)
    with pytest.raises(ValueError, match="finite"):
        canary_audit(variant="v", scores=scores * np.nan, masks=masks, epsilon=1.0, delta=1e-5, alpha=0.05)
    with pytest.raises(ValueError, match="alpha"):
        canary_audit(variant="v", scores=scores, masks=masks, epsilon=1.0, delta=1e-5, alpha=0.0)
    with pytest.raises(ValueError, match="4 models"):
        canary_audit(variant="v", scores=scores[:3], masks=masks[:3], epsilon=1.0, delta=1e-5, alpha=0.05)


def test_bonferroni_share():
    assert bonferroni_share(0.05, 8) == pytest.approx(0.00625)
    assert bonferroni_share(0.05, 1) == 0.05
    for bad in ((0.0, 2), (1.0, 2), (0.05, 0), (0.05, 1.5)):
        with pytest.raises(ValueError):
            bonferroni_share(*bad)

"""The one-run audit: the published algorithms' tested values, its ceiling, and its validity."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from scipy import special, stats

from dpmem.privacy import one_run
from dpmem.privacy.canary_audit import gdp_epsilon


def deterministic_normal(mu: float, n: int) -> np.ndarray:
    """n scores at the midpoints of N(mu, 1)'s quantiles: the same numbers on every machine."""
    return stats.norm.ppf(np.linspace(0, 1, n, endpoint=False) + 1 / (2 * n)) + mu


# jax_privacy's CanaryScoreAuditor test (test_epsilon_one_run_close): 10,000 in- and 10,000
# out-scores, significance 0.05, delta 1e-6, Bonferroni over the Pareto-frontier thresholds.
PUBLISHED = [("steinke", 1, 1.13346), ("steinke", 2, 2.311945), ("steinke", 4, 4.395568),
             ("fdp", 1, 2.164749), ("fdp", 2, 4.7218075), ("fdp", 4, 9.133752)]


@pytest.mark.parametrize("method,shift,expected", PUBLISHED)
def test_bounds_equal_the_reference_implementation_on_its_tested_values(method, shift, expected):
    eps, _, tried = one_run.best_eps(deterministic_normal(shift, 10_000), deterministic_normal(0, 10_000),
                                     level=0.05, delta=1e-6, method=method, grid="frontier")
    assert tried > 1
    assert eps == pytest.approx(expected, rel=1e-5)


def test_p_value_is_the_papers_sum():
    # Steinke et al. Algorithm 2 written as a loop over the missed guesses
    for m, r, wrong, eps, delta in [(100, 10, 0, 0.5, 1e-3), (1000, 100, 10, 1.0, 1e-6), (1000, 100, 1, 0.0, 0.1)]:
        v = r - wrong
        q = special.expit(eps)
        beta = stats.binom.sf(v - 1, r, q)
        a, running = 0.0, 0.0
        for i in range(1, v + 1):
            running += stats.binom.pmf(v - i, r, q)
            a = max(a, running / i)
        assert one_run.p_value(m, r, v, eps, delta) == pytest.approx(min(beta + a * delta * 2 * m, 1.0), rel=1e-9)


def test_ceiling_matches_the_known_limits_and_bounds_every_outcome():
    # all r guesses right, the best r, one test at 95% and delta 1e-5: about 5 at m = 1,000 and about
    # 7 at m = 10,000 (Steinke et al., Fig. 1)
    for m, known in ((1000, 5.09), (10_000, 7.14)):
        best = max(one_run.steinke_eps(m, r, r, 0.05, 1e-5) for r in np.unique(np.geomspace(10, m // 2, 60).astype(int)))
        assert best == pytest.approx(known, abs=0.03)
    # the audit's own ceiling pays for its grid: below the single test's, and within 25% of it
    assert 0.75 * 5.09 < one_run.ceiling(1000, 0.05, 1e-5) < 5.09
    # perfect separation reaches the ceiling, never above it
    masks = np.arange(1000) % 2 == 0
    eps = one_run.best_eps(masks[masks].astype(float), masks[~masks].astype(float), level=0.05, delta=1e-5)[0]
    assert eps == pytest.approx(one_run.ceiling(1000, 0.05, 1e-5), rel=1e-6)


def test_the_guess_grid_depends_on_the_number_of_canaries_only():
    """The Bonferroni count is fixed before the memberships are seen: the same for any scores and
    labels with the same m, and about 2 log2(m) + 1."""
    rng = np.random.default_rng(3)
    m = 2000
    tried = set()
    for frac_in in (0.1, 0.5, 0.9):
        scores = rng.normal(size=m)
        members = rng.random(m) < frac_in
        tried.add(one_run.best_eps(scores[members] + 1.0, scores[~members], level=0.05, delta=1e-5)[2])
    assert tried == {len(one_run.guess_grid(m))}
    assert len(one_run.guess_grid(m)) == pytest.approx(2 * math.log2(m) + 1, abs=2)
    assert one_run.guess_grid(m)[0] == 1 and one_run.guess_grid(m)[-1] == m
    # ties between an in- and an out-score are counted against the guesser
    _, tp, fp = one_run.top_counts(np.array([1.0, 0.0]), np.array([1.0]), np.array([1, 2, 3]))
    assert tp.tolist() == [0, 1, 2] and fp.tolist() == [1, 1, 1]


def test_randomised_response_exceeds_its_epsilon_at_most_alpha_of_the_time():
    """Randomised response on the membership bit is eps-DP and the guessing game is tight for it:
    guessing every canary's reported bit gives Binomial(m, e^eps / (1 + e^eps)) right guesses, so
    the bound exceeds eps with probability close to, and at most, alpha."""
    rng = np.random.default_rng(0)
    eps, m, reps, alpha = 1.0, 400, 400, 0.2
    right = rng.binomial(m, special.expit(eps), size=reps)     # every canary guessed
    lbs = np.array([one_run.steinke_eps(m, m, int(v), alpha, 0.0) for v in right])
    rate = np.mean(lbs > eps)
    assert rate <= alpha + 3 * math.sqrt(alpha * (1 - alpha) / reps)
    assert rate >= alpha / 3            # tight: a conservative slip in the p-value would show


@pytest.mark.parametrize("sample_rate", [1.0, 0.25])
def test_dp_sgd_canaries_never_exceed_the_accountants_epsilon(sample_rate):
    """Simulated DP-SGD canary scores (T steps, Poisson rate, noise multiplier sigma), 400 runs of
    1,000 canaries, at a fixed threshold: the Steinke bound exceeds the accountant's epsilon in
    at most alpha of the runs; at sample rate 1 the f-DP bound too (the claim is mu-GDP there)."""
    from dpmem.privacy import accounting
    rng = np.random.default_rng(1)
    T, sigma, m, reps, alpha, delta = 10, 1.2, 1000, 400, 0.1, 1e-5
    true_eps = accounting.epsilon_of(noise_multiplier=sigma, sample_rate=sample_rate, steps=T, delta=delta,
                                     accountant="prv")
    members = rng.random((reps, m)) < 0.5
    signal = rng.binomial(T, sample_rate, size=(reps, m)) * members
    scores = signal + sigma * math.sqrt(T) * rng.normal(size=(reps, m))
    threshold = T * sample_rate + 0.5 * sigma * math.sqrt(T)
    guess = scores > threshold
    n_guess, n_right = guess.sum(axis=1), (guess & members).sum(axis=1)
    steinke = np.array([one_run.steinke_eps(m, int(g), int(v), alpha, delta) for g, v in zip(n_guess, n_right)])
    assert np.mean(steinke > true_eps) <= alpha
    assert np.median(steinke) > 0.1 * true_eps          # not vacuous
    if sample_rate == 1.0:
        assert true_eps == pytest.approx(gdp_epsilon(math.sqrt(T) / sigma, delta), abs=0.02)
        fdp = np.array([one_run.fdp_eps(m, int(g), int(v), alpha, delta) for g, v in zip(n_guess, n_right)])
        assert np.mean(fdp > true_eps) <= alpha
        assert np.median(fdp) > np.median(steinke)     # the f-DP game is the tighter one for Gaussians


def test_one_run_audit_pools_models_and_reports_the_ceiling():
    rng = np.random.default_rng(2)
    masks = rng.random((2, 3000)) < 0.5
    scores = rng.normal(size=masks.shape) + 4.0 * masks
    audit = one_run.one_run_audit(variant="v", scores=scores, masks=masks, epsilon=1.0, delta=1e-5, alpha=0.05,
                                  sample_rate=1.0)
    assert audit.canaries == 6000 and audit.models == 2 and audit.n_in + audit.n_out == 6000
    assert audit.eps_lb == max(audit.eps_lb_steinke, audit.eps_lb_fdp) and not audit.consistent
    assert audit.power_eps == pytest.approx(max(one_run.ceiling(6000, 0.025, 1e-5, "steinke"),
                                                one_run.ceiling(6000, 0.025, 1e-5, "fdp")))
    # below sample rate 1 the f-DP game is not reported and the guessing game gets the whole alpha
    sub = one_run.one_run_audit(variant="v", scores=scores, masks=masks, epsilon=None, delta=1e-5, alpha=0.05,
                                sample_rate=0.5)
    assert sub.eps_lb_fdp is None and sub.eps_lb == sub.eps_lb_steinke and sub.consistent
    assert sub.power_eps == pytest.approx(one_run.ceiling(6000, 0.05, 1e-5, "steinke"))
    with pytest.raises(ValueError, match="bool"):
        one_run.one_run_audit(variant="v", scores=scores, masks=masks.astype(int), epsilon=1.0, delta=1e-5,
                              alpha=0.05, sample_rate=1.0)


def test_check_on_the_one_run_config_prints_the_bound_and_its_ceiling(tmp_path, capsys):
    """bench/configs/audit-one-run.toml: one model per variant; honest passes, noise off fails."""
    import json

    from dpmem.bench import cli, config
    from dpmem.bench.run import pipeline
    from dpmem.bench.store.run_store import RunStore
    one_run_config = Path(__file__).parents[1] / "bench" / "configs" / "audit-one-run.toml"
    for fault, code in (("none", 0), ("no_noise", 1)):
        cfg = config.load(one_run_config, [f"fault={fault}", "epsilons=4", "gradient_canaries=4000", "threads=1"])
        assert cfg.models == 1
        store = RunStore.create_or_resume(tmp_path / fault, cfg)
        pipeline.run(store, cfg, progress=False)
        capsys.readouterr()
        assert cli.main(["check", str(store.root), "--json"]) == code
        verdict = json.loads(capsys.readouterr().out)
        assert verdict["canary_audits"] == {}
        assert verdict["audit_family"] == {"nonprivate": ["black-box", "one-run"],
                                           "dp-eps4": ["black-box", "one-run", "parametric"]}
        o = verdict["one_run_audits"]["dp-eps4"]
        assert o["canaries"] == 4000 and o["alpha"] == pytest.approx(0.05 / 5) and o["kind"].startswith("rigorous")
        assert o["power_eps"] == pytest.approx(max(one_run.ceiling(4000, 0.005, 1e-5, "steinke"),
                                                   one_run.ceiling(4000, 0.005, 1e-5, "fdp")))
        if fault == "none":
            assert o["eps_lb"] is None or o["eps_lb"] <= 4.0
        else:
            assert o["eps_lb"] > 4.0 and any("one-run audit refutes" in f for f in verdict["failures"])
    assert cli.main(["check", str(tmp_path / "none")]) == 0
    text = capsys.readouterr().out
    assert "| one-run" in text and "ceiling of 4000 canaries" in text and "parametric (assumes DP-SGD" in text
    assert "| kind" in text      # every row labels its kind: rigorous or parametric


def test_one_run_configs_need_canaries_at_rate_one_half():
    from dpmem.bench import config
    from dpmem.privacy.errors import ConfigError
    assert config.load(None, ["models=1", "gradient_canaries=100", "q=0.5"]).models == 1
    with pytest.raises(ConfigError, match="q = 0.5"):
        config.load(None, ["models=8", "gradient_canaries=100", "q=0.7"])
    with pytest.raises(ConfigError, match="'models'"):
        config.load(None, ["models=1"])           # no canaries: one model audits nothing


def test_the_whole_audit_over_its_grid_exceeds_a_known_epsilon_at_most_alpha_of_the_time():
    """Randomised response on each canary's membership (exactly eps-DP per canary, scores with
    heavy ties) through one_run_audit with its fixed grid and Bonferroni split: the bound exceeds
    eps in at most alpha of 300 repetitions."""
    rng = np.random.default_rng(11)
    eps, m, reps, alpha = 1.0, 1000, 300, 0.3
    above = 0
    for _ in range(reps):
        members = rng.random((1, m)) < 0.5
        truthful = rng.random((1, m)) < special.expit(eps)
        scores = np.where(truthful, members, ~members).astype(float)
        audit = one_run.one_run_audit(variant="v", scores=scores, masks=members, epsilon=eps, delta=0.0,
                                      alpha=alpha, sample_rate=0.5)
        above += audit.eps_lb is not None and audit.eps_lb > eps
        assert audit.thresholds_tried == len(one_run.guess_grid(m))
    assert above / reps <= alpha + 3 * math.sqrt(alpha * (1 - alpha) / reps)

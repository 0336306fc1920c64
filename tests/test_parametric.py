"""The parametric white-box bound: its exact form, its validity under its assumption, its power."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dpmem.privacy import accounting
from dpmem.privacy.parametric import noise_and_sensitivity, parametric_bound, response


@pytest.mark.parametrize("momentum,weight_decay", [(0.0, 0.0), (0.9, 0.0), (0.5, 0.1)])
def test_response_is_torch_sgds_linear_response(momentum, weight_decay):
    T, lr = 7, 0.3
    H = response(steps=T, lr=lr, momentum=momentum, weight_decay=weight_decay)
    grads = np.random.default_rng(0).normal(size=T)
    theta = torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([theta], lr=lr, momentum=momentum, weight_decay=weight_decay)
    for g in grads:
        theta.grad = torch.tensor([g], dtype=torch.float32)
        opt.step()
    assert float(theta.detach()) == pytest.approx(-float(H @ grads), rel=1e-5, abs=1e-6)
    if momentum == 0 and weight_decay == 0:
        np.testing.assert_allclose(H, lr)


def simulated_scores(rng, *, reps, n, sigma, sensitivity, sample_rate, H):
    """u (scores in units of C) of `reps` independent audits with n in- and n out-canaries each."""
    T = len(H)
    z_in, z_out = rng.normal(size=(reps, n, T)), rng.normal(size=(reps, n, T))
    coins = rng.random((reps, n, T)) < sample_rate
    u_in = (sensitivity * coins + sigma * z_in) @ H
    u_out = (sigma * z_out) @ H
    return u_in, u_out


@pytest.mark.parametrize("sample_rate", [1.0, 0.3])
def test_the_bound_exceeds_the_truth_at_most_alpha_of_400_repetitions(sample_rate):
    """eps_lb > the accountant's epsilon for the true (sigma / s) exactly when sigma_hi / s_lo < sigma / s
    (epsilon falls with the noise multiplier), so the repetitions test the ratio, vectorised. At a
    large level the miss rate must be near it (the bounds are exact, not conservative) and not above."""
    rng = np.random.default_rng(4)
    H = response(steps=6, lr=0.5, momentum=0.5, weight_decay=0.05)
    sigma, s, reps, level = 1.3, 1.0, 400, 0.3
    u_in, u_out = simulated_scores(rng, reps=reps, n=1500, sigma=sigma, sensitivity=s, sample_rate=sample_rate, H=H)
    sig, sig_hi, sens, sens_lo = noise_and_sensitivity(u_in, u_out, H=H, sample_rate=sample_rate, level=level)
    assert np.median(sig) == pytest.approx(sigma, rel=0.01) and np.median(sens) == pytest.approx(s, rel=0.05)
    miss = np.mean(sig_hi / sens_lo < sigma / s)
    assert miss <= level + 3 * math.sqrt(level * (1 - level) / reps)
    assert miss >= level / 8     # below the level: the ratio misses only when both bounds lean the same way
    # each bound on its own misses about half the level
    for rate in (np.mean(sig_hi < sigma), np.mean(sens_lo > s)):
        assert rate <= level / 2 + 3 * math.sqrt(level / 2 / reps) and rate >= level / 8


def test_full_bound_is_tight_for_honest_runs_and_refutes_a_noise_multiplier_25pc_too_small():
    """K models x m canaries as the batched engine makes them (scores theta_c = u C / B_k)."""
    rng = np.random.default_rng(5)
    K, m, T, lr, C, delta = 200, 500, 10, 0.5, 1.0, 1e-5
    sigma = accounting.calibrate_noise(target_epsilon=4.0, delta=delta, sample_rate=1.0, steps=T, accountant="prv")
    batch = rng.integers(40, 60, size=K)
    masks = rng.random((K, m)) < 0.5

    def scores(noise):
        u = (masks * T + noise * math.sqrt(T) * rng.normal(size=(K, m))) * lr
        return u * C / batch[:, None]

    kw = dict(variant="dp-eps4", masks=masks, batch_sizes=batch, max_grad_norm=C, lr=lr, momentum=0.0,
              weight_decay=0.0, steps=T, sample_rate=1.0, epsilon=4.0, delta=delta, level=0.01)
    honest = parametric_bound(scores=scores(sigma), **kw)
    assert honest.consistent and 0.9 * 4.0 <= honest.eps_lb <= 4.0
    assert honest.noise_multiplier_hi >= sigma and honest.sensitivity_lo <= 1.0
    bug = parametric_bound(scores=scores(0.75 * sigma), **kw)
    assert not bug.consistent and bug.eps_lb > 4.0
    assert bug.noise_multiplier == pytest.approx(0.75 * sigma, rel=0.02)
    # without noise the out-scores are exactly 0: infinitely many noise multipliers fit nothing
    none = parametric_bound(scores=scores(0.0), **kw)
    assert none.eps_lb == math.inf and not none.consistent


def test_the_exact_form_holds_on_the_batched_engine_with_momentum_and_poisson_sampling(tmp_path):
    """A real run (momentum, weight decay, Poisson rate < 1): the measured noise multiplier and
    sensitivity bracket the trained ones; under noise_x0.75 the measured sigma is 0.75 of the plan's."""
    from dpmem.bench import config
    from dpmem.bench.report import analysis
    from dpmem.bench.run import pipeline
    from dpmem.bench.store.run_store import RunStore
    small = ["dataset=synthetic", "n_train=120", "n_test=50", "n_subgroups=10", "dim=8", "model=logreg",
             "models=17", "unit_size=17", "epochs=3", "batch_size=16", "lr=0.3", "momentum=0.9",
             "weight_decay=0.01", "epsilons=4", "gradient_canaries=400", "canary_norm=2", "q=0.5",
             "accountant=prv", "threads=1"]
    for fault, factor in (("none", 1.0), ("noise_x0.75", 0.75)):
        cfg = config.load(None, small + [f"fault={fault}"])
        store = RunStore.create_or_resume(tmp_path / fault, cfg)
        pipeline.run(store, cfg, progress=False)
        plan = store.plan("dp-eps4")
        assert plan["sample_rate"] < 1 and plan.get("fault", "none") == fault
        p = analysis.analyse(store, with_pairs=False).parametric["dp-eps4"]
        trained = factor * plan["noise_multiplier"]
        assert p.noise_multiplier == pytest.approx(trained, rel=0.03)
        assert p.noise_multiplier_hi >= trained and p.sensitivity_lo <= 1.0 <= p.sensitivity + 0.1
        if fault == "none":
            assert p.consistent


def test_honest_claims_at_the_exact_epsilon_are_refuted_at_most_level_of_1000_repetitions():
    """The target of the audit: a claim computed by an exact accountant (PLD) for a noise multiplier
    calibrated by RDP, which over-states epsilon. Through the epsilon lower bound the parametric
    bound exceeds it in at most the level of 1,000 repetitions; through the run's RDP accountant
    (what the bound did before) it exceeded it in most of them."""
    from dpmem.bench.tools.parametric_validity import critical_noise, ratios
    T, q, delta, level, reps = 10, 0.25, 1e-5, 0.3, 1000
    sigma = accounting.calibrate_noise(target_epsilon=4.0, delta=delta, sample_rate=q, steps=T, accountant="rdp")
    claim = accounting.epsilon_pld(noise_multiplier=sigma, sample_rate=q, steps=T, delta=delta)
    assert claim < 3.6                      # RDP's 4 is about 3.5 exactly
    lower = critical_noise(lambda s: accounting.epsilon_lower_bound(noise_multiplier=s, sample_rate=q, steps=T,
                                                                    delta=delta), claim)
    rdp = critical_noise(lambda s: accounting.epsilon_of(noise_multiplier=s, sample_rate=q, steps=T, delta=delta,
                                                         accountant="rdp"), claim)
    assert lower <= sigma <= rdp            # exceeding needs sigma_hi / s_lo below sigma, and below RDP's less
    import dpmem.bench.tools.parametric_validity as pv
    rng = np.random.default_rng(7)
    saved = pv.LEVEL
    pv.LEVEL = level
    try:
        ratio = ratios(rng, reps=reps, n=4000, sigma=sigma, q=q, noise="gaussian")
    finally:
        pv.LEVEL = saved
    rate = np.mean(ratio < lower)
    assert rate <= level + 3 * math.sqrt(level * (1 - level) / reps)
    assert np.mean(ratio < rdp) > 2 * level   # the accountant's over-statement, refuted as if it were the truth

"""Audit DP-SGD from gradient-canary scores: a rigorous epsilon lower bound and a Gaussian estimate.

Input: ``scores`` float [K, m], model k's final ``theta_c[j]`` for canary j (models/canary_stack.py and models/canaries.py),
and ``masks`` bool [K, m], whether canary j was in model k's subset. Each (model, canary) pair is
one observation of the mechanism "train with or without this canary, release its score".

Rigorous bound (a threshold test with Clopper-Pearson bounds). The threshold t is chosen on the
first ``SELECTION_FRACTION`` (5%) of the models (the selection models) and the bound is computed
on the other 95% only (the evaluation models), so t is independent of the observations it is
tested on. The choice fits a normal distribution to each class of the selection scores and takes
the t whose bound would be largest at the evaluation models' counts if the fits were exact
(falling back to the empirical counts of the selection models when a class is constant or far
from normal). The
fit only steers the choice; the bound's validity does not depend on it. A smooth fit on 5% of
the models picks nearly the best threshold, so the bound loses little against the oracle that
knows the best threshold and tests it on all models (``oracle_eps_lb``; a few percent in
simulations of the audit config's counts, where the earlier split in halves lost 6-8%).

On the evaluation models, TPR = P(score > t | in) and FPR =
P(score > t | out) are estimated from all in- and out-observations; TPR_lo and FPR_hi are
one-sided Clopper-Pearson bounds at level alpha / 2 each. (eps, delta)-DP for one canary implies
TPR <= e^eps FPR + delta and (1 - FPR) <= e^eps (1 - TPR) + delta for every test, so
    eps_lb = max(ln((TPR_lo - delta) / FPR_hi), ln((1 - FPR_hi - delta) / (1 - TPR_lo)))
is below the true epsilon with probability >= 1 - alpha, and the claim is refuted when
eps_lb > claim.

Independence assumptions, precisely: (a) canary memberships are independent Bernoulli(q) draws
for every (model, canary), independent of everything else; (b) different models use independent
randomness (initialisation, Poisson coins, noise); (c) within a model the canaries live in
disjoint coordinates that the network never reads, each canary's gradient is clipped on its own
(it is its own example) and its coordinate gets its own coins and noise, so with momentum and
weight decay acting coordinate-wise, the m scores of one model are independent given the
memberships. Then the indicators 1[score > t] are i.i.d. Bernoulli(TPR) over in-observations and
Bernoulli(FPR) over out-observations, which is what Clopper-Pearson needs. Canaries are
exchangeable (same gradient norm, same rate), so TPR and FPR are the same for every canary and
the DP inequality for any single canary is the inequality for the pooled rates.

Gaussian trade-off estimate (f-DP). If out-scores are N(a, s^2) and in-scores N(a + mu s, s^2),
the mechanism is mu-GDP at best, and mu-GDP is (eps, delta)-DP exactly for
    delta(eps) = Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2)   (Dong, Roth, Su 2019).
``mu`` is estimated as the difference of the in and out means over a pooled standard deviation,
and ``eps_gdp`` solves delta(eps) = delta. It is an ESTIMATE, not a bound: no confidence level,
and it assumes Gaussian scores of equal variance (exact for DP-SGD with sample rate 1, no
momentum and no weight decay, where the score is a sum of the canary's clipped gradients and
Gaussian noise; with Poisson sampling below 1 the in-scores are a binomial mixture).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
from scipy import optimize, special, stats

from dpmem.privacy import bounds

# Candidate thresholds tried on the selection models: this many quantiles of its scores.
THRESHOLD_CANDIDATES = 2000
# Share of the models used only to choose the threshold.
SELECTION_FRACTION = 0.05
# The threshold is steered by normal fits only when each class is this close to its fit (KS distance).
FIT_KS_DISTANCE = 0.02


@dataclass(frozen=True, kw_only=True)
class CanaryAudit:
    variant: str
    epsilon_claimed: float | None   # None: no claim (eps_lb reported only)
    delta: float
    alpha: float                    # this audit's level (its share of the family-wise alpha)
    models: int                     # K
    canaries: int                   # m per model
    selection_models: int           # models used to choose the threshold
    evaluation_models: int          # models the bound is computed on
    n_in: int                       # in-observations in the evaluation models
    n_out: int                      # out-observations in the evaluation models
    threshold: float
    tpr: float
    fpr: float
    tpr_lo: float                   # one-sided Clopper-Pearson bounds, level alpha / 2 each
    fpr_hi: float
    eps_lb: float | None            # rigorous lower bound; None when the test refutes no epsilon
    power_eps: float                # the largest epsilon these observation counts could refute
    gdp_mu: float                   # Gaussian estimate (all models): (mean_in - mean_out) / pooled sd
    eps_gdp: float                  # epsilon of gdp_mu at delta: an estimate, no confidence level
    consistent: bool                # eps_lb <= claim (or no claim)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def summary_line(self) -> str:
        claim = "no claim" if self.epsilon_claimed is None else f"claim eps={self.epsilon_claimed:g}"
        lb = "none" if self.eps_lb is None else f"{self.eps_lb:.3f}"
        return (f"{self.variant} (gradient canaries, {self.models} models x {self.canaries}): {claim}; "
                f"eps_lb {lb} at alpha={self.alpha:g}; Gaussian estimate {self.eps_gdp:.3f} (mu {self.gdp_mu:.3f}); "
                f"{'consistent' if self.consistent else 'VIOLATED'}")


# -- Gaussian differential privacy -----------------------------------------------------------------

def gdp_delta(epsilon, mu) -> np.ndarray:
    """delta(eps) of mu-GDP: Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2); mu > 0."""
    epsilon, mu = np.broadcast_arrays(np.asarray(epsilon, dtype=float), np.asarray(mu, dtype=float))
    first = special.ndtr(-epsilon / mu + mu / 2)
    second = np.exp(epsilon + special.log_ndtr(-epsilon / mu - mu / 2))
    return first - second


def gdp_epsilon(mu: float, delta: float) -> float:
    """The smallest eps >= 0 with delta(eps) <= delta for mu-GDP (0 when mu <= 0)."""
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    if not math.isfinite(mu):
        raise ValueError(f"mu must be finite, got {mu}")
    if mu <= 0 or gdp_delta(0.0, mu) <= delta:
        return 0.0
    hi = 1.0
    while gdp_delta(hi, mu) > delta:
        hi *= 2.0
    return float(optimize.brentq(lambda e: float(gdp_delta(e, mu)) - delta, 0.0, hi, xtol=1e-10))


def gaussian_mu(scores_in: np.ndarray, scores_out: np.ndarray) -> float:
    """(mean_in - mean_out) / pooled standard deviation; 0 when both samples are constant and equal,
    +inf when they are constant and the in-mean is larger."""
    scores_in, scores_out = np.asarray(scores_in, dtype=float), np.asarray(scores_out, dtype=float)
    if scores_in.size < 2 or scores_out.size < 2:
        raise ValueError("need at least two in- and two out-observations")
    diff = scores_in.mean() - scores_out.mean()
    pooled = math.sqrt(((scores_in.size - 1) * scores_in.var(ddof=1) + (scores_out.size - 1) * scores_out.var(ddof=1))
                       / (scores_in.size + scores_out.size - 2))
    if pooled == 0.0:
        return 0.0 if diff == 0 else math.copysign(math.inf, diff)
    return float(diff / pooled)


# -- the threshold test --------------------------------------------------------------------------

def counts_above(scores_in: np.ndarray, scores_out: np.ndarray, thresholds) -> tuple[np.ndarray, np.ndarray]:
    """(# in-scores > t, # out-scores > t) for every threshold t."""
    t = np.asarray(thresholds, dtype=float)
    s_in, s_out = np.sort(np.asarray(scores_in, dtype=float)), np.sort(np.asarray(scores_out, dtype=float))
    return (s_in.size - np.searchsorted(s_in, t, side="right"), s_out.size - np.searchsorted(s_out, t, side="right"))


def threshold_eps_lb(k_in, n_in, k_out, n_out, *, delta: float, level: float) -> np.ndarray:
    """eps_lb of threshold tests with these counts (both directions, see the module docstring)."""
    return bounds.eps_lb_from_bounds(bounds.cp_lower(k_in, n_in, level), bounds.cp_upper(k_out, n_out, level), delta)


def choose_threshold(scores_in: np.ndarray, scores_out: np.ndarray, *, delta: float, level: float) -> float:
    """The threshold whose bound on these scores is largest (among quantiles of the scores)."""
    pooled = np.concatenate([np.ravel(scores_in), np.ravel(scores_out)]).astype(float)
    candidates = np.unique(np.quantile(pooled, np.linspace(0.0, 1.0, THRESHOLD_CANDIDATES + 1)))
    k_in, k_out = counts_above(scores_in, scores_out, candidates)
    lb = threshold_eps_lb(k_in, np.size(scores_in), k_out, np.size(scores_out), delta=delta, level=level)
    return float(candidates[int(np.argmax(lb))])


def choose_threshold_by_fit(scores_in: np.ndarray, scores_out: np.ndarray, *, n_in: float, n_out: float,
                            delta: float, level: float) -> float:
    """The threshold that maximises the bound at counts (n_in, n_out) under normal fits of both classes.

    Falls back to ``choose_threshold`` on the scores themselves when a class has fewer than two
    observations, no spread, or is not close to normal (Kolmogorov-Smirnov distance to its fit above
    ``FIT_KS_DISTANCE``; discrete scores, for example): a bad fit would steer to a bad threshold."""
    scores_in, scores_out = np.ravel(scores_in).astype(float), np.ravel(scores_out).astype(float)
    if scores_in.size < 2 or scores_out.size < 2 or scores_in.std() == 0 or scores_out.std() == 0:
        return choose_threshold(scores_in, scores_out, delta=delta, level=level)
    m_in, s_in, m_out, s_out = scores_in.mean(), scores_in.std(ddof=1), scores_out.mean(), scores_out.std(ddof=1)
    if max(stats.kstest(scores_in, "norm", args=(m_in, s_in)).statistic,
           stats.kstest(scores_out, "norm", args=(m_out, s_out)).statistic) > FIT_KS_DISTANCE:
        return choose_threshold(scores_in, scores_out, delta=delta, level=level)
    lo, hi = min(m_in - 8 * s_in, m_out - 8 * s_out), max(m_in + 8 * s_in, m_out + 8 * s_out)
    t = np.linspace(lo, hi, THRESHOLD_CANDIDATES + 1)
    tpr, fpr = special.ndtr((m_in - t) / s_in), special.ndtr((m_out - t) / s_out)
    lb = threshold_eps_lb(n_in * tpr, n_in, n_out * fpr, n_out, delta=delta, level=level)
    return float(t[int(np.argmax(lb))])


def oracle_eps_lb(n_in: float, n_out: float, mu: float, *, delta: float, level: float) -> float:
    """The best single-threshold bound for Gaussian scores N(0, 1) vs N(mu, 1) with n_in / n_out
    observations: the threshold known in advance, the counts at their expected values. No
    threshold test on these counts can do better on average; it is the reference for how close
    an audit gets."""
    if not (mu > 0 and math.isfinite(mu)):
        raise ValueError(f"mu must be positive and finite, got {mu}")
    t = np.linspace(-4.0, mu + 10.0, 20001)
    tpr, fpr = special.ndtr(mu - t), special.ndtr(-t)
    lb = threshold_eps_lb(n_in * tpr, n_in, n_out * fpr, n_out, delta=delta, level=level)
    return float(np.max(lb))


def canary_audit(*, variant: str, scores: np.ndarray, masks: np.ndarray, epsilon: float | None, delta: float,
                 alpha: float, threshold: float | None = None) -> CanaryAudit:
    """Audit one variant's canary scores against a claimed (epsilon, delta) at level ``alpha``.

    ``threshold``: a threshold fixed in advance (then every model is an evaluation model);
    None chooses it on the selection models (see the module docstring)."""
    scores, masks = np.asarray(scores, dtype=float), np.asarray(masks)
    if scores.ndim != 2 or scores.shape != masks.shape:
        raise ValueError(f"scores and masks must both be [K, m]; got {scores.shape} and {masks.shape}")
    if masks.dtype != np.bool_:
        raise ValueError(f"masks must be bool, got {masks.dtype}")
    if not np.all(np.isfinite(scores)):
        raise ValueError("canary scores must be finite")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if not 0.0 <= delta < 1.0:
        raise ValueError(f"delta must be in [0, 1), got {delta}")
    if epsilon is not None and not (epsilon >= 0 and math.isfinite(epsilon)):
        raise ValueError(f"claimed epsilon must be finite and >= 0, got {epsilon}")
    K, m = scores.shape
    level = alpha / 2.0
    if threshold is None:
        if K < 4:
            raise ValueError(f"need at least 4 models to hold some out for the threshold, got {K}")
        select = np.arange(K) < max(1, round(SELECTION_FRACTION * K))
        ev = masks[~select]
        threshold = choose_threshold_by_fit(scores[select][masks[select]], scores[select][~masks[select]],
                                            n_in=float(ev.sum()), n_out=float((~ev).sum()), delta=delta, level=level)
    else:
        select = np.zeros(K, dtype=bool)
    ev_scores, ev_masks = scores[~select], masks[~select]
    s_in, s_out = ev_scores[ev_masks], ev_scores[~ev_masks]
    if s_in.size == 0 or s_out.size == 0:
        raise ValueError("the evaluation models need both in- and out-observations")
    k_in, k_out = (int(c[0]) for c in counts_above(s_in, s_out, [threshold]))
    n_in, n_out = int(s_in.size), int(s_out.size)
    tpr_lo, fpr_hi = float(bounds.cp_lower(k_in, n_in, level)), float(bounds.cp_upper(k_out, n_out, level))
    lb = float(bounds.eps_lb_from_bounds(tpr_lo, fpr_hi, delta))
    power = float(threshold_eps_lb(n_in, n_in, 0, n_out, delta=delta, level=level))
    mu = gaussian_mu(scores[masks], scores[~masks])
    eps_gdp = math.inf if mu == math.inf else gdp_epsilon(mu, delta) if delta > 0 else (math.inf if mu > 0 else 0.0)
    eps_lb = lb if math.isfinite(lb) else None
    return CanaryAudit(variant=variant, epsilon_claimed=None if epsilon is None else float(epsilon),
                       delta=float(delta), alpha=float(alpha), models=K, canaries=m,
                       selection_models=int(select.sum()), evaluation_models=int((~select).sum()),
                       n_in=n_in, n_out=n_out, threshold=float(threshold), tpr=k_in / n_in, fpr=k_out / n_out,
                       tpr_lo=tpr_lo, fpr_hi=fpr_hi, eps_lb=eps_lb, power_eps=power, gdp_mu=float(mu),
                       eps_gdp=float(eps_gdp),
                       consistent=epsilon is None or eps_lb is None or eps_lb <= epsilon)

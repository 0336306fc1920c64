"""Epsilon lower bounds from ONE training run: the guessing games of Steinke, Nasr & Jagielski (2023)
and Mahloujifar, Melis & Chaudhuri (2024).

The experiment. m canaries, each independently included in the training data with probability 1/2
(canaries of several independent models may be pooled: adding or removing one canary changes one
model's input only, so the pooled release is as private, per canary, as one model). After
training, an auditor scores every canary and guesses "in" for the r canaries whose score exceeds
a threshold (one-sided guessing, k- = 0); v of the r guesses are right.

Steinke et al., Theorem 5.2 / Algorithm 2 (rigorous for any (eps, delta)-DP mechanism). With
q = e^eps / (1 + e^eps),
    P[v or more right] <= beta + a * 2 m delta,
    beta = P[Binomial(r, q) >= v],
    a = max_{1 <= i <= v} (P[Binomial(r, q) >= v - i] - beta) / i,
so (eps, delta) is refuted at level ``level`` when that p-value is <= level; the bound is the
largest such eps.

Mahloujifar et al., "audit_rh_with_cap" (rigorous for a mechanism that is mu-GDP, mu being the
Gaussian trade-off curve that passes through (eps, delta)). Their recursion bounds, at the given
level, how many of the guesses a mu-GDP mechanism lets be right, using the Gaussian trade-off
G_mu(x) = Phi(Phi^-1(1 - x) - mu) through its inverse blow-up x -> Phi(Phi^-1(x) - mu); the
claim is refuted when the observed guesses exceed it. It is far tighter for Gaussian mechanisms, but it
refutes "the mechanism is mu-GDP", which the (eps, delta) claim of DP-SGD implies only when the
accountant's privacy curve is that Gaussian one: full-batch DP-SGD (sample rate 1), whose T steps
of noise multiplier sigma are exactly (sqrt(T) / sigma)-GDP. With Poisson sampling below 1 the
claimed curve is not Gaussian, and the f-DP bound is not reported.

Threshold choice: a fixed grid. The auditor guesses "in" for the r canaries with the highest
scores, for every r in ``guess_grid(m)``: a geometric grid of about 2 log2(m) counts that depends
on m alone, fixed before any score or membership is seen. Each r is one test at level / |grid|
(Bonferroni), so the largest bound over the grid holds at ``level`` by a union bound over a
number of tests known in advance. Top-r is a post-processing of the scores, as the games require;
ties between in- and out-scores at the r-th place are counted against the auditor (out first),
which can only lower the bound. jax_privacy's ``CanaryScoreAuditor`` tries the thresholds on the
Pareto frontier of the observed (false negatives, true negatives) instead, whose number depends
on the memberships; ``best_eps(..., grid="frontier")`` reproduces its tested values
(tests/test_one_run.py) to show the per-threshold arithmetic is the same, and is not used by
the audit.

The ceiling. Even if the scores separate members perfectly, r guesses out of m canaries refute
only so much: the largest bound over the grid's r, at the grid's Bonferroni share, with the
expected m / 2 members ranked first, is what this audit can show with m canaries (``ceiling``).
A claim above the ceiling cannot be refuted by one run.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np
from scipy import optimize, special, stats

from dpmem.privacy.canary_audit import gdp_delta

_binom = stats.binom

# A canary run of at most this many models per variant is audited as one run (its canaries pooled);
# with more, the multi-model threshold test (privacy/canary_audit.py) has the power.
ONE_RUN_MAX_MODELS = 16


def p_value(m: int, n_guess: int, n_correct: int, eps: float, delta: float) -> float:
    """Steinke et al.'s p-value of ``n_correct`` right out of ``n_guess`` guesses among m canaries."""
    q = special.expit(eps)
    beta = _binom.sf(n_correct - 1, n_guess, q)
    if delta == 0 or n_correct == 0:
        return float(min(beta, 1.0))
    i = np.arange(1, n_correct + 1)
    excess = _binom.sf(n_correct - i - 1, n_guess, q) - beta
    a = float(np.max(excess / i, initial=0.0))
    return float(min(beta + a * delta * 2 * m, 1.0))


def _search(objective, eps_lo: float) -> float:
    """Largest eps >= eps_lo with objective(eps) > 0 (objective falls with eps); eps_lo if none."""
    if objective(eps_lo) <= 0:
        return eps_lo
    eps_hi = max(1.0, 2 * eps_lo)
    while objective(eps_hi) > 0:
        eps_lo, eps_hi = eps_hi, 2 * eps_hi
        if eps_hi > 1e3:
            return math.inf
    return float(optimize.brentq(objective, eps_lo, eps_hi, xtol=1e-6))


def steinke_eps(m: int, n_guess: int, n_correct: int, level: float, delta: float, eps_lo: float = 0.0) -> float:
    """The largest eps that ``n_correct`` of ``n_guess`` right guesses refute at this level (>= eps_lo)."""
    if p_value(m, n_guess, n_correct, eps_lo, 0.0) > level:    # delta only raises the p-value
        return eps_lo
    return _search(lambda e: level - p_value(m, n_guess, n_correct, e, delta), eps_lo)


@functools.lru_cache(maxsize=4096)
def gdp_mu(eps: float, delta: float) -> float:
    """The mu whose mu-GDP curve passes through (eps, delta): delta(eps; mu) = delta."""
    if delta >= 1.0:
        return 0.0
    if gdp_delta(eps, 1e-12) >= delta:
        return 0.0
    hi = 1.0
    while float(gdp_delta(eps, hi)) < delta:
        hi *= 2.0
        if hi > 1e6:
            return math.inf
    return float(optimize.brentq(lambda mu: float(gdp_delta(eps, mu)) - delta, 1e-12, hi, xtol=1e-14, rtol=1e-15))


def _fdp_objective(eps: float, m: int, n_guess: int, n_correct: int, level: float, delta: float) -> float:
    """Positive when the guesses refute mu(eps, delta)-GDP (Mahloujifar et al., audit_rh_with_cap)."""
    mu = gdp_mu(eps, delta)
    if mu == math.inf:
        return -1.0

    def blow_up_inverse(x: float) -> float:
        return float(special.ndtr(special.ndtri(x) - mu))

    r = level * n_correct / m
    h = level * (n_guess - n_correct) / m
    for i in range(n_correct - 1, -1, -1):
        h_new = max(h, blow_up_inverse(r))
        if h_new == h:   # from here on neither h nor r changes
            break
        r = min(r + (i / (n_guess - i)) * (h_new - h), 1.0)
        h = h_new
    return r + h - n_guess / m


def fdp_eps(m: int, n_guess: int, n_correct: int, level: float, delta: float, eps_lo: float = 0.0) -> float:
    """The largest eps whose Gaussian trade-off (through (eps, delta)) these guesses refute (>= eps_lo)."""
    return _search(lambda e: _fdp_objective(e, m, n_guess, n_correct, level, delta), eps_lo)


def frontier_counts(scores_in: np.ndarray, scores_out: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(thresholds, true positives, false positives) of the rules "score >= t means in", over the
    thresholds on the Pareto frontier (upper convex hull) of the ROC curve."""
    s_in, s_out = np.sort(np.asarray(scores_in, dtype=float)), np.sort(np.asarray(scores_out, dtype=float))
    thresholds = np.concatenate([np.union1d(s_in, s_out), [np.inf]])
    fn = np.searchsorted(s_in, thresholds, side="left")
    tn = np.searchsorted(s_out, thresholds, side="left")
    points = np.stack([fn, tn], axis=1).astype(float)
    keep = np.arange(len(points))
    while len(keep) > 2:     # drop vertices that a chord of their neighbours weakly dominates
        d = np.diff(points[keep], axis=0)
        dominated = d[:-1, 1] * d[1:, 0] - d[1:, 1] * d[:-1, 0] <= 0
        if not dominated.any():
            break
        keep = keep[np.r_[True, ~dominated, True]]
    tp = s_in.size - fn[keep]
    fp = s_out.size - tn[keep]
    return thresholds[keep], tp, fp


def guess_grid(m: int) -> np.ndarray:
    """The guess counts r tried with m canaries: 1, then a factor of sqrt(2) apart, up to m, fixed
    by m alone (see the module docstring)."""
    if int(m) != m or m < 1:
        raise ValueError(f"the number of canaries must be a positive integer, got {m}")
    steps = int(math.ceil(2 * math.log2(m))) + 1 if m > 1 else 1
    return np.unique(np.round(np.geomspace(1, m, steps)).astype(np.int64))


def top_counts(scores_in: np.ndarray, scores_out: np.ndarray, guesses: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(thresholds, true positives, false positives) of guessing "in" for the r highest scores,
    for every r in ``guesses``; ties at the r-th score are broken against the guesser (out-scores
    first)."""
    s_in, s_out = np.asarray(scores_in, dtype=float).ravel(), np.asarray(scores_out, dtype=float).ravel()
    pooled = np.concatenate([s_in, s_out])
    is_in = np.concatenate([np.ones(s_in.size, bool), np.zeros(s_out.size, bool)])
    # descending score; among equal scores the out-scores come first
    order = np.lexsort((is_in, -pooled))
    tp = np.concatenate([[0], np.cumsum(is_in[order])])
    r = np.asarray(guesses, dtype=np.int64)
    return pooled[order][r - 1], tp[r], r - tp[r]


def best_eps(scores_in: np.ndarray, scores_out: np.ndarray, *, level: float, delta: float,
             method: str = "steinke", grid: str = "fixed") -> tuple[float, float, int]:
    """(eps_lb, threshold, thresholds tried): the best one-run bound over the guess counts of
    ``guess_grid`` (``grid="fixed"``, the audit's) or over the frontier thresholds (``"frontier"``,
    jax_privacy's, whose count depends on the memberships), each tested at level / (thresholds
    tried) so that the maximum holds at ``level``."""
    audit = {"steinke": steinke_eps, "fdp": fdp_eps}[method]
    m = int(np.size(scores_in) + np.size(scores_out))
    if grid == "fixed":
        thresholds, tp, fp = top_counts(scores_in, scores_out, guess_grid(m))
    elif grid == "frontier":
        thresholds, tp, fp = frontier_counts(scores_in, scores_out)
    else:
        raise ValueError(f"grid must be 'fixed' or 'frontier', got {grid!r}")
    share = level / len(thresholds)
    guesses = tp + fp
    # most promising first (highest precision lower bound), so later ones are cut by the precision test
    with np.errstate(invalid="ignore", divide="ignore"):
        prec_lo = 1.0 - np.where(fp < guesses, stats.beta.ppf(1 - level, fp + 1, guesses - fp), 1.0)
    best, best_t, best_q = 0.0, math.nan, 0.5
    for idx in np.argsort(-np.nan_to_num(prec_lo, nan=-1.0)):
        g, c = int(guesses[idx]), int(tp[idx])
        if g == 0 or c / g <= best_q:     # raw precision below the odds of the best eps: no gain
            continue
        eps = audit(m, g, c, share, delta, best)
        if eps > best:
            best, best_t = eps, float(thresholds[idx])
            best_q = float(special.expit(best)) if math.isfinite(best) else 1.0
    return best, best_t, len(thresholds)


@functools.lru_cache(maxsize=256)
def ceiling(m: int, level: float, delta: float, method: str = "steinke") -> float:
    """The largest bound this audit can give with m canaries: perfect separation of m // 2 members
    (the expected count), so r guesses get min(r, m // 2) right, for the best r of ``guess_grid(m)``,
    each r at level / |grid| as in ``best_eps``."""
    audit = {"steinke": steinke_eps, "fdp": fdp_eps}[method]
    grid = guess_grid(m)
    return max(audit(m, int(r), int(min(r, m // 2)), level / len(grid), delta) for r in grid)


# -- the audit of one variant ----------------------------------------------------------------------

FDP_KIND = "f-DP (refutes mu-GDP; the DP-SGD claim is mu-GDP at sample rate 1)"


@dataclasses.dataclass(frozen=True, kw_only=True)
class OneRunAudit:
    variant: str
    epsilon_claimed: float | None
    delta: float
    alpha: float                    # this audit's share of the family-wise alpha
    models: int                     # pooled models (each an independent run)
    canaries: int                   # m: every (model, canary) pair is one canary of the guessing game
    n_in: int
    n_out: int
    eps_lb_steinke: float | None    # rigorous for any (eps, delta)-DP mechanism
    eps_lb_fdp: float | None        # reported at sample rate 1 only (see the module docstring)
    eps_lb: float | None            # the larger of the two; None when neither refutes any epsilon
    thresholds_tried: int
    power_eps: float                # the ceiling: the largest bound m canaries can give at this level
    consistent: bool

    def to_dict(self) -> dict:
        return dataclasses.asdict(self) | {"kind": KIND}


KIND = ("rigorous (the guessing game: any (eps, delta)-DP mechanism; the f-DP game: a mu-GDP claim, "
        "which DP-SGD at sample rate 1 makes)")


def one_run_audit(*, variant: str, scores: np.ndarray, masks: np.ndarray, epsilon: float | None, delta: float,
                  alpha: float, sample_rate: float | None) -> OneRunAudit:
    """The one-run audit of one variant: every model's canaries pooled into one guessing game.

    ``masks`` must be Bernoulli(1/2) memberships (the games' analysis assumes it). The two bounds
    share ``alpha`` (alpha / 2 each) when both are reported."""
    scores, masks = np.asarray(scores, dtype=float), np.asarray(masks)
    if scores.shape != masks.shape or scores.ndim != 2:
        raise ValueError(f"scores and masks must both be [K, m]; got {scores.shape} and {masks.shape}")
    if masks.dtype != np.bool_:
        raise ValueError(f"masks must be bool, got {masks.dtype}")
    if not np.all(np.isfinite(scores)):
        raise ValueError("canary scores must be finite")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    s_in, s_out = scores[masks], scores[~masks]
    if s_in.size == 0 or s_out.size == 0:
        raise ValueError("the one-run audit needs both in- and out-canaries")
    use_fdp = sample_rate is not None and sample_rate >= 1.0
    level = alpha / 2 if use_fdp else alpha
    m = int(scores.size)
    steinke, _, tried = best_eps(s_in, s_out, level=level, delta=delta, method="steinke")
    fdp = best_eps(s_in, s_out, level=level, delta=delta, method="fdp")[0] if use_fdp else None
    power = max(ceiling(m, level, delta, "steinke"), ceiling(m, level, delta, "fdp") if use_fdp else 0.0)
    candidates = [e for e in (steinke, fdp) if e is not None and e > 0]
    eps_lb = max(candidates) if candidates else None
    return OneRunAudit(variant=variant, epsilon_claimed=None if epsilon is None else float(epsilon),
                       delta=float(delta), alpha=float(alpha), models=int(scores.shape[0]), canaries=m,
                       n_in=int(s_in.size), n_out=int(s_out.size),
                       eps_lb_steinke=steinke if steinke > 0 else None,
                       eps_lb_fdp=None if fdp is None or fdp <= 0 else fdp, eps_lb=eps_lb,
                       thresholds_tried=int(tried), power_eps=float(power),
                       consistent=epsilon is None or eps_lb is None or eps_lb <= epsilon)

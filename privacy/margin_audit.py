"""Audit one variant's per-example margins against a claimed (epsilon, delta): a rigorous threshold test.

The correctness audit (``privacy.audit``) thresholds every example's outcome at one fixed point:
"correct" is "margin > 0". This audit keeps the continuous margin (true-label logit minus the
largest other logit) and lets every example choose its own threshold t_i:

1. The first ``SELECTION_FRACTION`` (5%) of the models are *selection* models. For example i, a
   normal distribution is fitted to its margins in the selection models that trained on it and
   another to those that did not; t_i is the threshold whose bound would be largest at the
   evaluation models' counts if the fits were exact. Margin 0 (the correctness audit's threshold)
   is always a candidate, and it is chosen outright when a fit is impossible (fewer than two
   selection models on a side, or no spread). The fit only steers the choice.
2. On the other 95% (the *evaluation* models), TPR_i = P(margin > t_i | in) and
   FPR_i = P(margin > t_i | out) get one-sided Clopper-Pearson bounds at level alpha / (4 n). Beside
   it, margin 0 is tested on ALL the models at the same level alpha / (4 n): that is the correctness
   audit at half its level. The example keeps the larger of the two bounds: eps_lb_i = max(ln((TPR_lo - delta) / FPR_hi),
   ln((1 - FPR_hi - delta) / (1 - TPR_lo))). t_i depends on the selection models only, and models
   are independent given the masks, so each test's bound holds with probability >= 1 - alpha / (2n),
   both with probability >= 1 - alpha / n (a union bound: the two tests share models and need not be
   independent), and every example's at once with probability >= 1 - alpha (Bonferroni over n).

Adjacency follows the sampling exactly as in the correctness audit (replace-one for ``fixed``).
Relation to the correctness audit: thresholding correctness is the margin at 0, so this audit's
eps_lb is never below the correctness audit's at half the level (its margin-0 test is exactly that);
the halving is the price of the second test. It gains where the margin separates in from out better
than its sign does (a DP model that is right either way but more confident when trained on i).
Which wins at the same level depends on the run: on the default run the chosen thresholds beat margin 0
at the example that attains the maximum at epsilon 1 and 4; at epsilon 16 and without DP they do not,
and the margin audit reports the correctness audit's bound at half the level, a few hundredths below
it (results/README.md). ``dpmem check --margin-audit``
reports both, each as its own (variant, audit) test of the one family-wise alpha
(``bench/report/analysis.py`` ``audit_family``, kind "margin", reported as rigorous); a claim fails when
either refutes it. Without the flag ``check`` reports the correctness audit alone: each test added
shrinks every other test's share of alpha, for a gain that is small and not everywhere (results/mia.md).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import special

from dpmem.privacy import bounds
from dpmem.privacy.audit import adjacency_of, check_claim

SELECTION_FRACTION = 0.05
# Candidate thresholds per example: this many points across the fitted range, and margin 0.
CANDIDATES = 96
# Fewer models than this leave too few selection models to choose anything.
MIN_MODELS = 20


@dataclass(frozen=True, kw_only=True)
class MarginAudit:
    """The rigorous continuous-score audit of one variant (see the module docstring)."""
    variant: str
    kind: str                       # "rigorous"
    epsilon_claimed: float | None   # None: no claim (eps_lb reported only)
    delta: float | None
    adjacency: str                  # "add/remove" | "replace-one"
    epsilon_tested: float | None
    delta_tested: float | None
    alpha: float                    # this audit's share of the verdict's alpha
    level: float                    # this audit's per-example level alpha / (2 n), shared by its two tests
                                    # (each one-sided bound at alpha / (4 n))
    n_examples: int
    models: int
    selection_models: int
    evaluation_models: int
    violations: int
    eps_lb: float | None            # max over examples, per individual; None if no example gives one
    eps_lb_index: int | None
    eps_lb_threshold: float | None  # the margin threshold of that example
    zero_thresholds: int            # examples whose chosen threshold is margin 0 (the correctness rule)
    power_eps: float                # the largest epsilon these model counts could refute
    consistent: bool

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _fit(scores: np.ndarray, member: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per column: count, mean and sd (ddof 1) of the scores where ``member``."""
    w = member.astype(np.float64)
    n = w.sum(0)
    with np.errstate(divide="ignore", invalid="ignore"):
        mean = (w * scores).sum(0) / n
        sd = np.sqrt((w * (scores - mean) ** 2).sum(0) / (n - 1))
    return n, mean, sd


def choose_thresholds(scores: np.ndarray, masks: np.ndarray, *, n_in: np.ndarray, n_out: np.ndarray,
                      delta: float, level: float) -> np.ndarray:
    """float [n]: per example, the threshold whose bound at counts (n_in, n_out) is largest under
    normal fits to ``scores`` [S, n] (the selection models); 0 where a class cannot be fitted."""
    c_in, m_in, s_in = _fit(scores, masks)
    c_out, m_out, s_out = _fit(scores, ~masks)
    ok = (c_in >= 2) & (c_out >= 2) & (s_in > 0) & (s_out > 0) & np.isfinite(s_in) & np.isfinite(s_out)
    lo = np.where(ok, np.minimum(m_in - 4 * s_in, m_out - 4 * s_out), -1.0)
    hi = np.where(ok, np.maximum(m_in + 4 * s_in, m_out + 4 * s_out), 1.0)
    grid = lo[:, None] + (hi - lo)[:, None] * np.linspace(0.0, 1.0, CANDIDATES)[None, :]
    grid = np.concatenate([np.zeros((grid.shape[0], 1)), grid], axis=1)          # [n, C + 1], margin 0 first
    safe = lambda a: np.where(ok, a, 1.0)[:, None]                              # noqa: E731
    tpr = special.ndtr((np.where(ok, m_in, 0.0)[:, None] - grid) / safe(s_in))
    fpr = special.ndtr((np.where(ok, m_out, 0.0)[:, None] - grid) / safe(s_out))
    ni, no = n_in.astype(float)[:, None], n_out.astype(float)[:, None]
    lb = bounds.eps_lb_from_bounds(bounds.cp_lower(ni * tpr, ni, level), bounds.cp_upper(no * fpr, no, level), delta)
    best = np.argmax(lb, axis=1)                        # ties go to the first: margin 0
    return np.where(ok, grid[np.arange(grid.shape[0]), best], 0.0)


def margin_audit(*, variant: str, masks: np.ndarray, margins: np.ndarray, epsilon: float | None,
                 delta: float | None, alpha: float, sampling: str) -> tuple[MarginAudit, pd.DataFrame]:
    """Audit one variant's margins [K, n]; returns the summary and one row per training example
    (threshold, k_in, n_in, k_out, n_out of the evaluation models, TPR_lo, FPR_hi, eps_lb, violation)."""
    masks, margins = np.asarray(masks), np.asarray(margins)
    if masks.ndim != 2 or masks.dtype != np.bool_:
        raise ValueError(f"masks must be a bool [K, n] array, got {masks.dtype} of shape {masks.shape}")
    if margins.shape != masks.shape:
        raise ValueError(f"margins must have the masks' shape {masks.shape}, got {margins.shape}")
    margins = margins.astype(np.float64)
    if not np.all(np.isfinite(margins)):
        raise ValueError("margins must be finite (found NaN or inf)")
    check_claim(epsilon, delta)
    k, n = masks.shape
    if k < MIN_MODELS:
        raise ValueError(f"masks: the margin audit needs at least {MIN_MODELS} models, got {k}")
    adjacency = adjacency_of(sampling)
    level = bounds.per_test_level(alpha, n)
    d = 0.0 if delta is None else float(delta)
    select = np.arange(k) < max(1, round(SELECTION_FRACTION * k))
    ev_masks, ev_margins = masks[~select], margins[~select]
    n_in = ev_masks.sum(0)
    n_out = ev_masks.shape[0] - n_in
    threshold = choose_thresholds(margins[select], masks[select], n_in=n_in, n_out=n_out, delta=d, level=level)
    # Two tests per example, each at half its level (a union bound, so neither needs to be independent
    # of the other): margin 0 on ALL the models, which is the correctness audit at half its level, and
    # the chosen threshold on the evaluation models, where one other than 0 was chosen.
    half = level / 2.0
    n_in_all = masks.sum(0)
    n_out_all = k - n_in_all
    k_zero_in, k_zero_out = ((margins > 0) & masks).sum(0), ((margins > 0) & ~masks).sum(0)
    k_in, k_out = ((ev_margins > threshold) & ev_masks).sum(0), ((ev_margins > threshold) & ~ev_masks).sum(0)
    lb_of = (lambda lo, hi: bounds.replace_one_eps_lb(lo, hi, d)) if adjacency == "replace-one" else \
        (lambda lo, hi: bounds.eps_lb_from_bounds(lo, hi, d))
    zero_lo, zero_hi = bounds.cp_lower(k_zero_in, n_in_all, half), bounds.cp_upper(k_zero_out, n_out_all, half)
    chosen_lo, chosen_hi = bounds.cp_lower(k_in, n_in, half), bounds.cp_upper(k_out, n_out, half)
    lb_zero = lb_of(zero_lo, zero_hi)
    lb_chosen = np.where(threshold != 0, lb_of(chosen_lo, chosen_hi), -np.inf)
    use_chosen = lb_chosen > lb_zero
    eps_lb = np.maximum(lb_zero, lb_chosen)
    threshold = np.where(use_chosen, threshold, 0.0)
    k_in, k_out = np.where(use_chosen, k_in, k_zero_in), np.where(use_chosen, k_out, k_zero_out)
    n_in, n_out = np.where(use_chosen, n_in, n_in_all), np.where(use_chosen, n_out, n_out_all)
    tpr_lo, fpr_hi = np.where(use_chosen, chosen_lo, zero_lo), np.where(use_chosen, chosen_hi, zero_hi)
    power = bounds.audit_power(n_in_all, n_out_all, delta=d, level=half, adjacency=adjacency)
    if epsilon is None:
        eps_t = delta_t = None
        violation = np.zeros(n, dtype=bool)
    else:
        eps_t, delta_t = bounds.replace_one(epsilon, d) if adjacency == "replace-one" else (float(epsilon), d)
        e = np.exp(eps_t)      # the violation test of privacy.bounds, on the bounds used
        violation = (tpr_lo > e * fpr_hi + delta_t) | ((1.0 - fpr_hi) > e * (1.0 - tpr_lo) + delta_t)
    best = int(np.argmax(eps_lb))
    best_lb = float(eps_lb[best]) if math.isfinite(float(eps_lb[best])) else None
    result = MarginAudit(
        variant=variant, kind="rigorous", epsilon_claimed=None if epsilon is None else float(epsilon),
        delta=None if delta is None else float(delta), adjacency=adjacency, epsilon_tested=eps_t,
        delta_tested=delta_t, alpha=float(alpha), level=level, n_examples=n, models=k,
        selection_models=int(select.sum()), evaluation_models=int((~select).sum()),
        violations=int(violation.sum()), eps_lb=best_lb, eps_lb_index=best if best_lb is not None else None,
        eps_lb_threshold=float(threshold[best]) if best_lb is not None else None,
        zero_thresholds=int((threshold == 0).sum()), power_eps=float(np.max(power)),
        consistent=not bool(violation.any()))
    frame = pd.DataFrame({"threshold": threshold, "k_in": k_in, "n_in": n_in, "k_out": k_out, "n_out": n_out,
                          "tpr_lo": tpr_lo, "fpr_hi": fpr_hi, "eps_lb": eps_lb, "violation": violation})
    frame.index.name = "index"
    return result, frame

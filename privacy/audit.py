"""Audit one variant's per-example outcomes against a claimed (epsilon, delta).

For each training example i the K models split into "in" models (i in T_k) and "out" models;
k_in / k_out count the ones that classify i correctly. The DP inequalities of ``privacy.bounds``
are tested with one-sided Clopper-Pearson bounds at level alpha / (2 n), so a mechanism that
satisfies the claim shows any violation with probability <= alpha (family-wise over the n
examples).

Adjacency follows the subset sampling:
- ``bernoulli`` (and ``balanced``): given i in T_k versus not, the rest of T_k has the same
  distribution, so "in" and "out" models are add/remove neighbours in distribution and the claim
  (eps, delta) is tested as is. (``balanced`` masks are not independent across models; the
  binomial model of the counts is then an approximation.)
- ``fixed``: subsets have a fixed size, so "in" and "out" differ by a replacement; the claim is
  tested as (2 eps, (1 + e^eps) delta) (group privacy of 2). Epsilon lower bounds are reported
  per individual, in the units of the claim: the pair bound at delta' = (1 + e^e) delta refutes a
  per-individual e when it exceeds 2 e, and the reported figure is the largest such e (see
  ``bounds.replace_one_eps_lb``). With either adjacency a claim is violated exactly when the
  reported eps_lb exceeds it.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from dpmem.privacy import bounds

SAMPLINGS = ("bernoulli", "fixed", "balanced")


@dataclass(frozen=True, kw_only=True)
class AuditResult:
    variant: str
    epsilon_claimed: float | None   # None: no claim (non-private variant audited for eps_lb only)
    delta: float | None
    adjacency: str                  # "add/remove" | "replace-one"
    epsilon_tested: float | None    # the claim in the adjacency tested (2 eps under replace-one)
    delta_tested: float | None      # (1 + e^eps) delta under replace-one
    alpha: float                    # this audit's level, family-wise over its examples (a share of a verdict's alpha)
    level: float                    # level of each one-sided bound: alpha / (2 n)
    n_examples: int
    violations: int
    eps_lb: float | None            # max per-example lower bound, per individual; None if no example gives one
    eps_lb_index: int | None        # the example attaining it
    power_eps: float                # the largest epsilon this run could refute (per individual)
    consistent: bool                # no violation

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def summary_line(self) -> str:
        claim = ("no claim" if self.epsilon_claimed is None
                 else f"claim eps={self.epsilon_claimed:g} delta={self.delta:g} ({self.adjacency})")
        lb = "none" if self.eps_lb is None else f"{self.eps_lb:.3f} (example {self.eps_lb_index})"
        verdict = "consistent" if self.consistent else "VIOLATED"
        return (f"{self.variant}: {claim}; violations {self.violations}/{self.n_examples} at alpha={self.alpha:g}; "
                f"eps_lb {lb}; power {self.power_eps:.3f}; {verdict}")


def per_example_counts(masks: np.ndarray, correct: np.ndarray) -> dict[str, np.ndarray]:
    """k_in, n_in, k_out, n_out per training example (int64 arrays of length n)."""
    masks, correct = np.asarray(masks), np.asarray(correct)
    if masks.ndim != 2 or masks.shape != correct.shape:
        raise ValueError(f"masks and correct must both be [K, n]; got {masks.shape} and {correct.shape}")
    if masks.dtype != np.bool_ or correct.dtype != np.bool_:
        raise ValueError(f"masks and correct must be bool arrays; got {masks.dtype} and {correct.dtype}")
    n_in = masks.sum(axis=0, dtype=np.int64)
    k_in = (masks & correct).sum(axis=0, dtype=np.int64)
    k_out = (~masks & correct).sum(axis=0, dtype=np.int64)
    n_out = masks.shape[0] - n_in
    return {"k_in": k_in, "n_in": n_in, "k_out": k_out, "n_out": n_out}


def check_claim(epsilon: float | None, delta: float | None) -> None:
    """A ValueError naming what is wrong with a claimed (epsilon, delta); None means no claim."""
    if epsilon is not None and not (epsilon >= 0 and math.isfinite(epsilon)):
        raise ValueError(f"claimed epsilon must be finite and >= 0, got {epsilon}")
    if epsilon is not None and delta is None:
        raise ValueError("a claimed epsilon needs a delta")
    if delta is not None and not (0.0 <= delta < 1.0):
        raise ValueError(f"delta must be in [0, 1), got {delta}")


def adjacency_of(sampling: str) -> str:
    if sampling not in SAMPLINGS:
        raise ValueError(f"unknown sampling {sampling!r}; choose from {', '.join(SAMPLINGS)}")
    return "replace-one" if sampling == "fixed" else "add/remove"


def _finite_or_none(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def audit_variant(*, variant: str, masks: np.ndarray, correct: np.ndarray, epsilon: float | None,
                  delta: float | None, alpha: float, sampling: str) -> tuple[AuditResult, pd.DataFrame]:
    """Audit one variant; returns the summary and one row per training example.

    Columns: L_in, U_out, bound (the largest mem allowed, dp_bound(p_out, eps_tested,
    delta_tested); NaN without a claim or without out-models), violation, eps_lb (per individual,
    -inf where the example refutes no epsilon). ``delta=None`` counts as 0 for eps_lb.
    """
    adjacency = adjacency_of(sampling)
    check_claim(epsilon, delta)
    counts = per_example_counts(masks, correct)
    k_in, n_in, k_out, n_out = counts["k_in"], counts["n_in"], counts["k_out"], counts["n_out"]
    n = int(k_in.shape[0])
    level = bounds.per_test_level(alpha, n)
    d = 0.0 if delta is None else float(delta)

    l_in = bounds.cp_lower(k_in, n_in, level)
    u_out = bounds.cp_upper(k_out, n_out, level)
    if adjacency == "replace-one":
        eps_lb = bounds.replace_one_eps_lb(l_in, u_out, d)
    else:
        eps_lb = bounds.eps_lb_from_bounds(l_in, u_out, d)
    power = bounds.audit_power(n_in, n_out, delta=d, level=level, adjacency=adjacency)

    if epsilon is None:
        eps_t = delta_t = None
        bound = np.full(n, np.nan)
        violation = np.zeros(n, dtype=bool)
    else:
        eps_t, delta_t = bounds.replace_one(epsilon, d) if adjacency == "replace-one" else (float(epsilon), d)
        with np.errstate(invalid="ignore", divide="ignore"):
            p_out = np.where(n_out > 0, k_out / np.maximum(n_out, 1), np.nan)
        bound = bounds.dp_bound(p_out, eps_t, delta_t)
        violation = bounds.violations(k_in, n_in, k_out, n_out, epsilon=eps_t, delta=delta_t, level=level)

    best = int(np.argmax(eps_lb))
    best_lb = _finite_or_none(float(eps_lb[best]))
    result = AuditResult(
        variant=variant, epsilon_claimed=None if epsilon is None else float(epsilon),
        delta=None if delta is None else float(delta), adjacency=adjacency,
        epsilon_tested=eps_t, delta_tested=delta_t, alpha=float(alpha), level=level,
        n_examples=n, violations=int(violation.sum()), eps_lb=best_lb,
        eps_lb_index=best if best_lb is not None else None,
        power_eps=float(np.max(power)), consistent=not bool(violation.any()),
    )
    frame = pd.DataFrame({"L_in": l_in, "U_out": u_out, "bound": bound, "violation": violation,
                          "eps_lb": eps_lb})
    frame.index.name = "index"
    return result, frame

"""One family-wise alpha per verdict: how a `dpmem check` call splits its alpha over its tests.

A verdict runs several tests: for every audited variant, the black-box per-example DP-bound
audit and, when the run has gradient canaries, the canary audit. Each test gets an equal
Bonferroni share ``alpha / tests``. Every test's eps_lb is below the true epsilon except with
probability at most its share, so with probability >= 1 - alpha ALL the reported eps_lb hold at
once, whatever the dependence between the tests. In particular, when every audited variant
really satisfies its claim, the verdict wrongly fails with probability <= alpha.

The family counts every (variant, audit kind) whose eps_lb is reported, the non-private variant
without a claim included, so that the promise covers every printed bound, not only the claims.
It is fixed by the config and the recorded update forms before any test sees its scores.

The promise, kind by kind: with probability >= 1 - alpha, every printed eps_lb lies below the
TRUE epsilon of its mechanism, so `check` fails an honest claim, whatever accountant computed
it, with probability at most alpha.
- rigorous (black-box, gradient canary, one-run): valid for any mechanism; refutes any claim.
- parametric: valid when its stated assumption holds (DP-SGD with Gaussian noise and the recorded
  update); its epsilon comes from a lower bound on the exact epsilon of the measured mechanism
  (privacy/accounting.py ``epsilon_lower_bound``), never from an accountant's upper estimate, so
  it too refutes any claim, under that assumption.
- estimates (eps_gaussian_estimate, the parametric point estimate): no level; they refute nothing
  and are not in the family.
"""
from __future__ import annotations


def bonferroni_share(alpha: float, tests: int) -> float:
    """The level of each of ``tests`` tests that share a family-wise ``alpha`` (Bonferroni)."""
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if int(tests) != tests or tests < 1:
        raise ValueError(f"the number of tests must be a positive integer, got {tests}")
    return float(alpha) / int(tests)

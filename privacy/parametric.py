"""A white-box, parametric epsilon lower bound from gradient-canary scores (assumes DP-SGD with Gaussian noise).

The score of a gradient canary is linear in its clipped gradients and in the Gaussian noise on its
coordinate, with weights fixed by the training dynamics. For torch.optim.SGD with learning rate
eta, momentum mu and weight decay lambda (dampening 0), the canary coordinate follows
    buf_t = mu buf_{t-1} + g_t + lambda theta_{t-1},   theta_t = theta_{t-1} - eta buf_t,
which is linear and time-invariant, so theta_T = -sum_t H_t g_t where H_t is the coordinate's
response at step T to a unit gradient at step t (``response``; H_t = eta without momentum and
weight decay). In DP-SGD (models/spec.py) model k's step-t gradient on canary j is
    g_t = (-c b_t + sigma C z_t) / B_k,
with c the canary's clipped gradient norm, b_t ~ Bernoulli(q) its Poisson coin if it is a member
(0 otherwise), z_t ~ N(0, 1) the noise, C the clipping norm and B_k the model's expected batch
size. So u = theta_T B_k / C, the score in units of the clipping norm, satisfies
    out-canaries:  u ~ N(0, sigma^2 S2),              S2 = sum_t H_t^2
    in-canaries:   E u = s q S1,                       S1 = sum_t H_t,   s = c / C,
with i.i.d. observations over models and canaries. Two quantities are measured:
- the effective noise multiplier sigma: sum(u_out^2) / (S2 sigma^2) is chi-square with n_out
  degrees of freedom (the out-mean is known to be 0), which gives an exact upper confidence bound
  sigma_hi at level/2;
- the effective sensitivity s (1 for honest clipping of a canary whose gradient norm exceeds C):
  the in-mean over q S1, with a one-sided t lower bound s_lo at level/2 (exact at sample rate 1,
  where in-scores are Gaussian; a central-limit bound below 1, with thousands of observations).
The noise multiplier that matters for privacy is the one per unit of sensitivity,
sigma_hi / s_lo, and ``accounting.epsilon_lower_bound`` turns it, at the run's sample rate and
steps, into eps_lb. With probability >= 1 - level both confidence bounds hold, so
sigma_hi / s_lo >= sigma / s; epsilon falls with the noise multiplier, and the lower bound never
exceeds the exact epsilon, so
    eps_lb = lower(sigma_hi / s_lo) <= lower(sigma / s) <= exact epsilon of the run's mechanism.
Hence the bound can refute ANY claim, not only the one the run was trained for: a claim computed
by a tighter accountant than the run's (PLD, PRV) is refuted with probability at most the level
when it is true. (Passing sigma_hi / s_lo through the run's own accountant, as RDP, would bound
that accountant's over-statement of epsilon instead, and refute true claims between the exact
epsilon and the accountant's far more often than the level.)

Assumption (hence "parametric"): the mechanism is DP-SGD with Gaussian noise as above, with the
recorded learning rate, momentum, weight decay, steps, sample rate and batch normalisation. For
dpmem's engines these are the run's; for a user's trainer they are what ``dpmem.canaries``
recorded at ``attach`` (a torch.optim.SGD under Opacus's DP optimizer) and the steps it counted.
Any other optimizer (Adam, a custom update) has no known linear response, and the bound is not
computed. A trainer that adds non-Gaussian noise, or that normalises differently, breaks the
assumption; the bound is then neither rigorous nor, in general, conservative (under Student-t
noise of the same variance its false-alarm rate is measured in results/parametric_validity.md).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats

from dpmem.privacy import accounting

KIND = "parametric (assumes DP-SGD with Gaussian noise)"
ENGINE_ASSUMPTION = "DP-SGD with Gaussian noise, updated by torch.optim.SGD as dpmem's engine trains the run"


def response(*, steps: int, lr: float, momentum: float = 0.0, weight_decay: float = 0.0) -> np.ndarray:
    """H [steps]: -d theta_T / d g_t for torch.optim.SGD (dampening 0), theta and buffer starting at 0."""
    if int(steps) != steps or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps}")
    T = int(steps)
    # all T impulses at once: column t carries a unit gradient at step t; the recursion is linear
    theta = np.zeros(T)
    buf = np.zeros(T)
    for t in range(T):
        g = np.zeros(T)
        g[t] = 1.0
        g = g + weight_decay * theta
        buf = momentum * buf + g
        theta = theta - lr * buf
    return -theta


@dataclass(frozen=True, kw_only=True)
class ParametricBound:
    """The parametric bound of one DP variant. Guarantee: when the assumption holds (the module
    docstring), ``eps_lb`` exceeds the exact epsilon of the trained mechanism with probability at
    most ``level``, whatever the claim; ``eps_estimate`` is a point estimate with no level."""
    variant: str
    kind: str
    assumption: str                 # the update form the bound assumes, and where it comes from
    epsilon_claimed: float | None
    delta: float
    level: float                    # this bound's share of the family-wise alpha
    n_in: int
    n_out: int
    sample_rate: float
    steps: int
    epsilon_method: str             # how (noise, q, steps) becomes epsilon: accounting.lower_bound_name()
    noise_multiplier: float         # point estimate of the effective noise multiplier sigma
    noise_multiplier_hi: float      # upper confidence bound (level / 2)
    sensitivity: float              # point estimate of the effective sensitivity s = c / C (1 when honest)
    sensitivity_lo: float           # lower confidence bound (level / 2)
    noise_per_sensitivity_hi: float  # sigma_hi / s_lo: what the epsilon lower bound is given
    eps_estimate: float | None      # the same epsilon at the point estimates (an estimate: no confidence level)
    eps_lb: float | None            # the bound; None when the scores refute no epsilon (s_lo <= 0)
    consistent: bool

    def to_dict(self) -> dict:
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                for k, v in dataclasses.asdict(self).items()} | {
            "eps_lb_infinite": self.eps_lb is not None and math.isinf(self.eps_lb)}


def _eps(noise_per_sensitivity: float, *, sample_rate: float, steps: int, delta: float) -> float:
    if noise_per_sensitivity <= 0:
        return math.inf
    if not math.isfinite(noise_per_sensitivity):
        return 0.0
    return accounting.epsilon_lower_bound(noise_multiplier=noise_per_sensitivity, sample_rate=sample_rate,
                                          steps=steps, delta=delta)


def noise_and_sensitivity(u_in: np.ndarray, u_out: np.ndarray, *, H: np.ndarray, sample_rate: float,
                          level: float) -> tuple[float, float, float, float]:
    """(sigma, sigma_hi, s, s_lo) from scores in units of C (see the module docstring).

    Vectorised: u_in [..., n_in] and u_out [..., n_out] give arrays of the leading shape."""
    u_in, u_out = np.asarray(u_in, dtype=float), np.asarray(u_out, dtype=float)
    n_in, n_out = u_in.shape[-1], u_out.shape[-1]
    if n_in < 2 or n_out < 1:
        raise ValueError(f"need at least two in- and one out-observation, got {n_in} and {n_out}")
    S1, S2 = float(np.sum(H)), float(np.sum(np.square(H)))
    ss = np.sum(np.square(u_out), axis=-1)
    sigma = np.sqrt(ss / (n_out * S2))
    sigma_hi = np.sqrt(ss / (S2 * stats.chi2.ppf(level / 2, n_out)))
    mean_in = u_in.mean(axis=-1)
    se_in = u_in.std(axis=-1, ddof=1) / math.sqrt(n_in)
    s = mean_in / (sample_rate * S1)
    s_lo = (mean_in - stats.t.ppf(1 - level / 2, n_in - 1) * se_in) / (sample_rate * S1)
    return sigma, sigma_hi, s, s_lo


def parametric_bound(*, variant: str, scores: np.ndarray, masks: np.ndarray, batch_sizes: np.ndarray,
                     max_grad_norm: float, lr: float, momentum: float, weight_decay: float, steps: int,
                     sample_rate: float, epsilon: float | None, delta: float, level: float,
                     assumption: str = ENGINE_ASSUMPTION) -> ParametricBound:
    """The parametric bound of one DP variant from its canary scores [K, m] and memberships [K, m].

    ``batch_sizes`` [K]: each model's expected batch size (the update's normaliser, models/spec.py);
    ``max_grad_norm``: the CLAIMED clipping norm C (sensitivity is measured in its units)."""
    scores, masks = np.asarray(scores, dtype=float), np.asarray(masks, dtype=bool)
    if scores.shape != masks.shape or scores.ndim != 2:
        raise ValueError(f"scores and masks must both be [K, m]; got {scores.shape} and {masks.shape}")
    batch_sizes = np.asarray(batch_sizes, dtype=float).reshape(-1)
    if batch_sizes.shape != (scores.shape[0],):
        raise ValueError(f"need one batch size per model ({scores.shape[0]}), got {batch_sizes.shape}")
    if not (max_grad_norm > 0):
        raise ValueError(f"max_grad_norm must be positive, got {max_grad_norm}")
    H = response(steps=steps, lr=lr, momentum=momentum, weight_decay=weight_decay)
    u = scores * batch_sizes[:, None] / max_grad_norm
    sigma, sigma_hi, s, s_lo = (float(x) for x in noise_and_sensitivity(u[masks], u[~masks], H=H,
                                                                         sample_rate=sample_rate, level=level))
    ratio_hi = sigma_hi / s_lo if s_lo > 0 else math.inf
    kw: dict[str, Any] = dict(sample_rate=sample_rate, steps=steps, delta=delta)
    lb = _eps(ratio_hi, **kw) if s_lo > 0 else None
    if lb is not None and lb <= 0:
        lb = None
    est = _eps(sigma / s, **kw) if s > 0 else None
    return ParametricBound(variant=variant, kind=KIND, assumption=assumption,
                           epsilon_claimed=None if epsilon is None else float(epsilon),
                           delta=float(delta), level=float(level), n_in=int(masks.sum()), n_out=int((~masks).sum()),
                           sample_rate=float(sample_rate), steps=int(steps),
                           epsilon_method=accounting.lower_bound_name(),
                           noise_multiplier=sigma, noise_multiplier_hi=sigma_hi, sensitivity=s, sensitivity_lo=s_lo,
                           noise_per_sensitivity_hi=ratio_hi, eps_estimate=est, eps_lb=lb,
                           consistent=epsilon is None or lb is None or lb <= epsilon)


# -- the update form of a user's trainer -----------------------------------------------------------
# What a trainer of the trainer protocol returns as "canary_update" (float64 [5], one row per model
# in the store): the rule, then torch.optim.SGD's lr, momentum and weight decay, and the optimizer
# steps taken. ``dpmem.canaries`` records it at ``attach`` and counts the steps (models/canaries.py).
UPDATE_FIELDS = ("rule", "lr", "momentum", "weight_decay", "steps")
RULE_NOT_REPORTED, RULE_SGD, RULE_OTHER = 0, 1, 2
RULES = {RULE_NOT_REPORTED: "not reported", RULE_SGD: "torch.optim.SGD",
         RULE_OTHER: "an optimizer other than plain torch.optim.SGD with constant settings"}


def trainer_update(update: np.ndarray | None) -> tuple[dict | None, str | None]:
    """(the update form for ``parametric_bound``, None) from a variant's ``canary_update`` [K, 5], or
    (None, why the parametric bound cannot be computed) in one line."""
    if update is None:
        return None, ("the trainer returned no 'canary_update' (dpmem.canaries records it at attach: return "
                      "kit.update() as 'canary_update')")
    update = np.asarray(update, dtype=np.float64)
    rules = update[:, 0].astype(int)
    for rule, why in ((RULE_NOT_REPORTED, "returned no update form"),
                      (RULE_OTHER, f"trained with {RULES[RULE_OTHER]} (Adam, a scheduler, nesterov or dampening "
                                   "have no known linear response)")):
        if (rules == rule).any():
            return None, f"model {int(np.flatnonzero(rules == rule)[0])} {why}"
    if not (update == update[0]).all():
        k = int(np.flatnonzero((update != update[0]).any(axis=1))[0])
        return None, f"models 0 and {k} report different update forms ({update[0].tolist()} and {update[k].tolist()})"
    _, lr, momentum, weight_decay, steps = update[0].tolist()
    assumption = (f"DP-SGD with Gaussian noise, updated by torch.optim.SGD(lr={lr:g}, momentum={momentum:g}, "
                  f"weight_decay={weight_decay:g}) for {int(steps)} steps, as dpmem.canaries recorded at attach")
    return dict(lr=lr, momentum=momentum, weight_decay=weight_decay, steps=int(steps), assumption=assumption), None

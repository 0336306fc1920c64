"""Privacy accounting for DP-SGD, delegated to Opacus's accountants.

DP-SGD here is Opacus's: Poisson sampling at rate q, Gaussian noise of std sigma * C on the
clipped gradient sum, add/remove adjacency. For a run of ``steps`` identical steps the whole
history is one entry ``(sigma, q, steps)``; these helpers build an Opacus accountant with that
history, so the epsilon recorded in outputs is exactly what ``PrivacyEngine.get_epsilon`` would
report for the same run.

Names used in configs: ``"prv"`` (privacy random variables, Gopi et al.; numerically tight, and
the default of Opacus's ``PrivacyEngine``, hence dpmem's), ``"rdp"`` (Renyi DP, Mironov et al.;
over-states epsilon, so a sigma it calibrates carries more noise than the claim needs), ``"gdp"``
(Gaussian DP via a central limit approximation; Opacus itself warns that it can underestimate
epsilon).

Every accountant above answers "how private is at most this training": each rounds towards a
larger epsilon (except gdp, which is an approximation either way). An epsilon *lower* bound
needs the other direction: ``epsilon_lower_bound`` is an epsilon that the exact privacy curve of
the mechanism never falls below, from a privacy loss distribution rounded optimistically. The
parametric audit (privacy/parametric.py) passes its conservative noise estimate through it, so
that its eps_lb lower-bounds the true epsilon, not one accountant's over-statement of it.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import math
import warnings
from dataclasses import dataclass

import numpy as np
import opacus
from dp_accounting.pld import privacy_loss_distribution
from opacus.accountants import GaussianAccountant, PRVAccountant, RDPAccountant
from opacus.accountants.accountant import IAccountant
from opacus.accountants.utils import get_noise_multiplier

ACCOUNTANTS: dict[str, type[IAccountant]] = {
    "prv": PRVAccountant,
    "rdp": RDPAccountant,
    "gdp": GaussianAccountant,
}


def _accountant_class(name: str) -> type[IAccountant]:
    try:
        return ACCOUNTANTS[name]
    except KeyError:
        raise ValueError(f"unknown accountant {name!r}; choose from {', '.join(ACCOUNTANTS)}") from None


def accountant_name(name: str) -> str:
    """The full name recorded in outputs, e.g. 'opacus.accountants.RDPAccountant (opacus 1.6.0)'."""
    cls = _accountant_class(name)
    return f"opacus.accountants.{cls.__name__} (opacus {opacus.__version__})"


def _check_params(*, delta: float, sample_rate: float, steps: int) -> None:
    if not (0.0 < delta < 1.0):
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    if not (0.0 < sample_rate <= 1.0):
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
    if int(steps) != steps or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps}")


def _describe(*, delta: float, sample_rate: float, steps: int, accountant: str) -> str:
    return f"delta={delta:g}, sample_rate={sample_rate:g}, steps={steps}, accountant={accountant}"


# Accounting is pure and, with PRV, takes seconds per calibration: a process that plans the same
# schedule again (the checks before a run, then the run; a study's cells) asks the cache.
@functools.lru_cache(maxsize=4096)
def epsilon_of(*, noise_multiplier: float, sample_rate: float, steps: int, delta: float,
               accountant: str = "prv") -> float:
    """Epsilon that the Opacus accountant reports after ``steps`` DP-SGD steps at (sigma, q)."""
    cls = _accountant_class(accountant)
    _check_params(delta=delta, sample_rate=sample_rate, steps=steps)
    if not (noise_multiplier > 0 and math.isfinite(noise_multiplier)):
        raise ValueError(f"noise_multiplier must be positive and finite, got {noise_multiplier}")
    acct = cls()
    acct.history = [(float(noise_multiplier), float(sample_rate), int(steps))]
    try:
        # at sample_rate 1 the PRV accountant compares with log(1 - q) = -inf, correctly, but numpy warns
        with np.errstate(divide="ignore"):
            eps = float(acct.get_epsilon(delta=delta))
    except (ValueError, ArithmeticError, RuntimeError) as e:
        raise ValueError(f"accountant failed for noise_multiplier={noise_multiplier:g}, "
                         f"{_describe(delta=delta, sample_rate=sample_rate, steps=steps, accountant=accountant)}: "
                         f"{e}") from None
    if math.isnan(eps):
        raise ValueError(f"accountant returned NaN for noise_multiplier={noise_multiplier:g}, "
                         f"{_describe(delta=delta, sample_rate=sample_rate, steps=steps, accountant=accountant)}")
    return eps


@functools.lru_cache(maxsize=4096)
def calibrate_noise(*, target_epsilon: float, delta: float, sample_rate: float, steps: int,
                    accountant: str = "prv", tolerance: float = 0.01) -> float:
    """Smallest noise multiplier (up to Opacus's bisection) whose epsilon is <= target_epsilon.

    Opacus's search returns sigma with ``target - tolerance <= epsilon(sigma) <= target``.
    """
    _accountant_class(accountant)
    _check_params(delta=delta, sample_rate=sample_rate, steps=steps)
    if not (target_epsilon > 0 and math.isfinite(target_epsilon)):
        raise ValueError(f"target_epsilon must be positive and finite, got {target_epsilon}")
    if not (tolerance > 0):
        raise ValueError(f"tolerance must be positive, got {tolerance}")
    try:
        # the search visits very large noise levels whose optimal RDP order is the grid's largest;
        # Opacus warns about each, which says nothing about the sigma finally returned
        with warnings.catch_warnings(), np.errstate(divide="ignore"):
            warnings.filterwarnings("ignore", message="Optimal order is the", category=UserWarning)
            sigma = get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta,
                                         sample_rate=sample_rate, steps=int(steps),
                                         accountant=accountant, epsilon_tolerance=tolerance)
    except (ValueError, ArithmeticError, RuntimeError) as e:
        raise ValueError(f"cannot calibrate noise to epsilon={target_epsilon:g} with "
                         f"{_describe(delta=delta, sample_rate=sample_rate, steps=steps, accountant=accountant)}: "
                         f"{e}") from None
    return float(sigma)


@dataclass(frozen=True, kw_only=True)
class Calibration:
    """A calibrated DP-SGD noise level and the epsilon the accountant reports for it."""
    target_epsilon: float
    delta: float
    noise_multiplier: float
    sample_rate: float
    steps: int
    accountant: str          # config key: "rdp" | "prv" | "gdp"
    epsilon: float           # what the accountant reports for noise_multiplier (<= target_epsilon)

    @property
    def accountant_name(self) -> str:
        return accountant_name(self.accountant)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self) | {"accountant_name": self.accountant_name}


def calibrate(*, target_epsilon: float, delta: float, sample_rate: float, steps: int,
              accountant: str = "prv", tolerance: float = 0.01) -> Calibration:
    sigma = calibrate_noise(target_epsilon=target_epsilon, delta=delta, sample_rate=sample_rate,
                            steps=steps, accountant=accountant, tolerance=tolerance)
    eps = epsilon_of(noise_multiplier=sigma, sample_rate=sample_rate, steps=steps, delta=delta,
                     accountant=accountant)
    return Calibration(target_epsilon=float(target_epsilon), delta=float(delta), noise_multiplier=sigma,
                       sample_rate=float(sample_rate), steps=int(steps), accountant=accountant,
                       epsilon=eps)


# The privacy-loss grid of the lower bound: each of the T compositions rounds the loss down by at
# most one grid step, so the bound sits at most about T * interval below the exact epsilon. The
# interval is chosen so that this slack is about max(0.002, 0.1% of epsilon) (epsilon guessed by
# RDP, which over-states it: a large epsilon needs no fine grid, and a fine one would take minutes
# and gigabytes), within a floor that bounds the time (about 7 s at T = 1,000 on one core).
LOWER_BOUND_SLACK = 0.002
LOWER_BOUND_RELATIVE_SLACK = 0.001
LOWER_BOUND_MIN_INTERVAL = 1e-5
# FFT convolution and dp_accounting's tail truncation (at most 1e-15 of probability mass) can move
# the composed curve's delta by far less than this; the lower bound is read at delta plus it, so
# neither can lift it above the exact epsilon.
LOWER_BOUND_DELTA_SLACK = 1e-12


def lower_bound_name() -> str:
    """How ``epsilon_lower_bound`` computes, as recorded in outputs."""
    return (f"dp_accounting PLD, optimistic rounding (a lower bound on the exact epsilon; "
            f"dp-accounting {importlib.metadata.version('dp-accounting')})")


def epsilon_lower_bound(*, noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    """An epsilon at most the EXACT epsilon of ``steps`` DP-SGD steps at (sigma, q) under add/remove
    adjacency (Poisson-subsampled Gaussian mechanism, sensitivity 1, noise std sigma).

    Why it is below the exact epsilon: dp_accounting's privacy loss distribution with
    ``pessimistic_estimate=False`` rounds every privacy loss DOWN to its grid (privacy buckets) and
    drops or rounds down the truncated tails (Meiser & Mohammadi 2018; Koskela et al. 2020; the
    library's ``pessimistic_estimate`` contract). The rounded pair of distributions is therefore
    dominated by the exact pair, so its hockey-stick divergence, delta(eps), is at most the exact
    one at every eps, composition preserving the order; the smallest eps with delta(eps) <= delta
    is then at most the exact epsilon. Both adjacency directions (add and remove) are composed,
    and the larger epsilon taken, as the exact epsilon is. The curve is read at
    ``delta + LOWER_BOUND_DELTA_SLACK`` to absorb floating-point error.

    The pessimistic counterpart of the same library brackets the exact value from above; the two
    differ by about ``steps * interval`` (tests/test_accounting.py)."""
    _check_params(delta=delta, sample_rate=sample_rate, steps=steps)
    if not (noise_multiplier > 0 and math.isfinite(noise_multiplier)):
        raise ValueError(f"noise_multiplier must be positive and finite, got {noise_multiplier}")
    try:
        guess = epsilon_of(noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps, delta=delta,
                           accountant="rdp")
    except ValueError:
        guess = 0.0
    slack = max(LOWER_BOUND_SLACK, LOWER_BOUND_RELATIVE_SLACK * guess)
    interval = max(LOWER_BOUND_MIN_INTERVAL, min(max(1e-4, slack / 10), slack / int(steps)))
    return _pld_epsilon(float(noise_multiplier), float(sample_rate), int(steps), float(delta), interval,
                        pessimistic=False)


def epsilon_pld(*, noise_multiplier: float, sample_rate: float, steps: int, delta: float,
                interval: float = 1e-4) -> float:
    """The same privacy loss distribution rounded pessimistically: an upper bound on the exact
    epsilon (dp_accounting's default). With ``epsilon_lower_bound`` it brackets the exact value;
    the repetition tests call it "exact"."""
    _check_params(delta=delta, sample_rate=sample_rate, steps=steps)
    return _pld_epsilon(float(noise_multiplier), float(sample_rate), int(steps), float(delta), float(interval),
                        pessimistic=True)


@functools.lru_cache(maxsize=1024)
def _pld_epsilon(sigma: float, q: float, steps: int, delta: float, interval: float, *, pessimistic: bool) -> float:
    pld = privacy_loss_distribution.from_gaussian_mechanism(
        standard_deviation=sigma, sensitivity=1.0, pessimistic_estimate=pessimistic,
        value_discretization_interval=interval, sampling_prob=q,
        # connect-the-dots is pessimistic only; privacy buckets round either way
        use_connect_dots=pessimistic)
    composed = pld.self_compose(steps)
    return float(composed.get_epsilon_for_delta(delta + (0.0 if pessimistic else LOWER_BOUND_DELTA_SLACK)))

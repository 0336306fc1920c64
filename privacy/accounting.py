"""Privacy accounting for DP-SGD, delegated to Opacus's accountants.

DP-SGD here is Opacus's: Poisson sampling at rate q, Gaussian noise of std sigma * C on the
clipped gradient sum, add/remove adjacency. For a run of ``steps`` identical steps the whole
history is one entry ``(sigma, q, steps)``; these helpers build an Opacus accountant with that
history, so the epsilon recorded in outputs is exactly what ``PrivacyEngine.get_epsilon`` would
report for the same run.

Names used in configs: ``"rdp"`` (Renyi DP, Mironov et al.), ``"prv"`` (privacy random
variables, Gopi et al.; numerically tight), ``"gdp"`` (Gaussian DP via a central limit
approximation; Opacus itself warns that it can underestimate epsilon).
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass

import numpy as np
import opacus
from opacus.accountants import GaussianAccountant, PRVAccountant, RDPAccountant
from opacus.accountants.accountant import IAccountant
from opacus.accountants.utils import get_noise_multiplier

ACCOUNTANTS: dict[str, type[IAccountant]] = {
    "rdp": RDPAccountant,
    "prv": PRVAccountant,
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


def epsilon_of(*, noise_multiplier: float, sample_rate: float, steps: int, delta: float,
               accountant: str = "rdp") -> float:
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


def calibrate_noise(*, target_epsilon: float, delta: float, sample_rate: float, steps: int,
                    accountant: str = "rdp", tolerance: float = 0.01) -> float:
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
              accountant: str = "rdp", tolerance: float = 0.01) -> Calibration:
    sigma = calibrate_noise(target_epsilon=target_epsilon, delta=delta, sample_rate=sample_rate,
                            steps=steps, accountant=accountant, tolerance=tolerance)
    eps = epsilon_of(noise_multiplier=sigma, sample_rate=sample_rate, steps=steps, delta=delta,
                     accountant=accountant)
    return Calibration(target_epsilon=float(target_epsilon), delta=float(delta), noise_multiplier=sigma,
                       sample_rate=float(sample_rate), steps=int(steps), accountant=accountant,
                       epsilon=eps)

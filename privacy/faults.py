"""Planted DP-SGD faults: deliberately broken training that the audit must catch (never for results).

Each fault says how the DP-SGD parameters the models are actually trained with, and the sample rate
the accountant is told, differ from the honest plan. The pipeline consults this registry only when
a run sets ``fault``; the engines never see it (they train whatever parameters they are given).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

# Clipping "off" keeps the noise std sigma*C of the claim but lets gradients through unclipped.
NO_CLIP = 1e12


def _same(noise_multiplier: float, max_grad_norm: float) -> tuple[float, float]:
    return noise_multiplier, max_grad_norm


def _same_rate(sample_rate: float) -> float:
    return sample_rate


@dataclass(frozen=True, kw_only=True)
class Fault:
    description: str
    # (planned noise multiplier, planned clipping norm) -> (trained noise multiplier, trained clipping norm)
    trained: Callable[[float, float], tuple[float, float]] = _same
    # the sampling rate used in training -> the rate reported to the accountant
    told_sample_rate: Callable[[float], float] = _same_rate


FAULTS: dict[str, Fault] = {
    "none": Fault(description="honest DP-SGD"),
    "no_noise": Fault(description="the Gaussian noise is off",
                      trained=lambda sigma, clip: (0.0, clip)),
    "no_clipping": Fault(description="per-example gradients are not clipped (noise std sigma*C kept)",
                         trained=lambda sigma, clip: (sigma * clip / NO_CLIP, NO_CLIP)),
    "wrong_sample_rate": Fault(description="the accountant is told a sampling rate 10x lower than the one used",
                               told_sample_rate=lambda rate: rate / 10),
    "half_noise": Fault(description="the noise multiplier is half the calibrated one (the plan records the calibrated one)",
                        trained=lambda sigma, clip: (sigma / 2, clip)),
    # a subtler bug: at claimed eps 4 (audit config) the true epsilon is about 5.6
    "noise_x0.75": Fault(description="the noise multiplier is 0.75 of the calibrated one (the plan records the calibrated one)",
                         trained=lambda sigma, clip: (0.75 * sigma, clip)),
}


def get(name: str) -> Fault:
    try:
        return FAULTS[name]
    except KeyError:
        raise ValueError(f"unknown fault {name!r}; choose from {', '.join(FAULTS)}") from None

"""What each variant trains with: the Poisson schedule, the calibrated noise, the engine's TrainSpec,
and the seeds.

Model k of every unit draws its randomness from its own streams (k is its stream id, the seed is
the run's, the noise seed the variant's), so the arrays do not depend on how the models are split
into units, on the number of threads or workers, or on the order in which units finish. A study
(leave-one-out, marginal utility) trains its models from a seed of its own (``study_seed``), so
they are not the run's models.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from dpmem.bench.config import Config
from dpmem.bench.data import Dataset
from dpmem.models.spec import DPParams, TrainSpec
from dpmem.privacy import accounting, faults
from dpmem.privacy.errors import ConfigError

# Each study's own random stream (a run's models use the run's seed itself).
STUDY_STREAMS = {"loo": 7_919, "utility": 7_031}


@dataclass(frozen=True, kw_only=True)
class Schedule:
    """Poisson sampling as Opacus sets it up: rate = 1 / (batches per epoch)."""
    expected_subset: float
    steps_per_epoch: int
    sample_rate: float
    steps: int


def schedule(cfg: Config, n_train: int, *, expected: float | None = None) -> Schedule:
    """Steps and rate for subsets of the expected size (default: the config's q of n_train)."""
    if expected is None:
        expected = round(cfg.q * n_train) if cfg.sampling == "fixed" else cfg.q * n_train
    per_epoch = max(1, math.ceil(expected / cfg.batch_size))
    return Schedule(expected_subset=expected, steps_per_epoch=per_epoch, sample_rate=1.0 / per_epoch,
                    steps=cfg.epochs * per_epoch)


def plan_variant(cfg: Config, epsilon: float | None, sched: Schedule) -> dict:
    """What a variant trains with; for DP variants sigma is calibrated by the accountant."""
    plan: dict[str, Any] = {"epsilon": epsilon, "delta": None, "noise_multiplier": None, "max_grad_norm": None,
            "sample_rate": sched.sample_rate, "steps": sched.steps, "accountant": None,
            "epsilon_reported": None}
    if epsilon is not None:
        told_rate = faults.get(cfg.fault).told_sample_rate(sched.sample_rate)
        cal = accounting.calibrate(target_epsilon=epsilon, delta=cfg.delta, sample_rate=told_rate,
                                   steps=sched.steps, accountant=cfg.accountant)
        plan.update(delta=cfg.delta, noise_multiplier=cal.noise_multiplier, max_grad_norm=cfg.max_grad_norm,
                    accountant=accounting.accountant_name(cfg.accountant), epsilon_reported=cal.epsilon)
        if cfg.fault != "none":
            plan["fault"] = cfg.fault
    return plan


def _trained_dp_params(plan: dict) -> DPParams | None:
    """The DP-SGD parameters actually used, which differ from the plan only under a planted fault."""
    if plan["noise_multiplier"] is None:
        return None
    sigma, clip = faults.get(plan.get("fault", "none")).trained(plan["noise_multiplier"], plan["max_grad_norm"])
    return DPParams(noise_multiplier=sigma, max_grad_norm=clip)


def train_spec(cfg: Config, ds: Dataset, plan: dict) -> TrainSpec:
    dp = _trained_dp_params(plan)
    canary_norm = cfg.canary_norm
    if dp is not None:  # the auditor sizes its canaries by the claimed clipping bound, not by a faulty one
        canary_norm *= plan["max_grad_norm"] / dp.max_grad_norm
    if cfg.augment != "none" and len(ds.input_shape) != 3:
        raise ConfigError("augment", f"crops and flips need images (C, H, W); {cfg.dataset} has inputs of shape "
                                     f"{tuple(ds.input_shape)}")
    return TrainSpec(arch=cfg.model, input_shape=tuple(ds.input_shape), n_classes=ds.n_classes,
                     hidden=cfg.hidden, steps=plan["steps"], sample_rate=plan["sample_rate"], lr=cfg.lr,
                     momentum=cfg.momentum, weight_decay=cfg.weight_decay, dp=dp, trainer=cfg.trainer or None,
                     canaries=cfg.gradient_canaries, canary_norm=canary_norm, augment=cfg.augment,
                     augment_multiplicity=cfg.augment_multiplicity)



def provenance(cfg: Config, engine: str) -> dict:
    """Which engine trains a variant, which architecture or trainer, and how the batched engine draws
    its coins and noise (recorded in its plan)."""
    return {"engine": engine, "model": None if cfg.trainer else cfg.model, "trainer": cfg.trainer or None,
            "random_scheme": random_scheme(cfg, engine)}


def random_scheme(cfg: Config, engine: str) -> str | None:
    """The batched engine's random scheme on the run's device (models/philox.py): per-model
    generators ("generators", the CPU) or counter-based ("counter", a GPU); None for the other
    engines, whose generators do not depend on the device."""
    if engine != "batched":
        return None
    from dpmem.models.philox import RANDOM_SCHEMES
    from dpmem.models.runtime import resolve_device
    return RANDOM_SCHEMES.get(resolve_device(cfg.device).type, "counter")


def stored_random_scheme(plan: dict) -> str | None:
    """A stored plan's random scheme; plans written before it was recorded drew with generators."""
    if plan.get("engine") != "batched":
        return None
    return plan.get("random_scheme", "generators")


def run_seed(cfg: Config) -> int:
    """Initialisation and Poisson coins: one seed for the run, shared by every variant, so the
    non-private and DP models of one index start alike and see the same batches."""
    return int(cfg.seed)


def noise_seed(cfg: Config, variant: str) -> int:
    """DP noise: one seed per variant, derived from its name (not its position in a list)."""
    digest = hashlib.sha256(f"dpmem-noise\0{cfg.seed}\0{variant}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def study_seed(cfg: Config, study: str) -> int:
    """The seed a study's models train from: derived from the run's seed and the study's stream."""
    return int(np.random.SeedSequence([cfg.seed, STUDY_STREAMS[study]]).generate_state(1)[0])


def as_inputs(x: np.ndarray) -> np.ndarray:
    """Inputs as every engine takes them: float32, C-contiguous, the dataset's shape (modules flatten)."""
    return np.ascontiguousarray(x, dtype=np.float32)

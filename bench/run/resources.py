"""What a run will need, checked against what the machine has, before anything is written.

A config can ask for more than any machine holds (``models=1000000000`` means arrays of
terabytes; ``hidden=1000000000`` a layer of billions of weights). Such a run would otherwise
start, write its directory and die later with a MemoryError or be killed. The estimates here are
lower bounds of what the run must hold at once, so a refusal is never wrong; a run that passes
can still need more (activations, library overheads).
"""
from __future__ import annotations

import math
import os
from pathlib import Path

from dpmem.bench.config import Config
from dpmem.privacy.errors import ConfigError

GIB = 1 << 30
# Bytes per (model, example) that every variant keeps: correct (bool) + margin (float16).
BYTES_PER_OUTPUT = 3
# Bytes per (model, training example) of the training statistics (models/example_stats.py): loss sum
# (float32) + draws (int32), and under DP gradient-norm sum (float32) + clips (int32).
STAT_BYTES, DP_STAT_BYTES = 8, 8
# The analysis reads the masks and correctness as float32 for its matrix products.
ANALYSIS_BYTES = 4
# Per trained parameter and model in a unit: weights, gradient, noise, momentum buffer (float32).
TRAINING_COPIES = 4


def available_memory() -> int | None:
    """Bytes this process can still allocate: MemAvailable, capped by a cgroup v2 limit (None: unknown)."""
    limits = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                limits.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    try:
        cgroup = Path("/sys/fs/cgroup")
        limit = (cgroup / "memory.max").read_text().strip()
        if limit.isdigit():
            limits.append(int(limit) - int((cgroup / "memory.current").read_text().strip()))
    except (OSError, ValueError):
        pass
    if not limits and hasattr(os, "sysconf"):
        try:
            limits.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (ValueError, OSError):
            pass
    return max(0, min(limits)) if limits else None


def array_bytes(cfg: Config, n_train: int, n_test: int) -> int:
    """The per-model arrays a run stores and analyses: masks, and every variant's outputs."""
    K, variants = cfg.models, len(cfg.variants)
    masks = K * (n_train + cfg.gradient_canaries)
    outputs = variants * K * (n_train + n_test) * BYTES_PER_OUTPUT
    outputs += K * n_train * (variants * STAT_BYTES + sum(eps is not None for _, eps in cfg.variants) * DP_STAT_BYTES)
    analysis = K * (n_train + n_test) * ANALYSIS_BYTES
    return masks + outputs + analysis


def training_bytes(cfg: Config, parameters: int) -> int:
    """The stacked parameters (and their gradients, noise, momentum) of one unit of models."""
    return min(cfg.models, cfg.unit_size) * parameters * 4 * TRAINING_COPIES


def _gib(nbytes: int) -> str:
    return f"{nbytes / GIB:.3g} GiB"


def check_arrays_fit(cfg: Config, n_train: int, n_test: int, available: int | None = None) -> None:
    """ConfigError on 'models' when the run's per-model arrays cannot fit in memory."""
    available = available_memory() if available is None else available
    need = array_bytes(cfg, n_train, n_test)
    if available is not None and need > available:
        raise ConfigError("models", f"{cfg.models} models x {n_train} + {n_test} examples x {len(cfg.variants)} "
                                    f"variants need at least {_gib(need)} of memory; {_gib(available)} is available")


def check_model_fits(cfg: Config, parameters: int, available: int | None = None) -> None:
    """ConfigError on 'hidden' (built-in architectures) or 'model' when a unit of models cannot fit."""
    available = available_memory() if available is None else available
    need = training_bytes(cfg, parameters)
    if available is not None and need > available:
        field = "model" if ":" in cfg.model else "hidden"
        units = min(cfg.models, cfg.unit_size)
        raise ConfigError(field, f"{cfg.model} has {parameters:,} parameters; training {units} at once needs at "
                                 f"least {_gib(need)} of memory, {_gib(available)} is available "
                                 "(a smaller model, or a smaller unit_size)")


def parameter_count(spec) -> int | None:
    """The parameters of ``build_model(spec)``, counted on torch's meta device (nothing allocated);
    None when the module cannot be built there (the real build then reports any problem)."""
    import torch

    from dpmem.models.nets import build_model
    try:
        with torch.device("meta"):
            module = build_model(spec)
    except KeyboardInterrupt:
        raise
    except BaseException:  # noqa: BLE001 - user code that fails on the meta device is built for real later
        return None
    return sum(math.prod(p.shape) for p in module.parameters())

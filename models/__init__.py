"""Architectures and training engines behind one call, ``train_models``."""
from __future__ import annotations

from collections.abc import Callable

from dpmem.models.spec import ARCHITECTURES, DPParams, Outputs, TrainRequest, TrainSpec

# Architectures the batched many-model engine trains; the others go through Opacus one by one.
BATCHED_ARCHS = ("logreg", "mlp")
ENGINES = ("auto", "batched", "opacus")

__all__ = ["ARCHITECTURES", "BATCHED_ARCHS", "DPParams", "ENGINES", "Outputs", "TrainRequest", "TrainSpec",
           "resolve_engine", "train_models"]


def resolve_engine(arch: str, engine: str = "auto") -> str:
    """The engine that will train ``arch``: "batched" or "opacus"."""
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; choose from {', '.join(ENGINES)}")
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; choose from {', '.join(ARCHITECTURES)}")
    if engine == "auto":
        return "batched" if arch in BATCHED_ARCHS else "opacus"
    if engine == "batched" and arch not in BATCHED_ARCHS:
        raise ValueError(f"the batched engine trains {', '.join(BATCHED_ARCHS)} only; "
                         f"use engine='opacus' (or 'auto') for {arch!r}")
    return engine


def train_models(spec: TrainSpec, req: TrainRequest, *, engine: str = "auto",
                 progress: Callable[[int], None] | None = None) -> dict[str, Outputs]:
    """Train the K models of ``req.masks`` and predict on every split of ``req.evals``.

    ``progress``, if given, is called now and then with the running number of model-steps done
    (between 0 and K * spec.steps; K models advancing one step each count K)."""
    chosen = resolve_engine(spec.arch, engine)
    if chosen == "batched":
        from dpmem.models.batched import train_batched
        return train_batched(spec, req, progress=progress)
    from dpmem.models.opacus_trainer import train_opacus
    return train_opacus(spec, req, progress=progress)

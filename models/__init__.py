"""Training engines behind one call, ``train_models``, and the engine registry.

An engine is a module exposing ``supports(module) -> str | None`` (None: it can train this
``nn.Module``, else the reason it cannot) and ``train(spec, req, *, device, progress) ->
dict[str, np.ndarray]`` (flat ``"{split}_correct"`` bool [K, m] / ``"{split}_margin"`` float16
[K, m] arrays for every split in ``req.evals``). Engines get their modules from
``models.nets.build_model(spec)`` only, so user factories work with every engine.

- ``batched``: K models at once as stacked tensors (models/batched.py);
- ``opacus``: model by model through Opacus (models/opacus_engine.py), the reference;
- ``user``: the user's own trainer, ``fit`` (models/user_engine.py), chosen by ``spec.trainer``.

``auto`` picks ``user`` when the spec names a trainer, else ``batched`` when it supports every
layer of the module, else ``opacus``. Engines are imported on first use, so this registry (and
the config's validation against it) stays free of torch.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable
from types import ModuleType

import numpy as np

from dpmem.models.spec import DPParams, TrainRequest, TrainSpec

# engine name -> the module implementing it
ENGINES: dict[str, str] = {
    "batched": "dpmem.models.batched",
    "opacus": "dpmem.models.opacus_engine",
    "user": "dpmem.models.user_engine",
}

__all__ = ["DPParams", "ENGINES", "TrainRequest", "TrainSpec", "engine_module", "resolve_engine",
           "train_models"]


def engine_module(name: str) -> ModuleType:
    if name not in ENGINES:
        raise ValueError(f"unknown engine {name!r}; choose from auto, {', '.join(ENGINES)}")
    return importlib.import_module(ENGINES[name])


def resolve_engine(spec: TrainSpec, engine: str = "auto") -> str:
    """The engine that will train ``spec``; a ValueError naming the reason when ``engine`` cannot."""
    if engine != "auto" and engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; choose from auto, {', '.join(ENGINES)}")
    if spec.trainer:
        if engine not in ("auto", "user"):
            raise ValueError(f"a trainer ({spec.trainer}) trains the models itself; engine must be auto or "
                             f"user, not {engine!r}")
        return "user"
    if engine == "user":
        raise ValueError("engine 'user' needs a trainer = 'package.module:fit'")
    from dpmem.models.nets import build_model
    module = build_model(spec)
    if engine == "auto":
        return "batched" if _supports("batched", module, spec) is None else "opacus"
    reason = _supports(engine, module, spec)
    if reason is not None:
        raise ValueError(f"the {engine} engine cannot train {spec.arch!r}: {reason}")
    return engine


def _supports(engine: str, module, spec: TrainSpec) -> str | None:
    """The engine's ``supports``; the batched engine also traces the module on the spec's input shape."""
    if engine == "batched":
        return engine_module(engine).supports(module, spec.input_shape)
    return engine_module(engine).supports(module)


def train_models(spec: TrainSpec, req: TrainRequest, *, engine: str = "auto", device: str = "cpu",
                 progress: Callable[[int], None] | None = None) -> dict[str, np.ndarray]:
    """Train the K models of ``req.masks`` and predict on every split of ``req.evals``.

    Returns flat arrays, ``"{split}_correct"`` bool [K, m] and ``"{split}_margin"`` float16 [K, m],
    plus ``"canary_score"`` float32 [K, m_c] when the spec has gradient canaries, plus the
    per-example training statistics (models/example_stats.py; a user's trainer may omit them).
    ``progress``, if given, is called now and then with the running number of model-steps done
    (between 0 and K * spec.steps; K models advancing one step each count K)."""
    chosen = resolve_engine(spec, engine)
    return engine_module(chosen).train(spec, req, device=device, progress=progress)

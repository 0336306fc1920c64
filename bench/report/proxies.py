"""Memorization proxies on a stored run (no training): the proxy table and its per-example values.

For every variant, ``bench.estimators.proxies`` scores the run's real training examples with every
proxy from the second half of the models and compares them with mem from the first half. Variants
whose training statistics were not recorded get one note naming what is missing; the proxies that
need only margins (``in_margin``, ``confidence_mem``, ``lira_separation``, ...) are still computed.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from dpmem.bench.estimators import proxies as px
from dpmem.bench.estimators.memorization import memorization
from dpmem.bench.store.run_store import RunStore
from dpmem.privacy.errors import UsageError

# The per-example values kept for the figure (averaged proxies that every variant can have).
FIGURE_PROXIES = ("csl_mean", "csg_mean", "in_margin_mean", "confidence_mem", "lira_separation", "mem_other_half")


@dataclass(frozen=True, kw_only=True)
class ProxyAnalysis:
    table: pd.DataFrame          # one row per (variant, proxy): px.COLUMNS
    examples: pd.DataFrame       # one row per (variant, example): mem (reference half) and the averaged proxies
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0


def stat_keys(store: RunStore, variant: str) -> list[str]:
    """The training statistics a variant stored (models/example_stats.py)."""
    arrays = store.variant_record(variant).get("arrays") or []
    return [key for key in ("train_loss_sum", "train_draws", "train_grad_norm_sum", "train_clips") if key in arrays]


def analyse_proxies(store: RunStore, *, single_models: int = px.SINGLE_MODELS, bootstrap: int = px.BOOTSTRAP,
                    seed: int = 0) -> ProxyAnalysis:
    """Every proxy of every finished variant of the run (a UsageError if a variant lacks margins)."""
    t0 = time.perf_counter()
    cfg = store.config()
    data = store.data()
    masks = store.masks()
    real = ~data["is_canary"].astype(bool)
    tables, frames, notes = [], [], []
    for name, target in cfg.variants:
        arrays = store.variant_arrays(name)
        if "train_margin" not in arrays:
            raise UsageError(f"variant {name} in {store.root} has no train_margin.npy (a run from an older dpmem): "
                             "the proxies need the margins")
        if masks.shape[0] < 4:
            raise UsageError(f"the run has {masks.shape[0]} models per variant; proxies need at least 4 (two halves)")
        stats = {key: arrays[key] for key in stat_keys(store, name)}
        private = target is not None
        wanted = ("train_loss_sum", "train_draws") + (("train_grad_norm_sum", "train_clips") if private else ())
        absent = [key for key in wanted if key not in stats]
        if absent:
            notes.append(f"variant {name}: {', '.join(absent)} not recorded (a run from before dpmem recorded them, "
                         "or a trainer that does not return them); the proxies that need them are left out")
        inputs = px.ProxyInputs(masks=masks, correct=arrays["train_correct"], margin=arrays["train_margin"],
                                stats=stats)
        table = px.proxy_table(inputs, private=private, use=real, single_models=single_models,
                               bootstrap=bootstrap, seed=seed)
        tables.append(table.assign(variant=name, epsilon=target))
        reference, proxy_half = px.halves(masks.shape[0])
        frame = pd.DataFrame({"variant": name, "example": np.flatnonzero(real),
                              "mem": memorization(masks[reference], arrays["train_correct"][reference]).mem[real]})
        for proxy in FIGURE_PROXIES:
            if px.missing_stats(proxy, stats, private) is None:
                frame[proxy] = px.averaged_proxy(proxy, inputs, proxy_half)[real]
        frames.append(frame)
    table = pd.concat(tables, ignore_index=True)[px.COLUMNS]
    return ProxyAnalysis(table=table, examples=pd.concat(frames, ignore_index=True), notes=notes,
                         seconds=time.perf_counter() - t0)

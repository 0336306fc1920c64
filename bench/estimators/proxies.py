"""Memorization proxies against Feldman & Zhang's estimator, on non-private and DP models alike.

A proxy scores every training example from far fewer models than the estimator needs; it is
useful if it ranks examples as mem does. Every proxy here is oriented so that higher means
more memorized:

| proxy | from | models |
| --- | --- | --- |
| ``csl`` | one model's cumulative sample loss (its ``train_loss_sum``) | 1 |
| ``csg`` | one DP model's cumulative pre-clip gradient norm (``train_grad_norm_sum``) | 1 |
| ``clip_rate`` | the share of one DP model's draws of the example that were clipped | 1 |
| ``in_margin`` | minus the final margin of one model trained on the example | 1 |
| ``csl_mean``, ``csg_mean``, ``in_margin_mean`` | the same, averaged over the models trained on it | K/2 |
| ``confidence_mem`` | mean margin of the models trained on it minus the mean of the others | K/2 |
| ``lira_separation`` | LiRA's per-example Gaussians: (mu_in - mu_out) / the pooled sd of the margin | K/2 |
| ``mem_other_half`` | the estimator itself on the other half: its split-half reliability r | K/2 |

*Honest comparison.* The models are split in two halves by index: mem, the reference, comes
from the first half, every proxy from the second. A proxy computed on the models that also gave
mem would share their sampling noise and look better than it is (``confidence_mem`` is mem's own
formula on margins). mem is itself an estimate with sampling noise, so even the true memorization
would not correlate perfectly with it: ``mem_other_half`` is the estimator against itself across
the halves (its split-half reliability r), and a proxy equal to the true mem would reach about
sqrt(r) (classical test theory, halves of equal size). Each row's ``ceiling`` is that sqrt(r);
a proxy near its ceiling tracks mem as well as the reference's noise lets anyone see.

*Statistics.* Spearman's and Pearson's correlation with mem and the precision at the top 5% of mem
(of the examples a proxy ranks in its top 5%, the share in mem's top 5%), each with a 95%
bootstrap percentile interval over examples. A one-model proxy is computed from one model at a
time, over that model's training examples: its row gives the median over ``single_models`` models,
the interval of that median (examples resampled for every model), and the spread across models
(10th and 90th percentile of the per-model Spearman).

Non-private training forms no per-example gradients, so ``csg`` and ``clip_rate`` exist for DP
variants only; a run whose engine did not record the statistics (an older run, or a trainer that
does not return them) gets a ``note`` naming what is missing instead of a column of zeros.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats as sps

from dpmem.bench.estimators.memorization import memorization

TOP = 0.05
BOOTSTRAP = 1000
SINGLE_MODELS = 20
SINGLE_BOOTSTRAP = 200
# The training statistics each recorded proxy needs (models/example_stats.py).
NEEDS = {"csl": ("train_loss_sum",), "csg": ("train_grad_norm_sum",), "clip_rate": ("train_clips", "train_draws"),
         "csl_mean": ("train_loss_sum",), "csg_mean": ("train_grad_norm_sum",)}
DP_ONLY = ("csg", "clip_rate", "csg_mean")
SINGLE = ("csl", "csg", "clip_rate", "in_margin")
AVERAGED = ("csl_mean", "csg_mean", "in_margin_mean", "confidence_mem", "lira_separation", "mem_other_half")
PROXIES = SINGLE + AVERAGED
COLUMNS = ["variant", "epsilon", "proxy", "kind", "models", "examples", "spearman", "spearman_lo", "spearman_hi",
           "pearson", "pearson_lo", "pearson_hi", "precision@5%", "precision@5%_lo", "precision@5%_hi",
           "spread_lo", "spread_hi", "ceiling", "note"]


@dataclass(frozen=True, kw_only=True)
class ProxyInputs:
    """One variant's per-model arrays ([K, n] each); ``stats`` holds whichever training statistics
    were recorded (models/example_stats.py), keyed by name."""
    masks: np.ndarray       # bool: model k trained on example i
    correct: np.ndarray     # bool: model k classifies training example i correctly
    margin: np.ndarray      # float: its true-label margin
    stats: dict


def halves(K: int) -> tuple[np.ndarray, np.ndarray]:
    """The reference half (mem) and the proxy half of K models, by index."""
    if K < 4:
        raise ValueError(f"proxies need at least 4 models (two halves with in- and out-models), got {K}")
    return np.arange(K // 2), np.arange(K // 2, K)


def _spearman_pearson(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row-wise Spearman and Pearson correlations of [..., n] arrays (NaN for a constant row)."""
    def pearson(a, b):
        a = a - a.mean(-1, keepdims=True)
        b = b - b.mean(-1, keepdims=True)
        with np.errstate(invalid="ignore", divide="ignore"):
            return (a * b).sum(-1) / np.sqrt((a * a).sum(-1) * (b * b).sum(-1))
    return pearson(sps.rankdata(x, axis=-1), sps.rankdata(y, axis=-1)), pearson(x, y)


def _precision(proxy: np.ndarray, mem: np.ndarray, top: float = TOP) -> np.ndarray:
    """Row-wise share of the proxy's top ``top`` among mem's top ``top`` ([..., n] arrays)."""
    n = proxy.shape[-1]
    count = max(1, int(round(top * n)))
    mine = np.argsort(-proxy, axis=-1, kind="stable")[..., :count]
    theirs = np.argsort(-mem, axis=-1, kind="stable")[..., :count]
    hit = np.zeros(proxy.shape, dtype=bool)
    np.put_along_axis(hit, theirs, True, axis=-1)
    return np.take_along_axis(hit, mine, axis=-1).mean(-1)


def agreement(proxy: np.ndarray, mem: np.ndarray, *, bootstrap: int = BOOTSTRAP, seed: int = 0) -> dict:
    """Spearman, Pearson and precision at the top 5% of ``proxy`` [n] against ``mem`` [n], each with
    a 95% bootstrap percentile interval over examples."""
    proxy, mem = np.asarray(proxy, np.float64), np.asarray(mem, np.float64)
    rng = np.random.default_rng(seed)
    draw = rng.integers(0, len(mem), size=(bootstrap, len(mem)))
    s, p = _spearman_pearson(proxy, mem)
    bs, bp = _spearman_pearson(proxy[draw], mem[draw])
    prec, bprec = _precision(proxy, mem), _precision(proxy[draw], mem[draw])
    out: dict[str, float] = {"examples": len(mem)}
    for name, value, reps in (("spearman", s, bs), ("pearson", p, bp), ("precision@5%", prec, bprec)):
        lo, hi = np.nanpercentile(reps, [2.5, 97.5]) if np.isfinite(reps).any() else (np.nan, np.nan)
        out |= {name: float(value), f"{name}_lo": float(lo), f"{name}_hi": float(hi)}
    return out


def single_model_agreement(values: np.ndarray, members: np.ndarray, mem: np.ndarray, *,
                           bootstrap: int = SINGLE_BOOTSTRAP, seed: int = 0) -> dict:
    """A one-model proxy: ``values`` [M, n] from M models, each scored over its own training examples
    (``members`` [M, n]) against ``mem`` [n]. The median over models, its 95% bootstrap interval
    (each model's examples resampled), and the spread of the per-model Spearman (10th-90th pct)."""
    rng = np.random.default_rng(seed)
    per_model: dict[str, list] = {"spearman": [], "pearson": [], "precision@5%": []}
    replicates: dict[str, list] = {name: [] for name in per_model}
    for row, use in zip(values, members):
        x, y = row[use].astype(np.float64), mem[use]
        s, p = _spearman_pearson(x, y)
        draw = rng.integers(0, len(y), size=(bootstrap, len(y)))
        bs, bp = _spearman_pearson(x[draw], y[draw])
        for name, value, reps in (("spearman", s, bs), ("pearson", p, bp),
                                  ("precision@5%", _precision(x, y), _precision(x[draw], y[draw]))):
            per_model[name].append(value)
            replicates[name].append(reps)
    out: dict[str, float] = {"examples": int(np.median(members.sum(1)))}
    for name, values_k in per_model.items():
        reps = np.nanmedian(np.stack(replicates[name]), axis=0)     # the median over models, per replicate
        out |= {name: float(np.nanmedian(values_k)), f"{name}_lo": float(np.nanpercentile(reps, 2.5)),
                f"{name}_hi": float(np.nanpercentile(reps, 97.5))}
    out["spread_lo"], out["spread_hi"] = (float(v) for v in np.nanpercentile(per_model["spearman"], [10, 90]))
    return out


def _mean_over(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return (values * weights).sum(0) / weights.sum(0)


def averaged_proxy(name: str, inputs: ProxyInputs, models: np.ndarray, mem_reference: np.ndarray | None = None) -> np.ndarray:
    """An averaged proxy [n] from the models ``models`` (see the module docstring)."""
    m = inputs.masks[models].astype(np.float64)
    margin = inputs.margin[models].astype(np.float64)
    if name == "csl_mean":
        return _mean_over(inputs.stats["train_loss_sum"][models].astype(np.float64), m)
    if name == "csg_mean":
        return _mean_over(inputs.stats["train_grad_norm_sum"][models].astype(np.float64), m)
    if name == "in_margin_mean":
        return -_mean_over(margin, m)
    if name == "confidence_mem":
        return _mean_over(margin, m) - _mean_over(margin, 1 - m)
    if name == "lira_separation":
        mu_in, mu_out = _mean_over(margin, m), _mean_over(margin, 1 - m)
        var_in = _mean_over((margin - mu_in) ** 2, m)
        var_out = _mean_over((margin - mu_out) ** 2, 1 - m)
        with np.errstate(invalid="ignore", divide="ignore"):
            return (mu_in - mu_out) / np.sqrt(np.maximum((var_in + var_out) / 2, 1e-12))
    if name == "mem_other_half":
        return memorization(inputs.masks[models], inputs.correct[models]).mem
    raise ValueError(f"unknown averaged proxy {name!r}; choose from {', '.join(AVERAGED)}")


def single_proxy(name: str, inputs: ProxyInputs, models: np.ndarray) -> np.ndarray:
    """A one-model proxy [M, n] for each of the models ``models`` (meaningful on its members only)."""
    if name == "csl":
        return inputs.stats["train_loss_sum"][models].astype(np.float64)
    if name == "csg":
        return inputs.stats["train_grad_norm_sum"][models].astype(np.float64)
    if name == "clip_rate":
        draws = inputs.stats["train_draws"][models].astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(draws > 0, inputs.stats["train_clips"][models] / np.maximum(draws, 1), 0.0)
    if name == "in_margin":
        return -inputs.margin[models].astype(np.float64)
    raise ValueError(f"unknown one-model proxy {name!r}; choose from {', '.join(SINGLE)}")


def missing_stats(proxy: str, stats: dict, private: bool) -> str | None:
    """Why ``proxy`` cannot be computed for a variant (None: it can)."""
    if proxy in DP_ONLY and not private:
        return "non-private training computes no per-example gradients"
    absent = [key for key in NEEDS.get(proxy, ()) if key not in stats]
    return f"not recorded: {', '.join(absent)} missing" if absent else None


def proxy_table(inputs: ProxyInputs, *, private: bool, use: np.ndarray | None = None,
                single_models: int = SINGLE_MODELS, bootstrap: int = BOOTSTRAP, seed: int = 0) -> pd.DataFrame:
    """Every proxy against mem for one variant: one row per proxy (``COLUMNS`` without variant, epsilon).

    ``use`` (bool [n]) restricts the examples (e.g. real ones, not canaries); examples without in-
    and out-models in both halves are left out."""
    K, n = inputs.masks.shape
    reference, proxy_half = halves(K)
    masks = inputs.masks.astype(bool)
    use = np.ones(n, bool) if use is None else np.asarray(use, bool)
    for half in (reference, proxy_half):
        n_in = masks[half].sum(0)
        use = use & (n_in > 0) & (n_in < len(half))
    mem = memorization(masks[reference], inputs.correct[reference]).mem
    rows = []
    for proxy in PROXIES:
        single = proxy in SINGLE
        row = {"proxy": proxy, "kind": "one model" if single else "averaged",
               "models": 1 if single else len(proxy_half), "note": missing_stats(proxy, inputs.stats, private)}
        if row["note"] is None:
            if single:
                chosen = proxy_half[:single_models]
                values = single_proxy(proxy, inputs, chosen)[:, use]
                row |= single_model_agreement(values, masks[chosen][:, use], mem[use], seed=seed)
            else:
                row |= agreement(averaged_proxy(proxy, inputs, proxy_half)[use], mem[use], bootstrap=bootstrap, seed=seed)
        rows.append(row)
    table = pd.DataFrame(rows)
    reliability = table.loc[table["proxy"] == "mem_other_half", "spearman"].iloc[0]
    table["ceiling"] = float(np.sqrt(reliability)) if reliability > 0 else np.nan
    table["note"] = table["note"].fillna("")
    return table.reindex(columns=[c for c in COLUMNS if c not in ("variant", "epsilon")])

"""Exact leave-one-out memorization (the gold standard) and the subset-sampling estimator's error against it.

For each chosen training example i, R models are trained on the whole training set S and R on S \\ {i}.
Pair r shares everything else: the same initialisation and the same per-example sampling coins, so the
model on S \\ {i} sees its partner's batches minus i. One model on S per repeat serves every i.

The subset-sampling estimator (Feldman & Zhang) estimates a different quantity — leaving i out of a random
subset of size about qn, not out of S — so its error against LOO mixes variance (finite K) with that bias.
``estimator_error`` reports both as a function of K and q.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from scipy import stats

from dpmem.bench.config import Config
from dpmem.bench.data import load_dataset
from dpmem.bench.estimators import memorization
from dpmem.bench.report.figures import save_figure
from dpmem.bench.report.tables import write_frame, write_md_tex
from dpmem.bench.run import execution, pipeline, plan, units
from dpmem.bench.store.files import atomic_write_json, read_json
from dpmem.bench.store.run_store import ModelRange, RunStore, data_fingerprint
from dpmem.privacy.errors import UsageError

# How the LOO models' seeds are derived (plan.study_seed); a study stored otherwise is not resumed.
SEED_SCHEME = "study_seed"


def choose_examples(mem: np.ndarray, *, count: int, seed: int) -> np.ndarray:
    """A third the most memorized, a third the least, the rest at random (distinct, sorted)."""
    mem = np.nan_to_num(np.asarray(mem, float), nan=0.0)
    n = len(mem)
    count = min(count, n)
    order = np.argsort(-mem, kind="stable")
    top = order[: count // 3]
    bottom = order[::-1][: count // 3]
    chosen = list(dict.fromkeys(np.concatenate([top, bottom]).tolist()))
    rest = np.setdiff1d(np.arange(n), chosen)
    rng = np.random.default_rng(seed)
    chosen += rng.choice(rest, size=count - len(chosen), replace=False).tolist()
    return np.sort(np.array(chosen, dtype=np.int64))


def loo_masks(n: int, examples: np.ndarray, repeats: int, first: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Masks and stream ids for `repeats` blocks of [S, S minus e_1, ..., S minus e_E]: the models
    of repeat r (counted from ``first``) share stream id r, so they share init, coins and noise."""
    block = np.ones((1 + len(examples), n), bool)
    block[1 + np.arange(len(examples)), examples] = False
    masks = np.tile(block, (repeats, 1))
    streams = np.repeat(np.arange(first, first + repeats, dtype=np.int64), 1 + len(examples))
    return masks, streams


def paired_mem(in_correct: np.ndarray, out_correct: np.ndarray, level: float = 0.95) -> pd.DataFrame:
    """LOO memorization per example with a t-interval over the paired differences."""
    d = in_correct.astype(float) - out_correct.astype(float)     # [R, E]
    r = d.shape[0]
    mean = d.mean(0)
    sd = d.std(0, ddof=1) if r > 1 else np.zeros(d.shape[1])
    half = stats.t.ppf(0.5 + level / 2, df=max(r - 1, 1)) * sd / np.sqrt(r)
    return pd.DataFrame({"p_S": in_correct.mean(0), "p_S_minus_i": out_correct.mean(0), "mem_loo": mean,
                         "mem_loo_lo": mean - half, "mem_loo_hi": mean + half, "repeats": r})


def _plan_full_set(cfg: Config, n: int, epsilon: float | None) -> dict:
    return plan.plan_variant(cfg, epsilon, plan.schedule(cfg, n, expected=float(n)))


def run_loo(store: RunStore, *, variant: str = "nonprivate", count: int = 30, repeats: int = 100,
            examples: np.ndarray | None = None, unit_repeats: int | None = None, config: Config | None = None,
            progress: bool = True, ray_address: str | None = None) -> pd.DataFrame:
    """Train (or resume) the LOO models for ``variant`` of a finished run; returns one row per example.

    ``config``: the run's config with other execution settings (device, workers, threads)."""
    cfg = store.config() if config is None else config
    names = dict(cfg.variants)
    if variant not in names:
        raise UsageError(f"variant {variant!r} is not in this run ({', '.join(names)})")
    if repeats < 2:
        raise UsageError(f"--repeats must be >= 2, got {repeats}")
    execution.set_threads(cfg.threads)
    ds = load_dataset(cfg)
    store.check_fingerprint(data_fingerprint(ds), "the dataset built now")
    loo_store = RunStore(store.root / "loo" / variant)
    meta_path = loo_store.root / "loo.json"
    if meta_path.exists():
        meta = read_json(meta_path)
        if meta["repeats"] != repeats or (examples is not None and list(examples) != meta["examples"]):
            raise UsageError(f"{loo_store.root} holds a LOO study with other settings; remove it to start again")
        examples = np.array(meta["examples"], dtype=np.int64)
    else:
        if examples is None:
            mem = memorization.memorization(store.masks(), store.variant_arrays(variant)["train_correct"]).mem
            examples = choose_examples(mem, count=count, seed=cfg.seed)
        examples = np.asarray(examples, dtype=np.int64)
        if examples.min() < 0 or examples.max() >= ds.n_train:
            raise UsageError(f"example indices must be in [0, {ds.n_train})")
        loo_store.root.mkdir(parents=True, exist_ok=True)
        atomic_write_json(meta_path, {"variant": variant, "repeats": repeats, "examples": examples.tolist(),
                                      "plan": _plan_full_set(cfg, ds.n_train, names[variant]),
                                      "config_hash": cfg.hash(), "seeds": SEED_SCHEME})
    meta = read_json(meta_path)
    if meta.get("seeds") != SEED_SCHEME:
        raise UsageError(f"{loo_store.root} was written by an older dpmem (LOO seeds derived otherwise); "
                         "remove it to start again")
    spec = plan.train_spec(cfg, ds, meta["plan"])
    x_train = plan.as_inputs(ds.x_train)
    per_block = 1 + len(examples)
    masks, stream_ids = loo_masks(ds.n_train, examples, repeats)
    cols = np.arange(len(examples))

    def stored(models: ModelRange, out: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        correct = out["chosen_correct"].reshape(models.size, per_block, len(examples))
        margin = out["chosen_margin"].reshape(models.size, per_block, len(examples))
        return {"in_correct": correct[:, 0, :], "out_correct": correct[:, 1 + cols, cols],
                "in_margin": margin[:, 0, :], "out_margin": margin[:, 1 + cols, cols]}

    # LOO models draw from streams of the study's own seed, apart from the main run's models
    loo_cfg = cfg.replace(seed=plan.study_seed(cfg, "loo"))
    cell = units.Cell(name="loo", spec=spec, models=repeats, seed=plan.run_seed(loo_cfg),
                      noise_seed=plan.noise_seed(loo_cfg, variant), engine=cfg.engine, masks=masks,
                      rows_per_model=per_block, stream_ids=stream_ids, stored=stored)
    # a unit holds whole repeats: about unit_size models of 1 + len(examples) each
    execution_cfg = cfg.replace(unit_size=unit_repeats or max(1, cfg.unit_size // per_block))
    units.train_units(loo_store, [cell], {"x_train": x_train, "y_train": ds.y_train,
                                          "evals": {"chosen": (x_train[examples], ds.y_train[examples])}},
                      execution_cfg, ray_address=ray_address, progress=progress, desc=f"LOO {variant}",
                      counting="repeat")
    arrays = loo_store.variant_arrays("loo")
    table = paired_mem(arrays["in_correct"], arrays["out_correct"])
    table.insert(0, "index", examples)
    table.insert(0, "variant", variant)
    return table


# -- estimator error -------------------------------------------------------------------------

def _boot_ci(stat, *samples, seed: int = 0, n: int = 2000) -> tuple[float, float]:
    if len(samples[0]) < 3:
        return (np.nan, np.nan)
    res = stats.bootstrap(samples, stat, paired=True, vectorized=False, n_resamples=n, confidence_level=0.95,
                          method="percentile", random_state=np.random.default_rng(seed))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def error_row(est: np.ndarray, loo: np.ndarray) -> dict:
    err = np.abs(est - loo)
    pear = stats.pearsonr(est, loo).statistic if np.std(est) > 0 and np.std(loo) > 0 else np.nan
    spear = stats.spearmanr(est, loo).statistic if np.std(est) > 0 and np.std(loo) > 0 else np.nan
    row = {"examples": len(est), "mae": float(err.mean()), "p90_abs_err": float(np.quantile(err, 0.9)),
           "pearson": float(pear), "spearman": float(spear), "mean_est": float(est.mean()),
           "mean_loo": float(loo.mean())}
    row["mae_lo"], row["mae_hi"] = _boot_ci(lambda e, t: np.mean(np.abs(e - t)), est, loo)
    row["p90_lo"], row["p90_hi"] = _boot_ci(lambda e, t: np.quantile(np.abs(e - t), 0.9), est, loo)
    safe = lambda f: (lambda e, t: f(e, t).statistic if np.std(e) > 0 and np.std(t) > 0 else 0.0)  # noqa: E731
    row["pearson_lo"], row["pearson_hi"] = _boot_ci(safe(stats.pearsonr), est, loo)
    row["spearman_lo"], row["spearman_hi"] = _boot_ci(safe(stats.spearmanr), est, loo)
    return row


def subset_run(store: RunStore, q: float, variant: str, models: int, *, progress: bool) -> tuple[np.ndarray, np.ndarray]:
    """Masks and train correctness of a subset-sampling run at rate q (the main run when q matches)."""
    cfg = store.config()
    if q == cfg.q and models <= cfg.models:
        return store.masks(), store.variant_arrays(variant)["train_correct"]
    eps = dict(cfg.variants)[variant]
    sub_cfg = cfg.replace(q=q, models=models, epsilons=() if eps is None else (eps,))
    sub = RunStore.create_or_resume(store.root / "loo" / f"q{q:g}-{variant}-K{models}", sub_cfg,
                                    fingerprint=store.fingerprint())
    pipeline.run(sub, sub_cfg, progress=progress)
    return sub.masks(), sub.variant_arrays(variant)["train_correct"]


def estimator_error(store: RunStore, loo_table: pd.DataFrame, *, ks: list[int], qs: list[float],
                    progress: bool = True) -> pd.DataFrame:
    """Subset-sampling estimate vs LOO on the same examples, for K models (prefixes) and subset rates q."""
    variant = loo_table["variant"].iloc[0]
    idx = loo_table["index"].to_numpy()
    loo = loo_table["mem_loo"].to_numpy()
    rows = []
    for q in qs:
        masks, correct = subset_run(store, q, variant, max(ks), progress=progress)
        for k in ks:
            if k > masks.shape[0]:
                continue
            est = memorization.memorization(masks[:k], correct[:k]).mem[idx]
            ok = np.isfinite(est)
            rows.append({"variant": variant, "q": q, "K": k, **error_row(est[ok], loo[ok])})
    return pd.DataFrame(rows)


# -- report -------------------------------------------------------------------------------

def write_report(loo_table: pd.DataFrame, errors: pd.DataFrame, est_at_default: pd.DataFrame, out: Path) -> None:
    """LOO ground truth, the estimator-error table (MD/LaTeX/CSV) and its figure."""
    out = Path(out)
    write_frame(loo_table, out / "loo")
    write_frame(errors, out / "estimator_error")
    cols = ["q", "K", "examples", "mae", "mae_lo", "mae_hi", "p90_abs_err", "pearson", "pearson_lo",
            "pearson_hi", "spearman", "spearman_lo", "spearman_hi"]
    write_md_tex(errors[cols], "Subset-sampling memorization estimate versus exact leave-one-out.", out,
                 "estimator_error")
    sns.set_theme(style="whitegrid", context="paper")
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.errorbar(est_at_default["loo"], est_at_default["est"],
                 xerr=[est_at_default["loo"] - est_at_default["loo_lo"], est_at_default["loo_hi"] - est_at_default["loo"]],
                 fmt="o", ms=4, alpha=0.7, elinewidth=0.6)
    lim = [-0.3, 1.05]
    ax1.plot(lim, lim, "k--", lw=0.8)
    ax1.set(xlim=lim, ylim=lim, xlabel="exact leave-one-out memorization (95% CI)",
            ylabel="subset-sampling estimate", title=est_at_default.attrs.get("title", "estimate vs LOO"))
    for q, rows in errors.groupby("q"):
        ax2.errorbar(rows["K"], rows["mae"], yerr=[rows["mae"] - rows["mae_lo"], rows["mae_hi"] - rows["mae"]],
                     marker="o", capsize=3, label=f"q = {q:g}")
    ax2.set(xscale="log", xlabel="models K", ylabel="mean |estimate - LOO|", title="Estimator error vs K and q")
    ax2.legend()
    fig.tight_layout()
    save_figure(fig, out / "figures", "estimator_error")

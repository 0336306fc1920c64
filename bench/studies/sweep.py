"""Memorization versus generalization across training configurations (the critique's analysis, measured).

Each configuration (model width x training-set size, every variant of it: non-private and each epsilon) is a
complete dpmem run of its own under SWEEP/runs/, so a sweep resumes like a run. Each (configuration, variant)
is one point: mean memorization of the training examples against mean test accuracy over the K models.
"""
from __future__ import annotations

import itertools
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from scipy import stats

from dpmem.bench.config import Config
from dpmem.bench.report import analysis
from dpmem.bench.report.figures import save_figure
from dpmem.bench.report.tables import write_frame, write_md_tex
from dpmem.bench.run import pipeline
from dpmem.bench.store.run_store import RunStore


def sweep_configs(base: Config, *, widths: list[int], n_trains: list[int]) -> list[tuple[str, Config]]:
    out = []
    for width, n in itertools.product(widths, n_trains):
        out.append((f"w{width}-n{n}", base.replace(hidden=(width,) * max(1, len(base.hidden)), n_train=n)))
    return out


def run_sweep(root, base: Config, *, widths: list[int], n_trains: list[int], progress: bool = True) -> pd.DataFrame:
    rows = []
    for name, cfg in sweep_configs(base, widths=widths, n_trains=n_trains):
        store = RunStore.create_or_resume(f"{root}/runs/{name}", cfg)
        pipeline.run(store, cfg, progress=progress)
        result = analysis.analyse(store, with_pairs=False)
        n_train = result.summary["run"]["n_train"]
        for variant, v in result.summary["variants"].items():
            rows.append({"config": name, "width": cfg.hidden[0], "n_train_target": cfg.n_train,
                         "n_train": n_train, "variant": variant, "epsilon": v["epsilon"],
                         "test_accuracy": v["test_accuracy"], "train_accuracy": v["train_accuracy"],
                         "gen_gap": v["train_accuracy"] - v["test_accuracy"], "mean_mem": v["mean_mem"],
                         "models": v["models"]})
    return pd.DataFrame(rows)


def correlation(points: pd.DataFrame, x: str = "mean_mem", y: str = "test_accuracy", seed: int = 0) -> dict:
    """Pearson and Spearman correlation over the sweep's points, with bootstrap 95% intervals."""
    a, b = points[x].to_numpy(float), points[y].to_numpy(float)
    out = {"points": len(a), "x": x, "y": y}
    for name, fn in (("pearson", stats.pearsonr), ("spearman", stats.spearmanr)):
        out[name] = float(fn(a, b).statistic) if len(a) > 2 else float("nan")
        if len(a) > 3:
            res = stats.bootstrap((a, b), lambda u, v, fn=fn: fn(u, v).statistic if np.std(u) > 0 and np.std(v) > 0 else 0.0,
                                  paired=True, vectorized=False, n_resamples=2000, method="percentile",
                                  random_state=np.random.default_rng(seed))
            out[f"{name}_lo"], out[f"{name}_hi"] = float(res.confidence_interval.low), float(res.confidence_interval.high)
        else:
            out[f"{name}_lo"] = out[f"{name}_hi"] = float("nan")
    return out


def correlations(points: pd.DataFrame) -> pd.DataFrame:
    """Pooled over every point, then within each variant (fixed epsilon: only width and n_train vary).

    Pooling mixes two effects of opposite sign — more data lowers memorization and raises accuracy, while
    stronger DP lowers both — so the within-variant rows are the ones that isolate the critique's question.
    """
    rows = [{"scope": "all points", **correlation(points)}]
    for variant, group in points.groupby("variant", sort=False):
        rows.append({"scope": variant, **correlation(group)})
    return pd.DataFrame(rows)


# -- report -------------------------------------------------------------------------------

CORRELATION_COLUMNS = ["scope", "points", "pearson", "pearson_lo", "pearson_hi", "spearman", "spearman_lo",
                       "spearman_hi"]


def write_report(points: pd.DataFrame, corr: pd.DataFrame, out: Path) -> None:
    out = Path(out)
    write_frame(points, out / "mem_vs_gen")
    write_frame(corr, out / "mem_vs_gen_correlation")
    cols = ["config", "variant", "n_train", "width", "test_accuracy", "train_accuracy", "gen_gap", "mean_mem"]
    for stem, df, caption in (("mem_vs_gen", points[cols], "Memorization versus generalization across configurations."),
                              ("mem_vs_gen_correlation", corr[CORRELATION_COLUMNS],
                               "Correlation of mean memorization with test accuracy (95% bootstrap intervals).")):
        write_md_tex(df, caption, out, stem)
    sns.set_theme(style="whitegrid", context="paper")
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    variants = list(dict.fromkeys(points["variant"]))
    palette = dict(zip(variants, sns.color_palette("viridis_r", len(variants))))
    for variant in variants:
        rows = points.loc[points["variant"] == variant]
        r = corr.loc[corr["scope"] == variant].iloc[0]
        ax.scatter(rows["mean_mem"], rows["test_accuracy"], s=18 + rows["n_train"] / 10, color=palette[variant],
                   label=f"{variant}: r = {r['pearson']:.2f} [{r['pearson_lo']:.2f}, {r['pearson_hi']:.2f}]")
    pooled = corr.iloc[0]
    ax.set(xlabel="mean memorization of training examples", ylabel="test accuracy",
           title=f"All {int(pooled['points'])} points: r = {pooled['pearson']:.2f} "
                 f"[{pooled['pearson_lo']:.2f}, {pooled['pearson_hi']:.2f}] (marker size: training-set size)")
    ax.legend(fontsize=7, title="Pearson r within variant", title_fontsize=7)
    fig.tight_layout()
    save_figure(fig, out / "figures", "mem_vs_gen")

"""Tables (CSV, Parquet, Markdown, LaTeX) and figures (PNG, PDF) from an analysed run."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from dpmem.bench.report.analysis import Analysis  # noqa: E402
from dpmem.bench.store.files import atomic_write_bytes, atomic_write_json  # noqa: E402
from dpmem.bench.estimators.subgroups import bin_order  # noqa: E402

MEMORIZATION_COLUMNS = ["variant", "epsilon", "index", "label", "subgroup", "subgroup_count", "p_in", "p_out",
                        "n_in", "n_out", "mem", "mem_se", "no_in_or_out", "high_mem", "bound", "violation", "eps_lb"]
SUBGROUP_COLUMNS = ["variant", "epsilon", "subgroup", "label", "train_count", "test_count", "test_acc",
                    "test_acc_lo", "test_acc_hi", "acc_loss", "acc_loss_lo", "acc_loss_hi", "mean_mem", "mem_examples"]
BIN_COLUMNS = ["variant", "freq_bin", "subgroups", "train_examples", "test_examples", "test_acc", "test_acc_lo",
               "test_acc_hi", "acc_loss", "acc_loss_lo", "acc_loss_hi", "mean_mem", "mem_examples"]


def _ordered(df: pd.DataFrame, first: list[str]) -> pd.DataFrame:
    return df[first + [c for c in df.columns if c not in first]]


def write_frame(df: pd.DataFrame, path_stem: Path) -> None:
    """CSV and Parquet, each written atomically."""
    atomic_write_bytes(path_stem.with_suffix(".csv"), df.to_csv(index=False).encode())
    import io
    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    atomic_write_bytes(path_stem.with_suffix(".parquet"), buf.getvalue())


def summary_frame(summary: dict) -> pd.DataFrame:
    rows = []
    for name, v in summary["variants"].items():
        rows.append({"variant": name, "epsilon": v["epsilon"], "sigma": v["noise_multiplier"],
                     "steps": v["steps"], "models": v["models"], "test_acc": v["test_accuracy"],
                     "train_acc": v["train_accuracy"], "mean_mem": v["mean_mem"],
                     "high_mem": v["high_mem_examples"], "high_mem_raw": v["high_mem_examples_raw"],
                     "violations": v["violations"], "eps_lb": v["eps_lb"], "power_eps": v["power_eps"]})
    return pd.DataFrame(rows)


def findings_frame(summary: dict) -> pd.DataFrame:
    """Per variant: raw and controlled findings, the expected number of false ones among the raw."""
    rows = []
    for name, v in summary["variants"].items():
        rows.append({"variant": name, "models": v["models"], "high_mem_raw": v["high_mem_examples_raw"],
                     "expected_false_high_mem": v["expected_false_high_mem"], "high_mem": v["high_mem_examples"],
                     "pairs_raw": v.get("high_influence_pairs_raw"),
                     "expected_false_pairs": v.get("expected_false_pairs"),
                     "pairs": v.get("high_influence_pairs")})
    return pd.DataFrame(rows)


def trend_frame(summary: dict) -> pd.DataFrame:
    """Per variant: slopes of accuracy loss and mean memorization on log2 subgroup frequency, with intervals."""
    rows = []
    for name, v in summary["variants"].items():
        rows.append({"variant": name, "acc_loss_slope": v.get("acc_loss_slope"),
                     "acc_loss_slope_lo": v.get("acc_loss_slope_lo"), "acc_loss_slope_hi": v.get("acc_loss_slope_hi"),
                     "mem_slope": v.get("mem_slope"), "mem_slope_lo": v.get("mem_slope_lo"),
                     "mem_slope_hi": v.get("mem_slope_hi"), "loss_subgroups": v.get("acc_loss_slope_subgroups"),
                     "mem_subgroups": v.get("mem_slope_subgroups")})
    return pd.DataFrame(rows).astype({c: float for c in ("acc_loss_slope", "acc_loss_slope_lo", "acc_loss_slope_hi",
                                                         "mem_slope", "mem_slope_lo", "mem_slope_hi")})


def fdr_warnings(summary: dict) -> list[str]:
    """One line per variant where most raw findings are what noise alone produces."""
    lines = []
    for name, v in summary["variants"].items():
        for what, raw, false, need in (
                ("high-memorization examples", v.get("high_mem_examples_raw"), v.get("expected_false_high_mem"),
                 v.get("models_needed_high_mem")),
                ("high-influence pairs", v.get("high_influence_pairs_raw"), v.get("expected_false_pairs"),
                 v.get("models_needed_pairs"))):
            if raw and false is not None and false > 0.5 * raw:
                more = f"; about {need:,} models per variant would make noise findings rare" if need else ""
                lines.append(f"warning: {name}: {false:,.0f} of the {raw:,} raw {what} are expected from noise alone "
                             f"at K = {v['models']:,} models{more}")
    return lines


def _fmt(df: pd.DataFrame) -> pd.DataFrame:
    out = df.copy()
    for c in out.columns:
        if pd.api.types.is_float_dtype(out[c]):
            out[c] = out[c].map(lambda x: "" if pd.isna(x) else f"{x:.3g}" if abs(x) >= 1e-3 or x == 0 else f"{x:.1e}")
    return out


def markdown(df: pd.DataFrame) -> str:
    return _fmt(df).to_markdown(index=False) + "\n"


def latex(df: pd.DataFrame, caption: str) -> str:
    return _fmt(df).to_latex(index=False, caption=caption, escape=True)


def write_tables(analysis: Analysis, out: Path) -> None:
    out = Path(out)
    write_frame(_ordered(analysis.memorization, MEMORIZATION_COLUMNS), out / "memorization")
    write_frame(_ordered(analysis.subgroups, SUBGROUP_COLUMNS), out / "subgroups")
    write_frame(_ordered(analysis.bins, BIN_COLUMNS), out / "frequency_bins")
    if len(analysis.pairs.columns):     # written even when empty, so no earlier list survives a report
        write_frame(analysis.pairs, out / "influence_pairs")
    else:  # never leave an earlier report's pairs next to this report's tables
        for ext in (".csv", ".parquet"):
            (out / f"influence_pairs{ext}").unlink(missing_ok=True)
    atomic_write_json(out / "summary.json", analysis.summary)
    tables = out / "tables"
    summ = summary_frame(analysis.summary)
    bins = analysis.bins[BIN_COLUMNS]
    for stem, df, caption in (("summary", summ, "Per-variant accuracy, memorization and DP audit."),
                              ("frequency_bins", bins, "Accuracy loss (95% intervals over models and test examples) "
                                                       "and memorization by subgroup training frequency."),
                              ("findings", findings_frame(analysis.summary),
                               "High-memorization examples and high-influence pairs: raw, expected false, and "
                               "after false-discovery control."),
                              ("trends", trend_frame(analysis.summary),
                               "Slopes on log2 subgroup frequency (weighted least squares, 95% intervals).")):
        atomic_write_bytes(tables / f"{stem}.md", markdown(df).encode())
        atomic_write_bytes(tables / f"{stem}.tex", latex(df, caption).encode())


# -- figures ---------------------------------------------------------------------------------

def _save(fig, out: Path, stem: str) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for ext in ("png", "pdf"):
        p = out / f"{stem}.{ext}"
        tmp = out / f".{stem}.tmp.{ext}"
        # no creation date in the PDF: the same arrays give byte-identical figures
        fig.savefig(tmp, dpi=150, bbox_inches="tight", metadata={"CreationDate": None} if ext == "pdf" else None)
        tmp.replace(p)
        paths.append(p)
    plt.close(fig)
    return paths


def figure_memorization_hist(analysis: Analysis):
    mem = analysis.memorization.loc[~analysis.memorization["is_canary"]]
    variants = list(dict.fromkeys(mem["variant"]))
    fig, axes = plt.subplots(1, len(variants), figsize=(3.2 * len(variants), 3), sharey=True, squeeze=False)
    for ax, name in zip(axes[0], variants):
        vals = mem.loc[mem["variant"] == name, "mem"].dropna()
        sns.histplot(vals, bins=np.linspace(-0.25, 1, 26), ax=ax, color="C0" if name == "nonprivate" else "C1")
        ax.axvline(vals.mean(), color="k", lw=1, ls="--")
        ax.set_title(f"{name}: mean {vals.mean():.3f}")
        ax.set_xlabel("memorization (subset-sampling estimate)")
    axes[0][0].set_ylabel("training examples")
    fig.tight_layout()
    return fig


def figure_loss_vs_frequency(analysis: Analysis):
    sub = analysis.subgroups
    bins = analysis.bins
    order = bin_order(bins["freq_bin"])
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(14, 4.6))
    dp = [v for v in dict.fromkeys(sub["variant"]) if v != "nonprivate"]
    palette = dict(zip(dict.fromkeys(sub["variant"]), sns.color_palette("viridis_r", len(set(sub["variant"])))))
    for name in dict.fromkeys(sub["variant"]):
        rows = sub.loc[(sub["variant"] == name) & (sub["test_count"] > 0)]
        b = bins.loc[bins["variant"] == name].set_index("freq_bin").reindex(order)
        ax1.plot(order, b["test_acc"], marker="o", label=name, color=palette[name])
        ax1.fill_between(order, b["test_acc_lo"], b["test_acc_hi"], color=palette[name], alpha=0.2, lw=0)
        ax3.plot(order, b["mean_mem"], marker="o", label=name, color=palette[name])
        if name in dp:
            ax2.scatter(rows["train_count"], rows["acc_loss"], s=8, alpha=0.25, color=palette[name])
            # bins sit at the geometric middle of their count range (1, 2-3 -> 2.45, 4-7 -> 5.3, ...)
            lo_hi = [(int(s.split("-")[0]), int(s.split("-")[-1])) for s in order]
            mid = np.array([np.sqrt(lo * hi) if lo > 0 else 0.5 for lo, hi in lo_hi])
            v = analysis.summary["variants"].get(name, {})
            slope = ("" if v.get("acc_loss_slope") is None else
                     f"\nslope per doubling {v['acc_loss_slope']:+.3f} "
                     f"[{v['acc_loss_slope_lo']:+.3f}, {v['acc_loss_slope_hi']:+.3f}]")
            ax2.errorbar(mid, b["acc_loss"], yerr=[b["acc_loss"] - b["acc_loss_lo"], b["acc_loss_hi"] - b["acc_loss"]],
                         marker="o", lw=1.5, capsize=3, color=palette[name], label=f"{name} bins{slope}")
    ax1.set(title="Test accuracy by subgroup frequency (95% CI)", xlabel="training examples in subgroup",
            ylabel="accuracy")
    ax2.set(title="DP accuracy loss: subgroups (dots), bins (95% CI)", xlabel="training examples in subgroup (log)",
            ylabel="acc(nonprivate) - acc(DP)")
    ax2.set_xscale("log", base=2)
    ax2.axhline(0, color="k", lw=0.8)
    ax3.set(title="Mean memorization by subgroup frequency", xlabel="training examples in subgroup",
            ylabel="mean memorization")
    for ax in (ax1, ax3):
        ax.legend(fontsize=7)
    # below the axes: inside, the slopes would cover the points they describe
    ax2.legend(fontsize=6, loc="upper center", bbox_to_anchor=(0.5, -0.2), frameon=False)
    fig.tight_layout()
    return fig


def figure_mem_vs_bound(analysis: Analysis):
    mem = analysis.memorization
    variants = [v for v in dict.fromkeys(mem["variant"])]
    fig, axes = plt.subplots(1, len(variants), figsize=(3.3 * len(variants), 3.2), sharey=True, squeeze=False)
    p = np.linspace(0, 1, 200)
    for ax, name in zip(axes[0], variants):
        rows = mem.loc[mem["variant"] == name]
        audit = analysis.audits[name]
        ok = ~rows["violation"].astype(bool)
        ax.scatter(rows.loc[ok, "p_out"], rows.loc[ok, "mem"], s=6, alpha=0.4, color="C0", label="examples")
        if (~ok).any():
            ax.scatter(rows.loc[~ok, "p_out"], rows.loc[~ok, "mem"], s=14, color="red", label="violation")
        canary = rows["is_canary"].astype(bool)
        if canary.any():
            ax.scatter(rows.loc[canary, "p_out"], rows.loc[canary, "mem"], s=18, marker="x", color="k",
                       label="canary")
        if audit.epsilon_claimed is not None:
            bound = np.minimum((np.exp(audit.epsilon_tested) - 1) * p + audit.delta_tested, 1 - p)
            ax.plot(p, bound, color="C3", lw=1.2, label=f"DP bound (eps={audit.epsilon_tested:g})")
        ax.set(xlim=(0, 1), ylim=(-0.3, 1.02), xlabel="p_out (accuracy when left out)",
               title=f"{name}\nviolations {audit.violations}, eps_lb "
                     f"{'n/a' if audit.eps_lb is None else f'{audit.eps_lb:.2f}'}")
        ax.legend(fontsize=6, loc="upper right")
    axes[0][0].set_ylabel("memorization = p_in - p_out")
    fig.tight_layout()
    return fig


FIGURES = {"memorization_hist": figure_memorization_hist,
           "acc_loss_vs_frequency": figure_loss_vs_frequency,
           "mem_vs_bound": figure_mem_vs_bound}


def write_figures(analysis: Analysis, out: Path) -> list[Path]:
    sns.set_theme(style="whitegrid", context="paper")
    paths = []
    for stem, make in FIGURES.items():
        paths += _save(make(analysis), Path(out) / "figures", stem)
    return paths


def write_all(analysis: Analysis, out: Path) -> None:
    write_tables(analysis, out)
    write_figures(analysis, out)


# -- studies ---------------------------------------------------------------------------------

def write_loo(loo_table: pd.DataFrame, errors: pd.DataFrame, est_at_default: pd.DataFrame, out: Path) -> None:
    """LOO ground truth, the estimator-error table (MD/LaTeX/CSV) and its figure."""
    out = Path(out)
    write_frame(loo_table, out / "loo")
    write_frame(errors, out / "estimator_error")
    cols = ["q", "K", "examples", "mae", "mae_lo", "mae_hi", "p90_abs_err", "pearson", "pearson_lo",
            "pearson_hi", "spearman", "spearman_lo", "spearman_hi"]
    atomic_write_bytes(out / "tables" / "estimator_error.md", markdown(errors[cols]).encode())
    atomic_write_bytes(out / "tables" / "estimator_error.tex",
                       latex(errors[cols], "Subset-sampling memorization estimate versus exact leave-one-out.").encode())
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
    _save(fig, out / "figures", "estimator_error")


CORRELATION_COLUMNS = ["scope", "points", "pearson", "pearson_lo", "pearson_hi", "spearman", "spearman_lo",
                       "spearman_hi"]


def write_sweep(points: pd.DataFrame, corr: pd.DataFrame, out: Path) -> None:
    out = Path(out)
    write_frame(points, out / "mem_vs_gen")
    write_frame(corr, out / "mem_vs_gen_correlation")
    cols = ["config", "variant", "n_train", "width", "test_accuracy", "train_accuracy", "gen_gap", "mean_mem"]
    for stem, df, caption in (("mem_vs_gen", points[cols], "Memorization versus generalization across configurations."),
                              ("mem_vs_gen_correlation", corr[CORRELATION_COLUMNS],
                               "Correlation of mean memorization with test accuracy (95% bootstrap intervals).")):
        atomic_write_bytes(out / "tables" / f"{stem}.md", markdown(df).encode())
        atomic_write_bytes(out / "tables" / f"{stem}.tex", latex(df, caption).encode())
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
    _save(fig, out / "figures", "mem_vs_gen")

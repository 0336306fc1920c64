"""Figures from an analysed run (PNG and PDF, byte-identical for the same arrays)."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import seaborn as sns  # noqa: E402

from dpmem.bench.estimators.subgroups import bin_order  # noqa: E402
from dpmem.bench.report.analysis import Analysis  # noqa: E402


def save_figure(fig, out: Path, stem: str) -> list[Path]:
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
        if audit.epsilon_tested is not None and audit.delta_tested is not None:
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
        paths += save_figure(make(analysis), Path(out) / "figures", stem)
    return paths

"""Figures from an analysed run (PNG and PDF, byte-identical for the same arrays)."""
from __future__ import annotations

import textwrap
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


def figure_mia_roc(mia):
    """ROC per variant on log-log axes, every attack, with the DP region's boundary of DP variants."""
    from dpmem.bench.estimators.membership import dp_region_tpr
    variants = list(dict.fromkeys(mia.table["variant"]))
    attacks = list(dict.fromkeys(mia.table["attack"]))
    fig, axes = plt.subplots(1, len(variants), figsize=(3.4 * len(variants), 3.4), squeeze=False)
    colours = dict(zip(attacks, sns.color_palette("tab10", len(attacks))))
    for ax, name in zip(axes[0], variants):
        rows = mia.table.loc[mia.table["variant"] == name].set_index("attack")
        floor = float(rows["min_fpr"].min())
        for attack in attacks:
            fpr, tpr = mia.curves[(name, attack)]
            keep = fpr >= floor
            ax.plot(fpr[keep], np.maximum(tpr[keep], floor), lw=1.1, color=colours[attack],
                    label=f"{attack} (AUC {rows.loc[attack, 'auc']:.3f})")
        grid = np.geomspace(floor, 1.0, 200)
        ax.plot(grid, grid, color="0.6", lw=0.8, ls=":", label="chance")
        if name in mia.claims:
            eps, delta = mia.claims[name]
            flagged = bool(rows["dp_region_flag"].fillna(False).astype(bool).any())
            ax.plot(grid, np.maximum(dp_region_tpr(grid, eps, delta), floor), color="k", lw=1.2, ls="--",
                    label=f"DP region boundary (eps={eps:g})" + (": FLAGGED (estimate)" if flagged else ""))
        ax.set(xscale="log", yscale="log", xlim=(floor, 1), ylim=(floor, 1.05), xlabel="false-positive rate",
               title=name)
        ax.legend(fontsize=5.5, loc="lower right")
    axes[0][0].set_ylabel("true-positive rate")
    fig.tight_layout()
    return fig


def figure_mia_vulnerability(mia):
    """Each example's TPR at the attack's 1% FPR threshold against its memorization, per variant."""
    from dpmem.bench.report.membership import HEADLINE
    ex = mia.examples.loc[~mia.examples["is_canary"].astype(bool)]
    variants = list(dict.fromkeys(ex["variant"]))
    fig, axes = plt.subplots(1, len(variants), figsize=(3.3 * len(variants), 3.2), sharey=True, squeeze=False)
    for ax, name in zip(axes[0], variants):
        rows = ex.loc[ex["variant"] == name]
        ax.scatter(rows["mem"], rows[f"{HEADLINE}_tpr"], s=6, alpha=0.5, color="C0")
        ax.axhline(0.01, color="k", lw=0.8, ls=":")
        ax.set(xlabel="memorization (subset-sampling estimate)", title=name, ylim=(-0.02, 1.02))
    axes[0][0].set_ylabel(f"{HEADLINE}: example's TPR at 1% FPR")
    fig.tight_layout()
    return fig


def figure_mia_vs_frequency(mia):
    """TPR at 1% FPR per subgroup-frequency bin (95% intervals) and the slope per doubling."""
    order = bin_order(mia.bins["freq_bin"])
    lo_hi = [(int(s.split("-")[0]), int(s.split("-")[-1])) for s in order]
    mid = np.array([np.sqrt(lo * hi) if lo > 0 else 0.5 for lo, hi in lo_hi])
    variants = list(dict.fromkeys(mia.bins["variant"]))
    palette = dict(zip(variants, sns.color_palette("viridis_r", len(variants))))
    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    for name in variants:
        b = mia.bins.loc[mia.bins["variant"] == name].set_index("freq_bin").reindex(order)
        t = mia.trends.loc[mia.trends["variant"] == name].iloc[0]
        slope = "" if not np.isfinite(t["slope"]) else \
            f"\nslope per doubling {t['slope']:+.3f} [{t['slope_lo']:+.3f}, {t['slope_hi']:+.3f}]"
        ax.errorbar(mid, b["tpr@1%"], yerr=[b["tpr@1%"] - b["tpr@1%_lo"], b["tpr@1%_hi"] - b["tpr@1%"]],
                    marker="o", lw=1.5, capsize=3, color=palette[name], label=f"{name}{slope}")
    ax.axhline(0.01, color="k", lw=0.8, ls=":")
    ax.set_xscale("log", base=2)
    ax.set(title="Membership inference (lira-online) by subgroup frequency (95% CI)",
           xlabel="training examples in subgroup (log)", ylabel="TPR at 1% FPR")
    ax.legend(fontsize=6, loc="upper center", bbox_to_anchor=(0.5, -0.16), frameon=False, ncol=2)
    fig.tight_layout()
    return fig


MIA_FIGURES = {"mia_roc": figure_mia_roc, "mia_vulnerability_vs_mem": figure_mia_vulnerability,
               "mia_tpr_vs_frequency": figure_mia_vs_frequency}


def write_membership_figures(mia, out: Path) -> list[Path]:
    sns.set_theme(style="whitegrid", context="paper")
    paths = []
    for stem, make in MIA_FIGURES.items():
        paths += save_figure(make(mia), Path(out) / "figures", stem)
    return paths


PROXY_LABELS = {"csl_mean": "cumulative sample loss", "csg_mean": "cumulative gradient norm",
                "in_margin_mean": "minus the in-model margin", "confidence_mem": "confidence memorization",
                "lira_separation": "LiRA separation", "mem_other_half": "mem, other half of the models"}


def figure_proxies(proxies):
    """Each averaged proxy (rows) against mem (x), one column per variant, as percentile ranks (the
    proxies' scales differ), with Spearman's correlation and its interval in each panel."""
    ex, table = proxies.examples, proxies.table
    variants = list(dict.fromkeys(ex["variant"]))
    shown = [p for p in PROXY_LABELS if p in ex.columns]
    fig, axes = plt.subplots(len(shown), len(variants), figsize=(2.6 * len(variants), 2.3 * len(shown)),
                             sharex=True, sharey=True, squeeze=False)
    for j, name in enumerate(variants):
        rows = ex.loc[ex["variant"] == name]
        mem_rank = rows["mem"].rank(pct=True)
        for i, proxy in enumerate(shown):
            ax = axes[i][j]
            stats = table.loc[(table["variant"] == name) & (table["proxy"] == proxy)].iloc[0]
            if proxy in rows and rows[proxy].notna().any():
                ax.scatter(mem_rank, rows[proxy].rank(pct=True), s=5, alpha=0.35, color="C1" if j else "C0", lw=0)
                ax.text(0.03, 0.97, f"rho {stats['spearman']:.2f} [{stats['spearman_lo']:.2f}, {stats['spearman_hi']:.2f}]",
                        transform=ax.transAxes, va="top", fontsize=7,
                        bbox={"facecolor": "white", "alpha": 0.8, "lw": 0})
            else:
                ax.text(0.5, 0.5, textwrap.fill(str(stats["note"]).split(":")[0] or "not recorded", 24),
                        transform=ax.transAxes, ha="center", va="center", fontsize=7)
            if i == 0:
                ax.set_title(name)
            if j == 0:
                ax.set_ylabel(PROXY_LABELS[proxy] + "\n(rank)", fontsize=7)
            if i == len(shown) - 1:
                ax.set_xlabel("mem (rank)")
    fig.suptitle("Memorization proxies against the subset-sampling estimate (proxies from the second half of the "
                 "models, mem from the first)", fontsize=9)
    fig.tight_layout()
    return fig


def write_proxy_figures(proxies, out: Path) -> list[Path]:
    sns.set_theme(style="whitegrid", context="paper")
    return save_figure(figure_proxies(proxies), Path(out) / "figures", "proxies_vs_mem")


FIGURES = {"memorization_hist": figure_memorization_hist,
           "acc_loss_vs_frequency": figure_loss_vs_frequency,
           "mem_vs_bound": figure_mem_vs_bound}


def write_figures(analysis: Analysis, out: Path) -> list[Path]:
    sns.set_theme(style="whitegrid", context="paper")
    paths = []
    for stem, make in FIGURES.items():
        paths += save_figure(make(analysis), Path(out) / "figures", stem)
    if analysis.membership is not None:
        paths += write_membership_figures(analysis.membership, out)
    if analysis.proxies is not None:
        paths += write_proxy_figures(analysis.proxies, out)
    return paths

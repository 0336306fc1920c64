"""Tables from an analysed run: CSV and Parquet for machines, Markdown and LaTeX for papers."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from dpmem.bench.report.analysis import Analysis
from dpmem.bench.store.files import atomic_write_bytes, atomic_write_json

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
        mia = v.get("membership") or {}
        rows.append({"variant": name, "epsilon": v["epsilon"], "sigma": v["noise_multiplier"],
                     "steps": v["steps"], "models": v["models"], "test_acc": v["test_accuracy"],
                     "train_acc": v["train_accuracy"], "mean_mem": v["mean_mem"],
                     "high_mem": v["high_mem_examples"], "high_mem_raw": v["high_mem_examples_raw"],
                     "violations": v["violations"], "eps_lb": v["eps_lb"], "power_eps": v["power_eps"],
                     **({"lira_auc": mia.get("auc"), "lira_tpr@0.1%": mia.get("tpr@0.1%")} if mia else {})})
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
    if analysis.membership is not None:
        write_membership_tables(analysis.membership, out)
    if analysis.proxies is not None:
        write_proxy_tables(analysis.proxies, out)
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
        write_md_tex(df, caption, out, stem)


MIA_SHOWN = ["variant", "attack", "auc", "auc_lo", "auc_hi", "tpr@1%", "tpr@0.1%", "tpr@0.1%_lo", "tpr@0.1%_hi",
             "tpr@0.01%", "trials", "min_fpr", "dp_region_flag"]


def write_membership_tables(mia, out: Path) -> None:
    """mia.csv/.parquet (variant x attack), mia_examples.parquet (variant x example), mia_bins.csv/.parquet
    (variant x frequency bin) and tables/mia.md, .tex."""
    out = Path(out)
    write_frame(mia.table, out / "mia")
    import io
    buf = io.BytesIO()
    mia.examples.to_parquet(buf, index=False)
    atomic_write_bytes(out / "mia_examples.parquet", buf.getvalue())
    write_frame(mia.bins, out / "mia_bins")
    write_md_tex(mia.table[MIA_SHOWN], "Membership inference, leave-one-model-out: AUC and TPR at low FPR "
                 "(95% bootstrap intervals over target models).", out, "mia")
    write_md_tex(mia.trends, "TPR at 1% FPR (lira-online) per doubling of subgroup training frequency.", out,
                 "mia_trends")


PROXIES_SHOWN = ["variant", "proxy", "kind", "models", "spearman", "spearman_lo", "spearman_hi", "pearson", "ceiling",
                 "precision@5%", "precision@5%_lo", "precision@5%_hi", "spread_lo", "spread_hi", "note"]


def write_proxy_tables(proxies, out: Path) -> None:
    """proxies.csv/.parquet (variant x proxy), proxies_examples.parquet and tables/proxies.md, .tex."""
    out = Path(out)
    write_frame(proxies.table, out / "proxies")
    import io
    buf = io.BytesIO()
    proxies.examples.to_parquet(buf, index=False)
    atomic_write_bytes(out / "proxies_examples.parquet", buf.getvalue())
    write_md_tex(proxies.table[PROXIES_SHOWN], "Memorization proxies against the subset-sampling estimate: Spearman "
                 "and Pearson correlation and precision at the top 5% of mem (95% bootstrap intervals over "
                 "examples; one-model proxies: median over models, spread = 10th-90th percentile).", out, "proxies")


def write_md_tex(df: pd.DataFrame, caption: str, out: Path, stem: str) -> None:
    """OUT/tables/STEM.md and .tex: the table as a paper shows it."""
    atomic_write_bytes(Path(out) / "tables" / f"{stem}.md", markdown(df).encode())
    atomic_write_bytes(Path(out) / "tables" / f"{stem}.tex", latex(df, caption).encode())

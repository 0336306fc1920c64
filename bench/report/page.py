"""One self-contained HTML page per run: ``report.html``.

The page holds the summary table, the audit verdict with its alpha split, the trends and findings,
every figure and gallery, and the run's provenance. Images are embedded as base64 PNG data URIs
(downscaled and palette-quantised with Pillow to keep the page small); the page has no script and
requests nothing, so it opens offline from any directory. It is rendered with jinja2 from
``page.html.j2`` (autoescaped). Each summary cell carries the exact summary.json value in
``data-value`` next to the rounded number it shows, so a test can check one against the other.
"""
from __future__ import annotations

import base64
import io
import json
import math
from pathlib import Path

import pandas as pd

from dpmem.bench.report import gallery as gallery_mod
from dpmem.bench.report import tables
from dpmem.bench.report.analysis import audit_failures
from dpmem.bench.store.files import atomic_write_bytes

PAGE_NAME = "report.html"
TEMPLATE = "page.html.j2"
EMBED_MAX_WIDTH = 1280        # px (the page width): wider PNGs are scaled down for the page (files keep full size)
EMBED_COLOURS = 256           # palette of embedded PNGs: the figures and galleries are flat-coloured

# summary table column -> summary.json key of variants[NAME]
SUMMARY_COLUMNS = {"epsilon": "epsilon", "sigma": "noise_multiplier", "steps": "steps", "models": "models",
                   "test_acc": "test_accuracy", "train_acc": "train_accuracy", "mean_mem": "mean_mem",
                   "high_mem": "high_mem_examples", "high_mem_raw": "high_mem_examples_raw",
                   "violations": "violations", "eps_lb": "eps_lb", "power_eps": "power_eps", "engine": "engine"}

FIGURE_CAPTIONS = {
    "memorization_hist": "Memorization estimates of the training examples, per variant (dashed: mean).",
    "acc_loss_vs_frequency": "Test accuracy, DP accuracy loss and mean memorization by subgroup training frequency "
                             "(95% intervals over models and test examples).",
    "mem_vs_bound": "Observed memorization against the DP bound mem <= (e^eps - 1) p_out + delta, per variant.",
    "mia_roc": "Membership inference ROC per variant (log-log), every attack leave-one-model-out; dashed: the DP "
               "region's boundary TPR = min(e^eps FPR + delta, 1 - e^-eps (1 - FPR - delta)) of DP variants.",
    "mia_vulnerability_vs_mem": "Each training example's TPR at the lira-online threshold of 1% FPR against its "
                                "memorization estimate.",
    "mia_tpr_vs_frequency": "TPR at 1% FPR (lira-online) by subgroup training frequency, 95% intervals over target "
                            "models and the bin's examples, with the slope per doubling.",
    "proxies_vs_mem": "Each memorization proxy (from the second half of the models) against mem (from the first), "
                      "as ranks, one column per variant, with Spearman's correlation and its 95% interval.",
}
GALLERY_TITLES = {"memorized": "Most memorized training examples", "pairs": "High-influence pairs",
                  "hardest_dp": "Hardest test examples for DP"}


def fmt(value) -> str:
    """A number as the page shows it: 4 significant digits, integers in full, '' for missing."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.4g}" if value == 0 or abs(value) >= 1e-3 else f"{value:.2e}"
    return str(value)


def embed_png(path: Path) -> str:
    """A data URI of the PNG at ``path``, scaled to EMBED_MAX_WIDTH and palette-quantised."""
    from PIL import Image
    with Image.open(path) as opened:
        img = opened.convert("RGB")
        if img.width > EMBED_MAX_WIDTH:
            img = img.resize((EMBED_MAX_WIDTH, round(img.height * EMBED_MAX_WIDTH / img.width)), Image.Resampling.LANCZOS)
        img = img.quantize(colors=EMBED_COLOURS, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
        buf = io.BytesIO()
        img.save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _table(df: pd.DataFrame) -> dict:
    """Header and formatted rows of a frame, for the template."""
    return {"columns": list(df.columns),
            "rows": [[fmt(v.item() if hasattr(v, "item") else v) for v in row] for row in df.itertuples(index=False)]}


def summary_rows(summary: dict) -> list[dict]:
    rows = []
    for name, v in summary["variants"].items():
        cells = [{"key": key, "column": col, "value": json.dumps(v.get(key)), "text": fmt(v.get(key))}
                 for col, key in SUMMARY_COLUMNS.items()]
        rows.append({"variant": name, "cells": cells})
    return rows


def audit_rows(analysis) -> list[dict]:
    rows = []
    for name, a in analysis.audits.items():
        rows.append({"variant": name, "audit": "black-box (mem bound)", "claimed_eps": fmt(a.epsilon_claimed),
                     "adjacency": a.adjacency,
                     "tested": "" if a.epsilon_claimed is None else f"({a.epsilon_tested:.3g}, {a.delta_tested:.2g})",
                     "alpha": fmt(a.alpha), "violations": str(a.violations), "eps_lb": fmt(a.eps_lb),
                     "refutable_up_to": fmt(a.power_eps),
                     "verdict": "no claim" if a.epsilon_claimed is None else ("ok" if a.consistent else "VIOLATION")})
        c = analysis.canary_audits.get(name)
        if c is not None:
            rows.append({"variant": name, "audit": "gradient canary", "claimed_eps": fmt(c.epsilon_claimed),
                         "adjacency": "add/remove",
                         "tested": "" if c.epsilon_claimed is None else f"({c.epsilon_claimed:.3g}, {c.delta:.2g})",
                         "alpha": fmt(c.alpha), "violations": "", "eps_lb": fmt(c.eps_lb),
                         "refutable_up_to": fmt(c.power_eps),
                         "verdict": "no claim" if c.epsilon_claimed is None else ("ok" if c.consistent else "VIOLATION")})
        m = getattr(analysis, "margin_audits", {}).get(name)
        if m is not None:
            rows.append({"variant": name, "audit": "margin threshold (rigorous)", "claimed_eps": fmt(m.epsilon_claimed),
                         "adjacency": m.adjacency,
                         "tested": "" if m.epsilon_claimed is None else f"({m.epsilon_tested:.3g}, {m.delta_tested:.2g})",
                         "alpha": fmt(m.alpha), "violations": str(m.violations), "eps_lb": fmt(m.eps_lb),
                         "refutable_up_to": fmt(m.power_eps),
                         "verdict": "no claim" if m.epsilon_claimed is None else ("ok" if m.consistent else "VIOLATION")})
    return rows


def _gallery_entries(galleries: gallery_mod.Galleries) -> list[dict]:
    out = []
    for kind in gallery_mod.KINDS:
        items = [g for g in galleries.items if g.kind == kind]
        entries = []
        for g in items:
            png = next((p for p in g.paths if p.suffix == ".png"), None)
            entries.append({"variant": g.variant, "caption": g.caption, "note": g.note,
                            "src": embed_png(png) if png else None, "file": png.name if png else None,
                            "table": _table(g.frame) if len(g.frame) else None})
        out.append({"kind": kind, "title": GALLERY_TITLES[kind], "rule": gallery_mod.rule(kind), "entries": entries})
    return out


def render(analysis, store, out: Path, galleries: gallery_mod.Galleries) -> str:
    """The page's HTML for an analysed run whose figures and galleries are in ``out/figures``."""
    import jinja2
    summary = analysis.summary
    run = summary["run"]
    meta = store.meta()
    figures = []
    for stem, text in FIGURE_CAPTIONS.items():
        png = Path(out) / "figures" / f"{stem}.png"
        if png.is_file():
            figures.append({"stem": stem, "caption": text, "src": embed_png(png)})
    failures = audit_failures(analysis)
    findings = tables.findings_frame(summary)
    trends = tables.trend_frame(summary)
    bins = analysis.bins[tables.BIN_COLUMNS]
    variants = summary["variants"]
    mia = getattr(analysis, "membership", None)
    membership = None if mia is None else {
        "table": _table(mia.table[tables.MIA_SHOWN]), "trends": _table(mia.trends),
        "bins": _table(mia.bins), "seconds": mia.seconds,
        "flagged": sorted({v for (v, _), c in mia.regions.items() if c.flagged})}
    proxy_analysis = getattr(analysis, "proxies", None)
    proxies = None if proxy_analysis is None else {
        "table": _table(proxy_analysis.table[tables.PROXIES_SHOWN]), "notes": proxy_analysis.notes}
    provenance = {
        "engines": {n: v.get("engine") for n, v in variants.items()},
        "accountants": {n: v.get("accountant") for n, v in variants.items()},
        "data_fingerprint": meta.get("data_fingerprint") or {},
        "dataset_fingerprint": run.get("data_fingerprint"),
        "versions": meta.get("versions") or run.get("versions") or {},
        "execution": meta.get("execution") or {},
        "config": json.dumps(meta.get("config", {}), indent=2, sort_keys=True),
    }
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(Path(__file__).parent)),
                             autoescape=True, undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    page = env.get_template(TEMPLATE)
    return page.render(
        run_name=Path(store.root).resolve().name, config_hash=run["config_hash"], run=run,
        summary_columns=list(SUMMARY_COLUMNS), summary_rows=summary_rows(summary),
        audits=audit_rows(analysis), failures=failures, consistent=not failures,
        warnings=tables.fdr_warnings(summary), findings=_table(findings), trends=_table(trends), bins=_table(bins),
        intervals=run.get("intervals"), trend_method=run.get("trend"), figures=figures,
        galleries=_gallery_entries(galleries), gallery_note=galleries.note, provenance=provenance, fmt=fmt,
        membership=membership, membership_note=run.get("membership_note"), proxies=proxies)


def write_report_page(analysis, store, out: Path, *, ds=None) -> Path:
    """Galleries (PNG, PDF) into ``out/figures`` and the page ``out/report.html``; returns its path.

    Call after report.write_all (the page embeds the figures it wrote). ``ds``: the run's Dataset
    when already built (dpmem run); otherwise it is rebuilt and checked against the run's data
    fingerprint before any input is drawn.
    """
    out = Path(out)
    galleries = gallery_mod.write_galleries(analysis, store, out, ds=ds)
    path = out / PAGE_NAME
    atomic_write_bytes(path, render(analysis, store, out, galleries).encode("utf-8"))
    return path

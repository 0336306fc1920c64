"""Membership inference on a finished run: its cost (wall time, peak memory) and its headline numbers.

    python -m dpmem.bench.tools.mia_bench RUN_DIR [--block N] [--out results/mia.md]

measures the whole membership analysis of the run (every attack on every variant, the bootstrap
intervals, per-example vulnerability, the frequency bins, the DP region check; then the tables and
figures) and prints:
- the cost: wall seconds and peak memory (tracemalloc's peak of Python and numpy allocations, and
  the process's peak resident set size);
- AUC and TPR at 0.1% FPR per (variant, attack) with 95% intervals, and LiRA's TPR at 0.1% FPR
  against the global threshold's;
- the margin audit's eps_lb beside the correctness audit's, each at its share of the run's alpha
  in the family `dpmem check` reports;
- the slope per doubling of TPR at 1% FPR by subgroup frequency.

At Feldman & Zhang's scale, without training:
    python -m dpmem.bench.tools.mia_bench --synthetic 1000x50000 [--block N]
times every attack and its metrics on synthetic float16 margins of K models x n examples (with 719
population examples for RMIA) and reports each one's peak memory.

Campaigns (for later; they train models):
    python -m dpmem.bench.tools.mia_bench --campaign seeds --seeds 20 [CONFIG] [--out DIR]
trains the config (default: the default config) once per seed and records, per seed and DP
variant, whether the DP region check flags it and whether the margin or correctness audit
refutes its claim (the false-flag rates must stay at most alpha);
    python -m dpmem.bench.tools.mia_bench --campaign planted --seeds 20 [--out DIR]
trains bench/tools/planted.py's configuration with each planted fault and records both audits'
refutations. `--set key=value` (repeatable) overrides config keys (e.g. `--set models=64` for a
smoke run).
"""
from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import pandas as pd

from dpmem.bench import config
from dpmem.bench.report import analysis, figures, membership, tables
from dpmem.bench.store.files import atomic_write_bytes
from dpmem.bench.store.run_store import RunStore
from dpmem.privacy.family import bonferroni_share
from dpmem.privacy.margin_audit import margin_audit


def measure(store: RunStore, *, block: int, out: Path | None) -> tuple[membership.MembershipAnalysis, pd.DataFrame]:
    """The membership analysis of ``store`` (and its outputs under ``out``): wall time of an untraced
    pass, then the peak of Python and numpy allocations (tracemalloc) of a second, traced pass of the
    analysis (tracing slows pure-Python code such as plotting, so it is timed untraced)."""
    rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024     # noqa: E731  (kB on Linux)
    rss_before = rss()
    t0 = time.perf_counter()
    mia = membership.analyse_membership(store, block=block)
    rows = [{"stage": "attacks, metrics, bootstrap, bins, region check", "seconds": time.perf_counter() - t0}]
    if out is not None:
        t1 = time.perf_counter()
        tables.write_membership_tables(mia, out)
        figures.write_membership_figures(mia, out)
        rows.append({"stage": "tables and figures", "seconds": time.perf_counter() - t1})
    rss_after = rss()
    tracemalloc.start()
    membership.analyse_membership(store, block=block)
    traced = tracemalloc.get_traced_memory()[1] / 2 ** 20
    tracemalloc.stop()
    cost = pd.DataFrame(rows)
    cost.loc[len(cost)] = {"stage": "total", "seconds": cost["seconds"].sum()}
    cost["analysis_peak_traced_mb"] = traced
    cost["process_peak_rss_mb_before"] = rss_before
    cost["process_peak_rss_mb_after"] = rss_after
    return mia, cost


def audit_comparison(store: RunStore) -> pd.DataFrame:
    """Per variant: the margin audit's and the correctness audit's eps_lb, each at its family share."""
    result = analysis.analyse(store, with_pairs=False, margin=True)
    rows = []
    for name, a in result.audits.items():
        m = result.margin_audits.get(name)
        if m is None:       # a run too small for the margin audit in the family: at the same share
            cfg = store.config()
            m, _ = margin_audit(variant=name, masks=store.masks(), margins=store.variant_arrays(name)["train_margin"],
                                epsilon=a.epsilon_claimed, delta=a.delta, alpha=bonferroni_share(cfg.alpha, 1),
                                sampling=cfg.sampling)
        rows.append({"variant": name, "claimed_eps": a.epsilon_claimed, "alpha_per_test": a.alpha,
                     "correctness_eps_lb": a.eps_lb, "margin_eps_lb": m.eps_lb,
                     "margin_minus_correctness": None if a.eps_lb is None or m.eps_lb is None else m.eps_lb - a.eps_lb,
                     "margin_thresholds_at_0": m.zero_thresholds, "power_eps": m.power_eps,
                     "correctness_refutes": not a.consistent, "margin_refutes": not m.consistent})
    return pd.DataFrame(rows)


def headline(mia: membership.MembershipAnalysis) -> pd.DataFrame:
    t = mia.table
    cols = ["variant", "attack", "auc", "auc_lo", "auc_hi", "tpr@0.1%", "tpr@0.1%_lo", "tpr@0.1%_hi", "min_fpr",
            "dp_region_flag"]
    return t[cols]


def lira_vs_global(mia: membership.MembershipAnalysis) -> pd.DataFrame:
    rows = []
    for name, g in mia.table.groupby("variant", sort=False):
        g = g.set_index("attack")
        lira, base = g.loc[membership.HEADLINE, "tpr@0.1%"], g.loc["global", "tpr@0.1%"]
        rows.append({"variant": name, "lira_tpr@0.1%": lira, "global_tpr@0.1%": base,
                     "ratio": lira / base if base > 0 else float("inf")})
    return pd.DataFrame(rows)


def bench(args) -> int:
    store = RunStore.open(args.run_dir)
    out = Path(args.write_outputs) if args.write_outputs else None
    mia, cost = measure(store, block=args.block, out=out)
    audits = audit_comparison(store)
    sections = [("Cost of the membership analysis", cost), ("AUC and TPR at 0.1% FPR (95% intervals over target "
                                                            "models)", headline(mia)),
                ("LiRA online against the global threshold at 0.1% FPR", lira_vs_global(mia)),
                ("Margin audit against the correctness audit (eps_lb; each at its share of alpha)", audits),
                ("TPR at 1% FPR (lira-online): slope per doubling of subgroup frequency", mia.trends)]
    import os
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    text = (f"`python -m dpmem.bench.tools.mia_bench {args.run_dir}` on run {store.root} "
            f"({store.config().models} models per variant); {os.cpu_count()} CPUs, load average {load} at the end, "
            f"numpy on {os.environ.get('OMP_NUM_THREADS', 'default')} thread(s)\n\n") + "\n".join(
        f"## {title}\n\n{tables.markdown(frame)}" for title, frame in sections)
    print(text)
    if args.out:
        atomic_write_bytes(Path(args.out), text.encode())
        for stem, frame in (("mia_cost", cost), ("mia_headline", headline(mia)), ("mia_audits", audits),
                            ("mia_trends", mia.trends)):
            atomic_write_bytes(Path(args.out).with_name(f"{stem}.csv"), frame.to_csv(index=False).encode())
    return 0


def synthetic(args) -> int:
    """Every attack on synthetic margins of the given size: seconds and tracemalloc peaks."""
    import numpy as np

    from dpmem.bench.estimators import membership as mb
    try:
        k, n = (int(v) for v in args.synthetic.lower().split("x"))
    except ValueError:
        raise SystemExit(f"--synthetic: expected KxN such as 1000x50000, got {args.synthetic!r}") from None
    rng = np.random.default_rng(0)
    masks = rng.random((k, n)) < 0.7
    margins = (rng.normal(2.0, 2.0, (k, n)) + masks).astype(np.float16)
    population = rng.normal(2.0, 2.0, (k, 719)).astype(np.float16)
    rows = []
    for attack in mb.ATTACKS:
        tracemalloc.start()
        t0 = time.perf_counter()
        scores = mb.attack_scores(attack, masks, margins, population=population, block=args.block)
        t1 = time.perf_counter()
        peak_scores = tracemalloc.get_traced_memory()[1] / 2 ** 20
        tracemalloc.reset_peak()
        met = mb.roc_metrics(scores, masks)
        rows.append({"attack": attack, "models": k, "examples": n, "block": args.block,
                     "scores_seconds": t1 - t0, "metrics_seconds": time.perf_counter() - t1,
                     "scores_peak_mb": peak_scores, "metrics_peak_mb": tracemalloc.get_traced_memory()[1] / 2 ** 20,
                     "result_mb": scores.nbytes / 2 ** 20, "auc": met.auc})
        tracemalloc.stop()
        del scores
    table = pd.DataFrame(rows)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    text = (f"`python -m dpmem.bench.tools.mia_bench --synthetic {args.synthetic}`: inputs "
            f"{(masks.nbytes + margins.nbytes) / 2 ** 20:.0f} MB; process peak resident {rss:.0f} MB; "
            "the peaks (tracemalloc) include the [K, n] float64 scores the metrics read\n\n" + tables.markdown(table))
    print(text)
    if args.out:
        atomic_write_bytes(Path(args.out), text.encode())
    return 0


def _campaign_table(runs: pd.DataFrame) -> pd.DataFrame:
    return runs.groupby(["fault", "variant"], sort=False).agg(
        runs=("seed", "size"), region_flags=("region_flag", "sum"), correctness_refutes=("correctness_refutes", "sum"),
        margin_refutes=("margin_refutes", "sum"), median_correctness_eps_lb=("correctness_eps_lb", "median"),
        median_margin_eps_lb=("margin_eps_lb", "median")).reset_index()


def campaign(args) -> int:
    """20 seeds of a config (false flags) or the planted faults (refutations); see the module docstring."""
    from dpmem.bench.run import pipeline
    from dpmem.privacy.faults import FAULTS
    rows = []
    if args.campaign == "seeds":
        jobs: list[tuple[str | None, int]] = [(None, seed) for seed in range(args.seeds)]
        base_path, base = args.run_dir, []
    else:
        from dpmem.bench.tools.planted import PLANTED_BASE
        jobs = [(fault, seed) for fault in FAULTS for seed in range(args.seeds)]
        base_path, base = None, list(PLANTED_BASE)
    with tempfile.TemporaryDirectory() as tmp:
        for fault, seed in jobs:
            # later keys replace earlier ones (the config refuses a key given twice)
            merged = dict(o.split("=", 1) for o in base + [f"seed={seed}"] + ([f"fault={fault}"] if fault else [])
                          + list(args.set or []))
            overrides = [f"{k}={v}" for k, v in merged.items()]
            cfg = config.load(base_path, overrides)
            with RunStore.create_or_resume(Path(tmp) / f"{fault or 'honest'}-{seed}", cfg) as store:
                pipeline.run(store, cfg, progress=False)
                result = analysis.analyse(store, with_pairs=False, membership=True, margin=True)
            mia = result.membership
            for name, target in cfg.variants:
                if target is None:
                    continue
                flag = None if mia is None else bool(mia.table.loc[mia.table["variant"] == name,
                                                                   "dp_region_flag"].any())
                m = result.margin_audits.get(name)
                a = result.audits[name]
                rows.append({"fault": fault or "none", "seed": seed, "variant": name, "claimed_eps": target,
                             "region_flag": flag, "correctness_refutes": not a.consistent,
                             "correctness_eps_lb": a.eps_lb, "margin_refutes": None if m is None else not m.consistent,
                             "margin_eps_lb": None if m is None else m.eps_lb})
            print(f"{fault or 'honest'} seed {seed}: done", file=sys.stderr)
            table = _campaign_table(pd.DataFrame(rows))
            if args.out:      # after every run, so that an interrupted campaign keeps what it measured
                out = Path(args.out)
                atomic_write_bytes(out / f"mia_campaign_{args.campaign}.csv", pd.DataFrame(rows).to_csv(index=False).encode())
                atomic_write_bytes(out / f"mia_campaign_{args.campaign}.md", tables.markdown(table).encode())
    print(tables.markdown(table))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", nargs="?", help="a finished run (a config file with --campaign seeds)")
    p.add_argument("--block", type=int, default=1024, help="examples per block")
    p.add_argument("--out", help="write the report (Markdown) to this file, with CSVs beside it "
                                 "(a directory with --campaign)")
    p.add_argument("--write-outputs", metavar="DIR", help="also write mia.csv etc. and the figures to DIR (timed)")
    p.add_argument("--campaign", choices=("seeds", "planted"))
    p.add_argument("--seeds", type=int, default=20)
    p.add_argument("--synthetic", metavar="KxN", help="time the attacks on synthetic margins of this size")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="config override for --campaign (repeatable)")
    args = p.parse_args(argv)
    if args.campaign:
        return campaign(args)
    if args.synthetic:
        return synthetic(args)
    if not args.run_dir:
        p.error("RUN_DIR is required without --campaign")
    return bench(args)


if __name__ == "__main__":
    raise SystemExit(main())

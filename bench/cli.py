"""The `dpmem` command: run, report, check (and the studies built on them).

Unusable input (bad config, missing, damaged or corrupt run directory, an output path that cannot
be written, a full disk) prints one line and exits 2.
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import json
import math
import os
import sys
import time
from pathlib import Path

from dpmem.bench import config as config_mod
from dpmem.privacy.errors import UsageError

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


def _split_run_args(items: list[str]) -> tuple[str | None, list[str]]:
    paths = [a for a in items if "=" not in a]
    overrides = [a for a in items if "=" in a]
    if len(paths) > 1:
        raise UsageError(f"expected at most one config file, got {paths}")
    return (paths[0] if paths else None), overrides


def default_out(cfg: config_mod.Config) -> Path:
    model = (cfg.trainer or cfg.model).rsplit(":", 1)[-1]
    return Path("runs") / f"{cfg.dataset}-{model}-{cfg.hash()[:8]}"


def _output_dir(path: Path, what: str) -> Path:
    """An output directory that exists or can be made; refused with one line otherwise."""
    if path.is_symlink() and not path.exists():
        raise UsageError(f"{what} {path} is a symbolic link to {os.readlink(path)}, which does not exist")
    if path.exists() and not path.is_dir():
        raise UsageError(f"{what} {path} is a file, not a directory")
    parent = next((p for p in [path, *path.parents] if p.exists()), Path("."))
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"{what} {path}: cannot write in {parent}")
    return path


def _output_file(path: Path, what: str) -> Path:
    """A file path that can be written; refused with one line naming it otherwise."""
    if path.is_dir():
        raise UsageError(f"{what} {path} is a directory, not a file")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"{what} {path}: cannot write in {parent}")
    return path


@contextlib.contextmanager
def _timed(stages: dict[str, float], name: str):
    """Records in ``stages[name]`` the seconds the block took (also when it raises)."""
    start = time.perf_counter()
    try:
        yield
    finally:
        stages[name] = time.perf_counter() - start


def cmd_run(args) -> int:
    from dpmem.bench import report
    from dpmem.bench.report import analysis, page
    from dpmem.bench.run import execution, pipeline
    from dpmem.bench.store.run_store import RunStore, data_fingerprint
    path, overrides = _split_run_args(args.args)
    if args.workers is not None:
        overrides.append(f"workers={args.workers}")
    cfg = config_mod.load(path, overrides)
    out = _output_dir(Path(args.out) if args.out else default_out(cfg), "--out")
    stages: dict[str, float] = {}   # where the command's time went, printed at the end
    # What user code (factories, trainers) prints goes to stderr: stdout carries dpmem's table alone.
    with _timed(stages, "data and calibration"), contextlib.redirect_stdout(sys.stderr):
        # Everything that can be wrong with the config or the data is found before anything is written.
        on_ray = bool(cfg.workers or args.ray_address or os.environ.get("RAY_ADDRESS"))
        ds, engine = pipeline.check_inputs(cfg, on_ray=on_ray)   # data, model, engine, trainer, calibration, memory
        execution.check_available(cfg, args.ray_address)
    with RunStore.create_or_resume(out, cfg, fingerprint=data_fingerprint(ds)) as store:
        pipeline.check_resume(store, cfg)
        print(f"dpmem: run directory {out} (config {cfg.hash()})", file=sys.stderr)
        try:
            with _timed(stages, "training"), contextlib.redirect_stdout(sys.stderr):
                seconds = pipeline.run(store, cfg, progress=not args.quiet, ds=ds, engine=engine,
                                       ray_address=args.ray_address)
        except KeyboardInterrupt:
            print(f"\ndpmem: interrupted; finished units are stored in {out}. Run the same command to resume.",
                  file=sys.stderr)
            return 130
        with _timed(stages, "analysis"):
            result = analysis.analyse(store, membership=True, proxies=True)
        with _timed(stages, "tables and figures"):
            report.write_all(result, out)
        with _timed(stages, "report page"):
            page_path = page.write_report_page(result, store, out, ds=ds)
    _print_summary(result.summary)
    _print_membership_note(result)
    print(f"dpmem: trained in {stages['training']:.1f} s this session "
          f"({sum(seconds.values()):.1f} s of model training in all); outputs in {out}", file=sys.stderr)
    print("dpmem: time: " + ", ".join(f"{name} {t:.1f} s" for name, t in stages.items())
          + f" ({sum(stages.values()):.1f} s in all)", file=sys.stderr)
    print(f"dpmem: report {page_path}", file=sys.stderr)
    return EXIT_OK


def _print_membership_note(result) -> None:
    if result.membership_note:
        print(f"dpmem: note: {result.membership_note}", file=sys.stderr)
    for line in [] if result.proxies is None else result.proxies.notes:
        print(f"dpmem: note: {line}", file=sys.stderr)


def _print_summary(summary: dict) -> None:
    from dpmem.bench.report.tables import fdr_warnings, markdown, summary_frame
    print(markdown(summary_frame(summary)))
    for line in fdr_warnings(summary):
        print(line, file=sys.stderr)


def cmd_report(args) -> int:
    from dpmem.bench import report
    from dpmem.bench.report import analysis, page
    from dpmem.bench.store.run_store import RunStore
    store = RunStore.open(args.run_dir)
    out = _output_dir(Path(args.out) if args.out else store.root, "--out")
    result = analysis.analyse(store, membership=True, proxies=True)
    if out.resolve() == store.root.resolve():
        with store.acquire():          # the run's one writer writes its reports too
            report.write_all(result, out)
            page_path = page.write_report_page(result, store, out)
    else:
        report.write_all(result, out)
        page_path = page.write_report_page(result, store, out)
    _print_summary(result.summary)
    _print_membership_note(result)
    print(f"dpmem: tables, figures and galleries written to {out}", file=sys.stderr)
    print(f"dpmem: report {page_path}", file=sys.stderr)
    return EXIT_OK


def _parse_claims(items: list[str]) -> dict[str, float]:
    claims = {}
    for item in items or []:
        name, sep, value = item.partition("=")
        try:
            eps = float(value)
        except ValueError:
            eps = -1.0
        if not sep or not math.isfinite(eps) or eps <= 0:
            raise UsageError(f"--claim {item!r}: expected VARIANT=EPSILON with a positive, finite epsilon")
        claims[name.strip()] = eps
    return claims


# Which claims each kind of bound may refute (privacy/family.py states the promise).
REFUTES = {"rigorous": "any claim", "parametric": "any claim, if its assumption holds", "estimate": "none"}


def cmd_check(args) -> int:
    from dpmem.bench.report import analysis
    from dpmem.bench.report.analysis import audit_failures
    from dpmem.bench.store.run_store import RunStore
    from dpmem.privacy import baseline as baseline_mod
    store = RunStore.open(args.run_dir)
    cfg = store.config()
    claims = _parse_claims(args.claim)
    names = [n for n, _ in cfg.variants]
    for name in claims:
        if name not in names:
            raise UsageError(f"--claim names variant {name!r}, not in this run ({', '.join(names)})")
    if args.alpha is not None and not 0 < args.alpha < 1:
        raise UsageError(f"--alpha must be in (0, 1), got {args.alpha}")
    if args.write_baseline:
        _output_file(Path(args.write_baseline), "--write-baseline")
    base = baseline_mod.load_baseline(args.baseline) if args.baseline else None
    result = analysis.analyse(store, claims=claims, alpha=args.alpha, with_pairs=False,
                              parametric=not args.no_parametric, margin=args.margin_audit)
    failures = audit_failures(result)
    if base is not None:
        failures += baseline_mod.compare_to_baseline(result.summary, base)
    if args.write_baseline:
        from dpmem.bench.store.files import atomic_write_json
        atomic_write_json(Path(args.write_baseline), baseline_mod.make_baseline(result.summary, None))
    run = result.summary["run"]
    verdict = {"consistent": not failures, "failures": failures, "alpha": run["alpha"],
               "audit_tests": run["audit_tests"], "alpha_per_test": run["alpha_per_test"],
               "canaries": run["canaries"], "gradient_canaries": run["gradient_canaries"],
               "variants": {n: a.to_dict() for n, a in result.audits.items()},
               "canary_audits": {n: c.to_dict() for n, c in result.canary_audits.items()},
               "one_run_audits": {n: o.to_dict() for n, o in result.one_run_audits.items()},
               "parametric_bounds": {n: p.to_dict() for n, p in result.parametric.items()},
               "parametric_not_computed": result.parametric_refusals, "refutes": REFUTES,
               "oracle_eps_lb": {n: v["oracle_eps_lb"] for n, v in result.summary["variants"].items()
                                 if v.get("oracle_eps_lb") is not None},
               "margin_audits": {n: m.to_dict() for n, m in result.margin_audits.items()},
               "audit_family": run["audit_family"],
               "test_accuracy": {n: v["test_accuracy"] for n, v in result.summary["variants"].items()}}
    if args.json:
        print(json.dumps(verdict, indent=2, default=float))
    else:
        _print_margin_audits(result)
        _print_audit(result, failures)
    return EXIT_OK if not failures else EXIT_FAIL


def _print_margin_audits(result) -> None:
    """The margin audit beside the correctness (black-box) audit it generalises (privacy/margin_audit.py)."""
    if not result.margin_audits:
        return
    import pandas as pd

    from dpmem.bench.report.tables import markdown
    rows = [{"variant": n, "audit": "margin threshold", "kind": m.kind, "claimed_eps": m.epsilon_claimed,
             "eps_lb": m.eps_lb, "black_box_eps_lb": result.audits[n].eps_lb, "violations": m.violations,
             "refutable_up_to": m.power_eps, "thresholds_at_0": m.zero_thresholds,
             "verdict": "no claim" if m.epsilon_claimed is None else ("ok" if m.consistent else "VIOLATION")}
            for n, m in result.margin_audits.items()]
    m = next(iter(result.margin_audits.values()))
    print(markdown(pd.DataFrame(rows)))
    print(f"margin audit (rigorous): per example a threshold on the margin chosen on {m.selection_models} models, "
          f"Clopper-Pearson bounds on its TPR/FPR over the other {m.evaluation_models} (margin 0, the black-box "
          f"audit's correctness rule, is tested beside it); one test of the family below per variant.")


def _print_audit(result, failures: list[str]) -> None:
    import pandas as pd

    from dpmem.bench.report.tables import markdown
    rows = []
    for name, a in result.audits.items():
        rows.append({"variant": name, "audit": "black-box", "kind": "rigorous", "refutes": REFUTES["rigorous"],
                     "claimed_eps": a.epsilon_claimed, "adjacency": a.adjacency,
                     "tested": None if a.epsilon_claimed is None else f"({a.epsilon_tested:.3g}, {a.delta_tested:.2g})",
                     "eps_lb": a.eps_lb, "eps_gaussian_estimate": None, "violations": a.violations,
                     "refutable_up_to": a.power_eps,
                     "verdict": "no claim" if a.epsilon_claimed is None else ("ok" if a.consistent else "VIOLATION"),
                     "test_acc": result.summary["variants"][name]["test_accuracy"]})
        c = result.canary_audits.get(name)
        if c is not None:
            rows.append({"variant": name, "audit": "gradient canary", "kind": "rigorous",
                         "refutes": REFUTES["rigorous"], "claimed_eps": c.epsilon_claimed,
                         "adjacency": "add/remove",
                         "tested": None if c.epsilon_claimed is None else f"({c.epsilon_claimed:.3g}, {c.delta:.2g})",
                         "eps_lb": c.eps_lb, "eps_gaussian_estimate": c.eps_gdp, "violations": None,
                         "refutable_up_to": c.power_eps,
                         "verdict": "no claim" if c.epsilon_claimed is None else ("ok" if c.consistent else "VIOLATION"),
                         "test_acc": result.summary["variants"][name]["test_accuracy"]})
        o = result.one_run_audits.get(name)
        if o is not None:
            rows.append({"variant": name, "audit": "one-run", "kind": "rigorous", "refutes": REFUTES["rigorous"],
                         "claimed_eps": o.epsilon_claimed,
                         "adjacency": "add/remove",
                         "tested": None if o.epsilon_claimed is None else f"({o.epsilon_claimed:.3g}, {o.delta:.2g})",
                         "eps_lb": o.eps_lb, "eps_gaussian_estimate": None, "violations": None,
                         "refutable_up_to": o.power_eps,
                         "verdict": "no claim" if o.epsilon_claimed is None else ("ok" if o.consistent else "VIOLATION"),
                         "test_acc": result.summary["variants"][name]["test_accuracy"]})
        p = result.parametric.get(name)
        if p is not None:
            rows.append({"variant": name, "audit": "parametric*", "kind": "parametric",
                         "refutes": REFUTES["parametric"], "claimed_eps": p.epsilon_claimed,
                         "adjacency": "add/remove",
                         "tested": None if p.epsilon_claimed is None else f"({p.epsilon_claimed:.3g}, {p.delta:.2g})",
                         "eps_lb": p.eps_lb, "eps_gaussian_estimate": p.eps_estimate, "violations": None,
                         "refutable_up_to": None,
                         "verdict": "no claim" if p.epsilon_claimed is None else ("ok" if p.consistent else "VIOLATION"),
                         "test_acc": result.summary["variants"][name]["test_accuracy"]})
    print(markdown(pd.DataFrame(rows)))
    run = result.summary["run"]
    print(f"One family-wise alpha = {run['alpha']:g} for this verdict: {run['audit_tests']} tests (variant x audit), "
          f"each at alpha/{run['audit_tests']} = {run['alpha_per_test']:.3g} (Bonferroni); with probability >= "
          f"{1 - run['alpha']:g} every eps_lb above holds at once.")
    if result.canary_audits:
        c = next(iter(result.canary_audits.values()))
        print(f"gradient canaries: {c.models} models x {c.canaries} canaries per variant; threshold chosen on "
              f"{c.selection_models} models, bounds from the other {c.evaluation_models}. eps_gaussian_estimate "
              f"assumes Gaussian scores (an estimate, not a bound).")
        oracles = {n: v["oracle_eps_lb"] for n, v in result.summary["variants"].items() if v.get("oracle_eps_lb")}
        if oracles:
            print("oracle single-threshold reference (Gaussian scores at the claim, best threshold known in advance, "
                  "all observations, same level): " + ", ".join(f"{n} {v:.3f}" for n, v in oracles.items()))
    if result.one_run_audits:
        o = next(iter(result.one_run_audits.values()))
        print(f"one-run audit (rigorous): {o.models} model(s) x {o.canaries // o.models} canaries pooled into one guessing "
              f"game (Steinke, Nasr & Jagielski 2023; and the f-DP bound of Mahloujifar, Melis & Chaudhuri 2024 at "
              f"sample rate 1, where the claim is mu-GDP); refutable_up_to is the ceiling of {o.canaries} canaries.")
    if result.parametric:
        p = next(iter(result.parametric.values()))
        print(f"* parametric (assumes DP-SGD with Gaussian noise): effective noise multiplier and sensitivity measured "
              f"from the canary scores with confidence bounds, turned into epsilon by {p.epsilon_method}, at the "
              f"run's sample rate and steps, so eps_lb lower-bounds the exact epsilon of the trained mechanism, not "
              f"an accountant's over-statement of it; eps_gaussian_estimate is its point estimate. Counts in the "
              f"verdict (--no-parametric leaves it out). " + "; ".join(
                  f"{q.variant}: sigma_eff {q.noise_multiplier:.4g} (<= {q.noise_multiplier_hi:.4g}), "
                  f"sensitivity {q.sensitivity:.4f} (>= {q.sensitivity_lo:.4f}); assumes {q.assumption}"
                  for q in result.parametric.values()))
    for name, why in result.parametric_refusals.items():
        print(f"note: {name} has no parametric bound: {why}")
    canaries = run["canaries"]
    print("eps_lb: empirical epsilon lower bound; refutable_up_to: the largest "
          "claimed epsilon these model counts could have refuted.")
    print("refutes: which claims a row may refute. A rigorous bound holds for any mechanism, so it refutes any "
          "claim; a parametric one holds against the exact epsilon when its assumption holds, so it refutes any "
          "claim under that assumption; an estimate (eps_gaussian_estimate) has no level and refutes nothing.")
    print(f"audited {result.summary['run']['n_train']} training examples, {canaries} of them canaries "
          f"(mislabeled examples inserted to raise the audit's power).")
    if failures:
        print("FAIL")
        for f in failures:
            print(f"  - {f}")
    else:
        print("OK: every claimed budget is consistent with the measured behaviour")


def add_execution_args(parser: argparse.ArgumentParser, *, device: bool = False) -> None:
    """Where a command that trains models runs them (not part of any result's identity)."""
    parser.add_argument("--workers", type=int, metavar="N",
                        help="train on N Ray workers (a local Ray runtime; same arrays as a serial run)")
    parser.add_argument("--ray-address", metavar="ADDRESS",
                        help="join the Ray cluster at ADDRESS (default: $RAY_ADDRESS if set)")
    if device:
        parser.add_argument("--device", choices=config_mod.DEVICES, help="train on this device (default: the run's)")


def study_execution(args, cfg: config_mod.Config) -> config_mod.Config:
    """A study's config: the run's, with the execution settings given on the command line."""
    changes = {"workers": args.workers} if args.workers is not None else {}
    if getattr(args, "device", None):
        changes["device"] = args.device
    if changes:
        cfg = config_mod.load(None, {k: str(v) for k, v in changes.items()}, base=cfg)
    from dpmem.bench.run import execution
    execution.check_available(cfg, args.ray_address)
    return cfg


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dpmem", description="Memorization and the cost of differential privacy, "
                                "example by example and subgroup by subgroup.")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="train the paired variants and write tables, figures, galleries and report.html")
    r.add_argument("args", nargs="*", metavar="[CONFIG] [key=value ...]",
                   help="a TOML/YAML config file or the name of a shipped config (`dpmem configs`), and/or "
                        "overrides such as epsilons=1,4,16 models=500")
    r.add_argument("--out", help="run directory (default runs/DATASET-MODEL-HASH)")
    r.add_argument("--quiet", action="store_true", help="no progress bars")
    add_execution_args(r)
    r.set_defaults(func=cmd_run)
    rp = sub.add_parser("report", help="regenerate tables, figures, galleries and report.html from a run directory "
                                       "without training")
    rp.add_argument("run_dir")
    rp.add_argument("--out", help="write outputs here instead of the run directory")
    rp.set_defaults(func=cmd_report)
    c = sub.add_parser("check", help="audit a run against its privacy budgets; exit 1 on violation")
    c.add_argument("run_dir")
    c.add_argument("--baseline", help="baseline JSON with accuracy / eps_lb tolerances")
    c.add_argument("--claim", action="append", metavar="VARIANT=EPS",
                   help="audit VARIANT against epsilon EPS (repeatable)")
    c.add_argument("--alpha", type=float, help="family-wise significance level (default: the run's alpha)")
    c.add_argument("--no-parametric", action="store_true",
                   help="leave out the parametric white-box bound (which assumes DP-SGD with Gaussian noise)")
    c.add_argument("--margin-audit", action="store_true",
                   help="also run the margin audit (a per-example threshold on the stored margins; joins the alpha "
                        "split, so every other test gets a smaller share)")
    c.add_argument("--json", action="store_true", help="print a machine-readable verdict")
    c.add_argument("--write-baseline", metavar="FILE", help="also write this run's numbers as a baseline file")
    c.set_defaults(func=cmd_check)
    cf = sub.add_parser("configs", help="list the configs shipped with dpmem, which `dpmem run NAME` runs by name")
    cf.set_defaults(func=cmd_configs)
    for extra in _EXTRA_COMMANDS:
        extra(sub)
    return p


def cmd_configs(args) -> int:
    shipped = config_mod.shipped_configs()
    width = max(map(len, shipped))
    for name, path in shipped.items():
        print(f"{name:<{width}}  {config_mod.describe(path)}")
    print(f"dpmem: `dpmem run NAME` runs one; the files are in {config_mod.SHIPPED}", file=sys.stderr)
    return EXIT_OK


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"expected comma-separated integers, got {text!r}") from None


def _float_list(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"expected comma-separated numbers, got {text!r}") from None


def cmd_loo(args) -> int:
    import numpy as np

    from dpmem.bench.estimators import memorization
    from dpmem.bench.report import tables
    from dpmem.bench.store.run_store import RunStore
    from dpmem.bench.studies import loo
    store = RunStore.open(args.run_dir)
    cfg = store.config()
    ks, qs = _int_list(args.ks), _float_list(args.qs)
    if any(q <= 0 or q >= 1 for q in qs):
        raise UsageError(f"--qs values must be in (0, 1), got {args.qs}")
    if any(k < 2 for k in ks):
        raise UsageError(f"--ks values must be >= 2, got {args.ks}")
    if args.examples < 1:
        raise UsageError(f"--examples must be >= 1, got {args.examples}")
    out = _output_dir(Path(args.out) if args.out else store.root / "loo", "--out")
    loo_cfg = study_execution(args, cfg)
    with store.acquire():              # the LOO models and subset runs are stored inside the run
        table = loo.run_loo(store, variant=args.variant, count=args.examples, repeats=args.repeats,
                            config=loo_cfg, progress=not args.quiet, ray_address=args.ray_address)
        errors = loo.estimator_error(store, table, ks=ks, qs=qs, progress=not args.quiet)
    masks, correct = store.masks(), store.variant_arrays(args.variant)["train_correct"]
    est = memorization.memorization(masks, correct).mem[table["index"].to_numpy()]
    import pandas as pd
    at_default = pd.DataFrame({"est": est, "loo": table["mem_loo"], "loo_lo": table["mem_loo_lo"],
                               "loo_hi": table["mem_loo_hi"]})
    at_default.attrs["title"] = f"K = {cfg.models}, q = {cfg.q:g} ({args.variant})"
    loo.write_report(table, errors, at_default, out)
    print(tables.markdown(errors[["q", "K", "examples", "mae", "mae_lo", "mae_hi", "p90_abs_err", "pearson",
                                  "spearman"]]))
    print(f"dpmem: LOO on {len(table)} examples x {args.repeats} repeats; mean LOO mem "
          f"{np.mean(table['mem_loo']):.3f}; outputs in {out}", file=sys.stderr)
    return EXIT_OK


def cmd_sweep(args) -> int:
    from dpmem.bench.report import tables
    from dpmem.bench.studies import sweep
    path, overrides = _split_run_args(args.args)
    base = config_mod.load(path, overrides)
    out = Path(args.out)
    points = sweep.run_sweep(out, base, widths=_int_list(args.widths), n_trains=_int_list(args.n_trains),
                             progress=not args.quiet)
    corr = sweep.correlations(points)
    sweep.write_report(points, corr, Path(args.report_out) if args.report_out else out)
    print(tables.markdown(points[["config", "variant", "n_train", "test_accuracy", "mean_mem"]]))
    print("Correlation of mean memorization with test accuracy:")
    print(tables.markdown(corr[sweep.CORRELATION_COLUMNS]))
    return EXIT_OK


def cmd_mia(args) -> int:
    from dpmem.bench.report import figures, membership, tables
    from dpmem.bench.store.run_store import RunStore
    store = RunStore.open(args.run_dir)
    if args.alpha is not None and not 0 < args.alpha < 1:
        raise UsageError(f"--alpha must be in (0, 1), got {args.alpha}")
    if args.block < 1:
        raise UsageError(f"--block must be >= 1, got {args.block}")
    out = _output_dir(Path(args.out) if args.out else store.root, "--out")
    mia = membership.analyse_membership(store, alpha=args.alpha, block=args.block)
    if out.resolve() == store.root.resolve():
        with store.acquire():
            tables.write_membership_tables(mia, out)
            figures.write_membership_figures(mia, out)
    else:
        tables.write_membership_tables(mia, out)
        figures.write_membership_figures(mia, out)
    print(tables.markdown(mia.table[tables.MIA_SHOWN]))
    print(tables.markdown(mia.trends))
    flagged = sorted({v for (v, _), c in mia.regions.items() if c.flagged})
    print("DP region (an estimate): " + (f"flagged {', '.join(flagged)}" if flagged else "no DP variant flagged"))
    print(f"dpmem: membership inference in {mia.seconds:.1f} s; mia.csv, mia_examples.parquet, mia_bins.csv and "
          f"figures written to {out}", file=sys.stderr)
    return EXIT_OK


def cmd_proxies(args) -> int:
    from dpmem.bench.report import figures, proxies, tables
    from dpmem.bench.store.run_store import RunStore
    store = RunStore.open(args.run_dir)
    for flag, value, least in (("--single-models", args.single_models, 1), ("--bootstrap", args.bootstrap, 10)):
        if value < least:
            raise UsageError(f"{flag} must be >= {least}, got {value}")
    out = _output_dir(Path(args.out) if args.out else store.root, "--out")
    result = proxies.analyse_proxies(store, single_models=args.single_models, bootstrap=args.bootstrap)
    with store.acquire() if out.resolve() == store.root.resolve() else contextlib.nullcontext():
        tables.write_proxy_tables(result, out)
        figures.write_proxy_figures(result, out)
    print(tables.markdown(result.table[tables.PROXIES_SHOWN]))
    for line in result.notes:
        print(f"dpmem: note: {line}", file=sys.stderr)
    print(f"dpmem: memorization proxies in {result.seconds:.1f} s; proxies.csv, proxies_examples.parquet and "
          f"figures/proxies_vs_mem.png written to {out}", file=sys.stderr)
    return EXIT_OK


def _add_studies(sub) -> None:
    pr = sub.add_parser("proxies", help="memorization proxies (loss, gradient norm, margin, LiRA) against the "
                                        "subset-sampling estimate, on a finished run")
    pr.add_argument("run_dir")
    pr.add_argument("--out", help="write outputs here instead of the run directory")
    pr.add_argument("--single-models", type=int, default=20, help="models over which one-model proxies are summarised")
    pr.add_argument("--bootstrap", type=int, default=1000, help="bootstrap replicates over examples")
    pr.set_defaults(func=cmd_proxies)
    mi = sub.add_parser("mia", help="membership inference (LiRA, RMIA, global threshold) on a finished run's margins")
    mi.add_argument("run_dir")
    mi.add_argument("--out", help="write outputs here instead of the run directory")
    mi.add_argument("--alpha", type=float, help="alpha of the DP region check (default: the run's alpha)")
    mi.add_argument("--block", type=int, default=1024, help="examples per block (bounds the memory)")
    mi.set_defaults(func=cmd_mia)
    lo = sub.add_parser("loo", help="exact leave-one-out memorization and the estimator's error against it")
    lo.add_argument("run_dir")
    lo.add_argument("--variant", default="nonprivate")
    lo.add_argument("--examples", type=int, default=30, help="examples to test (most/least memorized, random)")
    lo.add_argument("--repeats", type=int, default=100, help="model pairs per example (R)")
    lo.add_argument("--ks", default="25,50,100,250,500,1000", help="model counts K for the error table")
    lo.add_argument("--qs", default="0.5,0.7,0.9", help="subset fractions q for the error table")
    lo.add_argument("--out", help="output directory (default RUN_DIR/loo)")
    lo.add_argument("--quiet", action="store_true")
    add_execution_args(lo, device=True)
    lo.set_defaults(func=cmd_loo)
    sw = sub.add_parser("sweep", help="memorization versus generalization across configurations")
    sw.add_argument("args", nargs="*", metavar="[CONFIG] [key=value ...]")
    sw.add_argument("--out", required=True, help="sweep directory (one run per configuration under OUT/runs)")
    sw.add_argument("--report-out", help="write tables and figures here instead of OUT")
    sw.add_argument("--widths", default="16,64,256", help="hidden widths")
    sw.add_argument("--n-trains", default="150,300,600", help="target training-set sizes")
    sw.add_argument("--quiet", action="store_true")
    sw.set_defaults(func=cmd_sweep)


def cmd_feldman(args) -> int:
    from dpmem.bench.report import tables
    from dpmem.bench.store.run_store import RunStore
    from dpmem.bench.studies import feldman
    store = RunStore.open(args.run_dir)
    per_model, summary, points, facts = feldman.analyse_run(store)
    out = Path(args.out) if args.out else store.root / "feldman"
    feldman.write_report(per_model, summary, points, facts, out)
    print(tables.markdown(summary[["variant", "n_mean", "tau", "opt", "opt_given_T", "singletons", "unfit_singletons",
                                   "test_error", "bound", "error_minus_bound", "explained"]]))
    print(f"dpmem: t = {facts['points']} points, n = {facts['n_train']} ({facts['singletons_in_S']} singletons in S), "
          f"tau(n) = {facts['tau_S']:.4g}, opt(n) = {facts['opt_S']:.4g}; outputs in {out}", file=sys.stderr)
    return EXIT_OK


def cmd_utility(args) -> int:
    from dpmem.bench.store.run_store import RunStore
    from dpmem.bench.studies import utility
    store = RunStore.open(args.run_dir)
    thresholds = _float_list(args.thresholds)
    if not thresholds or any(not 0 < t <= 1 for t in thresholds):
        raise UsageError(f"--thresholds values must be in (0, 1], got {args.thresholds!r}")
    if args.models < 2:
        raise UsageError(f"--models must be >= 2, got {args.models}")
    out = Path(args.out) if args.out else store.root / "utility"
    cfg = study_execution(args, store.config())
    t0 = time.perf_counter()
    try:
        cells = utility.run_utility(store, out, thresholds=thresholds, models=args.models, config=cfg,
                                    progress=not args.quiet, ray_address=args.ray_address)
    except KeyboardInterrupt:
        print(f"\ndpmem: interrupted; finished cells are stored in {out}. Run the same command to resume.",
              file=sys.stderr)
        return 130
    table = utility.utility_table(cells)
    utility.write_report(table, Path(args.report_out) if args.report_out else out)
    print(utility.markdown_summary(table))
    print(f"dpmem: utility study in {time.perf_counter() - t0:.1f} s; outputs in {out}", file=sys.stderr)
    return EXIT_OK


def _add_long_tail_studies(sub) -> None:
    ut = sub.add_parser("utility", help="marginal utility of memorized examples: remove them, retrain, compare "
                                        "with random and same-subgroup removals")
    ut.add_argument("run_dir")
    ut.add_argument("--thresholds", default="0.25,0.5,0.75",
                    help="memorization thresholds (non-private estimates); examples at or above are removed")
    ut.add_argument("--models", type=int, default=100, help="models per (threshold, removal, variant) cell")
    ut.add_argument("--out", help="study directory: retrained models' arrays, resumable (default RUN_DIR/utility)")
    ut.add_argument("--report-out", help="write tables and figures here instead of the study directory")
    ut.add_argument("--quiet", action="store_true")
    add_execution_args(ut, device=True)
    ut.set_defaults(func=cmd_utility)
    fe = sub.add_parser("feldman", help="Feldman's long-tail bound (Theorem 2.3) against the measured error "
                                        "of a dataset=feldman run")
    fe.add_argument("run_dir")
    fe.add_argument("--out", help="output directory (default RUN_DIR/feldman)")
    fe.set_defaults(func=cmd_feldman)


_EXTRA_COMMANDS: list = [_add_studies, _add_long_tail_studies]


def main(argv: list[str] | None = None) -> int:
    # User code named as package.module:function (model=, trainer=) imports from the working
    # directory, as under `python -m`.
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    parser = build_parser()
    # `dpmem run --out DIR key=value`: argparse stops collecting positionals at the first
    # option, so config paths and overrides given after options are gathered here.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "args") or any(e.startswith("-") for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.args = [*args.args, *extra]
    try:
        return args.func(args)
    except KeyboardInterrupt:      # Ctrl-C outside training (start-up, analysis, reports)
        print(f"\ndpmem: interrupted during `dpmem {args.command}`; stored files are intact, run it again", file=sys.stderr)
        return 130
    except SystemExit as e:        # user code (a factory, a trainer, an import) called sys.exit
        print(f"dpmem: error: user code called sys.exit({e.code!r}) during `dpmem {args.command}`", file=sys.stderr)
        return EXIT_USAGE
    except UsageError as e:
        print(f"dpmem: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as e:   # unwritable directory, full disk, a path that is a file, ...
        what = os.strerror(e.errno) if e.errno else str(e)
        hint = " (the disk is full)" if e.errno in (errno.ENOSPC, errno.EDQUOT) else ""
        where = f": {e.filename}" if e.filename else ""
        print(f"dpmem: error: {what}{where}{hint}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())

"""Tightness and power of the canary audits: the parametric bound, the threshold test against its oracle,
and the one-run audit.

`python -m dpmem.bench.tools.audit_tightness models --seeds 20` runs bench/configs/audit.toml once per seed
honestly (claims eps 1, 4, 8) and once with ``fault=noise_x0.75`` (claim 4 only), exactly as
`dpmem run` then `dpmem check` would (the same family-wise alpha split), and writes
results/audit_tightness.{csv,md}:
- parametric: median eps_lb / claim per claim, honest runs above their claim, and noise_x0.75
  refuted at claim 4;
- threshold test: median rigorous canary eps_lb next to the oracle single-threshold reference
  for the run's observation counts.
`python -m dpmem.bench.tools.audit_tightness one-run --seeds 20` runs bench/configs/audit-one-run.toml
(one model, 10,000 canaries) per seed and fault and writes results/one_run_audit.{csv,md}:
detection rate and median bound of the one-run audit (and of the parametric bound from the
same run), the ceiling, and the wall time of training and of the audit.
Seeds are independent (data, masks, initialisation, coins and noise all follow the seed).
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from dpmem.bench import config
from dpmem.bench.report import analysis
from dpmem.bench.report.analysis import audit_failures
from dpmem.bench.report.tables import markdown
from dpmem.bench.run import pipeline
from dpmem.bench.store.files import atomic_write_bytes
from dpmem.bench.store.run_store import RunStore
from dpmem.bench.tools.audit_power import exact_ci

CONFIGS = Path(__file__).parents[1] / "configs"
MODELS_FAULTS = {"none": [], "noise_x0.75": ["epsilons=4"]}
ONE_RUN_FAULTS = {"none": "honest", "no_noise": "noise off", "no_clipping": "clipping off",
                  "wrong_sample_rate": "sample rate misreported (10x lower)", "half_noise": "half noise",
                  "noise_x0.75": "noise x0.75"}


def _train(root: Path, config_file: Path, overrides: list[str]) -> tuple[RunStore, float]:
    cfg = config.load(config_file, overrides + ["threads=1"])
    store = RunStore.create_or_resume(root, cfg)
    t0 = time.perf_counter()
    pipeline.run(store, cfg, progress=False)
    return store, time.perf_counter() - t0


def models_rows(root: Path, fault: str, seed: int) -> list[dict]:
    store, train_s = _train(root / f"{fault}-{seed}", CONFIGS / "audit.toml",
                            MODELS_FAULTS[fault] + [f"fault={fault}", f"seed={seed}"])
    t0 = time.perf_counter()
    result = analysis.analyse(store, with_pairs=False)
    canary_masks = store.canary_masks()
    assert canary_masks is not None, "the audit config plants canaries"
    audit_s = time.perf_counter() - t0
    gate_failed = bool(audit_failures(result))
    rows = []
    for name, epsilon in store.config().variants:
        if epsilon is None:
            continue
        c, p = result.canary_audits[name], result.parametric[name]
        v = result.summary["variants"][name]
        rows.append({"fault": fault, "seed": seed, "variant": name, "epsilon": epsilon,
                     "gate_failed": gate_failed, "audit_tests": result.summary["run"]["audit_tests"],
                     "canary_eps_lb": c.eps_lb, "canary_refuted": not c.consistent, "oracle_eps_lb": v["oracle_eps_lb"],
                     "parametric_eps_lb": p.eps_lb, "parametric_refuted": not p.consistent,
                     "parametric_eps_estimate": p.eps_estimate, "sigma_planned": v["noise_multiplier"],
                     "sigma_eff": p.noise_multiplier, "sigma_eff_hi": p.noise_multiplier_hi,
                     "sensitivity": p.sensitivity, "sensitivity_lo": p.sensitivity_lo,
                     "n_in": int(canary_masks.sum()), "n_out": int((~canary_masks).sum()),
                     "models": c.models, "train_s": train_s, "audit_s": audit_s})
    shutil.rmtree(store.root)
    return rows


def one_run_rows(root: Path, fault: str, seed: int) -> list[dict]:
    store, train_s = _train(root / f"{fault}-{seed}", CONFIGS / "audit-one-run.toml", [f"fault={fault}", f"seed={seed}"])
    t0 = time.perf_counter()
    result = analysis.analyse(store, with_pairs=False)
    audit_s = time.perf_counter() - t0
    rows = []
    for name, epsilon in store.config().variants:
        if epsilon is None:
            continue
        o, p = result.one_run_audits[name], result.parametric[name]
        rows.append({"fault": fault, "seed": seed, "variant": name, "epsilon": epsilon,
                     "one_run_eps_lb": o.eps_lb, "one_run_steinke": o.eps_lb_steinke, "one_run_fdp": o.eps_lb_fdp,
                     "one_run_refuted": not o.consistent, "ceiling": o.power_eps, "canaries": o.canaries,
                     "parametric_eps_lb": p.eps_lb, "parametric_refuted": not p.consistent,
                     "train_s": train_s, "audit_s": audit_s})
    shutil.rmtree(store.root)
    return rows


def _rate(flags: pd.Series) -> dict:
    k, n = int(flags.sum()), int(flags.size)
    lo, hi = exact_ci(k, n)
    return {"seeds": n, "refuted": k, "rate": k / n if n else np.nan, "rate_lo": lo, "rate_hi": hi}


def _median(x: pd.Series) -> float:
    return float(pd.to_numeric(x, errors="coerce").fillna(0.0).median())


def models_tables(runs: pd.DataFrame) -> dict[str, pd.DataFrame]:
    honest, bug = runs[runs.fault == "none"], runs[runs.fault == "noise_x0.75"]
    par = []
    for e, g in honest.groupby("epsilon"):
        par.append({"claimed_eps": e, "seeds": len(g), "median_eps_lb": _median(g.parametric_eps_lb),
                    "min_eps_lb": g.parametric_eps_lb.min(), "max_eps_lb": g.parametric_eps_lb.max(),
                    "median_ratio_to_claim": _median(g.parametric_eps_lb) / e,
                    "above_claim": int((g.parametric_eps_lb > e).sum()),
                    "median_sigma_eff / planned": float((g.sigma_eff / g.sigma_planned).median()),
                    "median_sensitivity": float(g.sensitivity.median())})
    power = []
    for e, g in bug.groupby("epsilon"):
        for audit, col in (("parametric", "parametric"), ("threshold test", "canary")):
            power.append({"fault": "noise_x0.75", "claimed_eps": e, "audit": audit} | _rate(g[f"{col}_refuted"])
                         | {"median_eps_lb": _median(g[f"{col}_eps_lb"])})
    thr = []
    for e, g in honest.groupby("epsilon"):
        med, oracle = _median(g.canary_eps_lb), float(g.oracle_eps_lb.median())
        thr.append({"claimed_eps": e, "seeds": len(g), "median_eps_lb": med, "oracle_reference": oracle,
                    "ratio_to_oracle": med / oracle, "min_eps_lb": g.canary_eps_lb.min(),
                    "max_eps_lb": g.canary_eps_lb.max(), "n_in": int(g.n_in.median()), "n_out": int(g.n_out.median()),
                    "above_claim": int((g.canary_eps_lb > e).sum())})
    gates = honest.groupby("seed")["gate_failed"].first()
    validity = pd.DataFrame([{"runs": "honest DP-SGD, whole gate (all variants and audits, one alpha)"} | _rate(gates)])
    cost = pd.DataFrame([{"fault": f, "runs": len(g.seed.unique()),
                          "median_train_s": float(g.groupby("seed").train_s.first().median()),
                          "median_audit_s": float(g.groupby("seed").audit_s.first().median())}
                         for f, g in runs.groupby("fault", sort=False)])
    return {"parametric bound, honest runs": pd.DataFrame(par), "noise x0.75 at claimed eps 4": pd.DataFrame(power),
            "threshold test vs oracle single-threshold reference": pd.DataFrame(thr), "validity": validity,
            "wall time (one core)": cost}


def one_run_tables(runs: pd.DataFrame) -> dict[str, pd.DataFrame]:
    rows = []
    for (fault, e), g in runs.groupby(["fault", "epsilon"], sort=False):
        rows.append({"fault": ONE_RUN_FAULTS[fault], "claimed_eps": e} | _rate(g.one_run_refuted)
                    | {"median_one_run_eps_lb": _median(g.one_run_eps_lb), "median_steinke": _median(g.one_run_steinke),
                       "median_fdp": _median(g.one_run_fdp), "ceiling": float(g.ceiling.iloc[0]),
                       "parametric_refuted": int(g.parametric_refuted.sum()),
                       "median_parametric_eps_lb": _median(g.parametric_eps_lb)})
    timing = pd.DataFrame([{"runs": int(len(runs.groupby(["fault", "seed"]))), "canaries": int(runs.canaries.iloc[0]),
                            "median_train_s": float(runs.groupby(["fault", "seed"]).train_s.first().median()),
                            "median_audit_s": float(runs.groupby(["fault", "seed"]).audit_s.first().median())}])
    return {"one-run audit (1 model x 10,000 canaries per variant)": pd.DataFrame(rows), "wall time (one core)": timing}


def write(runs: pd.DataFrame, out: Path, stem: str, tables) -> str:
    text = "".join(f"### {name}\n\n{markdown(frame)}\n" for name, frame in tables(runs).items())
    atomic_write_bytes(out / f"{stem}.csv", runs.to_csv(index=False).encode())
    atomic_write_bytes(out / f"{stem}.md", text.encode())
    return text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("study", choices=["models", "one-run"])
    p.add_argument("--seeds", type=int, default=20)
    p.add_argument("--out", default="results")
    args = p.parse_args(argv)
    out = Path(args.out)
    faults, rows_of, stem, tables = ((MODELS_FAULTS, models_rows, "audit_tightness", models_tables)
                                     if args.study == "models" else
                                     (ONE_RUN_FAULTS, one_run_rows, "one_run_audit", one_run_tables))
    rows = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.seeds):       # seed-major, so partial results cover every fault
            for fault in faults:
                rows += rows_of(Path(tmp), fault, seed)
            write(pd.DataFrame(rows), out, stem, tables)
            print(f"seed {seed} done ({time.perf_counter() - t0:.0f} s)", flush=True)
    print(write(pd.DataFrame(rows), out, stem, tables))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Power, tightness and validity of the `dpmem check` audit on bench/configs/audit.toml.

`python -m dpmem.bench.tools.audit_power --seeds 20` runs the audit config once per seed and fault,
exactly as `dpmem run bench/configs/audit.toml seed=S fault=F` followed by `dpmem check` would,
and writes results/audit_power.{csv,md}:
- power: DP-SGD with half the calibrated noise multiplier (fault ``half_noise``, the accountant
  told the calibrated one), refuted at claimed eps 1, 4 and 8;
- tightness: the rigorous canary eps_lb of honest DP-SGD at eps 1, 4, 8 (median over seeds);
- validity: how often honest runs fail the gate (one family-wise alpha over every variant and
  both audits), and whether any eps_lb exceeds its claim;
- planted bugs (claimed eps 1): detection rate per fault and audit, with exact binomial
  intervals (Clopper-Pearson, 95%).
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
from scipy import stats

from dpmem.bench import config
from dpmem.bench.report import analysis
from dpmem.bench.report.analysis import audit_failures
from dpmem.bench.report.tables import markdown
from dpmem.bench.run import pipeline
from dpmem.bench.store.files import atomic_write_bytes
from dpmem.bench.store.run_store import RunStore

AUDIT_CONFIG = Path(__file__).parents[1] / "configs" / "audit.toml"
# fault -> overrides; the bugs other than half_noise are audited at claimed eps 1 only
FAULT_RUNS = {"none": [], "half_noise": [], "no_noise": ["epsilons=1"], "no_clipping": ["epsilons=1"],
              "wrong_sample_rate": ["epsilons=1"]}


def run_once(root: Path, fault: str, seed: int, extra: list[str] | None = None) -> list[dict]:
    """Train and audit one seed of the audit config; one row per variant."""
    cfg = config.load(AUDIT_CONFIG, FAULT_RUNS[fault] + (extra or []) + [f"fault={fault}", f"seed={seed}"])
    store = RunStore.create_or_resume(Path(root) / f"{fault}-{seed}", cfg)
    pipeline.run(store, cfg, progress=False)
    result = analysis.analyse(store, with_pairs=False)
    shutil.rmtree(store.root)   # 16 MB of canary scores per run; the rows below are what is kept
    gate_failed = bool(audit_failures(result))
    rows = []
    for name, epsilon in cfg.variants:
        a, c = result.audits[name], result.canary_audits[name]
        rows.append({"fault": fault, "seed": seed, "variant": name, "epsilon": epsilon,
                     "gate_failed": gate_failed, "audit_tests": result.summary["run"]["audit_tests"],
                     "canary_refuted": not c.consistent, "canary_eps_lb": c.eps_lb, "canary_eps_gdp": c.eps_gdp,
                     "canary_mu": c.gdp_mu, "canary_power_eps": c.power_eps, "n_in": c.n_in, "n_out": c.n_out,
                     "models": c.models, "canaries": c.canaries,
                     "blackbox_refuted": not a.consistent, "blackbox_eps_lb": a.eps_lb,
                     "blackbox_power_eps": a.power_eps,
                     "test_accuracy": result.summary["variants"][name]["test_accuracy"]})
    return rows


def exact_ci(k: int, n: int) -> tuple[float, float]:
    if n == 0:
        return np.nan, np.nan
    ci = stats.binomtest(int(k), int(n)).proportion_ci(method="exact")
    return float(ci.low), float(ci.high)


def _rate_row(label: dict, flags: pd.Series) -> dict:
    k, n = int(flags.sum()), int(flags.size)
    lo, hi = exact_ci(k, n)
    return label | {"seeds": n, "refuted": k, "rate": k / n if n else np.nan, "rate_lo": lo, "rate_hi": hi}


def tables(runs: pd.DataFrame) -> dict[str, pd.DataFrame]:
    dp = runs[runs["epsilon"].notna()]
    power = pd.DataFrame([_rate_row({"claimed_eps": e, "audit": audit}, g[f"{col}_refuted"])
                          for e, g in dp[dp.fault == "half_noise"].groupby("epsilon")
                          for audit, col in (("gradient canary", "canary"), ("black-box", "blackbox"))])
    honest = dp[dp.fault == "none"]
    tight = honest.groupby("epsilon").agg(
        seeds=("seed", "size"), median_eps_lb=("canary_eps_lb", "median"), min_eps_lb=("canary_eps_lb", "min"),
        max_eps_lb=("canary_eps_lb", "max"), median_eps_gdp=("canary_eps_gdp", "median"),
        median_blackbox_eps_lb=("blackbox_eps_lb", "median"), models=("models", "first"),
        canaries=("canaries", "first"), n_in=("n_in", "median"), n_out=("n_out", "median")).reset_index()
    tight["ratio_to_claim"] = tight["median_eps_lb"] / tight["epsilon"]
    gates = runs[runs.fault == "none"].groupby("seed")["gate_failed"].first()
    above = honest[(honest.canary_eps_lb > honest.epsilon) | (honest.blackbox_eps_lb > honest.epsilon)]
    validity = pd.DataFrame([_rate_row({"runs": "honest DP-SGD, whole gate (all variants and audits)"}, gates)
                             | {"eps_lb_above_claim": int(len(above))}])
    planted = []
    for fault, g in dp[dp.epsilon == 1.0].groupby("fault", sort=False):
        for audit, col in (("gradient canary", "canary"), ("black-box", "blackbox")):
            planted.append(_rate_row({"fault": fault, "audit": audit, "claimed_eps": 1.0}, g[f"{col}_refuted"])
                           | {"median_eps_lb": g[f"{col}_eps_lb"].median()})
    return {"power": power, "tightness": tight, "validity": validity, "planted": pd.DataFrame(planted)}


def write(runs: pd.DataFrame, out: Path) -> str:
    parts = tables(runs)
    text = ""
    for name, frame in parts.items():
        text += f"### {name}\n\n{markdown(frame)}\n"
    atomic_write_bytes(out / "audit_power.csv", runs.to_csv(index=False).encode())
    atomic_write_bytes(out / "audit_power.md", text.encode())
    return text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=20)
    p.add_argument("--faults", default=",".join(FAULT_RUNS), help="comma-separated faults to run")
    p.add_argument("--out", default="results")
    args = p.parse_args(argv)
    faults = [f for f in args.faults.split(",") if f]
    unknown = set(faults) - set(FAULT_RUNS)
    if unknown:
        p.error(f"unknown fault(s) {', '.join(sorted(unknown))}; choose from {', '.join(FAULT_RUNS)}")
    out = Path(args.out)
    rows = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.seeds):       # seed-major, so partial results cover every fault
            for fault in faults:
                rows += run_once(Path(tmp), fault, seed)
                write(pd.DataFrame(rows), out)
            print(f"seed {seed} done ({time.perf_counter() - t0:.0f} s)", flush=True)
    print(write(pd.DataFrame(rows), out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""How often the audit catches planted DP-SGD bugs, and how often it alarms on correct DP-SGD.

`python -m dpmem.bench.tools.planted --seeds 20` trains the small audit configuration below once per seed and fault
(512 models per variant, claimed (1, 1e-4)-DP) and writes results/planted_bugs.{csv,md}. This is the
black-box (memorization) audit; the gradient-canary audit's detection rates are bench/tools/audit_power.py's.
The same configuration backs tests/test_planted_bugs.py.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import pandas as pd
from scipy import stats
from tqdm.auto import tqdm

from dpmem.bench import config
from dpmem.bench.report import analysis
from dpmem.bench.report.tables import markdown
from dpmem.bench.run import pipeline
from dpmem.bench.store.files import atomic_write_bytes
from dpmem.bench.store.run_store import RunStore
from dpmem.privacy.faults import FAULTS

# Synthetic mixture with 10 mislabeled canaries (strong memorization signals), so that 512 models can
# refute epsilon = 1 (power_eps is about 3.5) when the implementation is broken.
PLANTED_BASE = ["dataset=synthetic", "n_train=100", "n_test=200", "n_subgroups=20", "dim=32", "canaries=10",
                "models=512", "unit_size=512", "q=0.5", "epochs=30", "batch_size=25", "lr=0.5", "hidden=32",
                "epsilons=1", "delta=1e-4"]


def audit_once(root: Path, fault: str, seed: int):
    """Train the planted configuration with ``fault`` and return its store and the dp-eps1 audit."""
    cfg = config.load(None, PLANTED_BASE + [f"fault={fault}", f"seed={seed}"])
    store = RunStore.create_or_resume(Path(root) / f"{fault}-{seed}", cfg)
    pipeline.run(store, cfg, progress=False)
    result = analysis.analyse(store, with_pairs=False)
    return store, result.audits["dp-eps1"], result.summary["variants"]["dp-eps1"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=10)
    p.add_argument("--out", default="results")
    p.add_argument("--faults", default=",".join(FAULTS),
                   help="comma-separated faults to (re)run; the other faults' rows are kept from OUT/planted_bugs.csv")
    args = p.parse_args(argv)
    faults = [f for f in args.faults.split(",") if f]
    if set(faults) - set(FAULTS):
        p.error(f"unknown fault(s) {', '.join(sorted(set(faults) - set(FAULTS)))}; choose from {', '.join(FAULTS)}")
    out = Path(args.out)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for fault in tqdm(faults, desc="faults"):
            for seed in range(args.seeds):
                _, audit, v = audit_once(Path(tmp), fault, seed)
                rows.append({"fault": fault, "seed": seed, "flagged": not audit.consistent,
                             "violations": audit.violations, "eps_lb": audit.eps_lb, "power_eps": audit.power_eps,
                             "test_accuracy": v["test_accuracy"]})
    runs = pd.DataFrame(rows)
    if (out / "planted_bugs.csv").exists() and set(faults) != set(FAULTS):
        kept = pd.read_csv(out / "planted_bugs.csv")
        runs = pd.concat([kept[~kept["fault"].isin(faults)], runs], ignore_index=True)
    table = runs.groupby("fault", sort=False).agg(runs=("flagged", "size"), flagged=("flagged", "sum"),
                                                  median_eps_lb=("eps_lb", "median"),
                                                  median_power_eps=("power_eps", "median"),
                                                  test_accuracy=("test_accuracy", "mean")).reset_index()
    table["rate"] = table["flagged"] / table["runs"]
    ci = [stats.binomtest(int(f), int(n)).proportion_ci(method="exact") for f, n in zip(table.flagged, table.runs)]
    table["rate_lo"] = [c.low for c in ci]
    table["rate_hi"] = [c.high for c in ci]
    atomic_write_bytes(out / "planted_bugs.csv", runs.to_csv(index=False).encode())
    atomic_write_bytes(out / "planted_bugs.md", markdown(table).encode())
    print(markdown(table))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

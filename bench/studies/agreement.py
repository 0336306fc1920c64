"""Do two runs of the same config reach the same accuracy? ``python -m dpmem.bench.studies.agreement RUN_A RUN_B``.

For every variant in both runs: each model's test accuracy, the mean and standard deviation over
models, Welch's t-test, and, when both runs trained the same subsets (equal masks, model k against
model k: same subsets and initialisations, their own batches and noise), the paired t-test. Made to
check one engine against another (``engine=batched`` against ``engine=opacus``) or a trainer
against either; prints a Markdown table (and writes it as JSON with ``--json``).
"""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import pandas as pd
from scipy import stats

from dpmem.bench.store.files import read_json
from dpmem.bench.store.run_store import RunStore
from dpmem.privacy.errors import UsageError


def per_model_accuracy(store: RunStore, variant: str) -> np.ndarray:
    return store.variant_arrays(variant)["test_correct"].mean(axis=1)


def compare(a: RunStore, b: RunStore) -> pd.DataFrame:
    paired = np.array_equal(a.masks(), b.masks())
    summary_a, summary_b = (read_json(s.root / "summary.json") for s in (a, b))
    rows = []
    for name in [v for v in summary_a["variants"] if v in summary_b["variants"]]:
        acc_a, acc_b = per_model_accuracy(a, name), per_model_accuracy(b, name)
        rows.append(dict(
            variant=name, engine_a=summary_a["variants"][name].get("engine"), engine_b=summary_b["variants"][name].get("engine"),
            models=len(acc_a), mean_a=acc_a.mean(), sd_a=acc_a.std(ddof=1), mean_b=acc_b.mean(), sd_b=acc_b.std(ddof=1),
            welch_p=stats.ttest_ind(acc_a, acc_b, equal_var=False).pvalue,
            paired_p=stats.ttest_rel(acc_a, acc_b).pvalue if paired else float("nan")))
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dpmem.bench.studies.agreement", description=__doc__.splitlines()[0])
    parser.add_argument("run_a")
    parser.add_argument("run_b")
    parser.add_argument("--json", help="also write the table here")
    args = parser.parse_args(argv)
    try:
        table = compare(RunStore.open(args.run_a), RunStore.open(args.run_b))
    except (UsageError, OSError) as e:
        print(f"agreement: error: {e}", file=sys.stderr)
        return 2
    print(table.to_markdown(index=False, floatfmt=".3f"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(table.to_dict(orient="records"), f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Cost of false-discovery control (a script, not a test):
``python -m dpmem.bench.tools.findings_speed RUN_DIR [--variant nonprivate] [--repeats 3]``.

Times, in one process, the median wall time of
  - a full streamed pass over the influence matrix of every training example, keeping the pairs above
    the thresholds (what the raw pair list costs without control),
  - ``controlled_findings`` at the run's thresholds (influence of the raw high-memorization rows, plus
    the permutation null),
  - ``controlled_findings`` with ``mem_threshold = 0``, where nearly every example is a candidate,
and prints the raw, expected-false and controlled counts beside them.
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import pandas as pd

from dpmem.bench.estimators import findings, memorization
from dpmem.bench.report.tables import markdown
from dpmem.bench.store.run_store import RunStore


def _median_seconds(fn, repeats: int):
    times, result = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dpmem.bench.tools.findings_speed", description=__doc__.splitlines()[0])
    p.add_argument("run_dir")
    p.add_argument("--variant", default="nonprivate")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    store = RunStore(args.run_dir)
    cfg, masks = store.config(), store.masks()
    arrays = store.variant_arrays(args.variant)
    eligible = ~store.data()["is_canary"].astype(bool)

    def full_pass():
        mem = memorization.memorization(masks, arrays["train_correct"]).mem
        count = 0
        for idx, infl in memorization.influence_blocks(masks, arrays["test_correct"]):
            count += int(np.count_nonzero((mem[idx] >= cfg.mem_threshold)[:, None] & (infl >= cfg.infl_threshold)))
        return count

    def controlled(mem_threshold: float):
        return lambda: findings.controlled_findings(
            masks, arrays["train_correct"], arrays["test_correct"], eligible=eligible, mem_threshold=mem_threshold,
            infl_threshold=cfg.infl_threshold, fdr=cfg.fdr, seed=cfg.seed)

    rows = []
    seconds, count = _median_seconds(full_pass, args.repeats)
    rows.append({"step": "raw pairs, full influence pass", "seconds": seconds, "pairs_raw": count})
    for label, threshold in (("controlled, run's thresholds", cfg.mem_threshold), ("controlled, mem_threshold=0", 0.0)):
        seconds, f = _median_seconds(controlled(threshold), args.repeats)
        rows.append({"step": label, "seconds": seconds, "high_mem_raw": f.high_mem_examples_raw,
                     "expected_false_high_mem": f.expected_false_high_mem, "high_mem": f.high_mem_examples,
                     "pairs_raw": f.high_influence_pairs_raw, "expected_false_pairs": f.expected_false_pairs,
                     "pairs": f.high_influence_pairs})
    print(f"{args.run_dir} ({args.variant}: K = {masks.shape[0]}, n = {masks.shape[1]}, "
          f"m = {arrays['test_correct'].shape[1]}; median of {args.repeats})")
    print(markdown(pd.DataFrame(rows)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

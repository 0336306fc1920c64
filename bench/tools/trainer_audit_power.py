"""Power and validity of the gradient-canary audit on a user's own Opacus trainer (the trainer protocol).

`python -m dpmem.bench.tools.trainer_audit_power --seeds 20` runs, per seed and planted bug, exactly what
`dpmem run bench/configs/audit.toml trainer=dpmem.bench.tools.planted_trainer:BUG ...` followed by
`dpmem check` does: the user's trainer (bench/tools/planted_trainer.py: the README's Opacus trainer with
``dpmem.canaries``) trains every model, dpmem stores the canary scores and audits them. It writes
results/trainer_audit_power.{csv,md}:
- refuted: per bug and claimed epsilon, how many seeds `dpmem check` refutes the claim with the
  canary audit, with exact (Clopper-Pearson, 95%) intervals;
- validity: how many honest seeds fail the whole gate (every variant and audit, one alpha);
- cost: models, canaries and (model, canary) observations per variant, CPU and wall seconds.

The proxy is bench/configs/audit.toml (logistic regression on a tiny synthetic mixture, Poisson
rate 1) with fewer models and steps (default 300 models per variant, 1,000 canaries per model,
one epoch = one full-batch step): Opacus trains one model at a time, and its per-example
gradients cost rows x canaries per step. At rate 1 the steps compose to one Gaussian mechanism
whose sigma is calibrated to the claimed epsilon for the actual number of steps, so the
canaries' privacy curve, and the audit's power, do not depend on the number of steps. Fixed-size
batches equal Poisson batches at rate 1; that bug runs on the same proxy with ``batch_size = 5`` (rate 0.1, 10 steps per epoch).
Seeds are independent (data, masks, initialisation, coins and noise all follow the seed).
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import pandas as pd

from dpmem.bench import config
from dpmem.bench.report import analysis
from dpmem.bench.report.analysis import audit_failures
from dpmem.bench.report.tables import markdown
from dpmem.bench.run import pipeline
from dpmem.bench.store.files import atomic_write_bytes
from dpmem.bench.store.run_store import RunStore
from dpmem.bench.tools.audit_power import AUDIT_CONFIG, _rate_row

TRAINER = "dpmem.bench.tools.planted_trainer:{bug}"
# bug -> overrides on top of the audit config and the common ones
BUG_RUNS = {"honest": ["epsilons=1,4"], "half_noise": ["epsilons=1,4"], "noise_x075": ["epsilons=4"],
            "no_clipping": ["epsilons=1"],
            "fixed_batches": ["epsilons=1", "batch_size=5", "epochs=1"]}
DESCRIPTION = {"honest": "honest DP-SGD (the README trainer)",
               "half_noise": "half the noise multiplier passed to make_private",
               "noise_x075": "0.75 of the noise multiplier passed to make_private",
               "no_clipping": "clipping off (noise std of the claim kept)",
               "fixed_batches": "fixed-size shuffled batches, accountant told Poisson (rate 0.1)"}


def common_overrides(models: int, canaries: int, epochs: int) -> list[str]:
    return [f"models={models}", f"unit_size={models}", f"gradient_canaries={canaries}", f"epochs={epochs}",
            "threads=1"]


def bug_config(bug: str, seed: int, common: list[str]) -> config.Config:
    """The audit config with the common overrides, then the bug's own (which win: fixed_batches keeps
    one epoch whatever --epochs says), the planted trainer and the seed."""
    overrides = dict(item.split("=", 1) for item in common + BUG_RUNS[bug])
    overrides |= {"trainer": TRAINER.format(bug=bug), "seed": str(seed)}
    return config.load(AUDIT_CONFIG, [f"{key}={value}" for key, value in overrides.items()])


def run_once(root: Path, bug: str, seed: int, common: list[str]) -> list[dict]:
    """Train and audit one seed with one planted bug, as `dpmem run` + `dpmem check`; one row per variant."""
    cfg = bug_config(bug, seed, common)
    store = RunStore.create_or_resume(Path(root) / f"{bug}-{seed}", cfg)
    t0, c0 = time.perf_counter(), time.process_time()
    pipeline.run(store, cfg, progress=False)
    result = analysis.analyse(store, with_pairs=False)
    gate_failed = bool(audit_failures(result))
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    shutil.rmtree(store.root)
    rows = []
    for name, epsilon in cfg.variants:
        a, c = result.audits[name], result.canary_audits[name]
        p = result.parametric.get(name)
        rows.append({"bug": bug, "seed": seed, "variant": name, "epsilon": epsilon, "gate_failed": gate_failed,
                     "audit_tests": result.summary["run"]["audit_tests"], "canary_refuted": not c.consistent,
                     "canary_eps_lb": c.eps_lb, "canary_power_eps": c.power_eps, "canary_eps_gdp": c.eps_gdp,
                     "blackbox_refuted": not a.consistent, "blackbox_eps_lb": a.eps_lb, "n_in": c.n_in,
                     "n_out": c.n_out, "models": c.models, "canaries": c.canaries,
                     "steps": result.summary["variants"][name]["steps"],
                     "parametric_refuted": None if p is None else not p.consistent,
                     "parametric_eps_lb": None if p is None else p.eps_lb,
                     "parametric_noise_multiplier": None if p is None else p.noise_multiplier,
                     "parametric_not_computed": result.parametric_refusals.get(name),
                     "run_wall_s": wall, "run_cpu_s": cpu})
    return rows


def tables(runs: pd.DataFrame) -> dict[str, pd.DataFrame]:
    dp = runs[runs["epsilon"].notna()]
    refuted = []
    for (bug, eps), g in dp.groupby(["bug", "epsilon"], sort=False):
        refuted.append(_rate_row({"bug": DESCRIPTION[bug], "claimed_eps": eps}, g["canary_refuted"])
                       | {"median_eps_lb": g["canary_eps_lb"].median(), "blackbox_refuted": int(g["blackbox_refuted"].sum()),
                          "models": int(g["models"].iloc[0]), "canaries": int(g["canaries"].iloc[0]),
                          "n_in": int(g["n_in"].median()), "n_out": int(g["n_out"].median()),
                          "steps": int(g["steps"].iloc[0])}
                       | _parametric_columns(g))
    honest = runs[runs.bug == "honest"]
    gates = honest.groupby("seed")["gate_failed"].first()
    above = honest[honest.epsilon.notna() & (honest.canary_eps_lb > honest.epsilon)]
    validity = pd.DataFrame([_rate_row({"runs": "honest trainer, whole gate (all variants and audits)"}, gates)
                             | {"eps_lb_above_claim": int(len(above))}])
    per_run = runs.groupby(["bug", "seed"]).first().reset_index()
    cost = per_run.groupby("bug", sort=False).agg(
        runs=("seed", "size"), models_per_variant=("models", "first"), canaries_per_model=("canaries", "first"),
        median_run_wall_s=("run_wall_s", "median"), median_run_cpu_s=("run_cpu_s", "median"),
        total_cpu_s=("run_cpu_s", "sum")).reset_index()
    return {"refuted": pd.DataFrame(refuted), "validity": validity, "cost": cost}


def _parametric_columns(g: pd.DataFrame) -> dict:
    """The parametric bound's refutations (with their exact interval) and median bound, where computed."""
    if "parametric_refuted" not in g or g["parametric_refuted"].isna().all():
        return {"parametric_refuted": None}
    done = g["parametric_refuted"].dropna().astype(bool)
    row = _rate_row({}, done)
    return {"parametric_refuted": row["refuted"], "parametric_rate_lo": row["rate_lo"],
            "parametric_rate_hi": row["rate_hi"],
            "median_parametric_eps_lb": pd.to_numeric(g["parametric_eps_lb"], errors="coerce").median()}


def write(runs: pd.DataFrame, out: Path, header: str = "", name: str = "trainer_audit_power") -> str:
    text = header
    for title, frame in tables(runs).items():
        text += f"### {title}\n\n{markdown(frame)}\n"
    atomic_write_bytes(out / f"{name}.csv", runs.to_csv(index=False).encode())
    atomic_write_bytes(out / f"{name}.md", text.encode())
    return text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=20)
    p.add_argument("--first-seed", type=int, default=0)
    p.add_argument("--bugs", default=",".join(BUG_RUNS), help="comma-separated bugs to run")
    p.add_argument("--models", type=int, default=300, help="models per variant (<= 1000)")
    p.add_argument("--canaries", type=int, default=1000, help="gradient canaries per model")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--out", default="results")
    p.add_argument("--name", default="trainer_audit_power", help="the output files' stem in --out")
    p.add_argument("--merge", nargs="+", metavar="CSV",
                   help="no training: write the tables of these runs' CSVs together (seeds split over processes)")
    args = p.parse_args(argv)
    if args.merge:
        runs = pd.concat([pd.read_csv(path) for path in args.merge], ignore_index=True)
        if runs.duplicated(["bug", "seed", "variant"]).any():
            p.error("the CSVs overlap: a (bug, seed, variant) appears twice")
        print(write(runs, Path(args.out), f"Merged from {', '.join(args.merge)}.\n\n", args.name))
        return 0
    bugs = [b for b in args.bugs.split(",") if b]
    unknown = set(bugs) - set(BUG_RUNS)
    if unknown:
        p.error(f"unknown bug(s) {', '.join(sorted(unknown))}; choose from {', '.join(BUG_RUNS)}")
    common = common_overrides(args.models, args.canaries, args.epochs)
    out = Path(args.out)
    rows = []
    t0, c0 = time.perf_counter(), time.process_time()
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.first_seed, args.first_seed + args.seeds):   # seed-major: partial results cover every bug
            for bug in bugs:
                rows += run_once(Path(tmp), bug, seed, common)
                write(pd.DataFrame(rows), out, name=args.name)
            print(f"seed {seed} done ({time.perf_counter() - t0:.0f} s wall, {time.process_time() - c0:.0f} s CPU)",
                  flush=True)
    header = (f"`python -m dpmem.bench.tools.trainer_audit_power --seeds {args.seeds} --models {args.models} "
              f"--canaries {args.canaries} --epochs {args.epochs} --bugs {','.join(bugs)}`: "
              f"{time.perf_counter() - t0:.0f} s wall, "
              f"{time.process_time() - c0:.0f} s CPU in all.\n\n")
    print(write(pd.DataFrame(rows), out, header, args.name))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Reliability campaign: kill -9 a `dpmem run` at random moments, resume it, compare with an
uninterrupted run; and start two `dpmem run`s on one directory at once.

    python -m dpmem.bench.tools.reliability [--trials 20] [--writers 3] [--out results] [--seed 0]

Kill moments: uniform over the reference run's wall time, and moments picked by watching the
directory (while config.json is being created, while a variant's units are concatenated, while
the reports are written). A trial may be killed twice before its final resume (the second kill at
a random moment); a run that finishes before its kill is started again on a fresh directory with
an earlier kill, so every trial is killed at least once. A trial
is "identical" when the masks, every variant's arrays and memorization.csv equal the reference's
byte for byte; "different" when they do not; "failed" when the resumed run does not finish (exit
code other than 0). Writes reliability.csv (one row per trial) and reliability.md under --out.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from dpmem.bench.report.tables import markdown
from dpmem.bench.store.files import atomic_write_bytes
from dpmem.bench.store.run_store import RunStore

CONFIG = ["dataset=digits", "models=96", "unit_size=8", "epochs=2", "epsilons=4", "hidden=32"]
MODES = ("random", "random", "random", "creation", "concatenation", "reports")


def command(out: Path) -> list[str]:
    return [sys.executable, "-m", "dpmem.bench.cli", "run", "--out", str(out), "--quiet", *CONFIG]


def environment() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def start(out: Path) -> subprocess.Popen:
    return subprocess.Popen(command(out), env=environment(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)


def _watched(out: Path, mode: str) -> bool:
    """Whether the run in ``out`` is at the moment ``mode`` names."""
    if mode == "creation":       # the directory exists, config.json may not yet
        return out.is_dir()
    if mode == "concatenation":
        vdirs = out / "variants"
        # the temporaries of the concatenated arrays (.train_correct.npy.XXXX.tmp, ...)
        return vdirs.is_dir() and any(p.name.startswith((".train_", ".test_")) and ".tmp" in p.name
                                      for v in vdirs.iterdir() for p in v.iterdir())
    if mode == "reports":        # a report file's temporary exists
        names = [p.name for p in out.iterdir()] + ([p.name for p in (out / "figures").iterdir()]
                                                    if (out / "figures").is_dir() else [])
        return any(n.startswith(".") and ".tmp" in n and not n.startswith((".config", ".masks", ".arrays"))
                   for n in names)
    raise ValueError(mode)


def run_until(out: Path, mode: str, at: float, limit: float) -> tuple[str, float]:
    """Run once and kill -9 at ``at`` seconds (mode "random") or when the watched moment comes."""
    proc = start(out)
    t0 = time.perf_counter()
    while proc.poll() is None:
        elapsed = time.perf_counter() - t0
        try:
            due = elapsed >= at if mode == "random" else _watched(out, mode)
        except OSError:          # a directory renamed or removed while looking
            due = False
        if due or elapsed > limit:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return "killed", elapsed
        time.sleep(0.002)
    assert proc.stderr is not None
    proc.stderr.read()
    return ("finished" if proc.returncode == 0 else f"exit {proc.returncode}"), time.perf_counter() - t0


def same_as(out: Path, ref: Path) -> bool:
    a, b = RunStore.open(out), RunStore.open(ref)
    if not np.array_equal(a.masks(), b.masks()):
        return False
    for name, _ in b.config().variants:
        xa, xb = a.variant_arrays(name), b.variant_arrays(name)
        if sorted(xa) != sorted(xb) or any(not np.array_equal(xa[k], xb[k]) for k in xb):
            return False
    return (out / "memorization.csv").read_bytes() == (ref / "memorization.csv").read_bytes()


def outcome(out: Path, ref: Path) -> str:
    proc = subprocess.run(command(out), env=environment(), capture_output=True, text=True)
    if proc.returncode != 0:
        return "failed"
    try:
        return "identical" if same_as(out, ref) else "different"
    except Exception:  # noqa: BLE001 - an unreadable result counts as a failure of the store
        return "failed"


def kill_trials(ref: Path, work: Path, trials: int, ref_seconds: float, rng: np.random.Generator) -> list[dict]:
    rows = []
    for t in range(trials):
        out = work / f"trial{t:02d}"
        mode = MODES[t % len(MODES)]
        kills, moments = 0, []
        at = float(rng.uniform(0.5, ref_seconds))
        for _attempt in range(4):                               # the first kill: retried until it lands
            status, when = run_until(out, mode, at, limit=3 * ref_seconds)
            if status == "killed":
                kills, moments = 1, [round(when, 2)]
                break
            shutil.rmtree(out, ignore_errors=True)
            at /= 2
        if kills and rng.random() < 0.4:                       # some trials are killed a second time
            status, when = run_until(out, "random", float(rng.uniform(0.5, ref_seconds)), limit=3 * ref_seconds)
            if status == "killed":
                kills += 1
                moments.append(round(when, 2))
        rows.append({"trial": t, "mode": mode, "kills": kills, "kill_seconds": moments, "result": outcome(out, ref)})
        print(f"trial {t:2d} {mode:>13}: {kills} kill(s) at {moments} s -> {rows[-1]['result']}", flush=True)
        shutil.rmtree(out, ignore_errors=True)
    return rows


def writer_trials(ref: Path, work: Path, trials: int) -> list[dict]:
    """Two `dpmem run`s on one new directory at once: one trains, the other waits and then refuses
    (or, if the first is done by then, finds the run finished); the directory must end identical."""
    rows = []
    for t in range(trials):
        out = work / f"writers{t:02d}"
        procs = [start(out), start(out)]
        codes, errors = [], []
        for p in procs:
            _, err = p.communicate()
            codes.append(p.returncode)
            errors.append(err.strip().splitlines()[-1] if err.strip() else "")
        refused = sum("another dpmem process" in e for e in errors)
        try:
            result = "identical" if same_as(out, ref) else "different"
        except Exception:  # noqa: BLE001
            result = outcome(out, ref)       # neither finished: a resume must still give the reference
        rows.append({"trial": t, "mode": "two writers", "kills": 0, "kill_seconds": [],
                     "exit_codes": codes, "refused": refused, "result": result})
        print(f"writers {t}: exit codes {codes}, {refused} refused -> {result}", flush=True)
        shutil.rmtree(out, ignore_errors=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--writers", type=int, default=3, help="trials with two concurrent writers")
    ap.add_argument("--out", default="results")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    with tempfile.TemporaryDirectory(prefix="dpmem-reliability-") as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        ref = work / "reference"
        if subprocess.run(command(ref), env=environment(), capture_output=True).returncode != 0:
            print("the reference run failed", file=sys.stderr)
            return 1
        ref_seconds = time.perf_counter() - t0
        print(f"reference run: {ref_seconds:.1f} s", flush=True)
        rows = kill_trials(ref, work, args.trials, ref_seconds, rng) + writer_trials(ref, work, args.writers)
    table = pd.DataFrame(rows)
    out = Path(args.out)
    atomic_write_bytes(out / "reliability.csv", table.to_csv(index=False).encode())
    summary = (table.assign(campaign=np.where(table["mode"] == "two writers", "two writers", "kill -9 and resume"))
               .groupby("campaign", sort=False)
               .agg(trials=("trial", "size"), kills=("kills", "sum"),
                    identical=("result", lambda r: int((r == "identical").sum())),
                    different=("result", lambda r: int((r == "different").sum())),
                    failed=("result", lambda r: int((r == "failed").sum())))
               .reset_index())
    by_mode = (table.groupby("mode", sort=False)
               .agg(trials=("trial", "size"), kills=("kills", "sum"),
                    identical=("result", lambda r: int((r == "identical").sum())))
               .reset_index())
    text = (f"Reliability campaign ({' '.join(CONFIG)}; reference run {ref_seconds:.1f} s)\n\n"
            + markdown(summary) + "\nBy kill moment:\n\n" + markdown(by_mode))
    atomic_write_bytes(out / "reliability.md", text.encode())
    print(text)
    return 0 if (summary["different"].sum() + summary["failed"].sum()) == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

"""Validity of the canary audits where the truth is known: 400 repetitions of each full audit.

`python -m dpmem.bench.tools.audit_validity --reps 400` simulates DP-SGD canary scores (T steps, Poisson
sample rate, noise multiplier sigma, sensitivity 1; each canary in with probability 1/2), whose
true epsilon is the exact one (dp_accounting's PLD, the top of its bracket), and randomised
response (exactly eps-DP), and runs each audit exactly as `dpmem check` does: the one-run audit
(Bonferroni over its fixed grid of guess counts; the f-DP bound at sample rate 1 only), the
threshold test (threshold chosen on 5% of the models) and the parametric bound. It counts how
often each bound exceeds the true epsilon; every rate must be at most the level. Writes
results/audit_validity.{csv,md}. The CI tests (tests/test_one_run.py, tests/test_parametric.py,
tests/test_canary_audit.py) run the same repetitions at fixed thresholds or vectorised, in seconds.
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import special

from dpmem.bench.report.tables import markdown
from dpmem.bench.store.files import atomic_write_bytes
from dpmem.bench.tools.audit_power import exact_ci
from dpmem.bench.tools.parametric_validity import critical_noise
from dpmem.privacy import accounting
from dpmem.privacy.canary_audit import canary_audit
from dpmem.privacy.one_run import one_run_audit
from dpmem.privacy.parametric import noise_and_sensitivity, response

T, DELTA = 10, 1e-5
# noise multipliers whose true epsilon is about 4 at each sample rate
SIGMAS = {1.0: 3.43, 0.25: 1.2}


def dp_sgd_scores(rng, shape, sample_rate: float) -> tuple[np.ndarray, np.ndarray]:
    """Canary scores in units of C (lr 1, no momentum): sum of clipped gradients and noise."""
    members = rng.random(shape) < 0.5
    signal = rng.binomial(T, sample_rate, size=shape) * members
    return signal + SIGMAS[sample_rate] * math.sqrt(T) * rng.normal(size=shape), members


def run(reps: int, alpha: float, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for rate in (1.0, 0.25):
        sigma = SIGMAS[rate]
        truth = accounting.epsilon_pld(noise_multiplier=sigma, sample_rate=rate, steps=T, delta=DELTA)
        t0 = time.perf_counter()
        for rep in range(reps):
            scores, members = dp_sgd_scores(rng, (1, 1000), rate)
            o = one_run_audit(variant="v", scores=scores, masks=members, epsilon=truth, delta=DELTA, alpha=alpha,
                              sample_rate=rate)
            rows.append({"mechanism": f"DP-SGD canaries, sample rate {rate:g}", "bound": "one-run (1 x 1,000 canaries)",
                         "true_eps": truth, "rep": rep, "eps_lb": o.eps_lb})
            scores, members = dp_sgd_scores(rng, (20, 250), rate)
            c = canary_audit(variant="v", scores=scores, masks=members, epsilon=truth, delta=DELTA, alpha=alpha)
            rows.append({"mechanism": f"DP-SGD canaries, sample rate {rate:g}", "bound": "threshold test (20 x 250)",
                         "true_eps": truth, "rep": rep, "eps_lb": c.eps_lb})
        print(f"sample rate {rate:g}: {time.perf_counter() - t0:.0f} s", flush=True)
        # the parametric bound: eps_lb > truth exactly when sigma_hi / s_lo is below the noise multiplier
        # at which the epsilon lower bound equals the truth (it falls with the noise multiplier), so all
        # repetitions are one vectorised call
        H = response(steps=T, lr=1.0)
        u_in = rng.binomial(T, rate, size=(reps, 2500)) + sigma * math.sqrt(T) * rng.normal(size=(reps, 2500))
        u_out = sigma * math.sqrt(T) * rng.normal(size=(reps, 2500))
        _, sig_hi, _, s_lo = noise_and_sensitivity(u_in, u_out, H=H, sample_rate=rate, level=alpha)
        ratio = np.where(s_lo > 0, sig_hi / np.where(s_lo > 0, s_lo, 1.0), np.inf)
        def lower(s: float, rate: float = rate) -> float:
            return accounting.epsilon_lower_bound(noise_multiplier=s, sample_rate=rate, steps=T, delta=DELTA)

        critical = critical_noise(lower, truth)
        # its median bound: the lower bound at the median ratio (epsilon is monotone in it)
        median_lb = lower(float(np.median(ratio)))
        for rep, r in enumerate(ratio):
            rows.append({"mechanism": f"DP-SGD canaries, sample rate {rate:g}", "bound": "parametric (2,500 in + 2,500 out)",
                         "true_eps": truth, "rep": rep, "eps_lb": median_lb, "exceeds": bool(r < critical)})
    eps_rr = 1.0
    for rep in range(reps):   # randomised response on the membership bit: exactly eps-DP, delta 0
        members = rng.random((20, 250)) < 0.5
        truthful = rng.random(members.shape) < special.expit(eps_rr)
        scores = np.where(truthful, members, ~members).astype(float)
        c = canary_audit(variant="v", scores=scores, masks=members, epsilon=eps_rr, delta=0.0, alpha=alpha)
        rows.append({"mechanism": "randomised response, eps 1", "bound": "threshold test (20 x 250)",
                     "true_eps": eps_rr, "rep": rep, "eps_lb": c.eps_lb})
    frame = pd.DataFrame(rows)
    lb = pd.to_numeric(frame["eps_lb"], errors="coerce")
    computed = lb > frame["true_eps"]
    frame["exceeds"] = frame["exceeds"].where(frame["exceeds"].notna(), computed) if "exceeds" in frame else computed
    return frame


def table(frame: pd.DataFrame, alpha: float) -> pd.DataFrame:
    rows = []
    for (mech, bound), g in frame.groupby(["mechanism", "bound"], sort=False):
        k, n = int(g.exceeds.astype(bool).sum()), len(g)
        lo, hi = exact_ci(k, n)
        lb = pd.to_numeric(g.eps_lb, errors="coerce")
        rows.append({"mechanism": mech, "bound": bound, "true_eps": float(g.true_eps.iloc[0]), "alpha": alpha,
                     "repetitions": n, "exceeded": k, "rate": k / n, "rate_lo": lo, "rate_hi": hi,
                     "median_eps_lb": float(lb.fillna(0.0).median()) if lb.notna().any() else None})
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=400)
    p.add_argument("--alpha", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="results")
    args = p.parse_args(argv)
    frame = run(args.reps, args.alpha, args.seed)
    out = Path(args.out)
    text = f"### validity ({args.reps} repetitions per row, alpha {args.alpha:g})\n\n{markdown(table(frame, args.alpha))}\n"
    atomic_write_bytes(out / "audit_validity.csv", frame.to_csv(index=False).encode())
    atomic_write_bytes(out / "audit_validity.md", text.encode())
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

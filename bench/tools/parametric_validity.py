"""Does the parametric bound lower-bound the TRUE epsilon? Honest claims at the exact epsilon, repeated.

`python -m dpmem.bench.tools.parametric_validity --reps 1000` simulates the canary scores of honest
DP-SGD (the mechanism of privacy/parametric.py: T steps at lr 0.5 without momentum, Poisson
sample rate q, noise multiplier sigma, sensitivity 1, each canary in with probability 1/2) and
audits the claim "epsilon = the exact epsilon of this mechanism" (dp_accounting's PLD, the upper
end of its bracket, so the claim is true) with the parametric bound at level 0.05. The noise
multiplier is calibrated to epsilon 4 by RDP (which over-states epsilon, so the exact epsilon is
lower) and by PRV. Two sizes: one model x 10,000 canaries, and 1,000 models x 1,000 canaries.

Each row counts the repetitions whose eps_lb exceeds the claim, with an exact (Clopper-Pearson)
95% interval, for two ways of turning the measured noise into epsilon:
- ``lower bound`` (the audit's): ``accounting.epsilon_lower_bound``;
- ``the run's accountant`` (what the bound did before): the accountant that calibrated sigma.
The misspecification row keeps the claim but draws the scores' noise from a Student-t with 5
degrees of freedom scaled to the same variance (the assumption broken).

The simulation is exact, not an approximation: the out-scores enter only through their sum of
squares, drawn as sigma^2 S2 chi-square(n_out); an in-score is lr * Binomial(T, q) + its noise,
drawn per observation. eps_lb exceeds the claim exactly when sigma_hi / s_lo is below the noise
multiplier at which the epsilon map equals the claim (epsilon falls with the noise multiplier),
so each repetition compares one ratio with one precomputed threshold. Writes
results/parametric_validity.{csv,md}.
"""
from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import optimize, stats

from dpmem.bench.report.tables import markdown
from dpmem.bench.store.files import atomic_write_bytes
from dpmem.bench.tools.audit_power import exact_ci
from dpmem.privacy import accounting

T, LR, DELTA, TARGET, LEVEL = 10, 0.5, 1e-5, 4.0, 0.05
SIZES = {"1 model x 10,000 canaries": (1, 10_000), "1,000 models x 1,000 canaries": (1000, 1000)}


def critical_noise(epsilon_of, claim: float) -> float:
    """The noise multiplier at which ``epsilon_of`` equals ``claim`` (it falls with the noise)."""
    return math.exp(optimize.brentq(lambda log_s: epsilon_of(math.exp(log_s)) - claim, math.log(0.2),
                                    math.log(50.0), xtol=1e-9))


def ratios(rng: np.random.Generator, *, reps: int, n: int, sigma: float, q: float, noise: str) -> np.ndarray:
    """sigma_hi / s_lo of ``reps`` parametric audits of n (model, canary) observations each."""
    H = np.full(T, LR)
    S1, S2 = float(H.sum()), float(np.square(H).sum())
    out = np.empty(reps)
    for r in range(reps):
        n_in = rng.binomial(n, 0.5)
        n_out = n - n_in
        if noise == "gaussian":
            ss = sigma ** 2 * S2 * rng.chisquare(n_out)
            z = rng.standard_normal(n_in)
        else:    # Student-t(5) scaled to unit variance, on the out-scores and the in-scores alike
            ss = sigma ** 2 * S2 * np.sum(np.square(rng.standard_t(5, n_out) * math.sqrt(3 / 5)))
            z = rng.standard_t(5, n_in) * math.sqrt(3 / 5)
        u_in = LR * rng.binomial(T, q, n_in) + sigma * math.sqrt(S2) * z
        sigma_hi = math.sqrt(ss / (S2 * stats.chi2.ppf(LEVEL / 2, n_out)))
        se = u_in.std(ddof=1) / math.sqrt(n_in)
        s_lo = (u_in.mean() - stats.t.ppf(1 - LEVEL / 2, n_in - 1) * se) / (q * S1)
        out[r] = sigma_hi / s_lo if s_lo > 0 else math.inf
    return out


def run(reps: int, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    rng = np.random.default_rng(seed)
    rows, settings = [], []
    for q in (1.0, 0.25):
        for calibrated_by in ("rdp", "prv"):
            sigma = accounting.calibrate_noise(target_epsilon=TARGET, delta=DELTA, sample_rate=q, steps=T,
                                               accountant=calibrated_by)
            claim = accounting.epsilon_pld(noise_multiplier=sigma, sample_rate=q, steps=T, delta=DELTA)
            def lower(s: float, q: float = q) -> float:
                return accounting.epsilon_lower_bound(noise_multiplier=s, sample_rate=q, steps=T, delta=DELTA)

            def accountant(s: float, q: float = q, a: str = calibrated_by) -> float:
                return accounting.epsilon_of(noise_multiplier=s, sample_rate=q, steps=T, delta=DELTA, accountant=a)

            maps: dict[str, Callable[[float], float]] = {"lower bound": lower, "the run's accountant": accountant}
            critical = {name: critical_noise(fn, claim) for name, fn in maps.items()}
            settings.append({"sample_rate": q, "calibrated_by": calibrated_by, "sigma": sigma, "claim_exact_eps": claim,
                             "accountant_eps": accounting.epsilon_of(noise_multiplier=sigma, sample_rate=q, steps=T,
                                                                     delta=DELTA, accountant=calibrated_by),
                             **{f"critical_sigma ({k})": v for k, v in critical.items()}})
            for size, (models, canaries) in SIZES.items():
                for noise in ("gaussian", "student-t(5)") if calibrated_by == "prv" else ("gaussian",):
                    t0 = time.perf_counter()
                    ratio = ratios(rng, reps=reps, n=models * canaries, sigma=sigma, q=q, noise=noise)
                    for name, crit in critical.items():
                        if noise != "gaussian" and name != "lower bound":
                            continue
                        k = int(np.sum(ratio < crit))
                        lo, hi = exact_ci(k, reps)
                        rows.append({"sample_rate": q, "calibrated_by": calibrated_by, "size": size, "noise": noise,
                                     "epsilon_from": name, "claim": claim, "level": LEVEL, "repetitions": reps,
                                     "exceeded": k, "rate": k / reps, "rate_lo": lo, "rate_hi": hi,
                                     "median_eps_lb": maps[name](float(np.median(ratio)))})
                    print(f"q {q:g}, {calibrated_by}, {size}, {noise}: {time.perf_counter() - t0:.0f} s", flush=True)
    return pd.DataFrame(rows), pd.DataFrame(settings)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="results")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    frame, settings = run(args.reps, args.seed)
    text = (f"`python -m dpmem.bench.tools.parametric_validity --reps {args.reps} --seed {args.seed}` "
            f"({time.perf_counter() - t0:.0f} s). Honest DP-SGD canaries, T = {T} steps, lr {LR}, delta {DELTA:g}; "
            f"each claim is the mechanism's exact epsilon (dp_accounting PLD); level {LEVEL}.\n\n"
            f"### the mechanisms\n\n{markdown(settings)}\n### eps_lb above the exact epsilon\n\n{markdown(frame)}\n")
    out = Path(args.out)
    atomic_write_bytes(out / "parametric_validity.csv", frame.to_csv(index=False).encode())
    atomic_write_bytes(out / "parametric_validity.md", text.encode())
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Studies built on a run: exact leave-one-out, sweeps, marginal utility, Feldman's theorem, run agreement."""

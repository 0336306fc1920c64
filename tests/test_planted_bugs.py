"""The audit must catch broken DP-SGD and must not cry wolf on correct DP-SGD.

The configuration is bench.planted.PLANTED_BASE: a small synthetic problem with mislabeled canaries,
512 models per variant, claimed (1, 1e-4)-DP. Each planted bug is a real implementation mistake: no noise,
no clipping, and a sample rate reported to the accountant 10x lower than the one used.
"""
import numpy as np
import pytest

from dpmem.bench import cli
from dpmem.bench.tools.planted import audit_once


def _audit(tmp_path, fault: str, seed: int):
    store, audit, _ = audit_once(tmp_path, fault, seed)
    return store, audit


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["no_noise", "no_clipping", "wrong_sample_rate"])
def test_planted_bug_is_flagged_on_every_seed(fault, tmp_path):
    for seed in range(3):
        store, audit = _audit(tmp_path, fault, seed)
        assert audit.violations > 0, (fault, seed)
        assert audit.eps_lb > 1.0 and not audit.consistent
    assert cli.main(["check", str(store.root)]) == 1          # and the CI gate fails


@pytest.mark.slow
def test_correct_dp_sgd_is_not_flagged(tmp_path):
    flagged = []
    lbs = []
    for seed in range(8):
        store, audit = _audit(tmp_path, "none", seed)
        flagged.append(not audit.consistent)
        lbs.append(audit.eps_lb if audit.eps_lb is not None else -np.inf)
        assert audit.power_eps > 1.0       # the run could have refuted eps = 1: silence means something
    # Under the null each run alarms with probability <= alpha = 0.05; two or more alarms in 8 runs
    # has probability < 0.06, so more than one is evidence of a broken audit (or broken DP-SGD).
    assert sum(flagged) <= 1
    assert max(lbs) < 1.0
    assert cli.main(["check", str(store.root)]) == 0

"""Auditing simulated outcomes against a claimed budget, and baseline regressions."""
import json
import math

import numpy as np
import pytest

from dpmem.privacy import bounds
from dpmem.privacy.audit import AuditResult, audit_variant, per_example_counts
from dpmem.privacy.baseline import compare_to_baseline, load_baseline, make_baseline, validate_baseline
from dpmem.privacy.errors import UsageError


def simulate(rng, K, p_in, p_out, q=0.7):
    """Bernoulli(q) masks and outcomes: correct w.p. p_in[i] when i is in, p_out[i] when out."""
    p_in, p_out = np.atleast_1d(p_in), np.atleast_1d(p_out)
    masks = rng.random((K, p_in.size)) < q
    correct = rng.random((K, p_in.size)) < np.where(masks, p_in, p_out)
    return masks, correct


def test_per_example_counts_match_a_loop():
    rng = np.random.default_rng(0)
    masks, correct = rng.random((30, 7)) < 0.6, rng.random((30, 7)) < 0.5
    c = per_example_counts(masks, correct)
    for i in range(7):
        assert c["n_in"][i] == masks[:, i].sum() and c["n_out"][i] == (~masks[:, i]).sum()
        assert c["k_in"][i] == correct[masks[:, i], i].sum()
        assert c["k_out"][i] == correct[~masks[:, i], i].sum()
    with pytest.raises(ValueError):
        per_example_counts(masks, correct[:, :3])
    with pytest.raises(ValueError):
        per_example_counts(masks.astype(int), correct)


def test_strong_memorization_refutes_eps1():
    rng = np.random.default_rng(1)
    masks, correct = simulate(rng, 1000, np.full(40, 0.99), np.full(40, 0.01))
    result, frame = audit_variant(variant="dp-eps1", masks=masks, correct=correct, epsilon=1.0,
                                  delta=1e-5, alpha=0.05, sampling="bernoulli")
    assert isinstance(result, AuditResult)
    assert result.adjacency == "add/remove" and result.epsilon_tested == 1.0 and result.delta_tested == 1e-5
    assert result.level == pytest.approx(0.05 / 80)
    assert result.violations == 40 and not result.consistent
    assert result.eps_lb > 1.0 and result.eps_lb <= result.power_eps
    assert result.eps_lb == frame["eps_lb"].max() and result.eps_lb_index == int(frame["eps_lb"].idxmax())
    assert list(frame.columns) == ["L_in", "U_out", "bound", "violation", "eps_lb"] and len(frame) == 40
    assert frame["violation"].all() and (frame["eps_lb"] > 1.0).all()
    c = per_example_counts(masks, correct)
    np.testing.assert_allclose(frame["bound"], bounds.dp_bound(c["k_out"] / c["n_out"], 1.0, 1e-5))
    np.testing.assert_allclose(frame["L_in"], bounds.cp_lower(c["k_in"], c["n_in"], result.level))
    # a generous claim above the run's power cannot be refuted
    generous, _ = audit_variant(variant="dp-eps1", masks=masks, correct=correct,
                                epsilon=result.power_eps + 0.01, delta=1e-5, alpha=0.05, sampling="bernoulli")
    assert generous.consistent and generous.eps_lb == pytest.approx(result.eps_lb)
    d = result.to_dict()
    assert d["violations"] == 40 and json.loads(json.dumps(d)) == d


def test_no_claim_still_reports_eps_lb_and_power():
    rng = np.random.default_rng(2)
    masks, correct = simulate(rng, 500, np.full(20, 0.95), np.full(20, 0.2))
    claimed, _ = audit_variant(variant="nonprivate", masks=masks, correct=correct, epsilon=1.0,
                               delta=1e-5, alpha=0.05, sampling="bernoulli")
    result, frame = audit_variant(variant="nonprivate", masks=masks, correct=correct, epsilon=None,
                                  delta=1e-5, alpha=0.05, sampling="bernoulli")
    assert result.epsilon_claimed is None and result.epsilon_tested is None
    assert result.violations == 0 and result.consistent
    assert result.eps_lb == pytest.approx(claimed.eps_lb) and result.power_eps == pytest.approx(claimed.power_eps)
    assert frame["bound"].isna().all() and not frame["violation"].any()
    assert "no claim" in result.summary_line()


def test_a_true_eps1_mechanism_at_its_boundary_rarely_alarms():
    # Each example sits exactly on the eps=1 boundary of one of the two inequalities:
    # p_in = e p_out + delta, or (1 - p_out) = e (1 - p_in) + delta.
    rng = np.random.default_rng(3)
    delta, alpha, reps = 1e-5, 0.2, 2000
    p_out_a = np.array([0.05, 0.1, 0.2, 0.3])
    p_in_b = np.array([0.95, 0.9, 0.8, 0.7])
    p_in = np.concatenate([math.e * p_out_a + delta, p_in_b])
    p_out = np.concatenate([p_out_a, 1 - (math.e * (1 - p_in_b) + delta)])
    alarms, lb_above = 0, 0
    for _ in range(reps):
        masks, correct = simulate(rng, 200, p_in, p_out)
        result, _ = audit_variant(variant="dp-eps1", masks=masks, correct=correct, epsilon=1.0,
                                  delta=delta, alpha=alpha, sampling="bernoulli")
        alarms += not result.consistent
        lb_above += result.eps_lb is not None and result.eps_lb > 1.0
    assert alarms == lb_above          # a violation is exactly eps_lb above the claim
    assert alarms / reps <= alpha + 3 * math.sqrt(alpha * (1 - alpha) / reps)


def test_single_boundary_example_alarm_rate_is_at_most_twice_the_level():
    # The per-example guarantee behind the Bonferroni split, checked with a sharper test:
    # one example, many repetitions, counts drawn directly.
    rng = np.random.default_rng(4)
    level, reps, n_in, n_out = 0.05, 200_000, 140, 60
    p_out = 0.2
    p_in = math.e * p_out
    k_in, k_out = rng.binomial(n_in, p_in, reps), rng.binomial(n_out, p_out, reps)
    rate = bounds.violations(k_in, n_in, k_out, n_out, epsilon=1.0, delta=0.0, level=level).mean()
    assert rate <= 2 * level + 3 * math.sqrt(2 * level / reps)
    assert rate > 0.001                 # the test is not vacuous
    # a mechanism that is really eps=2 gets caught most of the time against the eps=1 claim
    k_in2 = rng.binomial(n_in, min(1.0, math.exp(2.0) * 0.1), reps)
    k_out2 = rng.binomial(n_out, 0.1, reps)
    assert bounds.violations(k_in2, n_in, k_out2, n_out, epsilon=1.0, delta=0.0, level=level).mean() > 0.5


def test_fixed_sampling_doubles_the_tested_epsilon():
    rng = np.random.default_rng(5)
    # pair-level evidence of about eps 1.5: enough to refute 1 under add/remove, not 2 * 1
    masks, correct = simulate(rng, 3000, np.full(10, 0.6), np.full(10, 0.12))
    common = dict(masks=masks, correct=correct, epsilon=1.0, delta=1e-5, alpha=0.05)
    add_remove, frame_ar = audit_variant(variant="v", sampling="bernoulli", **common)
    replace, frame_r1 = audit_variant(variant="v", sampling="fixed", **common)
    balanced, _ = audit_variant(variant="v", sampling="balanced", **common)
    assert replace.adjacency == "replace-one" and balanced.adjacency == "add/remove"
    assert replace.epsilon_tested == 2.0
    assert replace.delta_tested == pytest.approx((1 + math.e) * 1e-5)
    assert not add_remove.consistent and replace.consistent
    assert 1.0 < add_remove.eps_lb < 2.0
    # per-individual figures: half the pair bound, up to the delta adjustment
    assert replace.eps_lb == pytest.approx(add_remove.eps_lb / 2, abs=1e-3)
    assert replace.eps_lb < add_remove.eps_lb / 2
    assert replace.power_eps == pytest.approx(add_remove.power_eps / 2, abs=1e-3)
    c = per_example_counts(masks, correct)
    p_out = c["k_out"] / c["n_out"]
    np.testing.assert_allclose(frame_r1["bound"], (math.exp(2.0) - 1) * p_out + (1 + math.e) * 1e-5)
    np.testing.assert_allclose(frame_ar["bound"], (math.e - 1) * p_out + 1e-5)
    with pytest.raises(ValueError, match="sampling"):
        audit_variant(variant="v", sampling="poisson", **common)


# -- baselines ---------------------------------------------------------------------------------

SUMMARY = {"variants": {
    "nonprivate": {"epsilon": None, "test_accuracy": 0.91, "eps_lb": 3.2, "violations": 0, "models": 100},
    "dp-eps1": {"epsilon": 1.0, "test_accuracy": 0.72, "eps_lb": 0.4, "violations": 0, "models": 100},
    "dp-eps4": {"epsilon": 4.0, "test_accuracy": 0.80, "eps_lb": None, "violations": 0, "models": 100},
}}


def _with(name, **changes):
    summary = json.loads(json.dumps(SUMMARY))
    summary["variants"][name].update(changes)
    return summary


def test_baseline_round_trip_passes_and_has_default_tolerances():
    baseline = make_baseline(SUMMARY)
    assert baseline["tolerances"] == {"test_accuracy": 0.02, "eps_lb": 0.5}
    assert baseline["variants"]["dp-eps4"] == {"test_accuracy": 0.80, "eps_lb": None}
    assert compare_to_baseline(SUMMARY, baseline) == []
    # changes inside the tolerances pass
    assert compare_to_baseline(_with("dp-eps1", test_accuracy=0.705, eps_lb=0.85), baseline) == []
    assert compare_to_baseline(_with("dp-eps4", eps_lb=0.45), baseline) == []   # null baseline counts as 0
    assert compare_to_baseline(_with("dp-eps1", test_accuracy=0.99, eps_lb=-2.0), baseline) == []


def test_baseline_catches_an_accuracy_drop_and_an_eps_lb_rise():
    baseline = make_baseline(SUMMARY, {"test_accuracy": 0.01})
    assert baseline["tolerances"] == {"test_accuracy": 0.01, "eps_lb": 0.5}
    failures = compare_to_baseline(_with("dp-eps1", test_accuracy=0.70), baseline)
    assert len(failures) == 1 and failures[0].startswith("dp-eps1: test accuracy 0.7000")
    failures = compare_to_baseline(_with("dp-eps1", eps_lb=1.2), baseline)
    assert len(failures) == 1 and failures[0].startswith("dp-eps1: eps_lb 1.200")
    failures = compare_to_baseline(_with("dp-eps4", eps_lb=0.6), baseline)
    assert len(failures) == 1 and "dp-eps4" in failures[0]
    del_one = json.loads(json.dumps(SUMMARY))
    del del_one["variants"]["nonprivate"]
    assert compare_to_baseline(del_one, baseline) == ["nonprivate: in the baseline but missing from the run"]
    # a variant the baseline does not know is not a failure
    extra = _with("dp-eps1")
    extra["variants"]["dp-eps16"] = {"test_accuracy": 0.1, "eps_lb": 9.0}
    assert compare_to_baseline(extra, baseline) == []


@pytest.mark.parametrize("content,message", [
    ("not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    ("{}", "'variants' must be a non-empty object"),
    ('{"variants": {"a": 0.5}}', "variant 'a' must be an object"),
    ('{"variants": {"a": {"eps_lb": 1.0}}}', "needs 'test_accuracy'"),
    ('{"variants": {"a": {"test_accuracy": 1.5, "eps_lb": 1.0}}}', "needs 'test_accuracy'"),
    ('{"variants": {"a": {"test_accuracy": 0.5}}}', "needs 'eps_lb'"),
    ('{"variants": {"a": {"test_accuracy": 0.5, "eps_lb": "high"}}}', "needs 'eps_lb'"),
    ('{"variants": {"a": {"test_accuracy": 0.5, "eps_lb": null}}, "tolerances": {"accuracy": 0.1}}',
     "unknown tolerance"),
    ('{"variants": {"a": {"test_accuracy": 0.5, "eps_lb": null}}, "tolerances": {"eps_lb": -1}}',
     "must be a number >= 0"),
    ('{"variants": {"a": {"test_accuracy": 0.5, "eps_lb": null}}, "extra": 1}', "unknown key"),
])
def test_bad_baseline_files_are_usage_errors(tmp_path, content, message):
    path = tmp_path / "baseline.json"
    path.write_text(content)
    with pytest.raises(UsageError, match=message) as info:
        load_baseline(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_baseline_file_round_trip(tmp_path):
    path = tmp_path / "baseline.json"
    path.write_text(json.dumps(make_baseline(SUMMARY)))
    assert compare_to_baseline(SUMMARY, load_baseline(path)) == []
    with pytest.raises(UsageError, match="not found"):
        load_baseline(tmp_path / "missing.json")
    with pytest.raises(UsageError):
        validate_baseline({"variants": {"a": {"test_accuracy": True, "eps_lb": None}}})

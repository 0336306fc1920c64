"""Honest uncertainty: false-discovery control of findings, crossed intervals, trend slopes, NaN accounting."""
import json

import numpy as np
import pandas as pd
import pytest

from dpmem.bench import config
from dpmem.bench.estimators import findings, subgroups
from dpmem.bench.report import analysis, tables
from dpmem.bench.run import pipeline
from dpmem.bench.store.run_store import RunStore


def test_permutation_fdr_threshold_on_hand_counts():
    obs = np.array([5.0, 4.0, 3.0, 2.0, 1.0])
    # two permutations; pooled null z: one above 3.5, four between 1.5 and 2.5
    null = np.array([3.6, 2.0, 2.0, 1.6, 1.6])
    # expected null count per permutation / observed count: tau = 4: 0 / 2; tau = 3: 0.5 / 3;
    # tau = 2: 1.5 / 4; tau = 1: 2.5 / 5
    assert findings.permutation_fdr_threshold(obs, null, 2, 0.1) == 4.0
    assert findings.permutation_fdr_threshold(obs, null, 2, 0.2) == 3.0
    assert findings.permutation_fdr_threshold(obs, np.array([9.0] * 4), 2, 0.1) == np.inf
    assert findings.permutation_fdr_threshold(np.array([]), null, 2, 0.1) == np.inf


def _noise(k=96, n=400, m=300, seed=0):
    """Masks and correctness arrays with no link between them."""
    rng = np.random.default_rng(seed)
    masks = rng.random((k, n)) < 0.7
    p_train = rng.uniform(0.3, 0.95, n)
    p_test = rng.uniform(0.3, 0.95, m)
    return masks, rng.random((k, n)) < p_train, rng.random((k, m)) < p_test, rng


def _control(masks, ctrain, ctest, **kw):
    return findings.controlled_findings(masks, ctrain, ctest, eligible=np.ones(masks.shape[1], bool),
                                          mem_threshold=0.25, infl_threshold=0.15, fdr=0.1, seed=0, **kw)


def test_pure_noise_gives_raw_findings_but_few_controlled_ones():
    masks, ctrain, ctest, _ = _noise(k=40, n=600)
    found = _control(masks, ctrain, ctest)
    # at K = 40 the thresholds are ~2 (mem) and ~1 (infl) null sds out: noise passes them often
    assert found.high_mem_examples_raw >= 10 and found.high_influence_pairs_raw >= 500
    assert found.expected_false_high_mem == pytest.approx(found.high_mem_examples_raw, rel=0.5)
    assert found.expected_false_pairs == pytest.approx(found.high_influence_pairs_raw, rel=0.5)
    assert found.high_mem_examples <= 2 and found.high_influence_pairs <= 0.02 * found.high_influence_pairs_raw
    assert found.models_needed_pairs > 40 and found.models_needed_high_mem > 40


def test_null_scored_on_a_share_of_many_candidates_keeps_its_scale(monkeypatch):
    masks, ctrain, ctest, _ = _noise(k=40, n=600)
    full = _control(masks, ctrain, ctest)
    # a capped list: the null's dropped pairs still count, so noise stays noise
    capped = _control(masks, ctrain, ctest, max_pairs=50)
    assert capped.high_influence_pairs_raw == full.high_influence_pairs_raw
    assert capped.expected_false_pairs == pytest.approx(full.expected_false_pairs)
    assert capped.high_influence_pairs <= 5
    monkeypatch.setattr(findings, "NULL_ROWS", 4)          # each permutation scores a share of the rows
    shared = _control(masks, ctrain, ctest)
    assert shared.high_influence_pairs_raw == full.high_influence_pairs_raw
    assert shared.expected_false_pairs == pytest.approx(full.expected_false_pairs, rel=0.25)
    assert shared.high_influence_pairs <= 0.02 * shared.high_influence_pairs_raw


def test_planted_dependence_is_found_among_noise():
    masks, ctrain, ctest, rng = _noise(seed=1)
    planted = np.arange(10)
    # memorized examples: right when trained on (95%), mostly wrong otherwise (30%)
    ctrain[:, planted] = np.where(masks[:, planted], rng.random((96, 10)) < 0.95, rng.random((96, 10)) < 0.3)
    # each planted example decides one test example the same way
    ctest[:, :10] = np.where(masks[:, planted], rng.random((96, 10)) < 0.95, rng.random((96, 10)) < 0.3)
    found = _control(masks, ctrain, ctest)
    kept = found.examples.loc[found.examples.passes_fdr, "index"]
    # at fdr = 0.1 about one false finding per ten true ones is the expected price
    assert set(planted) <= set(kept) and len(kept) <= 14
    pairs = found.pairs.loc[found.pairs.passes_fdr]
    assert {(i, i) for i in planted} <= set(zip(pairs.train_index, pairs.test_index))
    assert len(pairs) <= 14
    assert found.high_influence_pairs_raw > 100       # the planted rows also pass the raw threshold by noise


def test_crossed_interval_covers_a_known_paired_loss():
    """Models and test examples both random; the interval must count both (>= 90% at level 95%)."""
    rng = np.random.default_rng(2)
    sizes = np.array([2, 3, 5, 10, 30] * 6)                     # 30 subgroups of varied test counts
    groups = np.repeat(np.arange(len(sizes)), sizes)
    k, true_loss, hits, hits_models_only = 40, 0.2, 0, 0
    for _ in range(100):
        a = rng.uniform(0.5, 0.9, len(groups))                     # each test example's non-private accuracy
        d = rng.uniform(0.0, 0.4, len(groups))                     # its loss under DP (mean 0.2)
        u = rng.uniform(-0.05, 0.05, (k, 1))                       # model effects, shared by the pair
        v = rng.uniform(-0.05, 0.05, (k, 1))
        coin = rng.random((k, len(groups)))                        # same coins: paired models
        c_np = coin < a + u
        c_dp = coin < a - d + u + v
        mean, lo, hi = subgroups.crossed_mean_ci(c_np.astype(np.float32) - c_dp, groups, len(sizes),
                                                 value_range=(-1.0, 1.0))
        hits += np.sum((lo <= true_loss) & (true_loss <= hi))
        # the old interval, over models only, ignores which test examples a subgroup got
        per_model = subgroups.per_model_group_mean(c_np.astype(np.float32) - c_dp, groups, len(sizes))
        half = 2.02 * per_model.std(0, ddof=1) / np.sqrt(k)
        hits_models_only += np.sum(np.abs(per_model.mean(0) - true_loss) <= half)
    coverage = hits / (100 * len(sizes))
    assert coverage >= 0.90
    assert hits_models_only / (100 * len(sizes)) < 0.8


def test_crossed_interval_with_one_test_example_is_wide_not_nan():
    c = np.ones((20, 3), np.float32)
    mean, lo, hi = subgroups.crossed_mean_ci(c, np.array([0, 1, 1]), 3, value_range=(0.0, 1.0))
    assert mean[0] == 1 and lo[0] < 0.5 and hi[0] == 1.0       # one test example shows little
    assert np.isnan(mean[2]) and np.isnan(lo[2])               # no test example: nothing to estimate


def test_crossed_interval_never_collapses_to_a_point():
    # every model right on every one of a subgroup's n test examples: the accuracy interval is
    # [0.025^(1/n), 1] (Clopper-Pearson on the examples), the paired loss interval symmetric about 0
    groups = np.repeat([0, 1], [5, 30])
    ones = np.ones((50, 35), np.float32)
    mean, lo, hi = subgroups.crossed_mean_ci(ones, groups, 2, value_range=(0.0, 1.0))
    np.testing.assert_allclose(lo, 0.025 ** (1 / np.array([5, 30])))
    assert (mean == 1).all() and (hi == 1).all()
    mean, lo, hi = subgroups.crossed_mean_ci(ones - ones, groups, 2, value_range=(-1.0, 1.0))
    np.testing.assert_allclose(hi, 1 - 0.025 ** (1 / np.array([5, 30])))
    np.testing.assert_allclose(lo, -hi)


def test_wls_trend_recovers_a_planted_slope_and_covers_it():
    rng = np.random.default_rng(3)
    counts = np.repeat([1, 2, 4, 8, 16, 32], 10)               # 60 subgroups
    x = np.log2(counts / counts.sum())
    true_slope = -0.04
    p_loss = 0.15 + true_slope * (x - x.mean())                 # rarer subgroups lose more (0.05 to 0.25)
    test_count = rng.integers(3, 12, len(counts))
    groups = np.repeat(np.arange(len(counts)), test_count)
    covered, excluded_zero = 0, 0
    for _ in range(40):
        k = 30
        a = rng.uniform(0.6, 0.95, len(groups))
        coin = rng.random((k, len(groups)))
        d = p_loss[groups] + rng.uniform(-0.05, 0.05, len(groups))   # test examples scatter about the line
        diff = (coin < a).astype(np.float32) - (coin < a - d)
        loss, _, _ = subgroups.crossed_mean_ci(diff, groups, len(counts), value_range=(-1.0, 1.0))
        per_model = subgroups.per_model_group_mean(diff, groups, len(counts))
        t = subgroups.wls_trend(loss, counts, test_count, per_model=per_model)
        covered += t.lo <= true_slope <= t.hi
        excluded_zero += t.hi < 0
        assert t.subgroups == 60 and t.se_models > 0 and t.se_subgroups > 0
    assert covered >= 0.85 * 40 and excluded_zero >= 0.9 * 40


def test_mean_memorization_skips_and_counts_examples_without_in_or_out(tmp_path):
    """K = 3 models: many examples have no in- or no out-model; they are counted, flagged, never averaged."""
    out = tmp_path / "tiny"
    cfg = config.load(overrides=["dataset=synthetic", "n_train=60", "n_test=80", "n_subgroups=8", "dim=8",
                                 "models=3", "epochs=1", "epsilons=4", "model=logreg"])
    store = RunStore.create_or_resume(out, cfg)
    pipeline.run(store, cfg, progress=False)
    tables.write_tables(analysis.analyse(store), out)
    summary = json.loads((out / "summary.json").read_text())
    mem = pd.read_csv(out / "memorization.csv")
    for name, v in summary["variants"].items():
        rows = mem.loc[mem.variant == name]
        missing = (rows.n_in == 0) | (rows.n_out == 0)
        assert missing.any()
        assert (rows.no_in_or_out == missing).all()
        assert v["examples_without_in_or_out"] == int(missing.sum())
        assert v["mean_mem_examples"] == int((~missing).sum())
        assert v["mean_mem"] == pytest.approx(rows.loc[~missing, "mem"].mean())
    sub = pd.read_csv(out / "subgroups.csv")
    mem_np = mem.loc[mem.variant == "nonprivate"]
    per_subgroup = mem_np.loc[~mem_np.no_in_or_out].groupby("subgroup")["mem"].agg(["mean", "size"])
    np_sub = sub.loc[sub.variant == "nonprivate"].set_index("subgroup")
    assert (np_sub.loc[per_subgroup.index, "mem_examples"] == per_subgroup["size"]).all()
    np.testing.assert_allclose(np_sub.loc[per_subgroup.index, "mean_mem"], per_subgroup["mean"])
    assert (out / "influence_pairs.csv").is_file()         # written even when no pair survives
    bins = pd.read_csv(out / "frequency_bins.csv")
    assert {"acc_loss_lo", "acc_loss_hi", "mem_examples"} <= set(bins.columns)
    assert bins.loc[bins.variant == "nonprivate", "mem_examples"].sum() == summary["variants"]["nonprivate"][
        "mean_mem_examples"]


def test_report_warns_when_most_raw_findings_are_noise():
    from dpmem.bench.report.tables import fdr_warnings
    base = {"models": 128, "high_mem_examples_raw": 24, "expected_false_high_mem": 9.6,
            "models_needed_high_mem": 700, "high_influence_pairs_raw": 2310, "expected_false_pairs": 2192.1,
            "models_needed_pairs": 1285}
    lines = fdr_warnings({"variants": {"nonprivate": base,
                                       "dp-eps4": {**base, "expected_false_pairs": 3.0}}})
    assert lines == ["warning: nonprivate: 2,192 of the 2,310 raw high-influence pairs are expected from noise "
                     "alone at K = 128 models; about 1,285 models per variant would make noise findings rare"]

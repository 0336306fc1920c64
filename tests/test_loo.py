import numpy as np
import pytest

from dpmem.bench.studies import loo


def test_choose_examples_takes_extremes_and_random():
    mem = np.linspace(0, 1, 50)
    chosen = loo.choose_examples(mem, count=9, seed=0)
    assert len(chosen) == 9 and len(set(chosen)) == 9
    assert {47, 48, 49} <= set(chosen) and {0, 1, 2} <= set(chosen)
    np.testing.assert_array_equal(chosen, loo.choose_examples(mem, count=9, seed=0))


def test_loo_masks_pair_each_model_with_its_partner_on_s():
    masks, streams = loo.loo_masks(5, np.array([1, 3]), repeats=2, first=4)
    assert masks.shape == (6, 5)
    assert masks[0].all() and not masks[1, 1] and masks[1].sum() == 4 and not masks[2, 3]
    assert streams.tolist() == [4, 4, 4, 5, 5, 5]


def test_paired_mem_and_interval():
    in_c = np.array([[1, 1], [1, 0], [1, 1], [1, 0]], bool)
    out_c = np.array([[0, 1], [0, 0], [0, 1], [0, 0]], bool)
    t = loo.paired_mem(in_c, out_c)
    assert t.mem_loo.tolist() == [1.0, 0.0]
    assert t.mem_loo_lo[0] == pytest.approx(1.0) and t.mem_loo_hi[0] == pytest.approx(1.0)  # no spread
    assert t.p_S.tolist() == [1.0, 0.5]


def test_error_row_statistics():
    rng = np.random.default_rng(0)
    truth = rng.random(40)
    est = truth + rng.normal(0, 0.1, 40)
    row = loo.error_row(est, truth)
    assert row["mae"] == pytest.approx(np.mean(np.abs(est - truth)))
    assert row["mae_lo"] <= row["mae"] <= row["mae_hi"]
    assert row["pearson"] > 0.8 and row["pearson_lo"] <= row["pearson"] <= row["pearson_hi"]
    assert row["p90_abs_err"] == pytest.approx(np.quantile(np.abs(est - truth), 0.9))

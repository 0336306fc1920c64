import numpy as np
import pandas as pd
import pytest

from dpmem.bench.estimators import subgroups


def test_frequency_bins_are_powers_of_two():
    assert subgroups.frequency_bin(np.array([0, 1, 2, 3, 4, 7, 8, 15, 16])).tolist() == \
        ["0", "1", "2-3", "2-3", "4-7", "4-7", "8-15", "8-15", "16-31"]
    assert subgroups.bin_order(["4-7", "1", "16-31", "2-3"]) == ["1", "2-3", "4-7", "16-31"]


def test_subgroup_accuracy_interval_and_paired_loss():
    # 3 models, test examples in subgroups [0, 0, 1]
    g_test = np.array([0, 0, 1])
    c_np = np.array([[1, 1, 1], [1, 0, 1], [1, 1, 1]], bool)
    c_dp = np.array([[1, 0, 0], [0, 0, 0], [1, 1, 0]], bool)
    kw = dict(g_test=g_test, subgroup_label=np.array([0, 1]), train_count=np.array([5, 1]),
              mem=np.array([0.0, 0.2, np.nan]), g_train=np.array([0, 0, 1]), is_canary=np.zeros(3, bool),
              reference_correct=c_np)
    t = pd.concat([subgroups.subgroup_table(variant="nonprivate", epsilon=None, correct_test=c_np,
                                            **{**kw, "reference_correct": None}),
                   subgroups.subgroup_table(variant="dp-eps1", epsilon=1.0, correct_test=c_dp, **kw)])
    np_row = t[(t.variant == "nonprivate") & (t.subgroup == 0)].iloc[0]
    assert np_row.test_acc == pytest.approx((1 + 0.5 + 1) / 3)
    assert np_row.test_acc_lo < np_row.test_acc < np_row.test_acc_hi
    assert np_row.acc_loss == 0 and np_row.acc_loss_lo == 0 and np_row.acc_loss_hi == 0
    dp0 = t[(t.variant == "dp-eps1") & (t.subgroup == 0)].iloc[0]
    assert dp0.acc_loss == pytest.approx(np_row.test_acc - dp0.test_acc)
    assert dp0.acc_loss_lo < dp0.acc_loss < dp0.acc_loss_hi
    dp1 = t[(t.variant == "dp-eps1") & (t.subgroup == 1)].iloc[0]
    assert dp1.acc_loss == pytest.approx(1.0)      # always right without DP, never with it
    assert dp1.acc_loss_hi == 1.0 and dp1.acc_loss_lo < 0.5   # but one test example shows little
    assert np.isnan(dp1.mean_mem) and dp1.mem_examples == 0   # its only member has no estimate
    assert np_row.mean_mem == pytest.approx(0.1) and np_row.mem_examples == 2


def test_pairing_makes_the_loss_interval_tighter_than_unpaired_accuracies():
    rng = np.random.default_rng(0)
    g_test = np.repeat(np.arange(4), 50)
    model_skill = rng.uniform(-0.3, 0.3, (200, 1))        # the same model index shares subset and seed
    coin = rng.random((200, 200))
    c_np = coin < 0.6 + model_skill
    c_dp = coin < 0.5 + model_skill
    kw = dict(g_test=g_test, train_count=np.array([1, 2, 4, 8]), mem=np.zeros(4), g_train=np.arange(4),
              is_canary=np.zeros(4, bool), reference_correct=c_np)
    t = subgroups.subgroup_table(variant="dp", epsilon=1.0, correct_test=c_dp, subgroup_label=np.arange(4), **kw)
    loss_width = (t.acc_loss_hi - t.acc_loss_lo).to_numpy()
    acc_width = (t.test_acc_hi - t.test_acc_lo).to_numpy()
    assert (loss_width < acc_width).all()
    assert ((t.acc_loss_lo < 0.1) & (0.1 < t.acc_loss_hi)).sum() >= 3


def test_bin_table_weights_test_examples_and_matches_subgroups():
    rng = np.random.default_rng(1)
    g_test = rng.integers(0, 6, 300)
    train_count = np.array([1, 1, 2, 3, 5, 9])
    c_np = rng.random((30, 300)) < 0.9
    c_dp = rng.random((30, 300)) < 0.7
    g_train = np.repeat(np.arange(6), train_count)
    kw = dict(epsilon=1.0, g_test=g_test, train_count=train_count, mem=rng.random(len(g_train)),
              g_train=g_train, is_canary=np.zeros(len(g_train), bool), reference_correct=c_np)
    bins = subgroups.bin_table(variant="dp", correct_test=c_dp, **kw)
    assert bins.freq_bin.tolist() == ["1", "2-3", "4-7", "8-15"]
    first = np.isin(g_test, [0, 1])
    assert bins.test_acc[0] == pytest.approx(c_dp[:, first].mean())
    assert bins.acc_loss[0] == pytest.approx(c_np[:, first].mean() - c_dp[:, first].mean())
    assert (bins.acc_loss_lo < bins.acc_loss).all() and (bins.acc_loss < bins.acc_loss_hi).all()
    assert bins.mem_examples.tolist() == [2, 5, 5, 9] and bins.test_examples.sum() == 300

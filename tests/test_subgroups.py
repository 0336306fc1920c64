import numpy as np
import pandas as pd
import pytest

from dpmem.bench import subgroups


def test_frequency_bins_are_powers_of_two():
    assert subgroups.frequency_bin(np.array([0, 1, 2, 3, 4, 7, 8, 15, 16])).tolist() == \
        ["0", "1", "2-3", "2-3", "4-7", "4-7", "8-15", "8-15", "16-31"]
    assert subgroups.bin_order(["4-7", "1", "16-31", "2-3"]) == ["1", "2-3", "4-7", "16-31"]


def test_subgroup_accuracy_interval_and_loss():
    # 3 models, test examples in subgroups [0, 0, 1]
    g_test = np.array([0, 0, 1])
    c_np = np.array([[1, 1, 1], [1, 0, 1], [1, 1, 1]], bool)
    c_dp = np.array([[1, 0, 0], [0, 0, 0], [1, 1, 0]], bool)
    kw = dict(g_test=g_test, subgroup_label=np.array([0, 1]), train_count=np.array([5, 1]),
              mem=np.array([0.0, 0.2, 0.9]), g_train=np.array([0, 0, 1]), is_canary=np.zeros(3, bool))
    t = pd.concat([subgroups.subgroup_table(variant="nonprivate", epsilon=None, correct_test=c_np, **kw),
                   subgroups.subgroup_table(variant="dp-eps1", epsilon=1.0, correct_test=c_dp, **kw)])
    t = subgroups.add_accuracy_loss(t)
    np_row = t[(t.variant == "nonprivate") & (t.subgroup == 0)].iloc[0]
    assert np_row.test_acc == pytest.approx((1 + 0.5 + 1) / 3)
    assert np_row.test_acc_lo < np_row.test_acc < np_row.test_acc_hi
    dp1 = t[(t.variant == "dp-eps1") & (t.subgroup == 1)].iloc[0]
    assert dp1.acc_loss == pytest.approx(1.0)      # always right without DP, never with it
    assert dp1.mean_mem == pytest.approx(0.9)
    assert np_row.mean_mem == pytest.approx(0.1)

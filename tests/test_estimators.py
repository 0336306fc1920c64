import numpy as np
import pytest

from dpmem.bench.estimators import findings, memorization


def test_memorization_on_a_hand_computed_example():
    # 5 models, 2 examples. Example 0 is in models 0,1,2 (correct in 0,1) and out of 3,4 (correct in 3).
    masks = np.array([[1, 0], [1, 1], [1, 0], [0, 1], [0, 0]], bool)
    correct = np.array([[1, 1], [1, 1], [0, 0], [1, 1], [0, 0]], bool)
    m = memorization.memorization(masks, correct)
    assert m.n_in.tolist() == [3, 2] and m.n_out.tolist() == [2, 3]
    np.testing.assert_allclose(m.p_in, [2 / 3, 1.0])
    np.testing.assert_allclose(m.p_out, [1 / 2, 1 / 3])
    np.testing.assert_allclose(m.mem, [2 / 3 - 1 / 2, 1 - 1 / 3])
    se0 = np.sqrt((2 / 3) * (1 / 3) / 3 + 0.25 / 2)
    assert m.se[0] == pytest.approx(se0)


def test_normalised_by_in_and_out_counts_not_by_k():
    # a biased mask: example in 9 of 10 models; always correct when in, never when out -> mem = 1
    masks = np.array([[True]] * 9 + [[False]])
    correct = masks.copy()
    m = memorization.memorization(masks, correct)
    assert m.mem[0] == pytest.approx(1.0)


def test_influence_matches_direct_loop_and_blocks():
    rng = np.random.default_rng(0)
    masks = rng.random((40, 13)) < 0.6
    ctest = rng.random((40, 7)) < 0.5
    infl = memorization.influence(masks, ctest)
    i, j = 4, 2
    direct = ctest[masks[:, i], j].mean() - ctest[~masks[:, i], j].mean()
    assert infl[i, j] == pytest.approx(direct)
    blocks = np.concatenate([b for _, b in memorization.influence_blocks(masks, ctest, block=3)])
    np.testing.assert_allclose(blocks, infl)


def test_high_influence_candidates_thresholds_cap_and_exact_count():
    # example 0 decides test example 1 perfectly; everything else is noise
    rng = np.random.default_rng(1)
    masks = rng.random((200, 6)) < 0.5
    ctest = rng.random((200, 4)) < 0.5
    ctest[:, 1] = masks[:, 0]
    ctrain = rng.random((200, 6)) < 0.5
    ctrain[:, 0] = masks[:, 0]
    rows, z = findings.high_mem_candidates(masks, ctrain, eligible=np.ones(6, bool), mem_threshold=0.25)
    assert rows.tolist() == [0] and z[0] > 10          # a perfect link is ~sqrt(K) null sds out
    found = findings.high_influence_candidates(masks, ctest, rows, infl_threshold=0.5)
    assert list(zip(found.pairs.train_index, found.pairs.test_index)) == [(0, 1)]
    assert found.pairs.infl[0] == pytest.approx(1.0) and found.count == 1 and found.tests == 4
    capped = findings.high_influence_candidates(masks, ctest, np.arange(6), infl_threshold=-1.0,
                                                  max_pairs=5, block=2)
    assert len(capped.pairs) == 5 and capped.pairs.z.is_monotonic_decreasing
    assert capped.count == 24                            # the count is exact though the list is capped
    infl = memorization.influence(masks, ctest)
    np.testing.assert_allclose(capped.pairs.infl, infl[capped.pairs.train_index, capped.pairs.test_index],
                               rtol=1e-5)
    best, arg = memorization.max_influence_per_test(masks, ctest, block=4)
    assert arg[1] == 0 and best[1] == pytest.approx(1.0)

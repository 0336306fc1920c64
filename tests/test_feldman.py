"""Feldman's discrete model (dataset = "feldman") and the Theorem 2.3 quantities: tau, opt, singletons."""
import json

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from dpmem.bench import cli
from dpmem.bench.config import Config
from dpmem.bench.data import load_dataset
from dpmem.bench.studies import feldman
from dpmem.privacy.errors import ConfigError


def test_tau_two_frequency_prior_by_hand():
    # pi*: mass 1/4 on a = 0.1, 3/4 on b = 0.01, n = 3:
    # tau = (0.25*0.01*0.81 + 0.75*1e-4*0.9801) / (0.25*0.1*0.81 + 0.75*0.01*0.9801)
    num = 0.25 * 0.1 ** 2 * 0.9 ** 2 + 0.75 * 0.01 ** 2 * 0.99 ** 2
    den = 0.25 * 0.1 * 0.9 ** 2 + 0.75 * 0.01 * 0.99 ** 2
    assert feldman.tau(np.array([0.1, 0.01]), 3, weights=np.array([0.25, 0.75])) == pytest.approx(num / den, rel=1e-12)
    # equal atoms listed per point: the same prior written as four points
    assert feldman.tau(np.array([0.1, 0.01, 0.01, 0.01]), 3) == pytest.approx(num / den, rel=1e-12)


def test_tau_uniform_prior_is_one_over_t_and_survives_large_n():
    assert feldman.tau(np.full(50, 1 / 50), 10_000) == pytest.approx(1 / 50, rel=1e-12)
    # a frequent point's (1-a)^(n-1) underflows in float64; the log-space sum keeps the rare atom's ratio
    assert feldman.tau(np.array([0.9, 1e-6]), 100_000) == pytest.approx(1e-6, rel=1e-9)


def test_optimal_error_is_unseen_mass_times_guessing_error():
    d = np.array([0.5, 0.3, 0.2])
    expected = 0.9 * (0.5 * 0.5 ** 4 + 0.3 * 0.7 ** 4 + 0.2 * 0.8 ** 4)
    assert feldman.optimal_error(d, 4, 10) == pytest.approx(expected, rel=1e-12)


def test_singletons_are_counted_within_each_models_subset():
    g = np.array([0, 0, 1, 2, 2, 3])          # point 0 twice, 1 once, 2 twice, 3 once in S
    masks = np.array([[1, 0, 1, 1, 1, 0],      # T_0: point 0 once (singleton), 1 once, 2 twice
                      [1, 1, 0, 0, 1, 1]], bool)  # T_1: point 0 twice, 2 once, 3 once
    correct = np.array([[0, 1, 1, 0, 0, 1],
                        [1, 0, 1, 1, 0, 1]], bool)
    single = feldman.singleton_mask(masks, g, 4)
    assert single.tolist() == [[1, 0, 1, 0, 0, 0], [0, 0, 0, 0, 1, 1]]
    n_single, unfit = feldman.unfitted_singletons(masks, correct, g, 4)
    assert n_single.tolist() == [2, 2]
    assert unfit.tolist() == [1, 1]           # model 0 misses example 0; model 1 misses example 4
    prob = np.array([0.4, 0.3, 0.2, 0.1])
    rows = feldman.variant_rows(variant="v", epsilon=None, masks=masks, train_correct=correct,
                                test_correct=np.ones((2, 3), bool), g_train=g, probability=prob, n_classes=10)
    assert rows["opt_given_T"].tolist() == pytest.approx([0.9 * 0.1, 0.9 * 0.3])   # T_0 lacks point 3, T_1 point 1
    assert rows["bound"].tolist() == pytest.approx((rows["opt"] + rows["tau"] * np.array([1, 1])).tolist())


def test_feldman_data_follow_the_prior_exactly():
    ds = load_dataset(Config(dataset="feldman", n_subgroups=20, zipf_a=1.0, n_train=500, n_test=40_000))
    prob = np.array(ds.info["point_probability"])
    ranks = np.array(ds.info["subgroup_rank"])
    assert sorted(ranks) == list(range(1, 21))
    assert np.allclose(prob, (1 / ranks) / np.sum(1 / np.arange(1, 21)))
    observed = np.bincount(ds.g_test, minlength=20)
    assert stats.chisquare(observed, prob * len(ds.g_test)).pvalue > 1e-3
    # a wrong prior (uniform) is rejected by the same test
    assert stats.chisquare(observed, np.full(20, len(ds.g_test) / 20)).pvalue < 1e-6
    # one point per subgroup, labels a function of the point, one-hot inputs, exact training counts
    assert ds.x_train.shape == (500, 20) and np.array_equal(ds.x_train.argmax(1), ds.g_train)
    assert (ds.y_train == ds.subgroup_label[ds.g_train]).all() and (ds.y_test == ds.subgroup_label[ds.g_test]).all()
    assert ds.info["point_train_count"] == np.bincount(ds.g_train, minlength=20).tolist()
    assert ds.info["singletons"] == int((np.bincount(ds.g_train, minlength=20) == 1).sum())


def test_feldman_uniform_prior_and_embedding_inputs():
    ds = load_dataset(Config(dataset="feldman", n_subgroups=30, feldman_prior="uniform",
                             feldman_inputs="embedding", dim=8, n_train=90, n_test=100))
    assert np.allclose(ds.info["point_probability"], 1 / 30)
    assert ds.input_shape == (8,)
    # each point has one fixed input vector
    for p in np.unique(ds.g_train):
        assert np.ptp(ds.x_train[ds.g_train == p], axis=0).max() == 0


@pytest.mark.parametrize("key,value", [("feldman_prior", "pareto"), ("feldman_inputs", "pixels"),
                                       ("label_noise", 0.1), ("canaries", 3)])
def test_feldman_bad_config_names_the_field(key, value):
    with pytest.raises(ConfigError, match=key):
        Config(dataset="feldman", **{key: value})


def test_feldman_command_end_to_end(tmp_path, capsys):
    run = tmp_path / "run"
    assert cli.main(["run", "--out", str(run), "--quiet", "dataset=feldman", "n_subgroups=40", "n_train=60",
                     "n_test=400", "models=12", "epochs=3", "epsilons=4", "hidden=16"]) == 0
    assert cli.main(["feldman", str(run)]) == 0
    out = run / "feldman"
    for name in ("feldman_bound.csv", "feldman_bound.parquet", "tables/feldman_bound.md", "tables/feldman_bound.tex",
                 "figures/feldman_bound.png", "figures/feldman_bound.pdf", "feldman_per_model.csv"):
        assert (out / name).is_file(), name
    facts = json.loads((out / "feldman.json").read_text())
    assert [v["variant"] for v in facts["variants"]] == ["nonprivate", "dp-eps4"]
    assert facts["variants"][0]["epsilon"] is None and facts["variants"][0]["explained"] is None
    for v in facts["variants"]:
        assert v["opt"] <= v["bound"] and 0 <= v["unfit_singletons"] <= v["singletons"]
    points = pd.read_csv(out / "feldman_points.csv")
    assert facts["tau_S"] == pytest.approx(feldman.tau(points["probability"].to_numpy(), 60))
    assert points["train_count"].sum() == 60
    per_model = pd.read_csv(out / "feldman_per_model.csv")
    assert np.allclose(per_model["bound"], per_model["opt"] + per_model["tau"] * per_model["unfit_singletons"])
    # a non-feldman run is refused with exit 2
    other = tmp_path / "other"
    assert cli.main(["run", "--out", str(other), "--quiet", "dataset=synthetic", "n_train=60", "n_test=50",
                     "n_subgroups=10", "dim=4", "models=4", "epochs=1", "epsilons=4", "hidden=4"]) == 0
    assert cli.main(["feldman", str(other)]) == 2
    assert "feldman" in capsys.readouterr().err

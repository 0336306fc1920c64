"""Example galleries: which examples each selection picks, its intervals, and the files a run writes."""
import json

import matplotlib
import numpy as np
import pandas as pd
import pytest

import dpmem
from dpmem.bench import cli
from dpmem.bench.report import gallery
from dpmem.privacy.errors import UsageError

matplotlib.use("Agg")


def _mem_frame():
    # class 0: example 2 memorized most, 0 and 1 from a big subgroup; class 1: example 4 second, 5 typical
    rows = [  # index, label, subgroup, subgroup_count, p_in, p_out, canary
        (0, 0, 0, 9, 1.0, 1.0, False), (1, 0, 0, 9, 1.0, 0.98, False), (2, 0, 1, 1, 1.0, 0.05, False),
        (3, 0, 2, 2, 0.9, 0.6, False), (4, 1, 3, 1, 0.95, 0.2, False), (5, 1, 4, 5, 1.0, 1.0, False),
        (6, 1, 3, 1, 1.0, 0.0, True)]
    f = pd.DataFrame(rows, columns=["index", "label", "subgroup", "subgroup_count", "p_in", "p_out", "is_canary"])
    f["n_in"], f["n_out"] = 70, 30
    f["mem"] = f["p_in"] - f["p_out"]
    f["mem_se"] = np.sqrt(f["p_in"] * (1 - f["p_in"]) / 70 + f["p_out"] * (1 - f["p_out"]) / 30)
    f["high_mem"] = f["mem"] > 0.5
    f.insert(0, "variant", "nonprivate")
    return f


def test_most_memorized_are_ranked_with_typical_examples_of_their_class():
    sel = gallery.select_memorized(_mem_frame(), "nonprivate", rows=2, beside=2)
    focus = sel.loc[sel["role"] == "memorized"]
    assert focus["index"].tolist() == [2, 4]          # the canary (6, mem 1.0) is left out
    typical = sel.loc[(sel["role"] == "typical") & (sel["row"] == 0)]
    assert typical["index"].tolist() == [0, 1]        # class 0's largest subgroup, mem closest to 0 first
    assert (sel.loc[sel["row"] == 1, "label"] == 1).all()
    assert ((sel["mem_lo"] <= sel["mem"]) & (sel["mem"] <= sel["mem_hi"])).all()
    assert (sel["mem_hi"] - sel["mem_lo"] > 0).all()  # even mem = 0 exactly (p_in = p_out = 1) gets an interval
    assert ((sel["mem_lo"] >= -1) & (sel["mem_hi"] <= 1)).all()


def test_hardest_for_dp_is_largest_accuracy_loss_one_per_subgroup():
    k, m = 40, 6
    ref = np.ones((k, m), bool)
    dp = np.ones((k, m), bool)
    dp[:, 0] = False                  # loss 1.0, subgroup 0
    dp[:30, 1] = False                # loss 0.75, subgroup 0 (same subgroup as 0: skipped)
    dp[:20, 2] = False                # loss 0.5, subgroup 1
    dp[:5, 3] = False                 # loss 0.125, class 0
    sel = gallery.select_hardest_dp(ref, dp, y_test=np.array([0, 0, 1, 0, 1, 0]), g_test=np.array([0, 0, 1, 2, 3, 2]),
                                    train_count=np.array([1, 2, 5, 9]), rows=2, beside=2)
    hard = sel.loc[sel["role"] == "hardest"]
    assert hard["test_index"].tolist() == [0, 2]
    assert hard["acc_loss"].tolist() == [1.0, 0.5]
    easy0 = sel.loc[(sel["role"] == "easiest") & (sel["row"] == 0)]
    assert easy0["test_index"].tolist() == [5, 3]     # class 0, DP accuracy 1.0 then 0.875
    assert ((sel["acc_loss_lo"] <= sel["acc_loss"]) & (sel["acc_loss"] <= sel["acc_loss_hi"])).all()
    assert hard["subgroup_train_count"].tolist() == [1, 2]   # train_count of subgroups 0 and 1


def test_pairs_keep_the_strongest_per_training_example_with_intervals():
    rng = np.random.default_rng(0)
    k = 200
    masks = rng.random((k, 3)) < 0.7
    test_correct = np.zeros((k, 2), bool)
    test_correct[:, 0] = masks[:, 0]                  # test 0 is right exactly when train 0 was seen
    test_correct[:, 1] = masks[:, 1] | (rng.random(k) < 0.5)
    infl = dpmem.influence(masks, test_correct)
    pairs = pd.DataFrame({"variant": "v", "train_index": [0, 0, 1], "test_index": [0, 1, 1],
                          "infl": [infl[0, 0], infl[0, 1], infl[1, 1]], "z": [9.0, 1.0, 5.0], "mem": 0.5,
                          "train_subgroup": [0, 0, 1], "test_subgroup": [0, 1, 1], "same_subgroup": [True, False, True]})
    sel = gallery.select_pairs(pairs, "v", masks=masks, test_correct=test_correct, y_train=np.array([0, 1, 1]),
                               y_test=np.array([0, 1]), train_count=np.array([1, 3]), rows=5)
    assert sel[["train_index", "test_index"]].values.tolist() == [[0, 0], [1, 1]]
    assert sel["infl"].iloc[0] == pytest.approx(1.0)
    assert ((sel["infl_lo"] <= sel["infl"]) & (sel["infl"] <= sel["infl_hi"])).all()
    assert sel["train_subgroup_count"].tolist() == [1, 3]


@pytest.mark.parametrize("shape, kind", [((1, 8, 8), "image"), ((3, 32, 32), "image"), ((1, 40), "series"),
                                         ((28, 28), "image"), ((64,), None), ((300,), None)])
def test_input_kind(shape, kind):
    assert gallery.input_kind(shape) == kind


def test_series_inputs_are_drawn_as_lines(tmp_path):
    rng = np.random.default_rng(1)
    inputs = gallery.Inputs(kind="series", x_train=rng.standard_normal((5, 1, 40)), x_test=rng.standard_normal((4, 1, 40)),
                            lo=-3, hi=3)
    frame = gallery.select_hardest_dp(np.ones((10, 4), bool), np.eye(10, 4, dtype=bool), y_test=np.array([0, 0, 1, 1]),
                                      g_test=np.array([0, 1, 2, 3]), train_count=np.array([1, 1, 1, 1]), rows=2, beside=1)
    fig = gallery.draw("hardest_dp", frame, inputs, caption="run x, variant dp, K = 10")
    lines = [ax for ax in fig.axes if ax.lines]
    assert len(lines) == len(frame)                   # one line plot per shown example
    paths = gallery.save(fig, tmp_path, "g")
    assert [p.suffix for p in paths] == [".png", ".pdf"] and all(p.stat().st_size > 0 for p in paths)


def test_run_writes_every_gallery_and_ends_with_the_report_path(tiny_digits_run):
    out, err = tiny_digits_run
    figures = out / "figures"
    for stem in ("gallery_memorized_nonprivate", "gallery_memorized_dp-eps4", "gallery_hardest_dp_dp-eps4"):
        assert (figures / f"{stem}.png").stat().st_size > 0 and (figures / f"{stem}.pdf").stat().st_size > 0
    assert not (figures / "gallery_hardest_dp_nonprivate.png").exists()
    pairs = pd.read_csv(out / "influence_pairs.csv")
    for variant in ("nonprivate", "dp-eps4"):
        drawn = (figures / f"gallery_pairs_{variant}.png").exists()
        assert drawn == (pairs["variant"] == variant).any()
    assert err.strip().splitlines()[-1] == f"dpmem: report {out / 'report.html'}"
    assert (out / "report.html").stat().st_size > 0


def test_run_gallery_api_matches_the_tables(tiny_digits_run):
    out, _ = tiny_digits_run
    run = dpmem.open_run(out)
    mem = pd.read_csv(out / "memorization.csv")
    sel = run.gallery("memorized", "nonprivate", rows=5)
    top = mem.loc[(mem["variant"] == "nonprivate") & ~mem["is_canary"]].sort_values(["mem", "index"],
                                                                                     ascending=[False, True])
    assert sel.loc[sel["role"] == "memorized", "index"].tolist() == top["index"].head(5).tolist()
    pairs = run.gallery("pairs", "nonprivate")
    stored = pd.read_csv(out / "influence_pairs.csv")
    stored = stored.loc[stored["variant"] == "nonprivate"]
    assert set(zip(pairs["train_index"], pairs["test_index"])) <= set(zip(stored["train_index"], stored["test_index"]))
    if len(pairs):
        assert pairs["infl"].iloc[0] == pytest.approx(stored["infl"].max())
    hard = run.gallery("hardest_dp", "dp-eps4")
    assert {"test_index", "acc_loss", "acc_loss_lo", "acc_loss_hi"} <= set(hard.columns)
    with pytest.raises(UsageError, match="hardest_dp"):
        run.gallery("hardest_dp", "nonprivate")
    with pytest.raises(UsageError, match="kind"):
        run.gallery("nope", "nonprivate")


def test_report_without_drawable_inputs_says_why(tmp_path, tiny_digits_run):
    out, _ = tiny_digits_run
    # a copy whose recorded x_train fingerprint no longer matches the data rebuilt now
    import shutil
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    meta = json.loads((copy / "config.json").read_text())
    meta["data_fingerprint"]["x_train"] = "0" * 64
    (copy / "config.json").write_text(json.dumps(meta))
    assert cli.main(["report", str(copy)]) == 0
    assert not list((copy / "figures").glob("gallery_*"))       # stale galleries removed, none drawn
    page = (copy / "report.html").read_text()
    assert "differs from the data this run was trained on" in page


def test_synthetic_vectors_get_tables_and_a_note(tmp_path):
    out = tmp_path / "syn"
    assert cli.main(["run", "--out", str(out), "--quiet", "dataset=synthetic", "n_train=60", "n_test=80",
                     "n_subgroups=10", "dim=8", "models=8", "unit_size=8", "epochs=2", "epsilons=4", "hidden=8",
                     "threads=1"]) == 0
    assert not list((out / "figures").glob("gallery_*"))
    page = (out / "report.html").read_text()
    assert "flat 8-dimensional input vectors" in page
    assert 'id="gallery-memorized-nonprivate"' in page            # the selection still shows, as a table

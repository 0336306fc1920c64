"""The marginal-utility study: removal sets, influenced test examples, and `dpmem utility` end to end."""
import json

import numpy as np
import pandas as pd
import pytest

from dpmem.bench import cli
from dpmem.bench.run import execution
from dpmem.bench.studies import utility
from dpmem.privacy.errors import UsageError

SMALL = ["dataset=synthetic", "n_train=100", "n_test=200", "n_subgroups=25", "dim=12", "models=24",
         "unit_size=12", "epochs=3", "epsilons=8", "hidden=16"]


def test_matched_removal_prefers_the_subgroup_then_the_class_and_never_a_removed_example():
    g = np.array([0, 0, 0, 1, 2, 2, 3, 3])
    y = np.array([0, 0, 0, 1, 1, 1, 0, 0])
    removed = np.array([0, 3, 6])        # subgroup 0 has spares; subgroup 1 has none (class 1 has 4, 5)
    chosen, fallback = utility.matched_removal(removed, g, y, np.arange(8), np.random.default_rng(0))
    assert len(chosen) == 3 and len(set(chosen)) == 3 and not set(chosen) & set(removed)
    assert fallback == {"subgroup": 2, "class": 1, "any": 0}
    assert set(chosen) & {1, 2} and set(chosen) & {4, 5} and 7 in chosen


def test_matched_removal_refuses_when_too_few_examples_remain():
    with pytest.raises(UsageError, match="threshold"):
        utility.matched_removal(np.array([0, 1]), np.zeros(3, int), np.zeros(3, int), np.arange(3),
                                np.random.default_rng(0))


def test_removal_masks_have_the_memorized_size_and_per_model_control_draws():
    rng = np.random.default_rng(1)
    n = 60
    mem = np.where(np.arange(n) < 10, 0.9, 0.05)
    mem[:4] = 0.3
    g, y = rng.integers(0, 12, n), rng.integers(0, 3, n)
    sets = utility.memorized_sets(mem, np.arange(n), [0.25, 0.5, 0.95])
    assert [s["threshold"] for s in sets] == [0.25, 0.5]          # nothing reaches 0.95
    assert sets[0]["memorized"] == list(range(10)) and sets[1]["memorized"] == list(range(4, 10))
    memorized = np.array(sets[0]["memorized"])
    kw = dict(g_train=g, y_train=y, candidates=np.arange(n), seed=0, threshold=0.25)
    mem_masks, _ = utility.removal_masks("memorized", memorized, models=range(5), **kw)
    assert (mem_masks.sum(1) == 10).all() and mem_masks[:, :10].all()
    for kind in ("random", "matched"):
        masks, fallback = utility.removal_masks(kind, memorized, models=range(5), **kw)
        assert (masks.sum(1) == 10).all()
        assert len({m.tobytes() for m in masks}) == 5              # each model draws its own set
        # model k's draw does not depend on how many models there are
        assert np.array_equal(utility.removal_masks(kind, memorized, models=range(3, 4), **kw)[0][0], masks[3])
        if kind == "matched":
            assert not masks[:, :10].any() and sum(fallback.values()) == 50


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "small"
    assert cli.main(["run", "--out", str(out), "--quiet", *SMALL]) == 0
    return out


def test_utility_command_end_to_end_and_resume(small_run, tmp_path, monkeypatch, capsys):
    out, report = tmp_path / "study", tmp_path / "report"
    argv = ["utility", str(small_run), "--thresholds", "0.1,0.3", "--models", "4", "--out", str(out),
            "--report-out", str(report), "--quiet"]
    assert cli.main(argv) == 0
    for name in ("utility.csv", "utility.parquet", "tables/utility.md", "tables/utility.tex",
                 "figures/utility.png", "figures/utility.pdf"):
        assert (report / name).is_file(), name
    table = pd.read_csv(report / "utility.csv")
    meta = json.loads((out / "utility.json").read_text())
    kept = [s["threshold"] for s in meta["removals"]]
    assert kept and len(table) == 2 * (1 + 3 * len(kept))             # 2 variants x (reference + 3 removals)
    ref = table.loc[table["removal"] == "full"]
    assert (ref["drop"] == 0).all() and (ref["removed"] == 0).all()
    rem = table.loc[table["removal"] != "full"]
    for _thr, g in rem.groupby("threshold"):
        assert g["removed"].nunique() == 1                          # controls remove as many examples
        assert (g["n_train"] == 100 - g["removed"]).all()
    # the DP variants are recalibrated for the smaller training set
    dp = table.loc[table["variant"] == "dp-eps8"]
    assert dp["noise_multiplier"].notna().all()
    # paired drop = reference accuracy minus cell accuracy, model by model
    first = rem.iloc[0]
    assert first["drop"] == pytest.approx(
        ref.loc[ref["variant"] == first["variant"], "test_acc"].iloc[0] - first["test_acc"], abs=1e-9)
    # a finished study resumes without training anything
    monkeypatch.setattr(execution, "train_models", lambda *a, **k: pytest.fail("retrained a finished cell"))
    assert cli.main(argv) == 0
    assert pd.read_csv(report / "utility.csv").equals(table)
    # other settings in the same study directory are refused before anything is trained
    assert cli.main([*argv, "--models", "5"]) == 2
    assert "other settings" in capsys.readouterr().err


def test_utility_interrupted_cell_resumes_to_identical_arrays(small_run, tmp_path, monkeypatch):
    argv = ["utility", str(small_run), "--thresholds", "0.1", "--models", "4", "--quiet"]
    whole = tmp_path / "whole"
    assert cli.main([*argv, "--out", str(whole)]) == 0
    part = tmp_path / "part"
    real = execution.train_models
    calls = [0]

    def flaky(*a, **k):
        calls[0] += 1
        if calls[0] == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(execution, "train_models", flaky)
    assert cli.main([*argv, "--out", str(part)]) == 130
    monkeypatch.setattr(execution, "train_models", real)
    assert cli.main([*argv, "--out", str(part)]) == 0
    for f in sorted(whole.glob("variants/*/test_correct.npy")):
        assert np.array_equal(np.load(f), np.load(part / f.relative_to(whole))), f


@pytest.mark.parametrize("extra,needle", [(["--thresholds", "0,0.5"], "--thresholds"),
                                          (["--thresholds", "abc"], "numbers"),
                                          (["--models", "1"], "--models"),
                                          (["--thresholds", "1.0"], "no training example")])
def test_utility_bad_arguments_exit_2(small_run, tmp_path, capsys, extra, needle):
    assert cli.main(["utility", str(small_run), "--out", str(tmp_path / "u"), "--quiet", *extra]) == 2
    assert needle in capsys.readouterr().err
    assert not (tmp_path / "u").exists()                  # refused before anything is written


def test_utility_refuses_a_threshold_too_many_examples_reach(small_run, tmp_path, monkeypatch, capsys):
    class Everyone:
        def __init__(self, masks, correct):
            self.mem = np.ones(masks.shape[1])

    monkeypatch.setattr(utility.memorization, "memorization", Everyone)
    assert cli.main(["utility", str(small_run), "--out", str(tmp_path / "u"), "--quiet", "--thresholds", "0.5"]) == 2
    assert "too many to match" in capsys.readouterr().err
    assert not (tmp_path / "u").exists()


def test_utility_trains_on_the_device_and_workers_it_is_given(small_run, tmp_path, monkeypatch):
    """The study goes through the one unit loop: --device reaches every unit, and Ray workers give
    the serial arrays."""
    argv = ["utility", str(small_run), "--thresholds", "0.1", "--models", "4", "--quiet"]
    real, devices = execution.train_models, []

    def spy(*a, **k):
        devices.append(k["device"])
        return real(*a, **k)

    monkeypatch.setattr(execution, "train_models", spy)
    assert cli.main([*argv, "--out", str(tmp_path / "serial"), "--device", "auto"]) == 0
    assert devices and set(devices) == {"auto"}
    monkeypatch.setattr(execution, "train_models", real)
    pytest.importorskip("ray")
    assert cli.main([*argv, "--out", str(tmp_path / "ray"), "--workers", "2"]) == 0
    arrays = sorted((tmp_path / "serial").glob("variants/*/test_correct.npy"))
    assert arrays
    for f in arrays:
        assert np.array_equal(np.load(f), np.load(tmp_path / "ray" / f.relative_to(tmp_path / "serial"))), f

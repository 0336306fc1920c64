"""The command line end to end on a small configuration: run, report, check, resume, bad input."""
import contextlib
import io
import json
import re
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from dpmem import models
from dpmem.bench import cli
from dpmem.bench.store.run_store import RunStore

SMALL = ["dataset=synthetic", "n_train=120", "n_test=300", "n_subgroups=30", "dim=16", "models=24",
         "unit_size=8", "epochs=4", "epsilons=2,8", "hidden=16"]


def run(*argv) -> int:
    return cli.main(list(argv))


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "small"
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert run("run", "--out", str(out), "--quiet", *SMALL) == 0
    (out.parent / "run.stderr").write_text(err.getvalue())   # what the command printed (test_run_says_where_its_time_went)
    return out


def test_run_writes_the_output_contract(small_run):
    for name in ("config.json", "masks.npy", "memorization.csv", "memorization.parquet", "subgroups.csv",
                 "subgroups.parquet", "summary.json", "tables/summary.md", "tables/summary.tex",
                 "figures/memorization_hist.png", "figures/memorization_hist.pdf",
                 "figures/acc_loss_vs_frequency.png", "figures/mem_vs_bound.png"):
        assert (small_run / name).is_file(), name
    summary = json.loads((small_run / "summary.json").read_text())
    assert list(summary["variants"]) == ["nonprivate", "dp-eps2", "dp-eps8"]
    dp = summary["variants"]["dp-eps2"]
    assert dp["epsilon"] == 2.0 and dp["noise_multiplier"] > 0 and dp["accountant"]
    assert dp["epsilon_reported"] <= 2.0 + 1e-6 and dp["models"] == 24
    assert summary["variants"]["nonprivate"]["noise_multiplier"] is None
    assert {v["engine"] for v in summary["variants"].values()} == {"batched"}  # an MLP: the many-model engine
    mem = pd.read_parquet(small_run / "memorization.parquet")
    assert {"variant", "epsilon", "index", "label", "subgroup", "subgroup_count", "p_in", "p_out", "n_in",
            "n_out", "mem", "mem_se", "bound", "violation", "eps_lb"} <= set(mem.columns)
    assert len(mem) == 3 * 120
    assert ((mem.n_in + mem.n_out) == 24).all()
    sub = pd.read_csv(small_run / "subgroups.csv")
    assert {"train_count", "test_count", "test_acc", "test_acc_lo", "test_acc_hi", "acc_loss",
            "mean_mem"} <= set(sub.columns)
    assert (sub.loc[sub.variant == "nonprivate", "acc_loss"].fillna(0) == 0).all()
    store = RunStore.open(small_run)
    arrays = store.variant_arrays("dp-eps2")
    assert arrays["train_correct"].shape == (24, 120) and arrays["train_margin"].dtype == np.float16
    assert arrays["test_correct"].shape == (24, 300)


def test_run_says_where_its_time_went(small_run):
    """The last lines say how long each stage took, and the stages add up to the total."""
    err = (small_run.parent / "run.stderr").read_text()
    line = next(x for x in err.splitlines() if x.startswith("dpmem: time: "))
    body, total = line.removeprefix("dpmem: time: ").rsplit(" (", 1)
    stages = {name: float(t) for name, t, _ in (item.rsplit(" ", 2) for item in body.split(", "))}
    assert list(stages) == ["data and calibration", "training", "analysis", "tables and figures", "report page"]
    # a stage may round to 0.0 s (the calibration is cached within a process), training never does here
    assert all(t >= 0 for t in stages.values()) and stages["training"] > 0
    assert sum(stages.values()) == pytest.approx(float(total.removesuffix(" s in all)")), abs=0.3)
    trained = float(re.search(r"trained in ([0-9.]+) s this session", err).group(1))
    assert stages["training"] == pytest.approx(trained, abs=0.1)


def test_interrupted_run_resumes_to_identical_arrays(small_run, tmp_path, monkeypatch):
    out = tmp_path / "resumed"
    real = models.train_models
    calls = {"n": 0}

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 5:                        # die in the middle of the second variant
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr("dpmem.bench.run.execution.train_models", flaky)
    assert run("run", "--out", str(out), "--quiet", *SMALL) == 130
    store = RunStore.open(out)
    assert store.variant_complete("nonprivate") and not store.variant_complete("dp-eps2")
    monkeypatch.setattr("dpmem.bench.run.execution.train_models", real)
    assert run("run", "--out", str(out), "--quiet", *SMALL) == 0
    ref = RunStore.open(small_run)
    for name in ("nonprivate", "dp-eps2", "dp-eps8"):
        a, b = store.variant_arrays(name), ref.variant_arrays(name)
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=f"{name}/{key}")
    np.testing.assert_array_equal(store.masks(), ref.masks())


def test_paired_variants_share_subsets_and_differ_by_dp(small_run):
    store = RunStore.open(small_run)
    a = store.variant_arrays("nonprivate")["test_correct"]
    b = store.variant_arrays("dp-eps8")["test_correct"]
    assert not np.array_equal(a, b)


def test_report_regenerates_without_training(small_run, tmp_path):
    assert run("report", str(small_run), "--out", str(tmp_path / "rep")) == 0
    a = pd.read_csv(small_run / "memorization.csv")
    b = pd.read_csv(tmp_path / "rep" / "memorization.csv")
    pd.testing.assert_frame_equal(a, b)
    assert (tmp_path / "rep" / "tables" / "frequency_bins.tex").is_file()


def test_check_passes_for_correct_dp_and_json_verdict(small_run, capsys):
    assert run("check", str(small_run), "--json") == 0
    verdict = json.loads(capsys.readouterr().out)
    assert verdict["consistent"] is True
    assert verdict["variants"]["dp-eps2"]["violations"] == 0


def test_check_baseline_round_trip_and_regression(small_run, tmp_path):
    base = tmp_path / "baseline.json"
    assert run("check", str(small_run), "--write-baseline", str(base)) == 0
    assert run("check", str(small_run), "--baseline", str(base)) == 0
    data = json.loads(base.read_text())
    data["variants"]["nonprivate"]["test_accuracy"] = 0.999     # the run now looks like a regression
    base.write_text(json.dumps(data))
    assert run("check", str(small_run), "--baseline", str(base)) == 1


@pytest.mark.parametrize("argv, needle", [
    (["run", "dataset=imagenet"], "dataset"),
    (["run", "model=resnet"], "model"),
    (["run", "epsilons=-1"], "epsilons"),
    (["run", "q=1.5"], "q"),
    (["run", "no_such_key=1"], "no_such_key"),
    (["report", "/nonexistent/run"], "not found"),
    (["check", "/nonexistent/run"], "not found"),
    (["check", "{run}", "--claim", "nonprivate=abc"], "--claim"),
    (["check", "{run}", "--claim", "nosuch=1"], "nosuch"),
    (["check", "{run}", "--baseline", "/nonexistent.json"], "baseline"),
])
def test_bad_input_is_one_line_and_exit_2(argv, needle, small_run, tmp_path, capsys):
    argv = [a.replace("{run}", str(small_run)) for a in argv]
    if argv[0] == "run":
        argv += ["--out", str(tmp_path / "x")]
    assert run(*argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dpmem: error:") and needle in err[0]
    if argv[0] == "run":
        assert not (tmp_path / "x").exists()          # nothing written for a refused config


def test_overrides_may_follow_options(tmp_path, capsys):
    """`dpmem run CONFIG --out DIR key=value` reads the override (here a bad one, refused by name);
    commands without overrides still reject stray arguments."""
    config = tmp_path / "c.toml"
    config.write_text('dataset = "synthetic"\n')
    assert run("run", str(config), "--out", str(tmp_path / "x"), "--quiet", "q=1.5") == 2
    err = capsys.readouterr().err
    assert "q" in err and "unrecognized" not in err
    with pytest.raises(SystemExit) as stop:
        run("report", str(tmp_path), "q=1.5")
    assert stop.value.code == 2 and "unrecognized arguments: q=1.5" in capsys.readouterr().err


def test_corrupt_run_directory_is_refused_and_left_alone(small_run, tmp_path, capsys):
    import shutil
    bad = tmp_path / "bad"
    shutil.copytree(small_run, bad)
    (bad / "masks.npy").write_bytes(b"not an array")
    before = sorted(p.name for p in bad.rglob("*"))
    assert run("check", str(bad)) == 2
    assert "corrupt" in capsys.readouterr().err
    assert sorted(p.name for p in bad.rglob("*")) == before


def test_resuming_with_another_config_is_refused(small_run, capsys):
    assert run("run", "--out", str(small_run), "--quiet", *SMALL, "seed=5") == 2
    assert "different config" in capsys.readouterr().err


def test_console_script_exit_code(small_run):
    r = subprocess.run([sys.executable, "-m", "dpmem.bench.cli", "check", str(small_run) + "-missing"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1


def test_loo_command_end_to_end(small_run, tmp_path):
    out = tmp_path / "loo"
    assert run("loo", str(small_run), "--examples", "4", "--repeats", "3", "--ks", "8,24", "--qs", "0.5,0.7",
               "--out", str(out), "--quiet") == 0
    loo_table = pd.read_csv(out / "loo.csv")
    assert len(loo_table) == 4 and (loo_table.repeats == 3).all()
    assert loo_table.mem_loo.between(-1, 1).all()
    err = pd.read_csv(out / "estimator_error.csv")
    assert sorted(set(zip(err.q, err.K))) == [(0.5, 8), (0.5, 24), (0.7, 8), (0.7, 24)]
    assert (out / "figures" / "estimator_error.png").is_file() and (out / "tables" / "estimator_error.tex").is_file()
    # the study is stored in the run and resumes: a second call trains nothing new and agrees
    assert run("loo", str(small_run), "--examples", "4", "--repeats", "3", "--ks", "8,24", "--qs", "0.5,0.7",
               "--out", str(out), "--quiet") == 0
    pd.testing.assert_frame_equal(loo_table, pd.read_csv(out / "loo.csv"))


@pytest.mark.parametrize("extra, needle", [(["--variant", "nosuch"], "nosuch"), (["--qs", "1.5"], "--qs"),
                                           (["--ks", "a,b"], "integers"), (["--repeats", "1"], "--repeats")])
def test_loo_bad_arguments(small_run, tmp_path, capsys, extra, needle):
    assert run("loo", str(small_run), "--out", str(tmp_path / "x"), "--quiet", *extra) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0]


def test_sweep_command_end_to_end(tmp_path, capsys):
    out = tmp_path / "sweep"
    assert run("sweep", "--out", str(out), "--widths", "8,32", "--n-trains", "60,120", "--quiet",
               *[a for a in SMALL if not a.startswith(("n_train", "hidden"))]) == 0
    points = pd.read_csv(out / "mem_vs_gen.csv")
    assert len(points) == 2 * 2 * 3                        # widths x sizes x variants
    assert set(points.width) == {8, 32} and set(points.n_train_target) == {60, 120}
    corr = pd.read_csv(out / "mem_vs_gen_correlation.csv")
    assert corr.scope.tolist() == ["all points", "nonprivate", "dp-eps2", "dp-eps8"]
    assert corr.pearson.between(-1, 1).all()
    assert (out / "figures" / "mem_vs_gen.pdf").is_file()


def test_agreement_compares_per_model_accuracy(small_run, tmp_path, capsys):
    from dpmem.bench.store.run_store import RunStore
    from dpmem.bench.studies import agreement
    table = agreement.compare(RunStore.open(small_run), RunStore.open(small_run))
    store = RunStore.open(small_run)
    expected = store.variant_arrays("nonprivate")["test_correct"].mean(axis=1).mean()
    row = table.set_index("variant").loc["nonprivate"]
    assert row["models"] == 24 and row["mean_a"] == pytest.approx(expected) and row["welch_p"] == pytest.approx(1.0)
    assert set(table["variant"]) == {"nonprivate", "dp-eps2", "dp-eps8"}
    assert agreement.main([str(small_run), str(tmp_path / "missing")]) == 2
    assert "not found" in capsys.readouterr().err

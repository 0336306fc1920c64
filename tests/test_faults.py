"""Real faults on a run directory: damaged or missing files, other data, a second writer, a full
disk, unusable paths. Each ends in one line and exit 2, or is repaired by `dpmem run`; none is
used silently."""
import dataclasses
import errno
import json
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from dpmem.bench import cli
from dpmem.bench.report import analysis
from dpmem.bench.store.run_store import RunStore

SMALL = ["dataset=synthetic", "n_train=80", "n_test=120", "n_subgroups=20", "dim=8", "models=12",
         "unit_size=4", "epochs=2", "epsilons=4", "hidden=8"]


def run(*argv) -> int:
    return cli.main(list(argv))


def one_line_error(capsys, needle: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dpmem: error:") and needle in err[0], err
    return err[0]


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    out = tmp_path_factory.mktemp("faults") / "ref"
    assert run("run", "--out", str(out), "--quiet", *SMALL) == 0
    return out


@pytest.fixture
def copy(ref, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(ref, out)
    return out


def _flip(path, at=-7):
    data = bytearray(path.read_bytes())
    data[at] ^= 0x10
    path.write_bytes(bytes(data))


def _same_arrays(a, b):
    sa, sb = RunStore.open(a), RunStore.open(b)
    np.testing.assert_array_equal(sa.masks(), sb.masks())
    for name in ("nonprivate", "dp-eps4"):
        xa, xb = sa.variant_arrays(name), sb.variant_arrays(name)
        for key in xb:
            np.testing.assert_array_equal(xa[key], xb[key])


@pytest.mark.parametrize("rel", ["variants/nonprivate/train_correct.npy", "variants/dp-eps4/test_margin.npy",
                                 "masks.npy", "data/y_train.npy"])
def test_a_damaged_file_is_exit_2_naming_it_and_run_repairs_it(ref, copy, rel, capsys):
    _flip(copy / rel)
    for command in ("report", "check"):
        assert run(command, str(copy)) == 2
        one_line_error(capsys, rel.split("/")[-1])
    assert run("run", "--out", str(copy), "--quiet", *SMALL) == 0
    _same_arrays(copy, ref)
    assert run("check", str(copy)) == 0


@pytest.mark.parametrize("rel", ["masks.npy", "variants/nonprivate/train_correct.npy"])
def test_a_missing_or_misshapen_file_is_exit_2(copy, rel, capsys):
    (copy / rel).unlink()
    assert run("report", str(copy)) == 2
    one_line_error(capsys, "missing file")
    np.save(copy / rel, np.zeros((3, 2), bool))
    assert run("check", str(copy)) == 2
    one_line_error(capsys, rel.split("/")[-1])


def test_other_data_are_refused_by_resume_report_and_loo(copy, capsys):
    meta = json.loads((copy / "config.json").read_text())
    meta["data_fingerprint"]["y_train"] = "0" * 64         # as if the labels had been rebuilt differently
    (copy / "config.json").write_text(json.dumps(meta))
    assert run("report", str(copy)) == 2
    one_line_error(capsys, "y_train fingerprint")
    assert run("loo", str(copy), "--examples", "2", "--repeats", "2", "--quiet") == 2
    one_line_error(capsys, "y_train fingerprint")
    assert run("run", "--out", str(copy), "--quiet", *SMALL) == 2
    one_line_error(capsys, "y_train fingerprint")


def test_an_old_format_run_is_read_but_not_resumed(ref, copy, capsys):
    meta = json.loads((copy / "config.json").read_text())
    del meta["format"]
    (copy / "config.json").write_text(json.dumps(meta))
    assert run("check", str(copy)) == 0
    capsys.readouterr()
    assert run("run", "--out", str(copy), "--quiet", *SMALL) == 2
    one_line_error(capsys, "older dpmem")


def test_a_variant_is_not_resumed_with_another_random_scheme(copy, capsys):
    """A variant begun where coins and noise are counter-based (a GPU) is not finished with per-model
    generators (this CPU): its models would not share batches with the other variants'."""
    assert json.loads((copy / "variants" / "dp-eps4" / "plan.json").read_text())["random_scheme"] == "generators"
    store = RunStore.open(copy)
    store.discard_variant("dp-eps4")                        # unfinished again
    plan = store.plan("dp-eps4")
    store.save_plan("dp-eps4", {**plan, "random_scheme": "counter"})
    assert run("run", "--out", str(copy), "--quiet", *SMALL) == 2
    one_line_error(capsys, "counter scheme")
    assert not store.variant_complete("dp-eps4")
    # a plan from before the scheme was recorded drew with generators: it resumes here
    store.save_plan("dp-eps4", {k: v for k, v in plan.items() if k != "random_scheme"})
    assert run("run", "--out", str(copy), "--quiet", *SMALL) == 0
    assert store.variant_complete("dp-eps4")


def test_a_second_writer_waits_then_refuses_and_changes_nothing(copy, capsys, monkeypatch):
    from dpmem.bench.store import run_store as store_mod
    monkeypatch.setattr(store_mod, "LOCK_WAIT_S", 0.3)
    code = ("import sys, filelock; l = filelock.FileLock(sys.argv[1]); l.acquire(); print('held', flush=True); "
            "sys.stdin.read()")
    holder = subprocess.Popen([sys.executable, "-c", code, str(copy / ".lock")], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = {p: p.stat().st_mtime_ns for p in copy.rglob("*")}
        assert run("run", "--out", str(copy), "--quiet", *SMALL) == 2
        one_line_error(capsys, "another dpmem process")
        assert run("report", str(copy)) == 2
        one_line_error(capsys, "another dpmem process")
        assert {p: p.stat().st_mtime_ns for p in copy.rglob("*")} == before
    finally:
        holder.stdin.close()
        holder.wait()


@pytest.mark.parametrize("argv, needle, field", [
    (["dataset=synthetic", "model=cnn"], "cnn", "model"),
    (["dataset=synthetic", "engine=user"], "trainer", "trainer"),
])
def test_two_field_problems_are_found_before_anything_is_written(tmp_path, capsys, argv, needle, field):
    out = tmp_path / "x"
    assert run("run", "--out", str(out), "--quiet", "models=4", "epochs=1", *argv) == 2
    line = one_line_error(capsys, needle)
    assert f"'{field}'" in line or field in line
    assert not out.exists()


def test_unusable_output_paths_are_one_line(tmp_path, capsys, ref, monkeypatch):
    (tmp_path / "afile").write_text("x")
    assert run("run", "--out", str(tmp_path / "afile"), "--quiet", *SMALL) == 2
    one_line_error(capsys, "is a file")
    assert run("report", str(ref), "--out", str(tmp_path / "afile")) == 2
    one_line_error(capsys, "is a file")
    monkeypatch.setattr(cli.os, "access", lambda *a, **k: False)         # an unwritable parent
    assert run("run", "--out", str(tmp_path / "ro" / "run"), "--quiet", *SMALL) == 2
    one_line_error(capsys, "cannot write")
    assert not (tmp_path / "ro").exists()


def test_a_full_disk_is_one_line(ref, tmp_path, capsys, monkeypatch):
    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "rep" / "memorization.csv"))
    monkeypatch.setattr("dpmem.bench.report.tables.write_frame", full)
    assert run("report", str(ref), "--out", str(tmp_path / "rep")) == 2
    one_line_error(capsys, "disk is full")


def test_outputs_a_new_report_would_not_write_are_removed(ref, tmp_path, monkeypatch):
    out = tmp_path / "rep"
    assert run("report", str(ref), "--out", str(out)) == 0
    (out / "influence_pairs.csv").write_text("stale\n")
    (out / "influence_pairs.parquet").write_bytes(b"stale")
    real = analysis.analyse
    monkeypatch.setattr(analysis, "analyse",
                        lambda *a, **k: dataclasses.replace(real(*a, **k), pairs=pd.DataFrame()))
    assert run("report", str(ref), "--out", str(out)) == 0
    assert not (out / "influence_pairs.csv").exists() and not (out / "influence_pairs.parquet").exists()

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from dpmem.bench.config import Config
from dpmem.bench.store import files
from dpmem.bench.store import run_store as store_mod
from dpmem.bench.store.run_store import ModelRange, RunStore, StoreBusy, fill_gaps, split_models
from dpmem.privacy.errors import UsageError

FP = {"x_train": "a" * 64, "y_train": "b" * 64, "x_test": "c" * 64, "y_test": "d" * 64}


def _arrays(k, seed, start=0):
    rng = np.random.default_rng(seed)
    return {"train_correct": rng.random((k, 4)) < 0.5, "train_margin": rng.random((k, 4)).astype(np.float16)}


def _rows(models, seed=0):
    """Per-model arrays whose row i depends only on i, so every split concatenates to the same."""
    rng = np.random.default_rng(seed)
    return {"train_correct": rng.random((models, 4)) < 0.5, "train_margin": rng.random((models, 4)).astype(np.float16)}


def _write(store, name, unit, full):
    store.write_unit(name, unit, {k: v[unit.start:unit.stop] for k, v in full.items()}, {"seconds": 1.0})


def test_chunks_cover_every_model_once():
    units_ = split_models(10, 4)
    assert [(c.start, c.stop) for c in units_] == [(0, 4), (4, 8), (8, 10)]
    assert fill_gaps(10, 3, [ModelRange(2, 4), ModelRange(8, 9)]) == [ModelRange(0, 2), ModelRange(4, 7), ModelRange(7, 8),
                                                                      ModelRange(9, 10)]


def test_units_resume_and_finalize(tmp_path):
    cfg = Config(models=10, unit_size=4)
    full = _rows(10)
    with RunStore.create_or_resume(tmp_path / "run", cfg) as store:
        units_ = split_models(10, 4)
        _write(store, "nonprivate", units_[0], full)
        # a unit whose arrays landed but whose record did not (crash in between) is not done
        _write(store, "nonprivate", units_[1], full)
        (store.variant_dir("nonprivate") / "units" / f"{units_[1].name}.json").unlink()
    with RunStore.create_or_resume(tmp_path / "run", cfg) as reopened:
        assert reopened.pending_units("nonprivate", 10, 4) == units_[1:]
        assert not (reopened.variant_dir("nonprivate") / "units" / units_[1].name).exists()
        assert reopened.finalize_variant("nonprivate", 10) == [ModelRange(4, 10)]      # not complete yet
        for c in units_[1:]:
            _write(reopened, "nonprivate", c, full)
        assert reopened.finalize_variant("nonprivate", 10) == []
        got = reopened.variant_arrays("nonprivate")
        np.testing.assert_array_equal(got["train_correct"], full["train_correct"])
        assert got["train_margin"].dtype == np.float16
        assert reopened.variant_record("nonprivate")["train_seconds"] == 3.0
        assert not (reopened.variant_dir("nonprivate") / "units").exists()
    assert not [p for p in (tmp_path / "run").rglob("*") if ".tmp" in p.name]


def test_a_resume_with_another_unit_size_keeps_finished_units(tmp_path):
    full = _rows(20)
    with RunStore.create_or_resume(tmp_path / "run", Config(models=20, unit_size=8)) as store:
        _write(store, "nonprivate", ModelRange(0, 8), full)
    # unit_size is an execution setting: the same run, resumed with units of 3
    with RunStore.create_or_resume(tmp_path / "run", Config(models=20, unit_size=3)) as store:
        todo = store.pending_units("nonprivate", 20, 3)
        assert todo == [ModelRange(8, 11), ModelRange(11, 14), ModelRange(14, 17), ModelRange(17, 20)]
        for c in todo:
            _write(store, "nonprivate", c, full)
        assert store.finalize_variant("nonprivate", 20) == []
        np.testing.assert_array_equal(store.variant_arrays("nonprivate")["train_margin"], full["train_margin"])


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete_file"])
def test_a_damaged_unit_is_redone_never_used(tmp_path, damage):
    full = _rows(8)
    with RunStore.create_or_resume(tmp_path / "run", Config(models=8, unit_size=4)) as store:
        for c in split_models(8, 4):
            _write(store, "nonprivate", c, full)
        path = store.variant_dir("nonprivate") / "units" / "000004-000008" / "train_correct.npy"
        data = bytearray(path.read_bytes())
        if damage == "flip":
            data[-3] ^= 0x01                     # still a valid .npy, wrong values
            path.write_bytes(bytes(data))
        elif damage == "truncate":
            path.write_bytes(bytes(data[: len(data) // 2]))
        else:
            path.unlink()
        assert store.finalize_variant("nonprivate", 8) == [ModelRange(4, 8)]
        assert not store.variant_complete("nonprivate")
        _write(store, "nonprivate", ModelRange(4, 8), full)
        assert store.finalize_variant("nonprivate", 8) == []
        np.testing.assert_array_equal(store.variant_arrays("nonprivate")["train_correct"], full["train_correct"])


def test_a_damaged_finished_array_is_refused_naming_the_file(tmp_path):
    full = _rows(8)
    with RunStore.create_or_resume(tmp_path / "run", Config(models=8, unit_size=8)) as store:
        _write(store, "nonprivate", ModelRange(0, 8), full)
        assert store.finalize_variant("nonprivate", 8) == []
    path = store.variant_dir("nonprivate") / "train_correct.npy"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(UsageError, match="damaged file .*train_correct.npy"):
        RunStore.open(tmp_path / "run").variant_arrays("nonprivate")
    assert store.damaged_files("nonprivate") == [path]
    store.discard_variant("nonprivate")
    assert store.pending_units("nonprivate", 8, 8) == [ModelRange(0, 8)]


def test_run_level_arrays_are_checked_when_read(tmp_path):
    data = {n: np.arange(6) for n in store_mod.DATA_ARRAYS}
    with RunStore.create_or_resume(tmp_path / "run", Config(models=3)) as store:
        store.save_run_arrays(np.ones((3, 6), bool), data)
        assert store.run_arrays_intact()
    np.testing.assert_array_equal(store.masks(), np.ones((3, 6), bool))
    raw = bytearray((store.root / "masks.npy").read_bytes())
    raw[-1] ^= 0x01
    (store.root / "masks.npy").write_bytes(bytes(raw))
    assert not store.run_arrays_intact()
    with pytest.raises(UsageError, match="damaged file .*masks.npy"):
        store.masks()
    (store.root / "masks.npy").unlink()
    with pytest.raises(UsageError, match="missing file .*masks.npy"):
        store.masks()


def test_a_different_config_is_refused_and_nothing_is_touched(tmp_path):
    RunStore.create_or_resume(tmp_path / "run", Config(models=10)).release()
    before = (tmp_path / "run" / "config.json").read_text()
    with pytest.raises(UsageError, match="different config"):
        RunStore.create_or_resume(tmp_path / "run", Config(models=11))
    assert (tmp_path / "run" / "config.json").read_text() == before


def test_other_data_are_refused_on_resume(tmp_path):
    RunStore.create_or_resume(tmp_path / "run", Config(models=10), fingerprint=FP).release()
    with pytest.raises(UsageError, match="x_train fingerprint"):
        RunStore.create_or_resume(tmp_path / "run", Config(models=10), fingerprint={**FP, "x_train": "e" * 64})
    RunStore.create_or_resume(tmp_path / "run", Config(models=10, unit_size=3, threads=1), fingerprint=FP).release()


def test_old_format_runs_are_readable_but_not_resumed(tmp_path):
    root = tmp_path / "old"
    (root / "variants" / "nonprivate").mkdir(parents=True)
    cfg = Config(models=4)
    old = {k: v for k, v in cfg.to_dict().items() if k not in ("workers", "device")}
    (root / "config.json").write_text(json.dumps({"config": old, "hash": "0123456789abcdef", "versions": {}}))
    np.save(root / "masks.npy", np.ones((4, 6), bool))
    np.save(root / "variants" / "nonprivate" / "train_correct.npy", np.ones((4, 6), bool))
    (root / "variants" / "nonprivate" / "complete.json").write_text(json.dumps(
        {"models": 4, "units": 1, "arrays": ["train_correct"], "train_seconds": 1.0}))
    store = RunStore.open(root)
    assert store.format == 1 and store.config() == cfg
    assert store.masks().shape == (4, 6)
    assert store.variant_arrays("nonprivate")["train_correct"].all()
    with pytest.raises(UsageError, match="older dpmem .*cannot be resumed"):
        RunStore.create_or_resume(root, cfg)


def _hold_lock(root):
    code = ("import sys, filelock; l = filelock.FileLock(sys.argv[1]); l.acquire(); print('held', flush=True); "
            "sys.stdin.read()")
    proc = subprocess.Popen([sys.executable, "-c", code, str(root / ".lock")], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_writer_is_refused_while_the_first_holds_the_lock(tmp_path, monkeypatch):
    monkeypatch.setattr(store_mod, "LOCK_WAIT_S", 0.2)
    root = tmp_path / "run"
    RunStore.create_or_resume(root, Config(models=4)).release()
    proc = _hold_lock(root)
    try:
        with pytest.raises(StoreBusy, match="another dpmem process"):
            RunStore.create_or_resume(root, Config(models=4))
    finally:
        proc.stdin.close()
        proc.wait()
    # the holder is gone (as after kill -9): the lock is free again
    RunStore.create_or_resume(root, Config(models=4)).release()


def test_a_directory_killed_during_creation_is_taken_over(tmp_path):
    root = tmp_path / "run"
    root.mkdir()
    (root / ".lock").write_text("")
    (root / ".config.json.abc123.tmp").write_text('{"config": {"mod')     # killed mid-write
    with RunStore.create_or_resume(root, Config(models=4)) as store:
        assert store.config() == Config(models=4)
    assert sorted(p.name for p in root.iterdir()) == [".lock", "config.json"]
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    with pytest.raises(UsageError, match="not a dpmem run directory"):
        RunStore.create_or_resume(tmp_path / "foreign", Config())
    assert sorted(p.name for p in (tmp_path / "foreign").iterdir()) == ["notes.txt"]


def test_temporaries_of_killed_writes_are_removed_on_the_next_run(tmp_path):
    root = tmp_path / "run"
    RunStore.create_or_resume(root, Config(models=4)).release()
    leftovers = [root / ".masks.npy.x1.tmp", root / "variants" / "nonprivate" / "units" / ".000000-000004.y.tmp",
                 root / "figures" / ".memorization_hist.tmp.png"]
    for p in leftovers:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.mkdir() if p.name.startswith(".000000") else p.write_bytes(b"partial")
    RunStore.create_or_resume(root, Config(models=4)).release()
    assert not any(p.exists() for p in leftovers)


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_files_honour_the_umask(tmp_path, umask):
    old = os.umask(umask)
    files.current_umask.cache_clear()
    try:
        with RunStore.create_or_resume(tmp_path / "run", Config(models=4)) as store:
            _write(store, "nonprivate", ModelRange(0, 4), _rows(4))
            assert store.finalize_variant("nonprivate", 4) == []
    finally:
        os.umask(old)
        files.current_umask.cache_clear()
    for name in ("config.json", "variants/nonprivate/train_correct.npy", "variants/nonprivate/complete.json"):
        assert (tmp_path / "run" / name).stat().st_mode & 0o777 == 0o666 & ~umask, name


def test_unit_files_are_durable_before_their_record(tmp_path, monkeypatch):
    events = []
    real_fsync, real_dir = os.fsync, store_mod.fsync_dir
    monkeypatch.setattr(store_mod.os, "fsync", lambda fd: (events.append(os.readlink(f"/proc/self/fd/{fd}")),
                                                           real_fsync(fd)))
    monkeypatch.setattr(store_mod, "fsync_dir", lambda p: (events.append(f"dir:{p}"), real_dir(p)))
    with RunStore.create_or_resume(tmp_path / "run", Config(models=4)) as store:
        events.clear()
        _write(store, "nonprivate", ModelRange(0, 4), _rows(4))
    units = store.variant_dir("nonprivate") / "units"
    record = next(i for i, e in enumerate(events) if e.endswith(".tmp") and "000000-000004.json" in e)
    files = [i for i, e in enumerate(events) if e.endswith("train_correct.npy") or e.endswith("train_margin.npy")]
    renamed = events.index(f"dir:{units}")
    assert len(files) == 2 and max(files) < renamed < record


def test_open_reports_missing_and_corrupt_directories(tmp_path):
    with pytest.raises(UsageError, match="not found"):
        RunStore.open(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="no config.json"):
        RunStore.open(tmp_path / "empty")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{not json")
    with pytest.raises(UsageError, match="corrupt"):
        RunStore.open(tmp_path / "bad")
    with RunStore.create_or_resume(tmp_path / "ok", Config()) as store:
        store.save_run_arrays(np.ones((1000, 3), bool), {n: np.arange(3) for n in store_mod.DATA_ARRAYS})
    (store.root / "masks.npy").write_bytes(b"garbage")
    with pytest.raises(UsageError, match="damaged"):
        store.masks()
    with pytest.raises(UsageError, match="not complete"):
        store.variant_arrays("nonprivate")
    json.loads((store.root / "config.json").read_text())  # still intact
    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageError, match="is a file"):
        RunStore.create_or_resume(tmp_path / "file", Config())

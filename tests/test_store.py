import json

import numpy as np
import pytest

from dpmem.bench.config import Config
from dpmem.bench.errors import UsageError
from dpmem.bench.store import Chunk, RunStore, chunks_of


def _arrays(k, seed):
    rng = np.random.default_rng(seed)
    return {"train_correct": rng.random((k, 4)) < 0.5, "train_margin": rng.random((k, 4)).astype(np.float16)}


def test_chunks_cover_every_model_once():
    cs = chunks_of(10, 4)
    assert [(c.start, c.stop) for c in cs] == [(0, 4), (4, 8), (8, 10)]


def test_units_resume_and_finalize(tmp_path):
    cfg = Config(models=10, chunk_size=4)
    store = RunStore.create_or_resume(tmp_path / "run", cfg)
    cs = chunks_of(10, 4)
    store.write_chunk("nonprivate", cs[0], _arrays(4, 0), {"seconds": 1.0})
    # a unit whose arrays landed but whose record did not (crash in between) is not done
    store.write_chunk("nonprivate", cs[1], _arrays(4, 1), {"seconds": 1.0})
    (store.variant_dir("nonprivate") / "chunks" / f"{cs[1].name}.json").unlink()
    reopened = RunStore.create_or_resume(tmp_path / "run", cfg)
    assert reopened.chunk_done("nonprivate", cs[0])
    assert not reopened.chunk_done("nonprivate", cs[1])
    reopened.write_chunk("nonprivate", cs[1], _arrays(4, 1), {"seconds": 1.0})
    reopened.write_chunk("nonprivate", cs[2], _arrays(2, 2), {"seconds": 2.0})
    reopened.finalize_variant("nonprivate", cs)
    got = reopened.variant_arrays("nonprivate")
    expect = np.concatenate([_arrays(4, 0)["train_correct"], _arrays(4, 1)["train_correct"],
                             _arrays(2, 2)["train_correct"]])
    np.testing.assert_array_equal(got["train_correct"], expect)
    assert got["train_margin"].dtype == np.float16
    assert reopened.variant_record("nonprivate")["train_seconds"] == 4.0
    assert not (reopened.variant_dir("nonprivate") / "chunks").exists()
    # no temporary files are left behind
    assert not [p for p in (tmp_path / "run").rglob("*") if ".tmp" in p.name]


def test_a_different_config_is_refused_and_nothing_is_touched(tmp_path):
    store = RunStore.create_or_resume(tmp_path / "run", Config(models=10))
    before = (store.root / "config.json").read_text()
    with pytest.raises(UsageError, match="different config"):
        RunStore.create_or_resume(tmp_path / "run", Config(models=11))
    assert (store.root / "config.json").read_text() == before


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
    store = RunStore.create_or_resume(tmp_path / "ok", Config())
    (store.root / "masks.npy").write_bytes(b"garbage")
    with pytest.raises(UsageError, match="corrupt"):
        store.masks()
    with pytest.raises(UsageError, match="not complete"):
        store.variant_arrays("nonprivate")
    json.loads((store.root / "config.json").read_text())  # still intact

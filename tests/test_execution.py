"""How a run executes never changes its arrays: units of any size, resumed with another size, or
trained by Ray workers give a serial run's arrays bit for bit."""
import numpy as np
import pytest
import torch

from dpmem import models
from dpmem.bench import cli
from dpmem.bench.store.run_store import RunStore
from dpmem.models import train_models
from dpmem.models.spec import DPParams, TrainRequest, TrainSpec

TINY = ["dataset=digits", "models=16", "epochs=2", "epsilons=4", "hidden=16", "--quiet"]


def _same_run(a, b):
    sa, sb = RunStore.open(a), RunStore.open(b)
    np.testing.assert_array_equal(sa.masks(), sb.masks())
    for name, _ in sa.config().variants:
        xa, xb = sa.variant_arrays(name), sb.variant_arrays(name)
        assert sorted(xa) == sorted(xb)
        for key in xa:
            np.testing.assert_array_equal(xa[key], xb[key], err_msg=f"{name}/{key}")


@pytest.mark.parametrize("engine", ["batched", "opacus"])
def test_a_model_depends_only_on_its_stream_not_on_its_unit(engine):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 6)).astype(np.float32)
    y = rng.integers(0, 3, 60)
    masks = rng.random((5, 60)) < 0.7
    spec = TrainSpec(arch="mlp", input_shape=(6,), n_classes=3, hidden=(8,), steps=6, sample_rate=0.3, lr=0.2,
                     dp=DPParams(noise_multiplier=1.0, max_grad_norm=1.0))
    evals = {"train": (x, y)}
    whole = train_models(spec, TrainRequest(x_train=x, y_train=y, masks=masks, seed=1, noise_seed=2, evals=evals),
                         engine=engine)["train_margin"]
    part = train_models(spec, TrainRequest(x_train=x, y_train=y, masks=masks[3:], seed=1, noise_seed=2, evals=evals,
                                           stream_ids=np.array([3, 4])), engine=engine)["train_margin"]
    np.testing.assert_array_equal(whole[3:], part)
    other = train_models(spec, TrainRequest(x_train=x, y_train=y, masks=masks[3:], seed=1, noise_seed=2, evals=evals,
                                            stream_ids=np.array([0, 1])), engine=engine)["train_margin"]
    assert not np.array_equal(other, part)          # the stream id matters


def test_a_lone_model_on_two_threads_equals_it_in_a_unit_on_one():
    from dpmem.bench import config as config_mod
    from dpmem.bench.data import load_dataset
    from dpmem.bench.run import plan
    cfg = config_mod.load(None, ["dataset=digits", "models=16", "epochs=2", "epsilons=4", "hidden=16"])
    ds = load_dataset(cfg)
    spec = plan.train_spec(cfg, ds, plan.plan_variant(cfg, 4.0, plan.schedule(cfg, ds.n_train)))
    masks = np.random.default_rng(0).random((16, ds.n_train)) < 0.7
    evals = {"test": (ds.x_test, ds.y_test)}
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        unit = train_models(spec, TrainRequest(x_train=ds.x_train, y_train=ds.y_train, masks=masks, seed=0,
                                               noise_seed=1, evals=evals), engine="batched")["test_margin"]
        torch.set_num_threads(2)
        for k in (5, 13):
            alone = train_models(spec, TrainRequest(x_train=ds.x_train, y_train=ds.y_train, masks=masks[k:k + 1],
                                                    seed=0, noise_seed=1, evals=evals, stream_ids=np.array([k])),
                                 engine="batched")["test_margin"]
            np.testing.assert_array_equal(unit[k:k + 1], alone)
    finally:
        torch.set_num_threads(threads)


def test_units_of_any_size_and_a_resume_with_another_size_give_the_same_arrays(tmp_path, monkeypatch):
    assert cli.main(["run", "--out", str(tmp_path / "c8"), "unit_size=8", *TINY]) == 0
    assert cli.main(["run", "--out", str(tmp_path / "c32"), "unit_size=32", *TINY]) == 0
    _same_run(tmp_path / "c8", tmp_path / "c32")
    # killed after two units of 5, resumed with units of 3 (unit_size is no part of the run's identity)
    real, calls = models.train_models, {"n": 0}

    def dies_third(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr("dpmem.bench.run.execution.train_models", dies_third)
    assert cli.main(["run", "--out", str(tmp_path / "mixed"), "unit_size=5", *TINY]) == 130
    monkeypatch.setattr("dpmem.bench.run.execution.train_models", real)
    assert cli.main(["run", "--out", str(tmp_path / "mixed"), "unit_size=3", "threads=1", *TINY]) == 0
    _same_run(tmp_path / "c8", tmp_path / "mixed")


def test_ray_workers_give_the_serial_arrays(tmp_path):
    pytest.importorskip("ray")
    # serial in units of 8 against 2 Ray workers (a real local runtime) in units of 32
    assert cli.main(["run", "--out", str(tmp_path / "serial"), "unit_size=8", *TINY]) == 0
    assert cli.main(["run", "--out", str(tmp_path / "ray"), "--workers", "2", "unit_size=32", *TINY]) == 0
    _same_run(tmp_path / "serial", tmp_path / "ray")
    assert RunStore.open(tmp_path / "ray").config().hash() == RunStore.open(tmp_path / "serial").config().hash()

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


# -- GPUs through Ray: a local runtime that declares GPU resources (no real GPU needed) ----------------

class _Bar:
    def update(self, n):
        pass


def test_cuda_units_ask_ray_for_their_gpu_share_and_get_a_gpu_each(tmp_path, monkeypatch):
    ray = pytest.importorskip("ray")
    from dpmem.bench import config
    from dpmem.bench.run import execution
    from dpmem.bench.run.execution import Unit
    from dpmem.bench.store.run_store import ModelRange
    ray.init(num_cpus=4, num_gpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")

    def probe(spec, inputs, unit, device, threads):
        """Stands in for a unit's training (defined here, so Ray ships it by value): what Ray gave this task."""
        import ray as worker_ray
        ids = np.array([float(g) for g in worker_ray.get_gpu_ids()])
        return {"gpu_ids": ids, "device": np.array([device == "cuda"])}, 0.0

    try:
        monkeypatch.setattr(execution, "_remote_unit", probe)
        units = [Unit(cell="dp-eps4", models=ModelRange(k, k + 1), masks=np.ones((1, 3), bool),
                      stream_ids=np.array([k]), seed=0, noise_seed=1, engine="batched") for k in range(6)]
        for share, ids in ((0.5, {0.0, 1.0}), (1.0, {0.0, 1.0}), (2.0, None)):
            cfg = config.load(None, ["workers=4", "device=cuda", f"gpus_per_unit={share:g}"])
            ex = execution.RayExecutor(cfg, None)
            assert ex.gpus == share and ex.task._default_options["num_gpus"] == share
            got = [arrays for _, arrays, _ in ex.map({"dp-eps4": None}, {}, units, _Bar())]
            assert len(got) == 6 and all(a["device"].all() for a in got)
            if ids is not None:   # a fraction or one GPU: each task sees exactly one of the two GPUs
                assert all(len(a["gpu_ids"]) == 1 and set(a["gpu_ids"]) <= ids for a in got)
            else:                 # two GPUs: every task holds both
                assert all(set(a["gpu_ids"]) == {0.0, 1.0} for a in got)
        # the CPU asks for none
        assert execution.RayExecutor(config.load(None, ["workers=4", "device=cpu"]), None).gpus == 0
        # more GPUs per unit than any node has: one line, before anything is written
        with pytest.raises(Exception, match=r"gpus_per_unit=3: no node of the local Ray runtime has that many GPUs"):
            execution.check_available(config.load(None, ["workers=4", "device=cuda", "gpus_per_unit=3"]))
    finally:
        ray.shutdown()


def test_a_cuda_run_on_a_ray_runtime_without_gpus_is_refused_before_anything_is_written(tmp_path, capsys):
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    try:
        out = tmp_path / "run"
        assert cli.main(["run", "--out", str(out), "--workers", "2", "device=cuda", *TINY]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1] == ("dpmem: error: device=cuda on Ray: the local Ray runtime has no GPU (start its nodes "
                           "with GPUs, or use device=cpu)")
        assert not out.exists()
    finally:
        ray.shutdown()


def test_gpus_per_unit_takes_a_fraction_or_whole_gpus():
    from dpmem.bench import config
    from dpmem.privacy.errors import ConfigError
    assert config.load(None, ["gpus_per_unit=0.25"]).gpus_per_unit == 0.25
    for bad in ("0", "-1", "1.5"):
        with pytest.raises(ConfigError, match="gpus_per_unit"):
            config.load(None, [f"gpus_per_unit={bad}"])
    # an execution key: it never changes a run's identity
    assert config.load(None, ["gpus_per_unit=0.5"]).hash() == config.load(None, []).hash()

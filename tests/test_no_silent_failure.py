"""No silent failure: every way a run can go wrong ends loud, with the right exit code (0 ok, 1
violation, 2 unusable input, 130 interrupted), in one line, and never as a pass."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer
from torch import nn

import dpmem
from dpmem.bench import cli, config
from dpmem.bench.run import execution, pipeline
from dpmem.bench.store.run_store import RunStore
from dpmem.models import batched, opacus_engine, stack, streams
from dpmem.models.nets import build_model
from dpmem.models.spec import DPParams, TrainSpec, expected_batch_sizes
from dpmem.privacy.errors import ConfigError, UsageError

TINY = ["dataset=synthetic", "n_train=60", "n_test=60", "n_subgroups=10", "dim=8", "models=4", "unit_size=2",
        "epochs=1", "batch_size=16", "epsilons=4", "hidden=8", "threads=1"]
FILE_RUN = ["models=4", "unit_size=2", "epochs=1", "epsilons=4", "hidden=8", "threads=1"]
HERE = "test_no_silent_failure"


def run(*argv) -> int:
    return cli.main(list(argv))


def error_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("dpmem: error:")]


def refused_before_writing(capsys, out: Path, *argv: str, base: list[str] = TINY) -> str:
    """The run exits 2 with one error line, and nothing is written."""
    capsys.readouterr()
    assert run("run", "--out", str(out), "--quiet", *base, *argv) == 2
    errors = error_lines(capsys)
    assert len(errors) == 1, errors
    assert not out.exists()
    return errors[0]


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        yield


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "tiny"
    assert run("run", "--out", str(out), "--quiet", *TINY) == 0
    return out


@pytest.fixture
def tiny_copy(tiny_run, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(tiny_run, out)
    return out


# -- user code: trainers and factories the tests name as test_no_silent_failure:NAME ----------------

def _good_outputs(evals):
    return {f"{s}_{k}": (np.ones(len(y), bool) if k == "correct" else np.ones(len(y), np.float32))
            for s, (_, y) in evals.items() for k in ("correct", "margin")}


def exiting_fit(*, index, evals, **kw):
    if index == 2:
        sys.exit(0)
    return _good_outputs(evals)


def exiting_factory(input_shape, n_classes):
    sys.exit(0)


def writing_fit(*, x_train, evals, **kw):
    x_train[:] = 0
    return _good_outputs(evals)


def torch_writing_fit(*, index, x_train, evals, **kw):
    torch_writing_fit.sums.append(float(np.abs(x_train).sum()))
    torch.as_tensor(x_train)[:] = 0          # torch cannot see numpy's read-only flag
    return _good_outputs(evals)


torch_writing_fit.sums = []


def infinite_fit(*, index, evals, **kw):
    out = _good_outputs(evals)
    out["test_margin"][0] = np.inf
    out["train_margin"][1] = -1e9
    return out


def printing_fit(*, index, evals, **kw):
    print("USER-OUTPUT-FROM-FIT")
    return _good_outputs(evals)


def no_parameters(input_shape, n_classes):
    return nn.Sequential(nn.Flatten())


def all_frozen(input_shape, n_classes):
    net = nn.Sequential(nn.Flatten(), nn.Linear(int(np.prod(input_shape)), n_classes))
    for p in net.parameters():
        p.requires_grad_(False)
    return net


def frozen_but_last(input_shape, n_classes):
    """Every layer frozen but the head: DP fine-tuning of the last layer."""
    net = nn.Sequential(nn.Flatten(), nn.Linear(int(np.prod(input_shape)), 12), nn.ReLU(), nn.Linear(12, 10),
                        nn.ReLU(), nn.Linear(10, n_classes))
    for p in list(net.parameters())[:-2]:
        p.requires_grad_(False)
    return net


def partly_frozen(input_shape, n_classes):
    """A frozen middle layer and a frozen bias (weight trainable) in the first one."""
    net = nn.Sequential(nn.Flatten(), nn.Linear(int(np.prod(input_shape)), 12), nn.ReLU(), nn.Linear(12, 10),
                        nn.ReLU(), nn.Linear(10, n_classes))
    net[1].bias.requires_grad_(False)
    net[3].weight.requires_grad_(False)
    net[3].bias.requires_grad_(False)
    return net


def partly_frozen_conv(input_shape, n_classes):
    """A convolution whose weight is frozen (bias trainable) and a GroupNorm whose bias is frozen."""
    net = nn.Sequential(nn.Conv2d(input_shape[0], 4, 3, padding=1), nn.GroupNorm(2, 4), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, n_classes))
    net[0].weight.requires_grad_(False)
    net[1].bias.requires_grad_(False)
    return net


# -- 1. user code that exits -------------------------------------------------------------------

def test_a_trainer_calling_sys_exit_0_stops_the_run_with_exit_2_and_keeps_stored_units(tmp_path, capsys):
    out = tmp_path / "run"
    capsys.readouterr()
    assert run("run", "--out", str(out), "--quiet", *TINY, f"trainer={HERE}:exiting_fit") == 2
    errors = error_lines(capsys)
    assert len(errors) == 1 and "model 2" in errors[0] and "SystemExit" in errors[0], errors
    chunks = out / "variants" / "nonprivate" / "units"
    assert sorted(p.name for p in chunks.glob("*.json")) == ["000000-000002.json"]   # models 0-1 kept


def test_a_factory_calling_sys_exit_is_exit_2_before_anything_is_written(tmp_path, capsys):
    line = refused_before_writing(capsys, tmp_path / "run", f"model={HERE}:exiting_factory")
    assert "'model'" in line and "SystemExit" in line


def test_sys_exit_anywhere_below_the_command_is_exit_2(monkeypatch, tiny_run, capsys):
    monkeypatch.setattr(cli, "_print_audit", lambda *a: sys.exit(0))
    capsys.readouterr()
    assert run("check", str(tiny_run)) == 2
    assert len(error_lines(capsys)) == 1


# -- 2. values that train NaN models --------------------------------------------------------------

@pytest.mark.parametrize("override", ["max_grad_norm=inf", "weight_decay=inf", "noise_scale=nan", "lr=nan",
                                      "zipf_a=inf", "canary_norm=nan", "momentum=nan", "label_noise=nan"])
def test_infinite_or_nan_floats_are_refused_naming_the_field(override):
    field = override.split("=")[0]
    with pytest.raises(ConfigError) as e:
        config.load(None, [override])
    assert e.value.field == field


def test_a_unit_with_nan_outputs_is_not_stored_and_names_variant_and_model(tmp_path, capsys, monkeypatch):
    real = execution.train_models

    def diverging(spec, req, **kw):
        outs = real(spec, req, **kw)
        if spec.dp is not None:
            outs["train_margin"][1, 3] = np.nan
        return outs

    monkeypatch.setattr(execution, "train_models", diverging)
    out = tmp_path / "run"
    capsys.readouterr()
    assert run("run", "--out", str(out), "--quiet", *TINY) == 2
    errors = error_lines(capsys)
    assert len(errors) == 1 and "dp-eps4" in errors[0] and "model 1" in errors[0] and "mlp" in errors[0], errors
    assert not list((out / "variants" / "dp-eps4").glob("units/*.json"))
    assert (out / "variants" / "nonprivate" / "complete.json").exists()   # what was good is kept


# -- 3. frozen parameters -------------------------------------------------------------------------

def _reference_steps(spec, start, draws, k, ebs):
    """Opacus (GradSampleModule + DPOptimizer, or plain SGD) on model k's batches from ``start``."""
    model = build_model(spec)
    model.load_state_dict(start)
    if spec.dp is not None:
        module = GradSampleModule(model, batch_first=True, loss_reduction="sum")
        optimizer = DPOptimizer(torch.optim.SGD(module.parameters(), lr=spec.lr, momentum=spec.momentum,
                                                weight_decay=spec.weight_decay),
                                noise_multiplier=0.0, max_grad_norm=spec.dp.max_grad_norm,
                                expected_batch_size=ebs, loss_reduction="mean")
    else:
        module = model
        optimizer = torch.optim.SGD(model.parameters(), lr=spec.lr, momentum=spec.momentum,
                                    weight_decay=spec.weight_decay)
    for batch in draws:
        xb, yb = batch.x[k][batch.valid[k]], batch.y[k][batch.valid[k]]
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(module(xb), yb, reduction="sum")
        (loss if spec.dp is not None else loss / ebs).backward()
        optimizer.step()
    return model.state_dict()


FROZEN_CASES = [("frozen_but_last", (16,)), ("partly_frozen", (16,)), ("partly_frozen_conv", (2, 6, 6))]


@pytest.mark.parametrize(("factory", "shape"), FROZEN_CASES, ids=[c[0] for c in FROZEN_CASES])
@pytest.mark.parametrize("private", [False, True], ids=["sgd", "dpsgd"])
def test_frozen_parameters_train_in_the_batched_engine_exactly_as_in_opacus(factory, shape, private):
    """Two steps with momentum and weight decay, clipping active, noise off: the engine's models equal
    Opacus's, so frozen parameters take no gradient, no share of the clipping norm and no update."""
    torch.set_num_threads(1)
    dp = DPParams(noise_multiplier=0.0, max_grad_norm=0.05) if private else None
    spec = TrainSpec(arch=f"{HERE}:{factory}", input_shape=shape, n_classes=5, steps=2, sample_rate=0.25,
                     lr=0.3, momentum=0.9, weight_decay=0.01, dp=dp)
    K, n = 3, 40
    rng = np.random.default_rng(0)
    x_train = rng.normal(size=(n, *shape)).astype(np.float32) * 2
    y_train = rng.integers(0, 5, n)
    masks = rng.random((K, n)) < 0.6
    trainer = batched.stack_class(spec)(spec, x_train, y_train, masks, seed=3, noise_seed=4)
    assert type(trainer) is stack.ModelStack
    start = [trainer.model_state(k) for k in range(K)]
    draws = [trainer.sample_batch() for _ in range(2)]
    for batch in draws:
        trainer.step_on(batch)
    ebs = expected_batch_sizes(masks, spec.sample_rate)
    frozen = [name for name, p in build_model(spec).named_parameters() if not p.requires_grad]
    assert frozen
    for k in range(K):
        ref = _reference_steps(spec, start[k], draws, k, ebs[k])
        mine = trainer.model_state(k)
        for name in ref:
            torch.testing.assert_close(mine[name], ref[name], rtol=1e-4, atol=1e-6)
        for name in frozen:
            torch.testing.assert_close(mine[name], start[k][name], rtol=0, atol=0)


@pytest.mark.parametrize("factory", ["frozen_but_last", "partly_frozen"])
def test_frozen_parameters_get_no_noise_in_either_engine(factory):
    """With noise on, frozen parameters leave both engines exactly as they started."""
    spec = TrainSpec(arch=f"{HERE}:{factory}", input_shape=(16,), n_classes=5, steps=3, sample_rate=0.3, lr=0.5,
                     momentum=0.5, weight_decay=0.1, dp=DPParams(noise_multiplier=2.0, max_grad_norm=1.0))
    rng = np.random.default_rng(1)
    x = rng.normal(size=(30, 16)).astype(np.float32)
    y = rng.integers(0, 5, 30)
    masks = np.ones((2, 30), bool)
    trainer = batched.stack_class(spec)(spec, x, y, masks, seed=0, noise_seed=1)
    start = trainer.model_state(0)
    trainer.train(spec.steps)
    model = streams.initial_model(spec, 0, 0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opacus_engine.train_one(spec, model, torch.as_tensor(x), torch.as_tensor(y), batch_seed=0, noise_seed=1)
    after = model.state_dict()
    moved = 0
    for name, p in build_model(spec).named_parameters():
        if p.requires_grad:
            moved += not torch.equal(trainer.model_state(0)[name], start[name])
            moved += not torch.equal(after[name], before[name])
        else:
            assert torch.equal(trainer.model_state(0)[name], start[name]), name
            assert torch.equal(after[name], before[name]), name
    assert moved  # the trainable parameters did move


def test_the_mlp_fast_path_refuses_frozen_parameters():
    from dpmem.models.batched_mlp import MLPStack
    spec = TrainSpec(arch=f"{HERE}:frozen_but_last", input_shape=(16,), n_classes=5, steps=1, sample_rate=0.3,
                     lr=0.1)
    with pytest.raises(ValueError, match="frozen"):
        MLPStack(spec, np.zeros((4, 16), np.float32), np.zeros(4, np.int64), np.ones((1, 4), bool), seed=0,
                   noise_seed=0)


def test_a_run_with_a_frozen_body_trains_only_the_head(tmp_path):
    out = tmp_path / "run"
    assert run("run", "--out", str(out), "--quiet", *TINY, f"model={HERE}:frozen_but_last") == 0
    assert json.loads((out / "summary.json").read_text())["variants"]["dp-eps4"]["engine"] == "batched"


@pytest.mark.parametrize("factory", ["all_frozen", "no_parameters"])
def test_a_model_with_nothing_to_train_is_refused_before_anything_is_written(tmp_path, capsys, factory):
    line = refused_before_writing(capsys, tmp_path / "run", f"model={HERE}:{factory}")
    assert "'model'" in line and "no trainable parameters" in line


# -- 4. user code cannot change dpmem's data ------------------------------------------------------

def test_a_trainer_writing_into_its_inputs_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    capsys.readouterr()
    assert run("run", "--out", str(out), "--quiet", *TINY, f"trainer={HERE}:writing_fit") == 2
    errors = error_lines(capsys)
    assert len(errors) == 1 and "read-only" in errors[0] and "model 0" in errors[0], errors


def test_a_trainer_writing_through_torch_changes_only_its_own_copy(tmp_path):
    torch_writing_fit.sums.clear()
    assert run("run", "--out", str(tmp_path / "run"), "--quiet", *TINY, f"trainer={HERE}:torch_writing_fit") == 0
    sums = torch_writing_fit.sums
    assert len(sums) == 8 and sums[0] > 0 and all(s == sums[0] for s in sums), sums


# -- 5. a completion record without checksums -----------------------------------------------------

def test_a_completion_record_without_checksums_is_damaged(tiny_copy, capsys):
    record_path = tiny_copy / "variants" / "nonprivate" / "complete.json"
    record = json.loads(record_path.read_text())
    del record["sha256"]
    record_path.write_text(json.dumps(record))
    correct = tiny_copy / "variants" / "nonprivate" / "train_correct.npy"
    np.save(correct, ~np.load(correct))
    capsys.readouterr()
    assert run("check", str(tiny_copy)) == 2
    errors = error_lines(capsys)
    assert len(errors) == 1 and "complete.json" in errors[0] and "checksum" in errors[0], errors
    assert RunStore.open(tiny_copy).damaged_files("nonprivate")
    assert run("run", "--out", str(tiny_copy), "--quiet", *TINY) == 0            # repaired: retrained
    assert run("check", str(tiny_copy)) == 0


def test_a_record_missing_one_checksum_is_damaged(tiny_copy):
    record_path = tiny_copy / "variants" / "dp-eps4" / "complete.json"
    record = json.loads(record_path.read_text())
    del record["sha256"]["test_margin"]
    record_path.write_text(json.dumps(record))
    store = RunStore.open(tiny_copy)
    assert store.damaged_files("dp-eps4") == [tiny_copy / "variants" / "dp-eps4" / "test_margin.npy"]
    with pytest.raises(UsageError, match="no checksum for test_margin"):
        store.variant_arrays("dp-eps4")


# -- 6. the Python API validates its inputs -------------------------------------------------------

@pytest.fixture
def masks_correct():
    rng = np.random.default_rng(0)
    return rng.random((20, 30)) < 0.5, rng.random((20, 30)) < 0.7


@pytest.mark.parametrize("fn", ["memorization", "influence", "audit"])
def test_float_probabilities_are_refused_naming_the_argument(fn, masks_correct):
    masks, correct = masks_correct
    call = _api(fn)
    with pytest.raises(ValueError, match=r"correct\w* must be a bool .*float64"):
        call(masks, correct * 0.9)
    nan = correct.astype(float)
    nan[0, 0] = np.nan
    with pytest.raises(ValueError, match="with NaN"):
        call(masks, nan)
    with pytest.raises(ValueError, match="masks must hold only 0 and 1"):
        call(masks.astype(int) * 2, correct)


def _api(fn):
    if fn == "audit":
        return lambda m, c: dpmem.audit(m, c, epsilon=1.0, delta=1e-5)
    return getattr(dpmem, fn)


def test_integer_zero_one_arrays_are_accepted_as_bools(masks_correct):
    masks, correct = masks_correct
    a = dpmem.memorization(masks.astype(np.int8), correct.astype(np.int64))
    b = dpmem.memorization(masks, correct)
    assert a.equals(b)


@pytest.mark.parametrize("fn", ["memorization", "influence", "audit"])
def test_shapes_are_checked(fn, masks_correct):
    masks, correct = masks_correct
    with pytest.raises(ValueError, match=r"correct\w* must .*K = 20"):
        _api(fn)(masks, correct[:5])
    with pytest.raises(ValueError, match="masks must be"):
        _api(fn)(masks[0], correct)


@pytest.mark.parametrize("fn", ["memorization", "influence", "audit"])
def test_a_result_that_tested_nothing_says_so(fn, masks_correct):
    _, correct = masks_correct
    with pytest.raises(ValueError, match="no in/out comparison"):
        _api(fn)(np.ones_like(correct), correct)


# -- 7. `dpmem check --claim` with an infinite budget -----------------------------------------------

@pytest.mark.parametrize("claim", ["nonprivate=inf", "nonprivate=nan", "nonprivate=-1"])
def test_an_unusable_claim_is_exit_2_in_one_line(tiny_run, capsys, claim):
    capsys.readouterr()
    assert run("check", str(tiny_run), "--claim", claim) == 2
    errors = error_lines(capsys)
    assert len(errors) == 1 and "--claim" in errors[0], errors


# -- 8 and 9. found before anything is written ------------------------------------------------------

@pytest.mark.parametrize(("override", "field"), [
    ("models=1000000000", "models"), ("models=1e20", "models"), ("epsilons=1e-6", "epsilons"),
    ("seed=-1", "seed"), ("hidden=1000000000", "hidden"), ("zipf_a=inf", "zipf_a")])
def test_values_that_would_crash_later_are_refused_before_anything_is_written(tmp_path, capsys, override, field):
    line = refused_before_writing(capsys, tmp_path / "run", override)
    assert f"'{field}'" in line, line


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_device_cuda_without_a_gpu_is_refused_before_anything_is_written(tmp_path, capsys):
    line = refused_before_writing(capsys, tmp_path / "run", "device=cuda")
    assert "'device'" in line


def test_memory_is_sized_from_the_config():
    from dpmem.bench.run import resources
    cfg = config.load(None, ["models=1000", "epsilons=1,4"])
    resources.check_arrays_fit(cfg, 1000, 1000, available=1 << 30)          # 1000 x 2000 x 3 variants: fits
    with pytest.raises(ConfigError, match="'models'.*GiB"):
        resources.check_arrays_fit(cfg, 1000, 1000, available=1 << 20)
    spec = TrainSpec(arch="mlp", input_shape=(64,), n_classes=10, hidden=(1000000000,), steps=1, sample_rate=0.1,
                     lr=0.1)
    assert resources.parameter_count(spec) == 64 * 10**9 + 10**9 + 10 * 10**9 + 10


def _npz(path, **changes):
    rng = np.random.default_rng(0)
    arrays = dict(x_train=rng.normal(size=(40, 4)).astype(np.float32), y_train=np.arange(40) % 2,
                  x_test=rng.normal(size=(20, 4)).astype(np.float32), y_test=np.arange(20) % 2,
                  subgroup_train=np.arange(40) % 4, subgroup_test=np.arange(20) % 4)
    arrays.update(changes)
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize(("changes", "fragment"), [
    ({"subgroup_train": np.where(np.arange(40) == 0, 10**9, np.arange(40) % 4)}, "subgroup id 1000000000"),
    ({"y_train": np.where(np.arange(40) == 0, 10**9, np.arange(40) % 2)}, "without gaps"),
    ({"y_train": np.arange(40) % 3 * 2 + (np.arange(40) % 3 == 2)}, "without gaps"),   # classes 0, 2, 5
])
def test_bad_ids_in_a_data_file_are_refused_before_anything_is_written(tmp_path, capsys, changes, fragment):
    path = _npz(tmp_path / "d.npz", **changes)
    line = refused_before_writing(capsys, tmp_path / "run", "dataset=file", f"data_path={path}", "zipf_a=0",
                                  base=FILE_RUN)
    assert "'data_path'" in line and fragment in line, line


def test_loo_with_no_examples_is_exit_2(tiny_run, capsys):
    capsys.readouterr()
    assert run("loo", str(tiny_run), "--examples", "0", "--quiet") == 2
    errors = error_lines(capsys)
    assert len(errors) == 1 and "--examples" in errors[0]
    assert not (tiny_run / "loo").exists()


@pytest.mark.parametrize("where", ["start-up", "analysis"])
def test_ctrl_c_outside_training_is_one_line_and_exit_130(tmp_path, capsys, monkeypatch, where):
    from dpmem.bench.report import analysis
    def interrupt(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline if where == "start-up" else analysis,
                        "check_inputs" if where == "start-up" else "analyse", interrupt)
    capsys.readouterr()
    assert run("run", "--out", str(tmp_path / "run"), "--quiet", *TINY) == 130
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) <= 2 and "interrupted" in err[-1] and "Traceback" not in "".join(err), err


# -- 10. accepted silently before -------------------------------------------------------------------

def test_a_duplicate_key_in_a_yaml_file_is_refused(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("models: 4\nepochs: 2\nmodels: 8\n")
    with pytest.raises(UsageError, match="'models' is given twice"):
        config.load(path)


def test_a_duplicate_key_in_a_json_file_is_refused(tmp_path):
    path = tmp_path / "c.json"
    path.write_text('{"models": 4, "models": 8}')
    with pytest.raises(UsageError, match="given twice"):
        config.load(path)


def test_the_same_key_twice_on_the_command_line_is_refused(tmp_path, capsys):
    line = refused_before_writing(capsys, tmp_path / "run", "epochs=2", "epochs=3")
    assert "'epochs' is given twice" in line


@pytest.mark.parametrize("text", ["lr = true", "models = false", "epsilons = [true]", 'dataset = 3'])
def test_a_toml_value_of_the_wrong_type_is_refused(tmp_path, text):
    path = tmp_path / "c.toml"
    path.write_text(text + "\n")
    with pytest.raises(ConfigError, match="cannot read"):
        config.load(path)


def test_infinite_margins_are_stored_in_float16_range_and_said_in_one_line(tmp_path, capsys):
    out = tmp_path / "run"
    capsys.readouterr()
    assert run("run", "--out", str(out), "--quiet", *TINY, f"trainer={HERE}:infinite_fit") == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if "float16's range" in line]
    assert len(notes) == 2 and all(line.startswith("dpmem: note:") for line in notes), notes   # once a variant
    arrays = RunStore.open(out).variant_arrays("nonprivate")
    assert np.isfinite(arrays["test_margin"]).all() and arrays["test_margin"][0, 0] == 65504
    assert arrays["train_margin"][0, 1] == -65504


# -- 11 and 12. the lock ------------------------------------------------------------------------------

def _try_lock(root: Path) -> int:
    code = ("import sys; from dpmem.bench.store import run_store as store; store.LOCK_WAIT_S = 0.2\n"
            "try:\n    store.RunStore(sys.argv[1]).acquire()\nexcept store.StoreBusy:\n    sys.exit(3)")
    env = {**os.environ, "PYTHONPATH": str(Path(dpmem.__file__).parent.parent)}
    return subprocess.run([sys.executable, "-c", code, str(root)], env=env, timeout=120).returncode


def test_dpmem_run_releases_the_lock_when_it_returns(tmp_path):
    out = tmp_path / "run"
    dpmem.run(None, out=out, **dict(item.split("=") for item in TINY))
    assert _try_lock(out) == 0


def test_deleting_the_lock_file_does_not_let_a_second_writer_in(tiny_copy):
    store = RunStore(tiny_copy).acquire()
    try:
        (tiny_copy / ".lock").unlink()
        assert _try_lock(tiny_copy) == 3
    finally:
        store.release()
    assert _try_lock(tiny_copy) == 0


# -- 13. messages that say what is wrong ----------------------------------------------------------------

def test_a_text_file_named_npz_is_not_called_pickled(tmp_path, capsys):
    path = tmp_path / "d.npz"
    path.write_text("x_train,y_train\n1,2\n")
    line = refused_before_writing(capsys, tmp_path / "run", "dataset=file", f"data_path={path}", "zipf_a=0",
                                  base=FILE_RUN)
    assert "not a readable .npz archive: no zip header" in line and "pickl" not in line


def test_an_npy_renamed_to_npz_is_named_as_such(tmp_path, capsys):
    path = tmp_path / "d.npz"
    with open(path, "wb") as f:
        np.save(f, np.zeros(3))
    line = refused_before_writing(capsys, tmp_path / "run", "dataset=file", f"data_path={path}", "zipf_a=0",
                                  base=FILE_RUN)
    assert "single .npy array" in line and "TypeError" not in line


def test_write_baseline_to_a_directory_names_the_directory(tiny_run, tmp_path, capsys):
    capsys.readouterr()
    assert run("check", str(tiny_run), "--write-baseline", str(tmp_path)) == 2
    errors = error_lines(capsys)
    assert len(errors) == 1 and f"--write-baseline {tmp_path} is a directory" in errors[0], errors


def test_a_config_json_of_the_wrong_shape_is_called_corrupt(tiny_copy, capsys):
    (tiny_copy / "config.json").write_text(json.dumps({"config": {"models": 4}}))
    capsys.readouterr()
    assert run("run", "--out", str(tiny_copy), "--quiet", *TINY) == 2
    errors = error_lines(capsys)
    assert len(errors) == 1 and "corrupt file" in errors[0] and "hash None" not in errors[0], errors


def test_an_edited_config_json_is_blamed_not_the_masks(tiny_copy, capsys):
    meta = json.loads((tiny_copy / "config.json").read_text())
    meta["config"]["models"] = 6
    (tiny_copy / "config.json").write_text(json.dumps(meta))
    for argv in (["check", str(tiny_copy)], ["run", "--out", str(tiny_copy), "--quiet",
                                                    *[a if a != "models=4" else "models=6" for a in TINY]]):
        capsys.readouterr()
        assert run(*argv) == 2
        errors = error_lines(capsys)
        assert len(errors) == 1 and "config.json" in errors[0] and "edited" in errors[0], errors


def test_a_misspelt_key_gets_a_suggestion(tmp_path, capsys):
    line = refused_before_writing(capsys, tmp_path / "run", "epoch=2")
    assert "did you mean 'epochs'?" in line


def test_user_output_stays_off_the_summary_table(tmp_path, capsys):
    capsys.readouterr()
    assert run("run", "--out", str(tmp_path / "run"), "--quiet", *TINY, f"trainer={HERE}:printing_fit") == 0
    captured = capsys.readouterr()
    assert "USER-OUTPUT-FROM-FIT" not in captured.out and "USER-OUTPUT-FROM-FIT" in captured.err
    assert captured.out.lstrip().startswith("|")      # stdout is dpmem's table


# -- the probe ------------------------------------------------------------------------------------------

def test_the_probe_runs_cases_and_counts_silent_passes(capsys, monkeypatch):
    from dpmem.bench.tools import probe
    assert probe.main(["--only", "run seed=-1", "--no-trials"]) == 0
    out = capsys.readouterr().out
    assert "config field 'seed'" in out and "silent passes: 0" in out and "tracebacks: 0" in out
    # a case that should fail but passes is counted, and fails the probe
    monkeypatch.setattr(probe, "catalogue", lambda: [probe.Case("planted silent pass", ["run", "--out", "{run}",
                                                                                         "--quiet", "models=1"])])
    monkeypatch.setattr(probe, "_main", lambda argv, env=None: (0, "", ""))
    assert probe.main(["--only", "planted", "--no-trials"]) == 1
    assert "silent passes: 1" in capsys.readouterr().out

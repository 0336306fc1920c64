"""Your own data, architecture and DP training: bench/README.md's "Bring your own" examples end to end,
and every bad input refused with one line and exit code 2 before anything is written."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from dpmem.bench import cli
from dpmem.bench.store.run_store import RunStore
from dpmem.privacy.errors import UsageError

EXAMPLES = Path(__file__).parent / "examples"
TRAINER_RUN = ["dataset=synthetic", "n_train=60", "n_test=100", "n_subgroups=10", "dim=8", "models=8",
               "unit_size=2", "epochs=2", "batch_size=16", "epsilons=4", "lr=0.2"]
FILE_RUN = ["dataset=file", "zipf_a=0", "models=4", "unit_size=4", "epochs=2", "epsilons=8", "lr=0.2"]


# The examples import by name, as from the directory a user runs dpmem in.
if str(EXAMPLES) not in sys.path:
    sys.path.insert(0, str(EXAMPLES))


@pytest.fixture(scope="module")
def digits_npz(tmp_path_factory):
    import my_data
    path = tmp_path_factory.mktemp("data") / "digits.npz"
    my_data.write_npz(path)
    return path


def run(*argv) -> int:
    return cli.main(list(argv))


def summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def refused(capsys, argv: list[str], out: Path, *fragments: str) -> None:
    """Exit 2, one line naming the problem, and no run directory."""
    capsys.readouterr()
    assert run("run", "--out", str(out), "--quiet", *argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    assert not out.exists()


# -- your own data -------------------------------------------------------------------------------

def test_user_npz_with_a_user_convnet(digits_npz, tmp_path):
    out = tmp_path / "run"
    assert run("run", "--out", str(out), "--quiet", *FILE_RUN, f"data_path={digits_npz}",
               "model=my_models:small_convnet") == 0
    s = summary(out)
    assert s["run"]["subgroups"] == "derived" and s["run"]["data_fingerprint"].startswith("sha256:")
    assert s["run"]["n_train"] == 300 and s["run"]["n_test"] == 400      # zipf_a = 0: kept as given
    for variant in s["variants"].values():
        assert variant["engine"] == "batched" and variant["model"] == "my_models:small_convnet"
    assert s["variants"]["nonprivate"]["test_accuracy"] > 0.15             # it learned something (chance 0.1)
    store = RunStore.open(out)
    with np.load(digits_npz) as npz:
        np.testing.assert_array_equal(store.data()["y_train"], npz["y_train"])   # same order, no resampling
    assert run("check", str(out)) == 0


def test_given_subgroups_and_a_factory_on_the_batched_engine(tmp_path):
    import my_data
    path = tmp_path / "with_groups.npz"
    my_data.write_npz(path, with_subgroups=True)
    out = tmp_path / "run"
    assert run("run", "--out", str(out), "--quiet", *FILE_RUN, f"data_path={path}", "model=my_models:wide_mlp") == 0
    s = summary(out)
    assert s["run"]["subgroups"] == "given"
    assert {v["engine"] for v in s["variants"].values()} == {"batched"}
    with np.load(path) as npz:
        np.testing.assert_array_equal(RunStore.open(out).data()["g_train"], npz["subgroup_train"])
    # the same command on changed arrays is refused: the run records its data's fingerprint
    with np.load(path) as npz:
        arrays = dict(npz)
    arrays["x_train"][0] += 1
    np.savez(path, **arrays)
    assert run("run", "--out", str(out), "--quiet", *FILE_RUN, f"data_path={path}", "model=my_models:wide_mlp") == 2


def test_zipf_resampling_of_a_file_needs_a_target_size(digits_npz, tmp_path, capsys):
    refused(capsys, ["dataset=file", f"data_path={digits_npz}", "zipf_a=1"], tmp_path / "r", "'n_train'")
    from dpmem.bench.config import Config
    from dpmem.bench.data import load_dataset
    ds = load_dataset(Config(dataset="file", data_path=str(digits_npz), zipf_a=1, n_train=100,
                                 clusters_per_class=3))
    counts = np.sort(ds.subgroup_counts)
    assert 60 <= ds.n_train <= 100 and ds.info["subgroups"] == "derived"
    assert counts[0] == 1 and counts[-1] >= 8                               # a long tail: singletons and a head
    assert ds.n_test == 400                                                 # the test set is never resampled


def test_the_data_fingerprint_changes_with_any_array(tmp_path):
    from dpmem.bench.data.fingerprint import arrays_fingerprint as array_fingerprint
    a = {"x_train": np.zeros((3, 2), np.float32), "y_train": np.array([0, 1, 0])}
    base = array_fingerprint(a)
    assert base == array_fingerprint({k: v.copy() for k, v in a.items()})
    assert base != array_fingerprint({**a, "y_train": np.array([0, 1, 1])})
    assert base != array_fingerprint({**a, "x_train": np.zeros((2, 3), np.float32)})     # same bytes, other shape
    assert base != array_fingerprint({**a, "x_train": np.zeros((3, 2), np.float64)[:, :2].astype(np.float64)})


def _bad_npz(tmp_path, name, **changes):
    rng = np.random.default_rng(0)
    arrays = dict(x_train=rng.normal(size=(40, 5)).astype(np.float32), y_train=rng.integers(0, 3, 40),
                  x_test=rng.normal(size=(20, 5)).astype(np.float32), y_test=rng.integers(0, 3, 20))
    arrays.update(changes)
    arrays = {k: v for k, v in arrays.items() if v is not None}
    path = tmp_path / f"{name}.npz"
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize("name, changes, fragment", [
    ("missing", {"y_test": None}, "missing array 'y_test'"),
    ("lengths", {"y_train": np.zeros(39, np.int64)}, "y_train has shape (39,), expected (40,)"),
    ("nan", {"x_test": np.full((20, 5), np.nan, np.float32)}, "x_test holds NaN or inf"),
    ("inf", {"x_train": np.full((40, 5), np.inf, np.float32)}, "x_train holds NaN or inf"),
    ("range", {"y_test": np.full(20, 7)}, "y_test has label 7, out of range"),
    ("negative", {"y_train": -np.ones(40, np.int64)}, "negative value -1"),
    ("fractional", {"y_train": np.full(40, 0.5)}, "y_train must hold integers"),
    ("half_subgroups", {"subgroup_train": np.zeros(40, np.int64)}, "give both or neither"),
])
def test_bad_data_file_is_refused_before_anything_is_written(tmp_path, capsys, name, changes, fragment):
    path = _bad_npz(tmp_path, name, **changes)
    refused(capsys, ["dataset=file", "zipf_a=0", f"data_path={path}"], tmp_path / "run", "'data_path'", fragment)


def test_missing_or_unreadable_data_file(tmp_path, capsys):
    refused(capsys, ["dataset=file", "zipf_a=0", f"data_path={tmp_path / 'nope.npz'}"], tmp_path / "r", "no such file")
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip")
    refused(capsys, ["dataset=file", "zipf_a=0", f"data_path={junk}"], tmp_path / "r", "not a readable .npz")
    refused(capsys, ["dataset=file"], tmp_path / "r", "'data_path'", "needs data_path")


# -- your own architecture -----------------------------------------------------------------------

def raising_factory(input_shape, n_classes):
    raise RuntimeError("out of coffee")


def not_a_module(input_shape, n_classes):
    return "a string"


def batchnorm_net(input_shape, n_classes):
    from torch import nn
    return nn.Sequential(nn.Conv2d(input_shape[0], 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(n_classes))


def wrong_output(input_shape, n_classes):
    from torch import nn
    return nn.Sequential(nn.Flatten(), nn.Linear(64, n_classes + 1))


@pytest.mark.parametrize("model, fragment", [
    ("no_such_module:net", "cannot import 'no_such_module' (ModuleNotFoundError"),
    ("my_models:no_such_factory", "has no attribute 'no_such_factory'"),
    ("test_bring_your_own:raising_factory", "raised RuntimeError: out of coffee"),
    ("test_bring_your_own:not_a_module", "returned a str, not a torch.nn.Module"),
    ("test_bring_your_own:batchnorm_net", "BatchNorm cannot support training with differential privacy"),
    ("test_bring_your_own:wrong_output", "expected (2, 10) logits"),
    ("not a path", "unknown model 'not a path'"),
])
def test_bad_factory_is_refused_before_anything_is_written(digits_npz, tmp_path, capsys, model, fragment):
    refused(capsys, [f"data_path={digits_npz}", "dataset=file", "zipf_a=0", f"model={model}"], tmp_path / "run",
            "'model'", fragment)


def test_an_engine_that_cannot_train_the_module_is_refused(digits_npz, tmp_path, capsys):
    refused(capsys, ["dataset=file", "zipf_a=0", f"data_path={digits_npz}", "model=my_models:layernorm_mlp",
                     "engine=batched"], tmp_path / "run", "'engine'", "LayerNorm is not supported")


# -- your own training code ----------------------------------------------------------------------

def test_user_opacus_trainer_end_to_end_and_audited(tmp_path, monkeypatch):
    import my_trainer
    seen = []

    def recording_fit(**kw):
        seen.append(kw)
        return my_trainer.fit(**kw)

    monkeypatch.setattr(my_trainer, "recording_fit", recording_fit, raising=False)
    out = tmp_path / "run"
    assert run("run", "--out", str(out), "--quiet", *TRAINER_RUN, "trainer=my_trainer:recording_fit") == 0
    s = summary(out)
    assert {v["engine"] for v in s["variants"].values()} == {"user"}
    assert s["variants"]["dp-eps4"]["trainer"] == "my_trainer:recording_fit"
    assert s["variants"]["nonprivate"]["test_accuracy"] > 0.2               # trained (chance is about 0.1)
    plan = json.loads((out / "variants" / "dp-eps4" / "plan.json").read_text())
    dp_calls = [kw for kw in seen if kw["params"].private]
    assert [kw["index"] for kw in dp_calls] == list(range(8))
    masks = RunStore.open(out).masks()
    for kw in dp_calls:
        p = kw["params"]
        assert p.noise_multiplier == plan["noise_multiplier"] and p.max_grad_norm == plan["max_grad_norm"]
        assert p.sample_rate == plan["sample_rate"] and p.steps == plan["steps"]
        np.testing.assert_array_equal(kw["train_indices"], np.flatnonzero(masks[kw["index"]]))
    plain = {kw["index"]: kw for kw in seen if not kw["params"].private}
    assert all(plain[k]["seed"] == kw["seed"] and plain[k]["noise_seed"] != kw["noise_seed"]
               for k, kw in ((kw["index"], kw) for kw in dp_calls))     # same init/batches, other noise
    assert run("check", str(out)) == 0


def test_a_trainer_that_does_not_import_is_refused_before_anything_is_written(tmp_path, capsys):
    refused(capsys, [*TRAINER_RUN, "trainer=no_such_module:fit"], tmp_path / "run", "'trainer'", "cannot import")
    refused(capsys, [*TRAINER_RUN, "trainer=my_trainer:fit", "engine=opacus"], tmp_path / "run", "'engine'")


def flaky_fit(*, index, **kw):
    import os
    if os.environ.get("DPMEM_TEST_FAIL_AT") == str(index):
        raise ValueError("disk full\nsecond line of the message")
    flaky_fit.calls.append(index)
    n = len(kw["y_train"])
    return {"train_correct": np.ones(n, bool), "train_margin": np.ones(n, np.float32),
            "test_correct": np.zeros(len(kw["evals"]["test"][1]), bool),
            "test_margin": -np.ones(len(kw["evals"]["test"][1]), np.float32)}


flaky_fit.calls = []


def test_a_failing_trainer_names_the_model_and_keeps_the_stored_units(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    argv = ["run", "--out", str(out), "--quiet", *TRAINER_RUN, "trainer=test_bring_your_own:flaky_fit"]
    monkeypatch.setenv("DPMEM_TEST_FAIL_AT", "5")
    flaky_fit.calls.clear()
    capsys.readouterr()
    assert run(*argv) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1 and errors[0].endswith("failed on model 5: ValueError: disk full"), errors
    chunks = out / "variants" / "nonprivate" / "units"
    assert sorted(p.name for p in chunks.glob("*.json")) == ["000000-000002.json", "000002-000004.json"]
    monkeypatch.delenv("DPMEM_TEST_FAIL_AT")
    flaky_fit.calls.clear()
    assert run(*argv) == 0                                   # the fixed trainer resumes
    assert flaky_fit.calls[:4] == [4, 5, 6, 7]               # units 0-1 and 2-3 were not redone
    assert RunStore.open(out).variant_arrays("nonprivate")["train_correct"].shape == (8, 60)


def _returning(result_for):
    def fit(*, index, evals, **kw):
        good = {f"{s}_{k}": (np.ones(len(y), bool) if k == "correct" else np.zeros(len(y), np.float32))
                for s, (_, y) in evals.items() for k in ("correct", "margin")}
        return result_for(index, good)
    return fit


BAD_RETURNS = {
    "missing_key": (lambda i, good: {k: v for k, v in good.items() if k != "test_margin"}, "missing ['test_margin']"),
    "shape": (lambda i, good: {**good, "train_correct": good["train_correct"][:-1]}, "train_correct has shape (59,)"),
    "dtype": (lambda i, good: {**good, "test_correct": good["test_correct"].astype(int)}, "expected bool"),
    "nan": (lambda i, good: {**good, "test_margin": good["test_margin"] + (np.nan if i == 3 else 0)}, "test_margin holds NaN"),
    "not_a_mapping": (lambda i, good: [1, 2], "expected a mapping"),
}


@pytest.mark.parametrize("case", list(BAD_RETURNS))
def test_bad_trainer_returns_name_the_model(case, monkeypatch):
    from dpmem.models import user_engine as trainer_mod
    from dpmem.models.spec import TrainRequest, TrainSpec
    make, fragment = BAD_RETURNS[case]
    monkeypatch.setattr(trainer_mod, "load_callable", lambda path, field: _returning(make))
    spec = TrainSpec(arch="mlp", input_shape=(2,), n_classes=2, steps=1, sample_rate=0.5, lr=0.1, trainer="x.y:fit")
    x = np.zeros((60, 2), np.float32)
    y = np.zeros(60, np.int64)
    req = TrainRequest(x_train=x, y_train=y, masks=np.ones((2, 60), bool), seed=0, noise_seed=1,
                       evals={"train": (x, y), "test": (x[:10], y[:10])}, stream_ids=np.array([3, 4]))
    with pytest.raises(UsageError, match="model 3") as e:
        trainer_mod.train(spec, req)
    assert fragment in str(e.value)


def test_the_readme_shows_exactly_the_examples_the_tests_run():
    # The listings live in bench/README.md ("Bring your own"); the top-level README links there.
    readme = (Path(__file__).parent.parent / "bench" / "README.md").read_text()
    for name in ("my_data.py", "my_models.py", "my_trainer.py"):
        assert f"```python\n{(EXAMPLES / name).read_text().rstrip()}\n```" in readme, name

"""The public Python API (``import dpmem``), the registries behind it, and the one-namespace install."""
import tomllib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import dpmem
from dpmem.bench import data
from dpmem.bench.config import Config
from dpmem.privacy.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
SMALL = dict(dataset="synthetic", n_train=80, n_test=120, n_subgroups=12, dim=8, models=12, unit_size=6,
             epochs=2, epsilons=(4,), hidden=(16,))


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    return dpmem.run(SMALL, out=tmp_path_factory.mktemp("api") / "run", seed=3)


def test_run_from_a_dict_with_overrides_and_its_tables(small_run):
    assert small_run.config.seed == 3 and small_run.config.models == 12
    assert list(small_run.summary["variants"]) == ["nonprivate", "dp-eps4"]
    assert small_run.summary["variants"]["dp-eps4"]["engine"] == "batched"
    assert small_run.summary["variants"]["dp-eps4"]["model"] == "mlp"
    mem = small_run.memorization
    assert isinstance(mem, pd.DataFrame) and len(mem) == 2 * 80 and {"mem", "p_in", "eps_lb"} <= set(mem.columns)
    assert {"test_acc", "acc_loss"} <= set(small_run.subgroups.columns)
    assert "freq_bin" in small_run.frequency_bins.columns
    audit = small_run.audit
    assert list(audit["variant"]) == ["nonprivate", "dp-eps4"]
    assert audit.set_index("variant").loc["dp-eps4", "epsilon_claimed"] == 4.0


def test_open_run_reads_the_same_run_and_the_estimators_agree(small_run):
    again = dpmem.open_run(small_run.path)
    assert again.summary == small_run.summary
    from dpmem.bench.store.run_store import RunStore
    store = RunStore.open(small_run.path)
    masks, arrays = store.masks(), store.variant_arrays("nonprivate")
    mem = dpmem.memorization(masks, arrays["train_correct"])
    stored = again.memorization.query("variant == 'nonprivate'")
    np.testing.assert_allclose(mem["mem"].to_numpy(), stored["mem"].to_numpy())
    infl = dpmem.influence(masks, arrays["test_correct"])
    assert infl.shape == (80, 120)
    j = 5
    in_models, out_models = masks[:, 0], ~masks[:, 0]
    expected = arrays["test_correct"][in_models, j].mean() - arrays["test_correct"][out_models, j].mean()
    assert infl[0, j] == pytest.approx(expected)
    verdict, per_example = dpmem.audit(masks, arrays["train_correct"], epsilon=4.0, delta=1e-5, alpha=0.05)
    summary_row = again.audit.set_index("variant")
    assert verdict.violations == int(per_example["violation"].sum())
    assert dpmem.audit(masks, arrays["train_correct"], epsilon=4.0, delta=1e-5, alpha=0.05,
                       sampling="fixed")[0].adjacency == "replace-one"
    assert "nonprivate" in summary_row.index


def test_a_bad_value_raises_before_anything_is_written(tmp_path):
    with pytest.raises(ConfigError) as e:
        dpmem.run(SMALL, out=tmp_path / "bad", model="no_such_module:net")
    assert e.value.field == "model" and not (tmp_path / "bad").exists()
    with pytest.raises(ConfigError, match="'models'"):
        dpmem.load_config(SMALL, models=1)


def test_load_config_accepts_a_path_a_dict_and_a_config(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('dataset = "synthetic"\nmodels = 7\n')
    from_path = dpmem.load_config(path, seed=2)
    assert from_path.models == 7 and from_path.seed == 2
    assert dpmem.load_config(from_path) is from_path
    assert dpmem.load_config(from_path, models=9).models == 9
    assert dpmem.load_config({"dataset": "synthetic", "models": 7, "seed": 2}) == from_path


# -- registries --------------------------------------------------------------------------------

def test_config_validates_datasets_against_the_data_registry(monkeypatch):
    with pytest.raises(ConfigError, match="choose from digits, mnist5k, .*file"):
        Config(dataset="imagenet")
    monkeypatch.setitem(data.DATASETS, "imagenet", lambda cfg: None)
    assert Config(dataset="imagenet").dataset == "imagenet"     # one registration is all it takes


def test_architectures_registry_and_factories():
    from torch import nn

    from dpmem.models.nets import ARCHITECTURES, build_model
    from dpmem.models.spec import TrainSpec
    assert set(ARCHITECTURES) == {"logreg", "mlp", "cnn", "cnn1d", "resnet8", "resnet20", "wrn16"}
    spec = TrainSpec(arch="mlp", input_shape=(1, 8, 8), n_classes=10, hidden=(5,), steps=1, sample_rate=0.1, lr=0.1)
    assert [type(m) for m in build_model(spec)] == [nn.Flatten, nn.Linear, nn.ReLU, nn.Linear]
    with pytest.raises(ConfigError, match="choose from logreg, mlp, cnn"):
        Config(model="resnet")
    assert Config(model="my_models:small_convnet").model == "my_models:small_convnet"
    with pytest.raises(ConfigError, match="'trainer'"):
        Config(trainer="not a path")
    with pytest.raises(ConfigError, match="'engine'"):
        Config(trainer="a.b:fit", engine="batched")


def test_faults_registry_changes_only_what_it_says():
    from dpmem.privacy.faults import FAULTS, get
    assert set(FAULTS) == {"none", "no_noise", "no_clipping", "wrong_sample_rate", "half_noise", "noise_x0.75"}
    assert get("none").trained(2.0, 1.0) == (2.0, 1.0) and get("none").told_sample_rate(0.1) == 0.1
    assert get("no_noise").trained(2.0, 1.0) == (0.0, 1.0)
    sigma, clip = get("no_clipping").trained(2.0, 1.0)
    assert clip > 1e9 and sigma * clip == pytest.approx(2.0)           # the noise std sigma*C is kept
    assert get("wrong_sample_rate").told_sample_rate(0.1) == pytest.approx(0.01)
    assert get("half_noise").trained(2.0, 1.0) == (1.0, 1.0) and get("half_noise").told_sample_rate(0.1) == 0.1
    assert get("noise_x0.75").trained(2.0, 1.0) == (1.5, 1.0) and get("noise_x0.75").told_sample_rate(0.1) == 0.1
    with pytest.raises(ConfigError, match="'fault'"):
        Config(fault="half_broken")


# -- one namespace ------------------------------------------------------------------------------

def test_the_install_maps_every_package_under_dpmem():
    """pyproject's package list is dpmem and its folders, and every folder holding Python code is in it,
    so a fresh install puts nothing but dpmem at the top level of site-packages."""
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert tool["package-dir"] == {"dpmem": "."}
    packages = set(tool["packages"])
    assert all(p == "dpmem" or p.startswith("dpmem.") for p in packages)
    folders = [d for d in ROOT.iterdir() if d.is_dir() and not d.name.startswith(".") and d.name != "tests"]
    on_disk = {"dpmem"} | {"dpmem." + ".".join(init.parent.relative_to(ROOT).parts)
                           for folder in folders for init in folder.rglob("__init__.py")}
    assert packages == on_disk
    assert dpmem.__all__ == ["Config", "ConfigError", "Run", "UsageError", "audit", "canaries", "influence",
                             "load_config", "memorization", "mia", "mia_scores", "open_run", "proxies", "run"]
    from dpmem import canaries  # a module attribute, imported on first use
    assert canaries.__name__ == "dpmem.models.canaries" and dpmem.canaries is canaries
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = dpmem.nope

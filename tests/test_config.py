import pytest

from dpmem.bench import config as config_mod
from dpmem.bench.config import Config
from dpmem.privacy.errors import ConfigError, UsageError


def test_defaults_are_the_documented_benchmark():
    c = Config()
    assert c.dataset == "digits"
    assert [n for n, _ in c.variants] == ["nonprivate", "dp-eps1", "dp-eps4", "dp-eps16"]
    assert c.sampling == "bernoulli" and c.q == 0.7


def test_overrides_are_typed_and_lists_are_comma_separated():
    c = config_mod.load(None, ["epsilons=1,4", "models=12", "q=0.5", "hidden=32,16", "download=true"])
    assert c.epsilons == (1.0, 4.0) and c.models == 12 and c.q == 0.5
    assert c.hidden == (32, 16) and c.download is True
    # the TOML spelling of a list, as in the config files, reads the same
    toml_style = config_mod.load(None, ["epsilons=[1, 4]", "hidden=[32,16]", "models=12", "q=0.5", "download=true"])
    assert toml_style == c


def test_toml_and_yaml_files(tmp_path):
    (tmp_path / "a.toml").write_text('dataset = "synthetic"\nepsilons = [2, 8]\nmodels = 10\n')
    (tmp_path / "b.yaml").write_text("dataset: synthetic\nepsilons: [2, 8]\nmodels: 10\n")
    a = config_mod.load(tmp_path / "a.toml")
    b = config_mod.load(tmp_path / "b.yaml")
    assert a == b and a.epsilons == (2.0, 8.0)
    # overrides win over the file
    assert config_mod.load(tmp_path / "a.toml", ["models=3"]).models == 3


@pytest.mark.parametrize("override, field", [
    ("dataset=imagenet", "dataset"), ("model=resnet", "model"), ("epsilons=-1", "epsilons"),
    ("q=1.5", "q"), ("q=0", "q"), ("delta=2", "delta"), ("models=1", "models"), ("sampling=x", "sampling"),
    ("nonsense=3", "nonsense"), ("models=abc", "models"), ("epsilons=1,1", "epsilons"),
])
def test_bad_values_name_their_field(override, field):
    with pytest.raises(ConfigError) as e:
        config_mod.load(None, [override])
    assert e.value.field == field
    assert f"'{field}'" in str(e.value) and "\n" not in str(e.value)


def test_bad_files(tmp_path):
    with pytest.raises(UsageError, match="not found"):
        config_mod.load(tmp_path / "missing.toml")
    (tmp_path / "bad.toml").write_text("this is = = not toml")
    with pytest.raises(UsageError, match="not valid"):
        config_mod.load(tmp_path / "bad.toml")


def test_hash_tracks_every_field():
    assert Config().hash() == Config().hash()
    assert Config(seed=1).hash() != Config().hash()
    assert config_mod.from_dict(Config(models=7).to_dict()) == Config(models=7)


def test_execution_settings_are_no_part_of_the_identity():
    base = Config()
    for change in ({"unit_size": 7}, {"threads": 3}, {"workers": 4}, {"device": "cuda"}, {"gpus_per_unit": 0.5}):
        assert base.replace(**change).hash() == base.hash(), change
    assert set(config_mod.EXECUTION) == {"unit_size", "threads", "workers", "device", "gpus_per_unit"}
    assert not set(config_mod.EXECUTION) & set(base.identity())

"""What a new user meets first: the public API refuses bad arguments in one line naming them, the
command line's smaller refusals, and the release's version and commit in every run."""
import json
import re
import tomllib
from pathlib import Path

import pytest

import dpmem
from dpmem.bench import cli
from dpmem.privacy.release import source_commit

ROOT = Path(__file__).resolve().parent.parent
TINY = dict(dataset="synthetic", n_train=60, n_test=60, n_subgroups=6, dim=4, models=4, unit_size=4, epochs=1,
            epsilons=(4.0,), hidden=(4,), threads=1)


@pytest.mark.parametrize("call, error, names", [
    (lambda: dpmem.load_config(123), dpmem.UsageError, "config: expected a file path"),
    (lambda: dpmem.run(123, out="unused"), dpmem.UsageError, "config: expected a file path"),
    (lambda: dpmem.run(None, out=7), dpmem.UsageError, "out: expected a run directory"),
    (lambda: dpmem.open_run(None), dpmem.UsageError, "path: expected a run directory"),
    (lambda: dpmem.Config(models="x"), dpmem.ConfigError, "'models': must be an integer, got 'x'"),
    (lambda: dpmem.Config(hidden=5), dpmem.ConfigError, "'hidden': must be a tuple of int such as (64,), got 5"),
    (lambda: dpmem.Config(epsilons=(1.0, "4")), dpmem.ConfigError, "'epsilons': must be a tuple of float"),
    (lambda: dpmem.Config(download=1), dpmem.ConfigError, "'download': must be True or False"),
    (lambda: dpmem.Config(models=True), dpmem.ConfigError, "'models': must be an integer"),
    (lambda: dpmem.Config(model=None), dpmem.ConfigError, "'model': must be a string"),
])
def test_the_api_names_the_bad_argument_in_one_line(call, error, names, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(error) as caught:
        call()
    message = str(caught.value)
    assert names in message and "\n" not in message
    assert not (tmp_path / "unused").exists()


def test_config_takes_lists_and_integers_as_a_file_gives_them():
    direct = dpmem.Config(hidden=[32, 16], epsilons=[1, 4], lr=1)
    assert direct.hidden == (32, 16) and direct.epsilons == (1.0, 4.0) and isinstance(direct.lr, float)
    from_file_values = dpmem.load_config({"hidden": [32, 16], "epsilons": [1.0, 4.0], "lr": 1.0})
    assert direct.hash() == from_file_values.hash()


def test_a_section_in_a_config_file_is_explained(tmp_path):
    config = tmp_path / "sections.toml"
    config.write_text('[train]\nepochs = 3\n')
    with pytest.raises(dpmem.ConfigError) as caught:
        dpmem.load_config(config)
    message = str(caught.value)
    assert "'train'" in message and "no sections" in message and "top level" in message
    assert "did you mean" not in message


def test_a_misspelt_key_still_gets_its_suggestion():
    with pytest.raises(dpmem.ConfigError, match="did you mean 'epochs'"):
        dpmem.load_config({"epoch": 3})


def test_a_batch_larger_than_the_subset_is_noted(tmp_path, capsys):
    dpmem.run({**TINY, "batch_size": 100000}, out=tmp_path / "run")
    err = capsys.readouterr().err
    assert "batch_size 100000 is larger than the training set (60 examples)" in err
    assert "sample rate 1" in err
    assert dpmem.open_run(tmp_path / "run").summary["variants"]["dp-eps4"]["sample_rate"] == 1.0


def test_out_on_a_dangling_symlink_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "link").symlink_to(tmp_path / "gone")
    assert cli.main(["run", "--out", "link", "--quiet", "dataset=synthetic", "models=4"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert "--out link is a symbolic link to" in err and "gone" in err and "does not exist" in err


# -- the release ---------------------------------------------------------------------------

def _changelog_versions() -> list[str]:
    text = (ROOT / ".docs" / "CHANGELOG.md").read_text()
    return re.findall(r"^## \[(\d+\.\d+\.\d+)\]", text, flags=re.M)


def test_pyproject_package_and_changelog_agree_on_the_version():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    released = _changelog_versions()
    assert released, "CHANGELOG.md has no '## [X.Y.Z]' section"
    assert pyproject == dpmem.__version__ == released[0]
    citation = (ROOT / ".docs" / "CITATION.cff").read_text()
    assert re.search(rf"^version: \"?{re.escape(pyproject)}\"?$", citation, flags=re.M)


def test_citation_file_is_cff_1_2():
    import yaml
    cff = yaml.safe_load((ROOT / ".docs" / "CITATION.cff").read_text())
    assert cff["cff-version"] == "1.2.0"
    assert {"message", "title", "authors", "version"} <= set(cff)
    assert cff["authors"] == [{"name": "The dpmem developers"}]


def test_every_run_records_the_version_and_commit(tmp_path):
    run = dpmem.run(TINY, out=tmp_path / "run")
    versions = json.loads((run.path / "config.json").read_text())["versions"]
    assert versions["dpmem"] == dpmem.__version__
    commit = source_commit()
    if (ROOT / ".git").exists():
        assert commit is not None and re.fullmatch(r"[0-9a-f]{40}(\+modified)?", commit)
    assert versions.get("dpmem_commit") == commit
    page = (run.path / "report.html").read_text()
    assert f">{dpmem.__version__}<" in page
    if commit:
        assert commit in page


def test_no_commit_outside_a_checkout(tmp_path):
    assert source_commit(tmp_path) is None


# -- the repository ------------------------------------------------------------------------

TOP_LEVEL = {"pyproject.toml", "README.md", "__init__.py", "bench", "models", "privacy", "results", "tests"}


def test_the_repository_top_level_holds_only_the_package_entries():
    """What git tracks at the top level: the listed entries and dot-folders, nothing else (the
    changelog and citation live in .docs/, py.typed is made by the build backend)."""
    import subprocess
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout (an installed or copied tree)")
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    top = {path.split("/", 1)[0] for path in tracked.splitlines()}
    assert {name for name in top if not name.startswith(".")} == TOP_LEVEL

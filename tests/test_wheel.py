"""The built wheel, installed into a new venv, runs a shipped config by name from a folder with no
checkout, and lists the shipped configs."""
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

import dpmem

ROOT = Path(__file__).resolve().parent.parent
# What the sdist-free build needs: the package's sources and its metadata, not the results or tests.
SKIP = {".git", ".venv", "results", "tests", "runs", "build", "site", "dpmem.egg-info", "__pycache__"}


def _run(cmd, **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kwargs)
    assert done.returncode == 0, f"{cmd} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory):
    """A new venv with the wheel installed (no dependencies); the dependencies come from this
    interpreter's site-packages through a .pth line, which adds no editable install of dpmem."""
    work = tmp_path_factory.mktemp("wheel")
    source = work / "source"
    shutil.copytree(ROOT, source, ignore=lambda d, names: [n for n in names if n in SKIP or n.startswith(".docs")])
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(work / "dist"),
          str(source)])
    (wheel,) = (work / "dist").glob("dpmem-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "dpmem/bench/configs/audit.toml" in names and "dpmem/py.typed" in names
    assert not any(n.startswith(("dpmem/results/", "dpmem/tests/")) for n in names)
    venv = work / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    purelib = Path(_run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"])
                   .stdout.strip())
    (purelib / "_dpmem_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "-q", "--no-deps",
          "--no-index", str(wheel)])
    return venv, purelib


def _env():
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return {**env, "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
def test_the_installed_wheel_runs_a_shipped_config_by_name(wheel_venv, tmp_path):
    venv, purelib = wheel_venv
    empty = tmp_path / "empty"
    empty.mkdir()
    where = _run([str(venv / "bin" / "python"), "-c", "import dpmem; print(dpmem.__file__, dpmem.__version__)"],
                 cwd=empty, env=_env()).stdout.split()
    assert Path(where[0]).parent == purelib / "dpmem" and where[1] == dpmem.__version__
    listed = _run([str(venv / "bin" / "dpmem"), "configs"], cwd=empty, env=_env()).stdout
    shipped = sorted(p.stem for p in (ROOT / "bench" / "configs").glob("*.toml"))
    assert sorted(line.split()[0] for line in listed.splitlines()) == shipped
    assert all(len(line.split(maxsplit=1)) == 2 for line in listed.splitlines())   # each with a description
    _run([str(venv / "bin" / "dpmem"), "run", "ci", "--out", "run", "--quiet", "models=4", "unit_size=4", "epochs=1",
          "epsilons=4", "hidden=8"], cwd=empty, env=_env())
    meta = json.loads((empty / "run" / "config.json").read_text())
    assert meta["config"]["dataset"] == "digits" and meta["config"]["seed"] == 0
    assert meta["versions"]["dpmem"] == dpmem.__version__ and "dpmem_commit" not in meta["versions"]
    assert (empty / "run" / "report.html").is_file()
    assert sorted(p.name for p in empty.iterdir()) == ["run"]


def test_every_shipped_config_loads_by_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    from dpmem.bench import config
    for name in config.shipped_configs():
        assert dpmem.load_config(name) == dpmem.load_config(ROOT / "bench" / "configs" / f"{name}.toml")
        assert dpmem.load_config(f"{name}.toml").hash() == dpmem.load_config(name).hash()
    with pytest.raises(dpmem.UsageError, match="shipped configs, by name: audit-one-run, audit, ci"):
        dpmem.load_config("no-such-config")

"""The bad-input catalogue: every known way to misuse dpmem, run in one go, with what each did.

    python -m dpmem.bench.tools.probe [--out results] [--only SUBSTRING] [--no-trials]

Each case runs in a fresh temporary directory: a `dpmem` command (in this process, through
``cli.main``, so that a case costs milliseconds rather than a Python start-up; an exception that
escapes ``main`` is what the shell would show as a traceback and exit 1), or a call of the Python
API. The trials that need a real process (kill -9 and resume, two writers, Ctrl-C during start-up
and during training) run ``python -m dpmem.bench.cli`` as a subprocess and signal it.

For every case the table gives the exit code and the code it should have been, whether a
traceback was shown, the first line of the message, and whether the run directory is still
usable: nothing written, or the follow-up command (the fix a user would make) exits 0. The totals
count one-line exits with code 2, tracebacks and silent passes (a case that should fail but
exited 0); the last two should be 0. Written to OUT/probe.md and OUT/probe.csv.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

TINY = ["dataset=synthetic", "n_train=60", "n_test=60", "n_subgroups=10", "dim=8", "models=4", "unit_size=2",
        "epochs=1", "batch_size=16", "epsilons=4", "hidden=8", "threads=1"]
FILE_RUN = ["dataset=file", "zipf_a=0", "models=4", "unit_size=2", "epochs=1", "epsilons=4", "hidden=8",
            "threads=1"]
# How long a subprocess trial may take before it counts as a hang.
TRIAL_TIMEOUT_S = 600
# The user code the cases name (model=probe_user:..., trainer=probe_user:...), written to a
# directory on sys.path. Behaviour switches with environment variables, so that a "fixed" trainer
# keeps its name (and the run's config hash) as a user's fixed code would.
USER_MODULE = '''
import os, sys, time
from pathlib import Path
import numpy as np
from torch import nn


def _outputs(evals, seed):
    rng = np.random.default_rng(seed)
    return {f"{s}_{k}": (rng.random(len(y)) < 0.5 if k == "correct" else rng.normal(size=len(y)).astype(np.float32))
            for s, (_, y) in evals.items() for k in ("correct", "margin")}


def _maybe_sleep(index):
    at = os.environ.get("DPMEM_PROBE_SLEEP_AT")
    if at is not None and index == int(at):
        Path(os.environ["DPMEM_PROBE_MARKER"]).write_text("training")
        time.sleep(600)


def det_fit(*, index, evals, seed, **kw):
    _maybe_sleep(index)
    return _outputs(evals, seed)


def exit_fit(*, index, evals, seed, **kw):
    if index == 2 and not os.environ.get("DPMEM_PROBE_FIXED"):
        sys.exit(0)
    return _outputs(evals, seed)


def raising_fit(*, index, evals, seed, **kw):
    if index == 2 and not os.environ.get("DPMEM_PROBE_FIXED"):
        raise RuntimeError("CUDA out of memory")
    return _outputs(evals, seed)


def writing_fit(*, x_train, evals, seed, **kw):
    if not os.environ.get("DPMEM_PROBE_FIXED"):
        x_train[:] = 0
    return _outputs(evals, seed)


def nan_fit(*, index, evals, seed, **kw):
    out = _outputs(evals, seed)
    if not os.environ.get("DPMEM_PROBE_FIXED"):
        out["test_margin"][0] = np.nan
    return out


def inf_fit(*, index, evals, seed, **kw):
    out = _outputs(evals, seed)
    out["test_margin"][0] = np.inf
    return out


def wrong_shape_fit(*, index, evals, seed, **kw):
    out = _outputs(evals, seed)
    if not os.environ.get("DPMEM_PROBE_FIXED"):
        out["train_correct"] = out["train_correct"][:-1]
    return out


def exit_factory(input_shape, n_classes):
    sys.exit(0)


def no_parameters(input_shape, n_classes):
    return nn.Sequential(nn.Flatten())


def all_frozen(input_shape, n_classes):
    net = nn.Sequential(nn.Flatten(), nn.Linear(int(np.prod(input_shape)), n_classes))
    for p in net.parameters():
        p.requires_grad_(False)
    return net


def frozen_body(input_shape, n_classes):
    net = nn.Sequential(nn.Flatten(), nn.Linear(int(np.prod(input_shape)), 16), nn.ReLU(), nn.Linear(16, n_classes))
    for p in net[1].parameters():
        p.requires_grad_(False)
    return net


def batchnorm(input_shape, n_classes):
    return nn.Sequential(nn.Flatten(), nn.Linear(int(np.prod(input_shape)), 16), nn.BatchNorm1d(16),
                         nn.Linear(16, n_classes))


def wrong_output(input_shape, n_classes):
    return nn.Sequential(nn.Flatten(), nn.Linear(int(np.prod(input_shape)), n_classes + 1))
'''
# Imported at start-up by a trainer= path: it marks that it has started, then takes its time.
SLOW_MODULE = '''
import os, time
from pathlib import Path
Path(os.environ["DPMEM_PROBE_MARKER"]).write_text("importing")
time.sleep(600)


def fit(**kw):
    raise AssertionError("never reached")
'''


@dataclass
class Case:
    name: str
    argv: list[str] | None = None          # dpmem arguments; {run} is the case's run directory, {dir} its folder
    expect: int = 2                        # the right exit code
    setup: Callable[[Path], None] | None = None
    needs_run: bool = False                # {run} starts as a copy of a finished tiny run
    api: Callable[[], object] | None = None   # a Python API call instead of a command
    fix: dict[str, str] = field(default_factory=dict)   # environment of the follow-up (the user's fix)
    followup: list[str] | None = None      # shows the directory is usable when it exits 0


@dataclass
class Outcome:
    case: str
    exit_code: int
    expected: int
    traceback: bool
    first_line: str
    usable: str

    @property
    def one_line_2(self) -> bool:
        return self.exit_code == 2 and not self.traceback

    @property
    def silent_pass(self) -> bool:
        return self.expected != 0 and self.exit_code == 0


# -- files the cases read --------------------------------------------------------------------------

def _npz(dir: Path, **changes) -> None:
    rng = np.random.default_rng(0)
    arrays: dict[str, Any] = dict(x_train=rng.normal(size=(40, 4)).astype(np.float32), y_train=np.arange(40) % 2,
                  x_test=rng.normal(size=(20, 4)).astype(np.float32), y_test=np.arange(20) % 2,
                  subgroup_train=np.arange(40) % 4, subgroup_test=np.arange(20) % 4)
    arrays.update(changes)
    np.savez(dir / "data.npz", **arrays)


def _write(name: str, text: str) -> Callable[[Path], None]:
    def setup(dir: Path) -> None:
        (dir / name).write_text(text)
    return setup


def _npy_as_npz(dir: Path) -> None:
    with open(dir / "data.npz", "wb") as f:
        np.save(f, np.zeros((3, 3)))


def _edit_json(rel: str, edit: Callable[[dict], None]) -> Callable[[Path], None]:
    def setup(dir: Path) -> None:
        path = dir / "run" / rel
        obj = json.loads(path.read_text())
        edit(obj)
        path.write_text(json.dumps(obj))
    return setup


def _strip_checksums_and_invert(dir: Path) -> None:
    _edit_json("variants/nonprivate/complete.json", lambda r: r.pop("sha256"))(dir)
    path = dir / "run" / "variants" / "nonprivate" / "train_correct.npy"
    np.save(path, ~np.load(path))


def _flip_byte(dir: Path) -> None:
    path = dir / "run" / "variants" / "dp-eps4" / "test_margin.npy"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x10
    path.write_bytes(bytes(data))


def _api_cases() -> list[Case]:
    import dpmem
    rng = np.random.default_rng(0)
    masks, probs = rng.random((20, 30)) < 0.5, rng.random((20, 30))
    nan = (probs > 0.5).astype(float)
    nan[0, 0] = np.nan
    return [
        Case("api: memorization with float probabilities", api=lambda: dpmem.memorization(masks, probs)),
        Case("api: memorization with NaN in correct", api=lambda: dpmem.memorization(masks, nan)),
        Case("api: influence with mismatched model counts", api=lambda: dpmem.influence(masks, probs[:5] > 0.5)),
        Case("api: influence when every model holds every example",
             api=lambda: dpmem.influence(np.ones_like(masks), probs > 0.5)),
        Case("api: audit with all-True masks (tests nothing)",
             api=lambda: dpmem.audit(np.ones_like(masks), probs > 0.5, epsilon=1.0, delta=1e-5)),
    ]


def tiny(*items: str) -> list[str]:
    """TINY with ``items`` (key=value) in place of its own values for those keys."""
    keys = {item.split("=", 1)[0] for item in items}
    return [a for a in TINY if a.split("=", 1)[0] not in keys] + list(items)


def _gpu() -> bool:
    import torch
    return torch.cuda.is_available()


def catalogue() -> list[Case]:
    run = ["run", "--out", "{run}", "--quiet"]
    fixed = {"DPMEM_PROBE_FIXED": "1"}
    return [
        # values that pass a naive validation
        *[Case(f"run {kv}", run + tiny(kv)) for kv in (
            "max_grad_norm=inf", "weight_decay=inf", "noise_scale=nan", "zipf_a=inf", "lr=nan", "models=1000000000",
            "models=1e20", "epsilons=1e-6", "seed=-1", "hidden=1000000000", "epoch=2", "dataset=cifar7", "q=1")],
        *([] if _gpu() else [Case("run device=cuda (no GPU here)", run + tiny("device=cuda"))]),
        Case("run epochs=1 epochs=2 (same key twice)", run + TINY + ["epochs=2"]),
        Case("run c.yaml with a duplicate key", run + ["{dir}/c.yaml"], setup=_write("c.yaml", "models: 4\nmodels: 8\n")),
        Case("run c.toml with lr = true", run + ["{dir}/c.toml"], setup=_write("c.toml", "lr = true\n")),
        Case("run c.toml that does not parse", run + ["{dir}/c.toml"], setup=_write("c.toml", "lr = = 1\n")),
        # user code
        Case("trainer calls sys.exit(0) on model 2", run + TINY + ["trainer=probe_user:exit_fit"], fix=fixed,
             followup=run + TINY + ["trainer=probe_user:exit_fit"]),
        Case("trainer raises on model 2", run + TINY + ["trainer=probe_user:raising_fit"], fix=fixed,
             followup=run + TINY + ["trainer=probe_user:raising_fit"]),
        Case("trainer writes x_train[:] = 0", run + TINY + ["trainer=probe_user:writing_fit"], fix=fixed,
             followup=run + TINY + ["trainer=probe_user:writing_fit"]),
        Case("trainer returns a NaN margin", run + TINY + ["trainer=probe_user:nan_fit"], fix=fixed,
             followup=run + TINY + ["trainer=probe_user:nan_fit"]),
        Case("trainer returns an array of the wrong shape", run + TINY + ["trainer=probe_user:wrong_shape_fit"],
             fix=fixed, followup=run + TINY + ["trainer=probe_user:wrong_shape_fit"]),
        Case("trainer returns an infinite margin (clipped, noted)", run + TINY + ["trainer=probe_user:inf_fit"],
             expect=0),
        Case("trainer that does not import", run + TINY + ["trainer=no_such_module:fit"]),
        Case("factory calls sys.exit(0)", run + TINY + ["model=probe_user:exit_factory"]),
        Case("factory with no parameters", run + TINY + ["model=probe_user:no_parameters"]),
        Case("factory with every parameter frozen", run + TINY + ["model=probe_user:all_frozen"]),
        Case("factory with a frozen body (trains the head)", run + TINY + ["model=probe_user:frozen_body"], expect=0),
        Case("factory with BatchNorm", run + TINY + ["model=probe_user:batchnorm"]),
        Case("factory with the wrong number of logits", run + TINY + ["model=probe_user:wrong_output"]),
        # data files
        Case("data file: text named .npz", run + FILE_RUN + ["data_path={dir}/data.npz"],
             setup=_write("data.npz", "x_train,y_train\n1,0\n")),
        Case("data file: .npy renamed .npz", run + FILE_RUN + ["data_path={dir}/data.npz"], setup=_npy_as_npz),
        Case("data file: subgroup id 10^9", run + FILE_RUN + ["data_path={dir}/data.npz"],
             setup=lambda d: _npz(d, subgroup_train=np.where(np.arange(40) == 0, 10**9, np.arange(40) % 4))),
        Case("data file: label 10^9", run + FILE_RUN + ["data_path={dir}/data.npz"],
             setup=lambda d: _npz(d, y_train=np.where(np.arange(40) == 0, 10**9, np.arange(40) % 2))),
        Case("data file: labels 0, 1, 5 (gaps)", run + FILE_RUN + ["data_path={dir}/data.npz"],
             setup=lambda d: _npz(d, y_train=np.array([0, 1, 5] * 13 + [0]))),
        Case("data file: NaN in x_train", run + FILE_RUN + ["data_path={dir}/data.npz"],
             setup=lambda d: _npz(d, x_train=np.full((40, 4), np.nan, np.float32))),
        Case("data file: missing", run + FILE_RUN + ["data_path={dir}/none.npz"]),
        # damaged or misused run directories
        Case("check: complete.json without sha256, train_correct inverted", ["check", "{run}"], needs_run=True,
             setup=_strip_checksums_and_invert, followup=run + TINY),
        Case("check: a flipped byte in test_margin.npy", ["check", "{run}"], needs_run=True, setup=_flip_byte,
             followup=run + TINY),
        Case("run: config.json of the wrong shape", run + TINY, needs_run=True,
             setup=_write("run/config.json", '{"config": {"models": 4}}')),
        Case("check: config.json edited (models 4 -> 6)", ["check", "{run}"], needs_run=True,
             setup=_edit_json("config.json", lambda m: m["config"].update(models=6))),
        Case("run: resume with a different config", run + TINY + ["lr=0.1"], needs_run=True, followup=run + TINY),
        Case("check --claim nonprivate=inf", ["check", "{run}", "--claim", "nonprivate=inf"], needs_run=True),
        Case("check --claim nonprivate=nan", ["check", "{run}", "--claim", "nonprivate=nan"], needs_run=True),
        Case("check --claim nosuch=1", ["check", "{run}", "--claim", "nosuch=1"], needs_run=True),
        Case("check --alpha 2", ["check", "{run}", "--alpha", "2"], needs_run=True),
        Case("check --write-baseline DIRECTORY", ["check", "{run}", "--write-baseline", "{dir}"], needs_run=True),
        Case("check --baseline missing.json", ["check", "{run}", "--baseline", "{dir}/missing.json"], needs_run=True),
        Case("check on a finished run", ["check", "{run}"], needs_run=True, expect=0),
        Case("loo --examples 0", ["loo", "{run}", "--examples", "0", "--quiet"], needs_run=True),
        Case("report on a directory that is not a run", ["report", "{dir}"]),
        Case("check on a missing directory", ["check", "{dir}/nowhere"]),
        *_api_cases(),
    ]


# -- running a case -----------------------------------------------------------------------------------

def _expand(argv: list[str], dir: Path) -> list[str]:
    return [a.replace("{run}", str(dir / "run")).replace("{dir}", str(dir)) for a in argv]


def _first_line(err: str) -> str:
    lines = [line.strip() for line in err.splitlines() if line.strip()]
    for prefix in ("dpmem: error:", "dpmem: interrupted"):
        for line in lines:
            if line.startswith(prefix):
                return line
    tb = [line for line in lines if not line.startswith(("File ", "Traceback", "^", "~"))]
    return (tb[-1] if "Traceback" in err and tb else lines[0]) if lines else ""


def _main(argv: list[str], env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """``dpmem ARGV`` in this process: (exit code, stdout, stderr), as a shell would see them."""
    from dpmem.bench import cli
    out, err = io.StringIO(), io.StringIO()
    saved = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update(env or {})
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = cli.main(argv)
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            except BaseException:  # noqa: BLE001 - what escapes main is the shell's traceback and exit 1
                traceback.print_exc()
                code = 1
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return code, out.getvalue(), err.getvalue()


def _api(call: Callable[[], object]) -> tuple[int, str]:
    try:
        call()
    except ValueError as e:
        return 2, f"ValueError: {str(e).splitlines()[0]}"
    except Exception:  # noqa: BLE001 - anything else is a crash
        return 1, traceback.format_exc()
    return 0, "(returned a result)"


def run_case(case: Case, dir: Path, reference: Path) -> Outcome:
    if case.needs_run:
        shutil.copytree(reference, dir / "run")
    if case.setup is not None:
        case.setup(dir)
    if case.api is not None:
        code, text = _api(case.api)
        return Outcome(case.name, code, case.expect, "Traceback" in text, _first_line(text), "-")
    assert case.argv is not None, case.name   # a case runs the API or the command line
    code, _, err = _main(_expand(case.argv, dir))
    if not (dir / "run").exists():
        usable = "yes (nothing written)"
    elif case.expect == 0:
        usable = "yes" if code == 0 else "no"
    elif case.followup is None:   # the directory as the case left it: does `dpmem check` still read it?
        again, _, again_err = _main(_expand(["check", "{run}"], dir))
        usable = "yes (`dpmem check` exits 0)" if again == 0 else f"no: {_first_line(again_err)}"
    if case.followup is not None and (dir / "run").exists():
        again, _, again_err = _main(_expand(case.followup, dir), case.fix)
        if again == 0 and case.argv[0] == "check":
            again, _, again_err = _main(_expand(case.argv, dir))
        usable = "yes (follow-up exits 0)" if again == 0 else f"no: {_first_line(again_err)}"
    return Outcome(case.name, code, case.expect, "Traceback" in err, _first_line(err), usable)


# -- trials with real processes and signals ---------------------------------------------------------------

def _spawn(argv: list[str], cwd: Path, env: dict[str, str], code_dir: Path) -> subprocess.Popen:
    package_parent = str(Path(__file__).resolve().parents[2])
    full = {**os.environ, "OMP_NUM_THREADS": "1", **env,
            "PYTHONPATH": os.pathsep.join([package_parent, str(code_dir), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-m", "dpmem.bench.cli", *argv], cwd=cwd, env=full,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(marker: Path, proc: subprocess.Popen) -> bool:
    deadline = time.monotonic() + TRIAL_TIMEOUT_S
    while time.monotonic() < deadline and proc.poll() is None:
        if marker.exists():
            return True
        time.sleep(0.2)
    return False


def _finish(proc: subprocess.Popen) -> tuple[int, str]:
    try:
        _, err = proc.communicate(timeout=TRIAL_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        return 124, err
    return proc.returncode, err


def _arrays_equal(a: Path, b: Path) -> bool:
    from dpmem.bench.store.run_store import RunStore
    sa, sb = RunStore.open(a), RunStore.open(b)
    if not np.array_equal(sa.masks(), sb.masks()):
        return False
    for name, _ in sa.config().variants:
        xa, xb = sa.variant_arrays(name), sb.variant_arrays(name)
        if sorted(xa) != sorted(xb) or any(not np.array_equal(xa[k], xb[k]) for k in xa):
            return False
    return True


def trials(root: Path, code_dir: Path) -> list[Outcome]:
    """kill -9 and resume; a second writer with .lock deleted; Ctrl-C in training and at start-up."""
    outcomes = []
    argv = ["run", "--out", "run", "--quiet", *TINY, "trainer=probe_user:det_fit"]
    # reference: the same run, uninterrupted
    ref = root / "trial-reference"
    ref.mkdir()
    code, _, err = _main(["run", "--out", str(ref / "run"), "--quiet", *TINY, "trainer=probe_user:det_fit"])
    if code != 0:
        raise RuntimeError(f"the reference trial run failed: {_first_line(err)}")

    # kill -9 in the middle of training, then the same command again
    dir = root / "trial-kill"
    dir.mkdir()
    marker = dir / "marker"
    proc = _spawn(argv, dir, {"DPMEM_PROBE_SLEEP_AT": "2", "DPMEM_PROBE_MARKER": str(marker)}, code_dir)
    started = _wait_for(marker, proc)
    proc.send_signal(signal.SIGKILL)
    code, err = _finish(proc)
    again, _, again_err = _main(["run", "--out", str(dir / "run"), "--quiet", *TINY, "trainer=probe_user:det_fit"])
    same = again == 0 and _arrays_equal(dir / "run", ref / "run")
    outcomes.append(Outcome("kill -9 during training, then the same command" + ("" if started else " (never started)"),
                            code, -9, "Traceback" in err, "(killed)",
                            "yes (resumed; arrays identical to an uninterrupted run)" if same
                            else f"no: {_first_line(again_err) or 'arrays differ'}"))

    # two writers: the first holds the run; its .lock file is deleted; a second writer starts
    dir = root / "trial-two-writers"
    dir.mkdir()
    marker = dir / "marker"
    first = _spawn(argv, dir, {"DPMEM_PROBE_SLEEP_AT": "1", "DPMEM_PROBE_MARKER": str(marker)}, code_dir)
    started = _wait_for(marker, first)
    (dir / "run" / ".lock").unlink(missing_ok=True)
    code, _, err = _main(["run", "--out", str(dir / "run"), "--quiet", *TINY, "trainer=probe_user:det_fit"])
    outcomes.append(Outcome("second writer while the first trains, .lock deleted" + ("" if started else " (first never started)"),
                            code, 2, "Traceback" in err, _first_line(err), "yes (the first writer is untouched)"))
    # Ctrl-C to the first writer during training, then the same command again
    first.send_signal(signal.SIGINT)
    code, err = _finish(first)
    again, _, again_err = _main(["run", "--out", str(dir / "run"), "--quiet", *TINY, "trainer=probe_user:det_fit"])
    same = again == 0 and _arrays_equal(dir / "run", ref / "run")
    outcomes.append(Outcome("Ctrl-C during training, then the same command", code, 130, "Traceback" in err,
                            _first_line(err),
                            "yes (resumed; arrays identical to an uninterrupted run)" if same
                            else f"no: {_first_line(again_err) or 'arrays differ'}"))

    # Ctrl-C while the trainer module imports (start-up: nothing written yet)
    dir = root / "trial-sigint-start"
    dir.mkdir()
    marker = dir / "marker"
    proc = _spawn(["run", "--out", "run", "--quiet", *TINY, "trainer=probe_slow:fit"], dir,
                  {"DPMEM_PROBE_MARKER": str(marker)}, code_dir)
    started = _wait_for(marker, proc)
    proc.send_signal(signal.SIGINT)
    code, err = _finish(proc)
    outcomes.append(Outcome("Ctrl-C during start-up" + ("" if started else " (never started)"), code, 130,
                            "Traceback" in err, _first_line(err),
                            "yes (nothing written)" if not (dir / "run").exists() else "-"))
    return outcomes


# -- the table ---------------------------------------------------------------------------------------------

def table(outcomes: list[Outcome], root: Path | None = None):
    """One row per outcome; paths under the temporary ``root`` are written as TMP."""
    import pandas as pd

    def short(text: str) -> str:
        return text.replace(str(root), "TMP") if root is not None else text
    return pd.DataFrame([{"case": o.case, "exit_code": o.exit_code, "expected": o.expected,
                          "traceback": "yes" if o.traceback else "no", "first_line": short(o.first_line)[:140],
                          "directory_usable": short(o.usable)[:100]} for o in outcomes])


def totals(outcomes: list[Outcome]) -> dict[str, int]:
    return {"cases": len(outcomes),
            "one_line_exit_2": sum(o.one_line_2 for o in outcomes),
            "tracebacks": sum(o.traceback for o in outcomes),
            "silent_passes": sum(o.silent_pass for o in outcomes),
            "wrong_exit_codes": sum(o.exit_code != o.expected for o in outcomes)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dpmem.bench.tools.probe", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results", help="where probe.md and probe.csv go (default results/)")
    parser.add_argument("--only", help="run only the cases whose name contains this")
    parser.add_argument("--no-trials", action="store_true", help="skip the subprocess trials (signals, two writers)")
    args = parser.parse_args(argv)
    from dpmem.bench.report.tables import markdown
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="dpmem-probe-") as tmp:
        root = Path(tmp)
        code_dir = root / "user"
        code_dir.mkdir()
        (code_dir / "probe_user.py").write_text(USER_MODULE)
        (code_dir / "probe_slow.py").write_text(SLOW_MODULE)
        sys.path.insert(0, str(code_dir))
        cwd = Path.cwd()
        outcomes = []
        try:
            reference = root / "reference"
            cases = [(i, c) for i, c in enumerate(catalogue()) if not args.only or args.only in c.name]
            if any(c.needs_run for _, c in cases):
                code, _, err = _main(["run", "--out", str(reference), "--quiet", *TINY])
                if code != 0:
                    raise RuntimeError(f"the reference run failed: {_first_line(err)}")
            for i, case in cases:
                dir = root / f"case{i:02d}"
                dir.mkdir()
                os.chdir(dir)
                try:
                    outcomes.append(run_case(case, dir, reference))
                finally:
                    os.chdir(cwd)
                print(f"{outcomes[-1].exit_code:>4}  {case.name}", file=sys.stderr)
            if not args.no_trials and not args.only:
                outcomes += trials(root, code_dir)
        finally:
            os.chdir(cwd)
            sys.path.remove(str(code_dir))
    frame = table(outcomes, root)
    sums = totals(outcomes)
    text = (markdown(frame) + "\n" + ", ".join(f"{k.replace('_', ' ')}: {v}" for k, v in sums.items())
            + f"\n\nwall time {time.perf_counter() - t0:.0f} s\n")
    print(text)
    if not args.only:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "probe.md").write_text(text)
        frame.to_csv(out / "probe.csv", index=False)
    return 0 if sums["tracebacks"] == 0 and sums["silent_passes"] == 0 and sums["wrong_exit_codes"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

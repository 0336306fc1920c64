"""A two-node Ray cluster on this machine: models per hour with 1 and 2 workers, and a node killed mid-run.

    python -m dpmem.bench.tools.cluster [CONFIG] [--set key=value ...] [--kill-after S] [--out results/cluster]

1. trains the config serially (``threads=1``), the reference arrays;
2. starts a Ray head with one CPU, with token authentication (a fresh secret shared by every node and the
   driver), (``ray start --head --num-cpus 1``) and trains the config again with
   ``--ray-address``: one worker;
3. starts a second Ray node with one CPU (``ray start --address HEAD --num-cpus 1``), as one would on a
   second machine, and trains again: two workers;
4. trains once more on the two nodes and, ``--kill-after`` seconds into the run, kills the second node's
   raylet with SIGKILL (a machine lost); Ray retries the units that were running there on the head
   (``max_retries``), and the run finishes;
5. compares every stored array of runs 2-4 with the serial run's, byte for byte, and reports wall time,
   models per hour, and how many unit tasks were running on the second node when it was killed (its
   raylet's worker processes named after the task), which Ray then ran again on the head.

Before each timed run an untimed one of 4 models per variant starts the workers (each imports torch).

Writes ``cluster.md`` and ``cluster.json`` into ``--out``. Every Ray process it started is stopped at
the end (``ray stop``), also on an error.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dpmem.bench.store.files import atomic_write_bytes

PORT = 6390


def _ray(*args: str, env: dict) -> str:
    out = subprocess.run([str(Path(sys.executable).parent / "ray"), *args], env=env, capture_output=True, text=True,
                         timeout=180)
    if out.returncode:
        raise SystemExit(f"ray {' '.join(args)} failed: {out.stderr.strip().splitlines()[-1:]}")
    return out.stdout


def _processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) of every process (from /proc)."""
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        out[int(entry.name)] = (ppid, cmdline)
    return out


def _raylets() -> set[int]:
    return {pid for pid, (_, cmd) in _processes().items() if cmd.split(" ")[0].endswith("/raylet")}


def _children(pids: set[int]) -> dict[int, str]:
    """The processes whose parent is one of ``pids`` (a raylet's workers), with their command lines."""
    return {pid: cmd for pid, (ppid, cmd) in _processes().items() if ppid in pids}


def _arrays(run: Path) -> dict[str, str]:
    """sha256 of every stored array of a run (masks and every variant's per-model arrays)."""
    files = sorted(run.glob("masks.npy")) + sorted(run.glob("variants/*/*.npy"))
    return {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def _dpmem_run(config: list[str], out: Path, env: dict, extra: list[str]) -> subprocess.Popen:
    cmd = [str(Path(sys.executable).parent / "dpmem"), "run", *config, "--out", str(out), "--quiet", *extra]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _timed(proc: subprocess.Popen) -> tuple[float, float]:
    """(wall seconds of the whole command, seconds of training it reports: the analysis excluded)."""
    t0 = time.perf_counter()
    _, err = proc.communicate()
    if proc.returncode:
        raise SystemExit(f"dpmem run failed ({proc.returncode}): {err.strip().splitlines()[-3:]}")
    trained = re.search(r"trained in ([0-9.]+) s this session", err)
    if trained is None:
        raise SystemExit("dpmem run did not report its training time")
    return time.perf_counter() - t0, float(trained[1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config", nargs="?", help="a config (default: the default benchmark)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config overrides")
    p.add_argument("--kill-after", type=float, default=15.0, help="seconds into run 4 to kill the second node")
    p.add_argument("--out", default="results/cluster")
    p.add_argument("--markdown-only", action="store_true", help="rewrite OUT/cluster.md from OUT/cluster.json")
    args = p.parse_args(argv)
    if args.markdown_only:
        stored = json.loads((Path(args.out) / "cluster.json").read_text())
        return _write_markdown(stored, Path(args.out), stored.get("command", ""))
    config = ([args.config] if args.config else []) + ["threads=1", *args.set]
    # Ray's token authentication, as on a real cluster: every node and the driver share one secret
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    address = f"127.0.0.1:{PORT}"
    tmp = Path(tempfile.mkdtemp(prefix="dpmem-cluster-"))
    report: dict = {"config": config, "kill_after_s": args.kill_after,
                    "command": f"python -m dpmem.bench.tools.cluster {' '.join(sys.argv[1:] if argv is None else argv)}"}
    try:
        wall, train = _timed(_dpmem_run(config, tmp / "serial", env, []))
        report["serial"] = {"wall_s": wall, "train_s": train}
        reference = _arrays(tmp / "serial")
        models = json.loads((tmp / "serial" / "summary.json").read_text())["variants"]
        total = sum(v["models"] for v in models.values())
        report["models"] = total
        before = _raylets()
        _ray("start", "--head", "--num-cpus", "1", "--port", str(PORT), "--disable-usage-stats", env=env)
        head = _raylets() - before
        second: set[int] = set()
        busy: list[str] = []
        runs = {}
        for name, kill in (("1 worker", False), ("2 workers", False), ("2 workers, second node killed", True)):
            if name == "2 workers":
                before = _raylets()
                _ray("start", "--address", address, "--num-cpus", "1", env=env)
                second = _raylets() - before
            elif kill and not (second & _raylets()):   # the node is gone: start it again for this run
                before = _raylets()
                _ray("start", "--address", address, "--num-cpus", "1", env=env)
                second = _raylets() - before
            out = tmp / name.split(",")[0].replace(" ", "-") / ("killed" if kill else "whole")
            # untimed: a few small units start every node's worker processes (importing torch takes seconds)
            _timed(_dpmem_run(config + ["models=4", "unit_size=1"], out.with_name(out.name + "-warm-up"), env,
                              ["--ray-address", address]))
            proc = _dpmem_run(config, out, env, ["--ray-address", address])
            killed_at = None
            if kill:
                time.sleep(args.kill_after)
                killed_at = args.kill_after
                workers = _children(second)
                busy = sorted(cmd for cmd in workers.values() if "_remote_unit" in cmd)
                for pid in [*second, *workers]:   # the node and its workers, as when a machine is lost
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
            wall, train = _timed(proc)
            same = _arrays(out) == reference
            runs[name] = {"wall_s": wall, "train_s": train, "models_per_hour": total / train * 3600,
                          "arrays_equal_serial": same,
                          "killed_at_s": killed_at, "head_raylet": sorted(head), "second_raylet": sorted(second)}
            if kill:
                runs[name]["units_running_on_killed_node"] = len(busy)
            print(f"{name}: trained in {train:.1f} s ({wall:.1f} s with the analysis), {total / train * 3600:,.0f} "
                  f"models/hour, arrays equal the serial run's: {same}", file=sys.stderr)
        report["runs"] = runs
    finally:
        subprocess.run([str(Path(sys.executable).parent / "ray"), "stop", "--force"], env=env, capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)
    out = Path(args.out)
    atomic_write_bytes(out / "cluster.json", json.dumps(report, indent=1).encode())
    return _write_markdown(report, out, report["command"])


def _write_markdown(report: dict, out: Path, command: str) -> int:
    extra = [r["wall_s"] - r["train_s"] for r in [report["serial"], *report["runs"].values()]]
    lines = ["# Two Ray nodes on one machine, and one of them killed", "",
             f"`{command}`: {report['models']} models (config {' '.join(report['config'])}); each node one CPU, "
             "each task one torch thread. Training: the time `dpmem run` reports for its training; the whole "
             f"command adds the analysis and reports ({min(extra):.0f}-{max(extra):.0f} s here).", "",
             "| run | training (s) | models per hour (training) | whole command (s) | arrays equal the serial run's |",
             "| --- | --- | --- | --- | --- |",
             f"| serial, in one process | {report['serial']['train_s']:.1f} | "
             f"{report['models'] / report['serial']['train_s'] * 3600:,.0f} | {report['serial']['wall_s']:.1f} | "
             "(reference) |"]
    for name, r in report["runs"].items():
        lines.append(f"| Ray, {name} | {r['train_s']:.1f} | {r['models_per_hour']:,.0f} | {r['wall_s']:.1f} | "
                     f"{r['arrays_equal_serial']} |")
    killed = report["runs"].get("2 workers, second node killed", {})
    lines += ["", f"The second node was killed (SIGKILL to its raylet and its workers) {killed.get('killed_at_s')} s "
              f"into the last run, with {killed.get('units_running_on_killed_node')} unit task(s) running on it; "
              "the run finished on the head alone."]
    lines.append("")
    atomic_write_bytes(out / "cluster.md", "\n".join(lines).encode())
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Training-speed benchmark (a script, not a test): ``python -m dpmem.bench.tools.speed [--threads 2] [--out results]``.

Measures, in one process with a fixed number of torch threads, the median wall time of one
optimisation step per model for
  - plain single-model SGD (``nn.Sequential`` + ``torch.optim.SGD``),
  - Opacus DP-SGD with per-sample-gradient hooks (``GradSampleModule`` + ``DPOptimizer``),
  - Opacus DP-SGD with ghost clipping (``PrivacyEngine.make_private(grad_sample_mode="ghost")``),
  - the batched engine, non-private and DP, K models per step (time per model = step time / K),
on MLPs 784-256-10 and 64-128-10 (batch 256, K=64) and the built-in CNN on 1x28x28 inputs
(channels 16 and 32, GroupNorm; batch 64, K=16) and the 1-D CNN on MNIST-1D's 1x40 sequences, and
with ``--only resnet`` the residual ResNet-20 (GroupNorm, widths 16-32-64) and ResNet-8 (widths 8-16-32, the net
of ``bench/configs/resnet8-mnist5k.toml``) on 1x28x28 inputs (batch 64, K=8),
with batches of a fixed size (every batch is the
same random batch; Poisson sampling is not part of the timing), and the GFLOP/s of the engine's
MLP DP step (forward, backward, per-example norms, clipped product) next to a large float32
matmul. ``--device cuda`` times everything on the GPU (synchronising around every step).
``--interleave`` times an architecture's five methods in turn, one step of each per round, so a change of
the machine's load during the measurement hits them alike (the residual rows were measured so).
``--repeat N`` repeats the whole measurement N times and reports medians (and each ratio's range):
timings on a shared machine move by 10-30% between runs. Writes ``speed.csv`` and ``speed.md`` into
the output folder.
"""
from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn

from dpmem.models.batched import stack_class
from dpmem.models.nets import build_model
from dpmem.models.runtime import resolve_device, retain_freed_memory
from dpmem.models.spec import DPParams, TrainSpec
from dpmem.models.stack import PHASES, SPAN_PREFIX, PoissonBatch

# name -> (architecture, input shape, hidden widths, classes, kind); kind picks K and the batch size
ARCHS = {"784-256-10": ("mlp", (784,), (256,), 10, "mlp"), "64-128-10": ("mlp", (64,), (128,), 10, "mlp"),
         "cnn 1x28x28 16-32": ("cnn", (1, 28, 28), (16, 32), 10, "cnn"),
         "cnn1d 1x40 16-32": ("cnn1d", (1, 40), (16, 32), 10, "cnn"),
         "resnet20 1x28x28 16-32-64": ("resnet20", (1, 28, 28), (16, 32, 64), 10, "resnet"),
         "resnet8 1x28x28 8-16-32": ("resnet8", (1, 28, 28), (8, 16, 32), 10, "resnet")}
NOISE, CLIP, LR = 1.0, 1.0, 0.05
TARGETS = {  # kind -> ratio name -> (description, target as text); the CPU targets
    "mlp": {
        "dp_vs_opacus_hooks": ("Opacus hooks time / engine DP time", ">= 25"),
        "dp_vs_opacus_ghost": ("Opacus ghost time / engine DP time", ">= 10"),
        "dp_over_nonprivate": ("engine DP time / engine non-private time", "<= 1.3"),
        "dp_over_plain_sgd": ("engine DP time / plain single-model SGD time", "<= 1"),
    },
    "cnn": {
        "dp_over_nonprivate": ("engine DP time / engine non-private time", "<= 1.3"),
        "dp_over_plain_sgd": ("engine DP time / plain single-model SGD time", "<= 0.6"),
    },
    "resnet": {
        "dp_over_nonprivate": ("engine DP time / engine non-private time", "<= 1.15"),
        "dp_over_plain_sgd": ("engine DP time / plain single-model SGD time", "-"),
    },
}


DEVICE = torch.device("cpu")


def _sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def median_seconds(fn, *, warmup: int, reps: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        _sync()
        start = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved_median_seconds(steps: dict[str, Callable[[], object]], *, warmup: int, reps: int) -> dict[str, float]:
    """``median_seconds`` of several steps timed in turn (one step of each per round), so that a
    change in the machine's load during the measurement hits every method alike."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(reps):
        for name, step in steps.items():
            _sync()
            start = time.perf_counter()
            step()
            _sync()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def _spec(arch, shape, hidden, classes, dp):
    return TrainSpec(arch=arch, input_shape=shape, n_classes=classes, hidden=hidden, steps=1,
                     sample_rate=0.1, lr=LR, dp=dp)


def _step(model, optimizer, x, y):
    """One optimizer step on the fixed batch (x, y), as a closure for timing."""
    def step():
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return step


def plain_sgd_step(arch, x, y):
    model = build_model(_spec(*arch, None)).to(DEVICE)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    return _step(model, optimizer, x, y)


def opacus_hooks_step(arch, x, y):
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer
    model = GradSampleModule(build_model(_spec(*arch, None)).to(DEVICE))
    optimizer = DPOptimizer(torch.optim.SGD(model.parameters(), lr=LR), noise_multiplier=NOISE,
                            max_grad_norm=CLIP, expected_batch_size=len(x))
    return _step(model, optimizer, x, y)


def opacus_ghost_step(arch, x, y):
    from opacus import PrivacyEngine
    model = build_model(_spec(*arch, None)).to(DEVICE)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=len(x))
    model, optimizer, criterion, _ = PrivacyEngine().make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=LR), criterion=nn.CrossEntropyLoss(),
        data_loader=loader, noise_multiplier=NOISE, max_grad_norm=CLIP, grad_sample_mode="ghost")

    def step():
        optimizer.zero_grad()
        criterion(model(x), y).backward()
        optimizer.step()
    return step


def engine_trainer(arch, K, batch, private, record=True):
    """The engine's stack and one step on a fixed batch; ``record``: the per-example training
    statistics are recorded, as in every run (models/example_stats.py)."""
    dp = DPParams(noise_multiplier=NOISE, max_grad_norm=CLIP) if private else None
    g = torch.Generator().manual_seed(0)
    n = 4 * batch
    _, shape, _, classes = arch
    x_train = torch.randn(n, *shape, generator=g)
    y_train = torch.randint(0, classes, (n,), generator=g)
    spec = _spec(*arch, dp)
    trainer = stack_class(spec)(spec, x_train, y_train, torch.ones(K, n, dtype=torch.bool).numpy(), seed=0,
                                  noise_seed=1, device=DEVICE, record_stats=record)
    # distinct examples per model, as a Poisson batch has them
    index = torch.argsort(torch.rand(K, n, generator=g), dim=1)[:, :batch]
    drawn = torch.zeros(K, n, dtype=torch.bool).scatter_(1, index, True)
    fixed = PoissonBatch(x=x_train[index].to(DEVICE), y=y_train[index].to(DEVICE),
                         valid=torch.ones(K, batch, dtype=torch.bool, device=DEVICE), index=index.to(DEVICE),
                         drawn=drawn.to(DEVICE))
    return trainer, (lambda: trainer.step_on(fixed))


def dp_step_flops(d, hidden, classes, K, batch) -> float:
    """Floating-point operations of one engine DP step for K models (multiply-add = 2)."""
    widths = [d, *hidden, classes]
    pairs = list(zip(widths[:-1], widths[1:]))
    forward = sum(2 * batch * i * o for i, o in pairs)
    backward = sum(2 * batch * i * o for i, o in pairs[1:])          # errors of hidden layers
    norms = sum(2 * batch * (i + o) for i, o in pairs)                # ||a||^2 and ||delta||^2
    clipped = sum(2 * batch * i * o + batch * o for i, o in pairs)    # a^T (c * delta), bias sums
    return float(K * (forward + backward + norms + clipped))


def training_flops(arch, batch: int) -> float:
    """Floating-point operations of one model's training step, counted from the layers' shapes: each
    Linear and convolution costs 2 x its multiply-adds forward and twice that backward (the input's and
    the weights' gradients), so 6 x multiply-adds per example; element-wise work (activations,
    GroupNorm, the per-example norms and clipping) is left out. The same count for every method, so
    FLOP/s compare as times do, and against the matmul peak."""
    name, shape, hidden, classes = arch
    model = build_model(_spec(name, shape, hidden, classes, None))
    macs = [0]

    def count(module, inputs, output) -> None:
        if isinstance(module, nn.Linear):
            macs[0] += output.numel() * module.in_features
        elif isinstance(module, nn.Conv1d | nn.Conv2d):
            kernel = 1
            for k in module.kernel_size:
                kernel *= k
            macs[0] += output.numel() * (module.in_channels // module.groups) * kernel

    hooks = [m.register_forward_hook(count) for m in model.modules()
             if isinstance(m, nn.Linear | nn.Conv1d | nn.Conv2d)]
    with torch.no_grad():
        model(torch.zeros(1, *shape))
    for h in hooks:
        h.remove()
    return 6.0 * macs[0] * batch


def matmul_gflops(size: int = 2048) -> float:
    a, b = torch.randn(size, size, device=DEVICE), torch.randn(size, size, device=DEVICE)
    out = torch.empty(size, size, device=DEVICE)
    seconds = median_seconds(lambda: torch.mm(a, b, out=out), warmup=2, reps=10)
    return 2 * size**3 / seconds / 1e9


def run(threads: int, sizes: dict[str, tuple[int, int]], reps: int,
        only: tuple[str, ...] = ("mlp", "cnn", "resnet"), interleave: bool = False
        ) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """``sizes``: kind ("mlp" / "cnn" / "resnet") -> (K models per engine step, batch). With
    ``interleave`` the five methods of an architecture are timed in turn, one step each per round."""
    torch.set_num_threads(threads)
    retain_freed_memory()  # as the trainers do, for every method alike (before anything is timed)
    rows: list[dict[str, Any]] = []
    ratios: list[dict[str, Any]] = []
    flops: dict[str, float] = {}
    for name, (arch_name, shape, hidden, classes, kind) in ARCHS.items():
        if kind not in only:
            continue
        K, batch = sizes[kind]
        arch = (arch_name, shape, hidden, classes)
        g = torch.Generator().manual_seed(1)
        x = torch.randn(batch, *shape, generator=g).to(DEVICE)
        y = torch.randint(0, classes, (batch,), generator=g).to(DEVICE)
        per_model = {}
        model_flops = training_flops(arch, batch)
        single = [("plain SGD (1 model)", plain_sgd_step), ("Opacus hooks (1 model)", opacus_hooks_step),
                  ("Opacus ghost (1 model)", opacus_ghost_step)]
        engines = [(f"engine non-private (K={K})", False), (f"engine DP (K={K})", True)]
        timed = {}
        if interleave:
            trainers = {method: engine_trainer(arch, K, batch, private) for method, private in engines}
            steps = {method: make(arch, x, y) for method, make in single}
            steps.update({method: trainer_step[1] for method, trainer_step in trainers.items()})
            timed = interleaved_median_seconds(steps, warmup=3, reps=reps)
            for trainer, _ in trainers.values():
                trainer.close()
        for method, make in single:
            seconds = timed[method] if interleave else median_seconds(make(arch, x, y), warmup=3, reps=reps)
            per_model[method] = seconds
            rows.append(dict(arch=name, method=method, models_per_step=1, batch=batch, threads=threads,
                             step_ms=seconds * 1e3, per_model_step_ms=seconds * 1e3, reps=reps,
                             model_step_gflop=model_flops / 1e9))
        for method, private in engines:
            if interleave:
                seconds = timed[method]
            else:
                trainer, step = engine_trainer(arch, K, batch, private)
                seconds = median_seconds(step, warmup=3, reps=reps)
                trainer.close()
            per_model[method] = seconds / K
            rows.append(dict(arch=name, method=method, models_per_step=K, batch=batch, threads=threads,
                             step_ms=seconds * 1e3, per_model_step_ms=seconds / K * 1e3, reps=reps,
                             model_step_gflop=model_flops / 1e9))
            if private and kind == "mlp":
                flops[name] = dp_step_flops(shape[0], hidden, classes, K, batch) / seconds / 1e9
        dp_time = per_model[f"engine DP (K={K})"]
        values = {
            "dp_vs_opacus_hooks": per_model["Opacus hooks (1 model)"] / dp_time,
            "dp_vs_opacus_ghost": per_model["Opacus ghost (1 model)"] / dp_time,
            "dp_over_nonprivate": dp_time / per_model[f"engine non-private (K={K})"],
            "dp_over_plain_sgd": dp_time / per_model["plain SGD (1 model)"],
        }
        for key, value in values.items():
            description, target = TARGETS[kind].get(key, (TARGETS["mlp"][key][0], "-"))
            ratios.append(dict(arch=name, ratio=description, value=value, target=target))
        print(f"{name}: " + ", ".join(f"{k}={v:.2f}" for k, v in values.items()), file=sys.stderr)
    flops["matmul 2048x2048"] = matmul_gflops()
    if DEVICE.type == "cuda":  # the GPU target: engine DP model-steps per second over Opacus's one at a time
        for name in {r["arch"] for r in rows if r["arch"].startswith(("cnn", "resnet"))}:
            times = {r["method"].split(" (")[0]: r["per_model_step_ms"] for r in rows if r["arch"] == name}
            ratios.append(dict(arch=name, ratio="Opacus hooks time / engine DP time (GPU)",
                               value=times["Opacus hooks"] / times["engine DP"], target=">= 20 (K >= 256)"))
    return pd.DataFrame(rows), pd.DataFrame(ratios), flops


def _engine_archs(threads: int, sizes: dict[str, tuple[int, int]], only: tuple[str, ...]):
    """(row name, (arch, shape, hidden, classes), K, batch) of every architecture of ``only``, with the
    threads and malloc set as the trainers set them."""
    torch.set_num_threads(threads)
    retain_freed_memory()
    for name, (arch_name, shape, hidden, classes, kind) in ARCHS.items():
        if kind in only:
            yield name, (arch_name, shape, hidden, classes), *sizes[kind]


def stats_cost(threads: int, sizes: dict[str, tuple[int, int]], reps: int, only: tuple[str, ...],
               repeat: int) -> pd.DataFrame:
    """What recording the per-example training statistics costs: the engine's step with and without
    them, timed in turn (one step of each per round) in one process, ``repeat`` times; per row the
    median step time of each and the overhead's median and range over the repeats."""
    rows = []
    for name, arch, K, batch in _engine_archs(threads, sizes, only):
        for private in (False, True):
            trainers = {label: engine_trainer(arch, K, batch, private, label == "on") for label in ("on", "off")}
            runs = []
            for _ in range(repeat):
                timed = interleaved_median_seconds({label: step for label, (_, step) in trainers.items()},
                                                   warmup=3, reps=reps)
                runs.append(timed)
            for trainer, _ in trainers.values():
                trainer.close()
            overhead = [100 * (t["on"] / t["off"] - 1) for t in runs]
            rows.append(dict(arch=name, variant="DP" if private else "non-private", models_per_step=K, batch=batch,
                             ms_recording=statistics.median(t["on"] for t in runs) * 1e3,
                             ms_not_recording=statistics.median(t["off"] for t in runs) * 1e3,
                             overhead_pct=statistics.median(overhead), overhead_min=min(overhead),
                             overhead_max=max(overhead), repeats=repeat, reps=reps, threads=threads))
            print(f"{name} {rows[-1]['variant']}: recording costs {rows[-1]['overhead_pct']:+.1f}% "
                  f"[{min(overhead):+.1f}, {max(overhead):+.1f}]", file=sys.stderr)
    return pd.DataFrame(rows)


def profile_steps(threads: int, sizes: dict[str, tuple[int, int]], reps: int,
                  only: tuple[str, ...]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Where the engine's steps spend their time: torch's profiler over ``reps`` steps of each
    architecture's non-private and DP step. Two tables: the step's phases (the engine's
    ``step.<phase>`` spans, ms per step and share of the step's wall time, the rest as "other"),
    and self CPU time per operator (ms per step, share of all operators' self time)."""
    from torch.profiler import profile
    ops, phases = [], []
    for name, arch, K, batch in _engine_archs(threads, sizes, only):
        for private in (False, True):
            variant = "DP" if private else "non-private"
            trainer, step = engine_trainer(arch, K, batch, private)
            for _ in range(3):
                step()
            with profile() as prof:
                start = time.perf_counter()
                for _ in range(reps):
                    step()
                wall_ms = (time.perf_counter() - start) * 1e3 / reps
            trainer.close()
            events = prof.key_averages()
            spans = {e.key.removeprefix(SPAN_PREFIX): e.cpu_time_total / reps / 1e3 for e in events
                     if e.key.startswith(SPAN_PREFIX)}
            assert set(spans) <= set(PHASES), spans
            spans["other"] = wall_ms - sum(spans.values())
            for phase_name, ms in spans.items():
                phases.append(dict(arch=name, variant=variant, models_per_step=K, phase=phase_name,
                                   ms_per_step=ms, ms_per_model_step=ms / K, share_pct=100 * ms / wall_ms))
            operators = [e for e in events if not e.key.startswith(SPAN_PREFIX)]
            total = sum(e.self_cpu_time_total for e in operators)
            for e in sorted(operators, key=lambda e: -e.self_cpu_time_total)[:12]:
                ops.append(dict(arch=name, variant=variant, op=e.key,
                                ms_per_step=e.self_cpu_time_total / reps / 1e3,
                                share_pct=100 * e.self_cpu_time_total / total, calls_per_step=e.count / reps))
    return pd.DataFrame(phases), pd.DataFrame(ops)


def median_of_runs(runs: list[tuple[pd.DataFrame, pd.DataFrame, dict]]) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """Medians over repeated measurements (times, ratios, GFLOP/s); ratios also get their range."""
    if len(runs) == 1:
        return runs[0]
    times = pd.concat([t for t, _, _ in runs])
    keys = ["arch", "method", "models_per_step", "batch", "threads", "reps", "model_step_gflop"]
    times = times.groupby(keys, sort=False, as_index=False)[["step_ms", "per_model_step_ms"]].median()
    ratios = pd.concat([r for _, r, _ in runs])
    grouped = ratios.groupby(["arch", "ratio", "target"], sort=False)["value"]
    ratios = grouped.median().reset_index()
    ratios.insert(3, "min", grouped.min().to_numpy())
    ratios.insert(4, "max", grouped.max().to_numpy())
    ratios = ratios[["arch", "ratio", "value", "min", "max", "target"]]
    flops = {k: statistics.median(f[k] for _, _, f in runs) for k in runs[0][2]}
    return times, ratios, flops


def with_peak(times: pd.DataFrame, peak_gflops: float) -> pd.DataFrame:
    """Each row's FLOP/s (counted from the layers' shapes) and its percentage of the matmul peak."""
    times = times.copy()
    times["gflops"] = times["model_step_gflop"] / (times["per_model_step_ms"] / 1e3)
    times["pct_of_peak"] = 100.0 * times["gflops"] / peak_gflops
    return times


def _markdown_table(frame: pd.DataFrame, floatfmt: str) -> str:
    header = "| " + " | ".join(frame.columns) + " |"
    rule = "|" + "|".join("---" for _ in frame.columns) + "|"
    lines = [header, rule]
    for row in frame.itertuples(index=False):
        cells = [format(v, floatfmt) if isinstance(v, float) else str(v) for v in row]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _write_report(out: Path, name: str, lines: list[str]) -> None:
    """Write a Markdown report into ``out`` (created if missing) and print it."""
    out.mkdir(parents=True, exist_ok=True)
    (out / name).write_text("\n".join(lines))
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dpmem.bench.tools.speed", description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--out", default="results", help="output folder (default results)")
    parser.add_argument("--models", type=int, default=64, help="K MLPs per engine step (default 64)")
    parser.add_argument("--batch", type=int, default=256, help="examples per MLP batch (default 256)")
    parser.add_argument("--cnn-models", type=int, default=16, help="K CNNs per engine step (default 16)")
    parser.add_argument("--cnn-batch", type=int, default=64, help="examples per CNN batch (default 64)")
    parser.add_argument("--resnet-models", type=int, default=8, help="K residual nets per engine step (default 8)")
    parser.add_argument("--resnet-batch", type=int, default=64, help="examples per residual-net batch (default 64)")
    parser.add_argument("--reps", type=int, default=20, help="timed repetitions per method (default 20)")
    parser.add_argument("--only", choices=["mlp", "cnn", "resnet"],
                        help="time only these rows (default: mlp and cnn; the ResNet-20 rows only with --only resnet)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to time (default cpu)")
    parser.add_argument("--interleave", action="store_true",
                        help="time an architecture's methods in turn, one step each per round (a shared machine)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="measure everything this many times, interleaved; report medians and the ratios' range")
    parser.add_argument("--profile", action="store_true",
                        help="profile the engine's steps by operator (writes profile.md)")
    parser.add_argument("--stats-cost", action="store_true",
                        help="time the engine's step with and without recording the per-example training statistics "
                             "(writes stats_cost.csv and .md)")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    warnings.filterwarnings("ignore", category=UserWarning)  # Opacus's secure-RNG and hook notices
    global DEVICE
    DEVICE = resolve_device(args.device)
    sizes = {"mlp": (args.models, args.batch), "cnn": (args.cnn_models, args.cnn_batch),
             "resnet": (args.resnet_models, args.resnet_batch)}
    only = (args.only,) if args.only else ("mlp", "cnn")   # ResNet-20 rows take minutes: only with --only resnet
    if args.profile:
        phases, ops = profile_steps(args.threads, sizes, args.reps, only)
        command = "python -m dpmem.bench.tools.speed " + shlex.join(sys.argv[1:] if argv is None else argv)
        text = ["# Where the engine's steps spend their time", "",
                f"`{command}`: torch {torch.__version__}, device {DEVICE.type}; torch's profiler over "
                f"{args.reps} steps on a fixed batch.", "",
                "## The step's phases", "",
                "The engine's named spans (models/stack.py, `PHASES`): forward (with the loss), backward (autograd; "
                "for DP only the gradients with respect to the layers' outputs), norms (the per-example rules up to "
                "the clip factors), clipped_sums (the clip-weighted sums over examples), noise, example_stats, update "
                "(the SGD step; for the MLP path it also forms the clipped sums' products); other: the rest of the "
                "step's wall time (group slicing, Python). share_pct: of the step's wall time.", "",
                _markdown_table(phases, ".3f"), "",
                "## Operators", "",
                "The 12 operators with the most self CPU time per architecture and variant (share_pct: of all "
                "operators' self time).", "",
                _markdown_table(ops, ".3f"), ""]
        _write_report(Path(args.out), "profile.md", text)
        return 0
    if args.stats_cost:
        cost = stats_cost(args.threads, sizes, args.reps, only, args.repeat)
        text = ["# What recording the per-example training statistics costs", "",
                f"`python -m dpmem.bench.tools.speed --stats-cost --threads {args.threads} --repeat {args.repeat} "
                f"--reps {args.reps}`: torch {torch.__version__}, device {DEVICE.type}. The engine's step on a fixed "
                "batch with and without recording (models/example_stats.py), timed in turn, one step of each per "
                f"round, {args.reps} rounds, in one process; the whole repeated {args.repeat} times. overhead_pct: "
                "the median over the repeats of (time recording / time not recording - 1), with its range.", "",
                _markdown_table(cost, ".2f"), ""]
        _write_report(Path(args.out), "stats_cost.md", text)
        cost.to_csv(Path(args.out) / "stats_cost.csv", index=False)
        return 0
    runs = [run(args.threads, sizes, args.reps, only, args.interleave) for _ in range(args.repeat)]
    times, ratios, flops = median_of_runs(runs)
    times = with_peak(times, flops["matmul 2048x2048"])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    times.to_csv(out / "speed.csv", index=False)
    gflops = pd.DataFrame([dict(what=k if k.startswith("matmul") else f"engine DP step, MLP {k}", gflops=v)
                           for k, v in flops.items()])
    text = [
        "# Training speed",
        "",
        f"torch {torch.__version__}, device {DEVICE.type}, {args.threads} threads; MLPs: batch {args.batch}, "
        f"engine K={args.models}; CNN: batch {args.cnn_batch}, engine K={args.cnn_models}; "
        f"residual nets: batch {args.resnet_batch}, engine K={args.resnet_models} (a fixed batch reused "
        f"every step; no sampling in the timing), median of {args.reps} steps after 3 warm-up steps"
        + ("; an architecture's methods timed in turn, one step each per round" if args.interleave else "")
        + (f"; the whole measurement repeated {args.repeat} times: medians, and each ratio's range" if args.repeat > 1
           else "") + ".",
        "",
        "## Time per model-step (ms)",
        "",
        _markdown_table(times[["arch", "method", "step_ms", "per_model_step_ms", "gflops", "pct_of_peak"]], ".3f"),
        "",
        f"gflops: the layers' training FLOPs per model-step (6 x multiply-adds per example, counted from their "
        f"shapes) over the time per model-step; pct_of_peak: that rate as a percentage of the matmul row "
        f"({flops['matmul 2048x2048']:.1f} GFLOP/s).",
        "",
        "## Ratios against the targets",
        "",
        _markdown_table(ratios, ".2f"),
        "",
        "## Arithmetic throughput",
        "",
        _markdown_table(gflops, ".1f"),
        "",
    ]
    _write_report(out, "speed.md", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

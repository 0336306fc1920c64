"""Where units train: in this process, one after the other, or as Ray tasks on local workers or a cluster.

Either way the driver (the `dpmem run` process) alone writes the store, so the store's guarantees
(atomic units, one writer, checksums) do not depend on how many processes train. A unit's arrays
do not depend on where it ran (per-model random streams, see plan.py).

Threads: N workers on one machine each use ``max(1, cores // N)`` torch/OpenMP/MKL threads, so they
never oversubscribe the cores (two 2-thread processes on 2 cores run a CNN step about 8x slower).
On a cluster each task asks Ray for one CPU and uses one thread unless ``threads`` says otherwise.

GPUs: with ``device = "cuda"`` each task also asks Ray for ``gpus_per_unit`` GPUs (default 1), so
Ray places units on nodes that have GPUs, hands each its own (``CUDA_VISIBLE_DEVICES``), and packs
1 / gpus_per_unit units per GPU when it is a fraction. A run whose cluster has no GPU, or whose
units ask for more GPUs than any one node has, is refused in one line before anything is written
(``check_available``).
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from dpmem.bench.config import Config
from dpmem.bench.store.run_store import ModelRange
from dpmem.models import train_models
from dpmem.models.spec import TrainRequest, TrainSpec
from dpmem.privacy.errors import UsageError

# A unit whose worker dies (killed, out of memory, node lost) is run again this many times.
MAX_RETRIES = 3
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


@dataclass(frozen=True, kw_only=True)
class Unit:
    """One unit of work: models ``models.start .. models.stop - 1`` of one cell, with what a worker
    needs to train them (their mask rows and random streams; a LOO repeat is several rows)."""
    cell: str
    models: ModelRange
    masks: np.ndarray        # bool [rows, n_train]
    stream_ids: np.ndarray   # int64 [rows]: model k's initialisation, coins and noise streams
    seed: int
    noise_seed: int
    engine: str


def train_unit(spec: TrainSpec, inputs: dict, unit: Unit, *, device: str, threads: int = 0,
               progress: Callable[[int], None] | None = None) -> tuple[dict[str, np.ndarray], float]:
    """Train one unit (in this process or a worker): its flat arrays and seconds."""
    if threads:
        import torch
        torch.set_num_threads(threads)
    req = TrainRequest(x_train=inputs["x_train"], y_train=inputs["y_train"], masks=unit.masks,
                       canary=inputs.get("canary"), seed=unit.seed, noise_seed=unit.noise_seed,
                       evals=inputs["evals"], stream_ids=unit.stream_ids)
    t0 = time.perf_counter()
    arrays = train_models(spec, req, engine=unit.engine, device=device, progress=progress)
    return arrays, time.perf_counter() - t0


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def set_threads(threads: int) -> int:
    """Set torch's intra-op thread count once, so that nothing oversubscribes the machine; 0 means
    OMP_NUM_THREADS when the environment sets it, else the cores this process may use. Returns the count."""
    import torch
    if not threads:
        env = os.environ.get("OMP_NUM_THREADS", "")
        threads = int(env) if env.isdigit() and int(env) > 0 else cores()
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads


def threads_per_worker(workers: int, threads: int = 0) -> int:
    """Threads each of ``workers`` processes on this machine may use without oversubscribing it."""
    return threads or max(1, cores() // max(1, workers))


def check_available(cfg: Config, ray_address: str | None = None) -> None:
    """Refuse Ray execution without Ray installed, or a GPU request the cluster cannot meet, before
    anything is written (the Ray runtime this starts is the one the run then uses)."""
    address = ray_address or os.environ.get("RAY_ADDRESS") or None
    if cfg.workers or address:
        import importlib.util
        if importlib.util.find_spec("ray") is None:
            raise UsageError("workers / --ray-address need Ray: pip install 'dpmem[ray]'")
        if cfg.device == "cuda":
            import ray
            _connect(ray, cfg, address)
            check_gpus(ray, cfg.gpus_per_unit, address)


def gpus_requested(cfg: Config) -> float:
    """The GPUs one Ray task asks for: ``gpus_per_unit`` with device = cuda, else none."""
    return float(cfg.gpus_per_unit) if cfg.device == "cuda" else 0.0


def check_gpus(ray, per_unit: float, address: str | None) -> None:
    """One line when the Ray cluster cannot run a unit that asks for ``per_unit`` GPUs."""
    where = f"the Ray cluster at {address}" if address else "the local Ray runtime"
    per_node = [float(n.get("Resources", {}).get("GPU", 0.0)) for n in ray.nodes() if n.get("Alive")]
    if not any(per_node):
        raise UsageError(f"device=cuda on Ray: {where} has no GPU (start its nodes with GPUs, or use device=cpu)")
    if per_unit > max(per_node):
        raise UsageError(f"gpus_per_unit={per_unit:g}: no node of {where} has that many GPUs (the most on one "
                         f"node is {max(per_node):g}); ask for at most {max(per_node):g}")


def _connect(ray, cfg: Config, address: str | None) -> bool:
    """Start or join the Ray runtime (True when this call started it)."""
    if ray.is_initialized():
        return False
    threads = (cfg.threads or 1) if address else threads_per_worker(cfg.workers, cfg.threads)
    options: dict[str, Any] = dict(include_dashboard=False, log_to_driver=False, logging_level="ERROR",
                                   runtime_env={"env_vars": {name: str(threads) for name in THREAD_ENV}})
    try:
        if address:
            ray.init(address=address, **options)
        else:
            ray.init(address="local", num_cpus=cfg.workers, **options)
    except ConnectionError as e:
        raise UsageError(f"cannot join the Ray cluster at {address}: {str(e).splitlines()[0]}") from None
    return True


def executor(cfg: Config, ray_address: str | None = None):
    address = ray_address or os.environ.get("RAY_ADDRESS") or None
    if cfg.workers or address:
        return RayExecutor(cfg, address)
    return SerialExecutor(cfg)


class SerialExecutor:
    def __init__(self, cfg: Config):
        self.cfg = cfg

    def map(self, specs: dict, inputs: dict, todo: list[Unit], bar) -> Iterator[tuple]:
        for unit in todo:
            spec = specs[unit.cell]
            done = [0.0]
            # the bar counts the store's units of work (models, or LOO repeats of several models each)
            per_step = unit.models.size / (spec.steps * len(unit.masks))

            def advance(model_steps: int, done=done, per_step=per_step) -> None:
                target = model_steps * per_step
                bar.update(target - done[0])
                done[0] = target

            arrays, seconds = train_unit(spec, inputs, unit, device=self.cfg.device, progress=advance)
            bar.update(unit.models.size - done[0])
            yield unit, arrays, seconds

    def close(self) -> None:
        pass


def _remote_unit(spec, inputs, unit, device, threads):
    return train_unit(spec, inputs, unit, device=device, threads=threads)


class RayExecutor:
    """Units as Ray tasks: a local runtime with ``cfg.workers`` workers, or the cluster at ``address``."""

    def __init__(self, cfg: Config, address: str | None):
        try:
            import ray
        except ImportError:
            raise UsageError("workers / --ray-address need Ray: pip install 'dpmem[ray]'") from None
        self.ray, self.cfg = ray, cfg
        if address:
            self.threads = cfg.threads or 1
        else:
            self.threads = threads_per_worker(cfg.workers, cfg.threads)
        self.started = _connect(ray, cfg, address)
        self.gpus = gpus_requested(cfg)
        if self.gpus:
            check_gpus(ray, self.gpus, address)
        self.task = ray.remote(num_cpus=1, num_gpus=self.gpus, max_retries=MAX_RETRIES)(_remote_unit)

    def map(self, specs: dict, inputs: dict, todo: list[Unit], bar) -> Iterator[tuple]:
        ray = self.ray
        shared = ray.put(inputs)                 # the data travel once per node, not once per task
        pending = {}
        for unit in todo:
            ref = self.task.remote(specs[unit.cell], shared, unit, self.cfg.device, self.threads)
            pending[ref] = unit
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            unit = pending.pop(done[0])
            try:
                arrays, seconds = ray.get(done[0])
            except ray.exceptions.RayError as e:   # one line, as in a serial run: a worker's error names its unit
                cause = getattr(e, "cause", None)
                if isinstance(cause, UsageError):
                    raise UsageError(str(cause)) from None
                from dpmem.models.plugins import one_line
                raise UsageError(f"variant {unit.cell}, models {unit.models.start}-{unit.models.stop - 1}: a Ray "
                                 f"worker failed: {one_line(cause if isinstance(cause, BaseException) else e)}") from None
            bar.update(unit.models.size)          # models finished, counted across all workers
            yield unit, arrays, seconds

    def close(self) -> None:
        if self.started and self.ray.is_initialized():
            self.ray.shutdown()

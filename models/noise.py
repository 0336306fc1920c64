"""DP-SGD's Gaussian noise for K models at once, each row from its model's own stream: drawn by
per-model generators (``GaussianNoise``, the CPU's scheme) or by a counter-based generator keyed
by (noise seed, stream id, step) in a few kernels for all K models (``CounterNoise``, the GPU's;
philox.py)."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch import Tensor

from dpmem.models.philox import counter_normals, philox_keys
from dpmem.models.runtime import cpu_count
from dpmem.models.spec import stream_seeds

# Background threads that draw DP noise one step ahead (on CPUs with more than one core).
NOISE_WORKERS = 2


class GaussianNoise:
    """Standard normal noise [K, size] for one step, row k drawn by model k's own generator (so
    values never depend on timing, threads or neighbours). On a CPU with more than one core,
    background threads draw the next step's rows into a second buffer while the current step
    computes: drawing is a fixed cost per parameter (about 4 ns a float) that would otherwise
    add to every DP step. Each generator still draws its steps in order, so the numbers are the
    same as drawn inline."""

    def __init__(self, generators: list[torch.Generator], size: int, device: torch.device):
        self.generators = generators
        workers = min(NOISE_WORKERS, len(generators)) if device.type == "cpu" and cpu_count() > 1 else 0
        self.buffers = [torch.empty(len(generators), size, device=device) for _ in range(2 if workers else 1)]
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="dp-noise") if workers else None
        self._parts = np.array_split(np.arange(len(generators)), max(1, workers))
        self._pending: tuple[int, list] | None = None  # (buffer index, futures drawing into it)

    def _draw(self, buffer: Tensor, rows: np.ndarray) -> None:
        for k in rows:
            buffer[k].normal_(generator=self.generators[k])

    def _submit(self, index: int) -> None:
        assert self._pool is not None
        self._pending = (index, [self._pool.submit(self._draw, self.buffers[index], part) for part in self._parts])

    def begin(self) -> None:
        """A step starts: make sure its noise is being drawn (in the background)."""
        if self._pool is not None and self._pending is None:
            self._submit(0)

    def take(self) -> Tensor:
        """This step's noise. The buffer is valid until the next call of ``take``."""
        if self._pool is None:
            self._draw(self.buffers[0], np.arange(len(self.generators)))
            return self.buffers[0]
        self.begin()
        assert self._pending is not None
        index, futures = self._pending
        for future in futures:
            future.result()
        self._submit(1 - index)  # the next step's noise, while this step uses this buffer
        return self.buffers[index]

    def close(self) -> None:
        if self._pool is not None:
            for future in self._pending[1] if self._pending else []:
                future.result()
            self._pool.shutdown()
            self._pool = None
            self._pending = None

    def __del__(self):
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.shutdown(wait=False)


def counter_keys(noise_seed: int, streams: np.ndarray, device: torch.device) -> Tensor:
    """int64 [K, 2]: each model's Philox key, the two 32-bit halves of its noise stream's seed
    (``SeedSequence([noise_seed, stream_id])``, models/spec.py)."""
    return philox_keys([stream_seeds(noise_seed, int(s))[0] for s in streams], device)


class CounterNoise:
    """Standard normal noise [K, size] per step from a counter-based generator: all K models'
    draws in one pass of a few dozen elementwise kernels, instead of one generator call per model
    (on a GPU, K small kernel launches per step). Model k's noise at step t depends only on
    (noise seed, its stream id, t), so it does not depend on K, on its neighbours or on how the
    work is split. The numbers differ from ``GaussianNoise``'s (another generator), so the
    engine uses one scheme per device (``philox.RANDOM_SCHEMES``); the contract "model k's numbers depend
    only on (seed, k)" holds for both."""

    def __init__(self, keys: Tensor, size: int):
        self.keys, self.size, self.step = keys, size, 0

    def begin(self) -> None:
        pass

    def take(self) -> Tensor:
        noise = counter_normals(self.keys, self.step, self.size)
        self.step += 1
        return noise

    def close(self) -> None:
        pass

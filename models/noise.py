"""DP-SGD's Gaussian noise for K models at once, each row from its model's own generator."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch import Tensor

from dpmem.models.runtime import cpu_count

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

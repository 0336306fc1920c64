"""DP-SGD's Gaussian noise for K models at once, each row from its model's own stream: drawn by
per-model generators (``GaussianNoise``, the CPU's scheme) or by a counter-based generator keyed
by (noise seed, stream id, step) in a few kernels for all K models (``CounterNoise``, the GPU's)."""
from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch import Tensor

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


# -- counter-based noise: all K models in a few kernels -------------------------------------------
# Philox4x32-10 (Salmon et al. 2011, "Parallel random numbers: as easy as 1, 2, 3"), written with
# int64 tensor operations so that the same code runs on any device; every 32-bit product is split
# into 16-bit halves so that no intermediate leaves int64's range.
_MASK32 = 0xFFFFFFFF
_PHILOX_M = (0xD2511F53, 0xCD9E8D57)
_PHILOX_W = (0x9E3779B9, 0xBB67AE85)
_PHILOX_ROUNDS = 10
# The fourth counter word of DP noise: other counter-based draws can use other domains.
NOISE_DOMAIN = 1


def _mulhilo(multiplier: int, a: Tensor) -> tuple[Tensor, Tensor]:
    """(high, low) 32-bit words of multiplier * a for a < 2^32, without overflowing int64."""
    low_part = a.bitwise_and(0xFFFF).mul(multiplier)          # < 2^48
    high_part = a.bitwise_right_shift(16).mul(multiplier)     # < 2^48
    mid = low_part + high_part.bitwise_and(0xFFFF).bitwise_left_shift(16)   # < 2^49
    return high_part.bitwise_right_shift(16) + mid.bitwise_right_shift(32), mid.bitwise_and(_MASK32)


def philox4x32(counter: tuple[Tensor, Tensor, Tensor, Tensor], key: tuple[Tensor, Tensor]) -> list[Tensor]:
    """Philox4x32-10 of broadcastable int64 tensors holding 32-bit words: four output words."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for r in range(_PHILOX_ROUNDS):
        if r:
            k0 = (k0 + _PHILOX_W[0]).bitwise_and(_MASK32)
            k1 = (k1 + _PHILOX_W[1]).bitwise_and(_MASK32)
        hi0, lo0 = _mulhilo(_PHILOX_M[0], c0)
        hi1, lo1 = _mulhilo(_PHILOX_M[1], c2)
        c0, c1, c2, c3 = hi1.bitwise_xor(c1).bitwise_xor(k0), lo1, hi0.bitwise_xor(c3).bitwise_xor(k1), lo0
    return [c0, c1, c2, c3]


def _unit_open(word: Tensor) -> Tensor:
    """A 32-bit word -> float32 in (0, 1): its top 24 bits plus one half, times 2^-24 (exact)."""
    return (word.bitwise_right_shift(8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))


def counter_normals(keys: Tensor, step: int, size: int) -> Tensor:
    """Standard normals [K, size]: row k is a function of (keys[k], step) alone.

    ``keys`` int64 [K, 2] (two 32-bit words per model). Block j of row k (4 normals) is Philox of
    counter (j, 0, step, NOISE_DOMAIN) under key k, turned into normals by Box-Muller."""
    device = keys.device
    blocks = -(-size // 4)
    j = torch.arange(blocks, dtype=torch.int64, device=device).unsqueeze(0)
    zero = torch.zeros((), dtype=torch.int64, device=device)
    step_word = torch.full((), step & _MASK32, dtype=torch.int64, device=device)
    words = philox4x32((j, zero, step_word, torch.full((), NOISE_DOMAIN, dtype=torch.int64, device=device)),
                       (keys[:, 0:1], keys[:, 1:2]))
    out = torch.empty(keys.shape[0], blocks, 4, dtype=torch.float32, device=device)
    for pair in range(2):
        radius = torch.sqrt(-2.0 * torch.log(_unit_open(words[2 * pair])))
        angle = (2.0 * math.pi) * _unit_open(words[2 * pair + 1])
        out[..., 2 * pair] = radius * torch.cos(angle)
        out[..., 2 * pair + 1] = radius * torch.sin(angle)
    return out.view(keys.shape[0], -1)[:, :size]


def counter_keys(noise_seed: int, streams: np.ndarray, device: torch.device) -> Tensor:
    """int64 [K, 2]: each model's Philox key, the two 32-bit halves of its noise stream's seed
    (``SeedSequence([noise_seed, stream_id])``, models/spec.py)."""
    seeds = [stream_seeds(noise_seed, int(s))[0] for s in streams]
    return torch.tensor([[s & _MASK32, (s >> 32) & _MASK32] for s in seeds], dtype=torch.int64, device=device)


class CounterNoise:
    """Standard normal noise [K, size] per step from a counter-based generator: all K models'
    draws in one pass of a few dozen elementwise kernels, instead of one generator call per model
    (on a GPU, K small kernel launches per step). Model k's noise at step t depends only on
    (noise seed, its stream id, t), so it does not depend on K, on its neighbours or on how the
    work is split. The numbers differ from ``GaussianNoise``'s (another generator), so the
    engine uses one scheme per device (``NOISE_SCHEMES``); the contract "model k's numbers depend
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


# Which noise scheme the engine draws DP noise with, by device type: per-model generators on the
# CPU (drawn ahead on background threads; the committed CPU results), counter-based on a GPU.
NOISE_SCHEMES = {"cpu": "generators", "cuda": "counter"}

"""Counter-based random numbers for K models at once (the GPU's scheme): Philox4x32-10 (Salmon et al.
2011, "Parallel random numbers: as easy as 1, 2, 3") keyed by each model's stream seed, so a draw
is a function of (stream seed, step, domain, index) alone and all K models' numbers for a step
come from a few elementwise kernels instead of one generator call (on a GPU, one kernel launch) per
model. Used for DP noise (noise.py), Poisson coins (stack.py) and gradient canaries
(canary_stack.py) where ``RANDOM_SCHEMES`` says so."""
from __future__ import annotations

import math

import torch
from torch import Tensor

# How the engine draws per-model random numbers, by device type: per-model torch generators on the
# CPU (DP noise drawn ahead on background threads; the committed CPU results), counter-based on a GPU.
RANDOM_SCHEMES = {"cpu": "generators", "cuda": "counter"}

# Written with int64 tensor operations so that the same code runs on any device; every 32-bit
# product is split into 16-bit halves so that no intermediate leaves int64's range.
_MASK32 = 0xFFFFFFFF
_PHILOX_M = (0xD2511F53, 0xCD9E8D57)
_PHILOX_W = (0x9E3779B9, 0xBB67AE85)
_PHILOX_ROUNDS = 10
# The fourth counter word: one domain per kind of draw, so draws under one key never share a counter.
NOISE_DOMAIN = 1
COIN_DOMAIN = 2


def uses_counter(device: torch.device) -> bool:
    return RANDOM_SCHEMES.get(device.type, "counter") == "counter"


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


def philox_keys(seeds: list[int], device: torch.device) -> Tensor:
    """int64 [K, 2]: each model's Philox key, the two 32-bit halves of its stream's seed."""
    return torch.tensor([[s & _MASK32, (s >> 32) & _MASK32] for s in seeds], dtype=torch.int64, device=device)


def _blocks(keys: Tensor, step: int, domain: int, size: int) -> list[Tensor]:
    """The four output words [K, ceil(size / 4)] of counters (j, 0, step, domain) under each key."""
    device = keys.device
    j = torch.arange(-(-size // 4), dtype=torch.int64, device=device).unsqueeze(0)
    zero = torch.zeros((), dtype=torch.int64, device=device)
    step_word = torch.full((), step & _MASK32, dtype=torch.int64, device=device)
    return philox4x32((j, zero, step_word, torch.full((), domain, dtype=torch.int64, device=device)),
                      (keys[:, 0:1], keys[:, 1:2]))


def counter_normals(keys: Tensor, step: int, size: int, domain: int = NOISE_DOMAIN) -> Tensor:
    """Standard normals [K, size]: row k is a function of (keys[k], step) alone.

    ``keys`` int64 [K, 2] (two 32-bit words per model). Block j of row k (4 normals) is Philox of
    counter (j, 0, step, domain) under key k, turned into normals by Box-Muller."""
    words = _blocks(keys, step, domain, size)
    out = torch.empty(keys.shape[0], words[0].shape[1], 4, dtype=torch.float32, device=keys.device)
    for pair in range(2):
        radius = torch.sqrt(-2.0 * torch.log(_unit_open(words[2 * pair])))
        angle = (2.0 * math.pi) * _unit_open(words[2 * pair + 1])
        out[..., 2 * pair] = radius * torch.cos(angle)
        out[..., 2 * pair + 1] = radius * torch.sin(angle)
    return out.view(keys.shape[0], -1)[:, :size]


def counter_uniforms(keys: Tensor, step: int, size: int, domain: int = COIN_DOMAIN) -> Tensor:
    """Uniforms on (0, 1) [K, size] with 24 bits: block j of row k (4 uniforms) is Philox of counter
    (j, 0, step, domain) under key k. For Poisson coins (u < q) 24 bits resolve q to 6e-8."""
    words = _blocks(keys, step, domain, size)
    return torch.stack([_unit_open(w) for w in words], dim=2).view(keys.shape[0], -1)[:, :size]

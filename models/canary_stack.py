"""Gradient canaries in the batched engine (contract in models/spec.py and privacy/README.md).

Each canary is an extra trainable scalar per model that the network never reads; its per-example
gradient is ``-s e_j`` on that scalar alone, so the engine steps all K x m_c canaries in closed form
beside the network, sampled, clipped, noised and normalised as DP-SGD treats every example.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from dpmem.models.philox import counter_normals, counter_uniforms, philox_keys, uses_counter
from dpmem.models.spec import CANARY_STREAM, CLIP_EPS, TrainSpec, canary_grad_norm, stream_seeds
from dpmem.models.streams import stream_generator

if TYPE_CHECKING:
    from dpmem.models.stack import ModelStack


class GradientCanaries:
    """The canaries' parameters theta_c [K, m_c] and their DP-SGD steps (contract in models/spec.py).

    Canary j's per-example gradient is ``-s e_j`` (s = ``canary_grad_norm``), zero on the
    network, so its whole-gradient clip factor is ``min(1, C / (s + 1e-6))`` and a step's clipped
    sum is ``-s * factor`` on every sampled member canary. Coins and noise come from the canary
    streams; normalisation by the model's expected batch size of real examples."""

    def __init__(self, spec: TrainSpec, members: np.ndarray, *, seed: int, noise_seed: int, streams: np.ndarray,
                 inv_ebs: Tensor, device: torch.device):
        self.spec = spec
        self.members = torch.as_tensor(members).to(device)
        K, m = members.shape
        self.theta = torch.zeros(K, m, device=device)
        self.buf = torch.zeros(K, m, device=device) if spec.momentum else None
        # the canary streams' generators (the CPU), or Philox keyed by the same seeds (a GPU: all K
        # models' coins and noise in a few kernels; philox.RANDOM_SCHEMES)
        self.counter = uses_counter(device)
        self.steps_done = 0
        if self.counter:
            self.coin_keys = philox_keys([stream_seeds(seed, int(s), CANARY_STREAM)[0] for s in streams], device)
            self.noise_keys = philox_keys([stream_seeds(noise_seed, int(s), CANARY_STREAM)[0] for s in streams], device)
        else:
            self.coins = [stream_generator(seed, s, CANARY_STREAM, device=device) for s in streams]
            self.noise = ([stream_generator(noise_seed, s, CANARY_STREAM, device=device) for s in streams]
                          if spec.dp is not None else None)
        self.inv_ebs = inv_ebs
        self._uniform = torch.empty(K, m, device=device)

    def clipped_sum(self, sampled: Tensor) -> Tensor:
        """The clipped per-example gradient sum on theta_c of the sampled canaries [K, m_c]."""
        s = canary_grad_norm(self.spec)
        factor = 1.0 if self.spec.dp is None else min(1.0, self.spec.dp.max_grad_norm / (s + CLIP_EPS))
        return sampled.float() * (-s * factor)

    @torch.no_grad()
    def step(self, trainer: ModelStack) -> None:
        m = self._uniform.shape[1]
        if self.counter:
            self._uniform = counter_uniforms(self.coin_keys, self.steps_done, m)
        else:
            for k, generator in enumerate(self.coins):
                torch.rand(m, generator=generator, out=self._uniform[k])
        sampled = (self._uniform < self.spec.sample_rate).logical_and_(self.members)
        grad = self.clipped_sum(sampled)
        dp = self.spec.dp
        if dp is not None:
            if self.counter:
                z = counter_normals(self.noise_keys, self.steps_done, m)
            else:
                z = torch.empty_like(self._uniform)
                assert self.noise is not None
                for k, generator in enumerate(self.noise):
                    z[k].normal_(generator=generator)
            grad.add_(z, alpha=dp.noise_multiplier * dp.max_grad_norm)
        self.steps_done += 1
        grad.mul_(self.inv_ebs.unsqueeze(1))
        trainer.apply([self.theta], [grad], None if self.buf is None else [self.buf])

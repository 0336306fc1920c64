"""Per-model random streams (contract in models/spec.py): model k's initialisation, Poisson coins
and DP noise come from generators seeded by (seed, stream id) alone, so its numbers do not depend
on K, on its neighbours or on how the work is split."""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from dpmem.models.nets import build_model
from dpmem.models.spec import TrainSpec, stream_seeds


def initial_params(spec: TrainSpec, streams: np.ndarray, seed: int) -> list[Tensor]:
    """Stacked parameters [K, *shape] of ``build_model(spec)`` built under each model's seed."""
    per_model = [initial_model(spec, seed, int(s)) for s in streams]
    return [torch.stack([p.detach() for p in ps]).float().contiguous()
            for ps in zip(*(m.parameters() for m in per_model), strict=True)]


def initial_model(spec: TrainSpec, seed: int, stream_id: int) -> nn.Module:
    """Model ``stream_id``'s initial module: ``build_model(spec)`` under its own torch seed."""
    init_seed, _ = stream_seeds(seed, stream_id, count=2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        return build_model(spec)


def coin_seed(seed: int, stream_id: int) -> int:
    """The seed of model ``stream_id``'s Poisson coins (the second seed of its stream)."""
    return stream_seeds(seed, stream_id, count=2)[1]


def coin_generator(seed: int, stream_id: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(coin_seed(seed, stream_id))


def stream_generator(seed: int, stream_id: int, *extra: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(stream_seeds(seed, stream_id, *extra)[0])

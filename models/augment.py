"""Data augmentation of DP-SGD batches: random crop with zero padding and horizontal flip, per
example and per step, with augmentation multiplicity (De et al. 2022).

Each model draws its augmentation from its own generator (``SeedSequence([seed, stream_id,
AUGMENT_STREAM])``), exactly ``copies * b`` draws per step for a Poisson batch of b real examples
(never for padding), so its augmented copies depend only on (seed, stream id) and its own batches,
not on K or on the other models of its call. Both engines call ``augment_batch`` on a model's
batch in the batch's order, so a model with the same batch and generator state gets the same
copies in either engine.

Multiplicity m: every example of the batch becomes m augmented copies, rows ``i * m .. i * m +
m - 1`` (example-major). The example's gradient is the mean of its copies' gradients, clipped as
one per-example gradient; the Poisson sampling, and so the privacy accounting, are unchanged.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from dpmem.models.spec import AUGMENTS
# Zero padding of the random crop, in pixels on each side (4 for 32x32 CIFAR images in the papers).
CROP_PADDING = 4


def crops(augment: str) -> bool:
    return augment in ("crop", "crop-flip")


def flips(augment: str) -> bool:
    return augment in ("flip", "crop-flip")


def augment_batch(x: Tensor, augment: str, copies: int, generator: torch.Generator) -> Tensor:
    """[b, C, H, W] -> [b * copies, C, H, W]: row i * copies + j is copy j of example i, each
    shifted by (dy, dx) uniform in [-CROP_PADDING, CROP_PADDING] (zeros shifted in) and/or
    mirrored left-right with probability 1/2. Draws: the shifts [b * copies, 2], then the flips
    [b * copies], from ``generator``."""
    if augment not in AUGMENTS:
        raise ValueError(f"unknown augment {augment!r}; choose from {', '.join(AUGMENTS)}")
    rows = x.repeat_interleave(copies, dim=0) if copies > 1 else x
    n = rows.shape[0]
    if augment == "none" or n == 0:
        return rows
    if x.dim() != 4:
        raise ValueError(f"augment {augment!r} needs image batches [b, C, H, W], got {tuple(x.shape)}")
    device = x.device
    if crops(augment):
        p = CROP_PADDING
        shifts = torch.randint(0, 2 * p + 1, (n, 2), generator=generator, device=generator.device).to(device)
        H, W = rows.shape[2:]
        padded = F.pad(rows, (p, p, p, p))
        ys = (shifts[:, 0:1] + torch.arange(H, device=device)).view(n, 1, H, 1)
        xs = (shifts[:, 1:2] + torch.arange(W, device=device)).view(n, 1, 1, W)
        index = (ys * (W + 2 * p) + xs).expand(n, rows.shape[1], H, W).reshape(n, rows.shape[1], -1)
        rows = padded.reshape(n, rows.shape[1], -1).gather(2, index).view_as(rows)
    if flips(augment):
        flip = torch.rand(n, generator=generator, device=generator.device).to(device) < 0.5
        rows = torch.where(flip.view(n, 1, 1, 1), rows.flip(-1), rows)
    return rows

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


def draw(augment: str, n: int, generator: torch.Generator) -> tuple[Tensor | None, Tensor | None]:
    """The random choices for n copies: shifts int64 [n, 2] in [0, 2 * CROP_PADDING] (the crop's
    top-left corner in the padded image; CROP_PADDING is no shift), then flips bool [n], each None
    when the augmentation does not use it. Drawn in that order from ``generator``."""
    if augment not in AUGMENTS:
        raise ValueError(f"unknown augment {augment!r}; choose from {', '.join(AUGMENTS)}")
    shifts = (torch.randint(0, 2 * CROP_PADDING + 1, (n, 2), generator=generator, device=generator.device)
              if crops(augment) and n else None)
    flip = torch.rand(n, generator=generator, device=generator.device) < 0.5 if flips(augment) and n else None
    return shifts, flip


def apply(rows: Tensor, shifts: Tensor | None, flip: Tensor | None) -> Tensor:
    """Images [n, C, H, W], each shifted (zeros shifted in) and/or mirrored as drawn by ``draw``."""
    n, channels, H, W = rows.shape
    device = rows.device
    if shifts is not None:
        p = CROP_PADDING
        shifts = shifts.to(device)
        padded = F.pad(rows, (p, p, p, p))
        ys = (shifts[:, 0:1] + torch.arange(H, device=device)).view(n, 1, H, 1)
        xs = (shifts[:, 1:2] + torch.arange(W, device=device)).view(n, 1, 1, W)
        index = (ys * (W + 2 * p) + xs).expand(n, channels, H, W).reshape(n, channels, -1)
        rows = padded.reshape(n, channels, -1).gather(2, index).view(n, channels, H, W)
    if flip is not None:
        rows = torch.where(flip.to(device).view(n, 1, 1, 1), rows.flip(-1), rows)
    return rows


def augment_batch(x: Tensor, augment: str, copies: int, generator: torch.Generator) -> Tensor:
    """[b, C, H, W] -> [b * copies, C, H, W]: row i * copies + j is copy j of example i, each
    shifted by (dy, dx) uniform in [-CROP_PADDING, CROP_PADDING] (zeros shifted in) and/or
    mirrored left-right with probability 1/2. Draws: the shifts [b * copies, 2], then the flips
    [b * copies], from ``generator``."""
    rows = x.repeat_interleave(copies, dim=0) if copies > 1 else x
    shifts, flip = draw(augment, rows.shape[0], generator)
    if shifts is None and flip is None:
        return rows
    if x.dim() != 4:
        raise ValueError(f"augment {augment!r} needs image batches [b, C, H, W], got {tuple(x.shape)}")
    return apply(rows, shifts, flip)

"""The per-model reference path: each of the K models trained on its own through Opacus.

It trains any module ``build_model(spec)`` returns and is the yardstick the batched engine is
tested against. DP-SGD is Opacus's own machinery (``GradSampleModule`` in hooks mode +
``DPOptimizer``) fed by Opacus's ``DPDataLoader`` (Poisson sampling at exactly
``spec.sample_rate``); the noise multiplier and clipping norm are taken as given (calibration
lives in privacy/accounting.py). The non-private variant takes plain SGD steps on Poisson
batches drawn the same way, with the summed loss divided by the same expected batch size.

Seeding (contract in models/spec.py): model k starts from exactly the batched engine's initial
module for its stream id (``streams.initial_model``), its Poisson batches come from the same
stream's coin generator (DPDataLoader draws over the model's own subset, so batches are not
coin-for-coin the engine's) and its noise from ``(noise_seed, stream_id)``.

Gradient canaries are a second, separate Opacus model per network: an ``nn.Embedding(m_c, 1)``
(theta_c, initialised to 0) whose loss on canary j is ``-s * theta_c[j]``, so Opacus computes
the per-example gradient ``-s e_j`` itself. Its own ``DPOptimizer`` (same clipping norm,
expected batch size, lr, momentum and weight decay; the canary noise stream) clips, noises and
steps it. Because a canary's gradient is zero on the network and a real example's is zero on
theta_c, clipping each block on its own equals clipping the whole per-example gradient.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from opacus import GradSampleModule
from opacus.data_loader import DPDataLoader
from opacus.optimizers import DPOptimizer
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from dpmem.models.augment import augment_batch
from dpmem.models.example_stats import ExampleStats
from dpmem.models.runtime import PROGRESS_EVERY, resolve_device, retain_freed_memory
from dpmem.models.spec import (
    AUGMENT_STREAM,
    CANARY_STREAM,
    TrainRequest,
    TrainSpec,
    canary_grad_norm,
    canary_layout,
    expected_batch_sizes,
    model_streams,
    stream_seeds,
)
from dpmem.models.streams import initial_model

# Evaluation forward passes keep the largest activation at about this many floats (64 MiB).
EVAL_BLOCK_FLOATS = 1 << 24


def supports(module: nn.Module) -> str | None:
    """Opacus trains every module its GradSampleModule validates."""
    from opacus.validators import ModuleValidator
    errors = ModuleValidator.validate(module, strict=False)
    return None if not errors else str(errors[0])


def initial_models(spec: TrainSpec, K: int, seed: int, stream_ids: np.ndarray | None = None) -> list[nn.Module]:
    """The K initial models of a request, exactly the batched engine's."""
    streams = np.arange(K) if stream_ids is None else np.asarray(stream_ids)
    return [initial_model(spec, seed, int(s)) for s in streams]


def _poisson_batches(x: Tensor, y: Tensor, spec: TrainSpec,
                     generator: torch.Generator) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """``spec.steps`` Poisson batches (x, y, rows of x) at rate ``spec.sample_rate`` (possibly empty)."""
    rows = torch.arange(len(x))
    if len(x) == 0:  # an empty subset: every batch is empty (DPDataLoader refuses empty datasets)
        for _ in range(spec.steps):
            yield x, y, rows
        return
    # the row numbers ride along as a third tensor: the sampler's draws depend on the dataset's length only
    loader = DPDataLoader(TensorDataset(x, y, rows), sample_rate=spec.sample_rate, generator=generator)
    done = 0
    while done < spec.steps:
        for xb, yb, ib in loader:
            yield xb, yb, ib
            done += 1
            if done == spec.steps:
                return


class CanaryBlock(nn.Module):
    """theta_c as an Embedding(m_c, 1) (initialised to 0); canary j's loss is ``-s * theta_c[j]``."""

    def __init__(self, count: int, grad_norm: float):
        super().__init__()
        self.theta = nn.Embedding(count, 1)
        nn.init.zeros_(self.theta.weight)
        self.grad_norm = grad_norm

    def forward(self, j: Tensor) -> Tensor:
        """The summed canary loss of a batch of canary ids."""
        return -self.grad_norm * self.theta(j).sum()


def _dp_optimizer(spec: TrainSpec, params, expected_batch_size: int, generator: torch.Generator) -> DPOptimizer:
    assert spec.dp is not None, "DP training only"
    return DPOptimizer(
        torch.optim.SGD(params, lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay),
        noise_multiplier=spec.dp.noise_multiplier,
        max_grad_norm=spec.dp.max_grad_norm,
        expected_batch_size=expected_batch_size,
        loss_reduction="mean",  # the optimizer divides the noisy clipped sum by expected_batch_size
        generator=generator,
    )


def trainable(module: nn.Module) -> list[nn.Parameter]:
    """The parameters an optimizer steps: frozen ones (requires_grad=False) are not handed to it."""
    return [p for p in module.parameters() if p.requires_grad]


@torch.no_grad()
def _zero_grads(module: nn.Module) -> None:
    for p in module.parameters():
        # a zero gradient rather than None, so an empty batch still takes an SGD step
        # (torch.optim.SGD skips parameters without a gradient, momentum included); a frozen
        # parameter keeps None, so that SGD (weight decay and momentum included) leaves it alone
        if p.requires_grad:
            p.grad = torch.zeros_like(p)


def train_one(spec: TrainSpec, model: nn.Module, x: Tensor, y: Tensor, *, batch_seed: int,
              noise_seed: int, device: torch.device = torch.device("cpu"),
              canary_members: np.ndarray | None = None, canary_seeds: tuple[int, int] = (0, 0),
              augment_seed: int = 0, stats: ExampleStats | None = None, stats_row: int = 0,
              subset: Tensor | None = None,
              progress: Callable[[int], None] | None = None) -> tuple[nn.Module, Tensor | None]:
    """Train one model on (x, y) = its own subset (real examples) for ``spec.steps`` steps.

    ``canary_members`` (bool [m_c]) are its gradient canaries, ``canary_seeds`` the seeds of
    their coins and noise, ``augment_seed`` the seed of its augmentation stream. ``stats``, if
    given, records the per-example statistics (models/example_stats.py) in its row ``stats_row``,
    ``subset`` mapping the rows of x to training examples. Returns the model and theta_c (None
    without canaries)."""
    expected_batch_size = expected_batch_sizes(np.ones((1, len(x)), dtype=bool), spec.sample_rate)[0]
    batch_generator = torch.Generator().manual_seed(batch_seed)
    model.to(device).train()
    _zero_grads(model)
    dp = spec.dp
    copies = spec.augment_multiplicity
    augmenter = None
    if spec.augment != "none" or copies > 1:
        augmenter = torch.Generator(device=device).manual_seed(augment_seed)
    canaries = None
    if spec.canaries:
        members = torch.as_tensor(np.zeros(spec.canaries, bool) if canary_members is None else canary_members).to(device)
        canaries = CanaryBlock(spec.canaries, canary_grad_norm(spec)).to(device)
        _zero_grads(canaries)
        canary_coins = torch.Generator(device=device).manual_seed(canary_seeds[0])
        canary_ids = torch.arange(spec.canaries, device=device)
    if dp is None:
        network: Any = model
        optimizer = torch.optim.SGD(trainable(model), lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay)
        canary_net: Any = canaries
        if canaries is not None:
            canary_opt = torch.optim.SGD(canaries.parameters(), lr=spec.lr, momentum=spec.momentum,
                                         weight_decay=spec.weight_decay)
    else:
        network = GradSampleModule(model, batch_first=True, loss_reduction="sum")
        optimizer = _dp_optimizer(spec, trainable(network), expected_batch_size,
                                  torch.Generator(device=device).manual_seed(noise_seed))
        if canaries is not None:
            canary_net = GradSampleModule(canaries, batch_first=True, loss_reduction="sum")
            canary_opt = _dp_optimizer(spec, canary_net.parameters(), expected_batch_size,
                                       torch.Generator(device=device).manual_seed(canary_seeds[1]))
    with warnings.catch_warnings():
        # Opacus's backward hooks make torch note that the input needs no gradient; expected.
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        for s, (xb, yb, ib) in enumerate(_poisson_batches(x, y, spec, batch_generator)):
            optimizer.zero_grad(set_to_none=False)
            if len(xb):
                xb, yb = xb.to(device), yb.to(device)
                if augmenter is not None:
                    xb, yb = augment_batch(xb, spec.augment, copies, augmenter), yb.repeat_interleave(copies)
                # the per-row losses, summed: the gradient is that of reduction="sum" (each row's weight is 1)
                rows = nn.functional.cross_entropy(network(xb), yb, reduction="none")
                loss = rows.sum()
                if copies > 1:
                    loss = loss / copies   # an example's gradient: the mean over its copies
                (loss if dp is not None else loss / expected_batch_size).backward()
                if dp is not None and copies > 1:
                    _sum_copies(optimizer, copies)
                if stats is not None:
                    assert subset is not None, "recording needs the subset's example indices"
                    losses = rows.detach().view(-1, copies).mean(dim=1) if copies > 1 else rows.detach()
                    norms = None if dp is None else per_sample_norms(optimizer)
                    stats.add_rows(stats_row, subset[ib].to(device), losses, norms,
                                   None if dp is None else dp.max_grad_norm)
            elif dp is not None:
                _empty_grad_samples(optimizer)
            optimizer.step()
            if canaries is not None:
                coins = torch.rand(spec.canaries, generator=canary_coins, device=device)
                picked = canary_ids[(coins < spec.sample_rate) & members]
                canary_opt.zero_grad(set_to_none=False)
                if len(picked):
                    loss = canary_net(picked)
                    (loss if dp is not None else loss / expected_batch_size).backward()
                elif dp is not None:
                    _empty_grad_samples(canary_opt)
                canary_opt.step()
            _report(progress, s + 1, spec.steps)
    if dp is not None:
        network.remove_hooks()
        if canaries is not None:
            canary_net.remove_hooks()
    theta = None if canaries is None else canaries.theta.weight.detach().reshape(-1).cpu()
    return model, theta


def per_sample_norms(optimizer: DPOptimizer) -> Tensor:
    """Each example's whole gradient norm, as ``DPOptimizer.clip_and_accumulate`` computes it."""
    per_param = [g.reshape(len(g), -1).norm(2, dim=-1) for g in optimizer.grad_samples]
    return torch.stack(per_param, dim=1).norm(2, dim=1)


def _report(progress: Callable[[int], None] | None, done: int, total: int) -> None:
    if progress is not None and (done % PROGRESS_EVERY == 0 or done == total):
        progress(done)


def _sum_copies(optimizer: DPOptimizer, copies: int) -> None:
    """Augmentation multiplicity: Opacus computed one gradient per row (copy); an example's
    per-sample gradient, which DPOptimizer clips, is the sum over its copies' rows (the loss
    already carries 1 / copies)."""
    for p in optimizer.params:
        if getattr(p, "grad_sample", None) is not None:
            p.grad_sample = p.grad_sample.view(-1, copies, *p.shape).sum(dim=1)


def _empty_grad_samples(optimizer: DPOptimizer) -> None:
    """An empty Poisson batch: zero per-example gradients, so the step is noise alone (as in
    Opacus, whose collate yields zero-length batches; done here directly because not every
    layer accepts a zero-length input)."""
    for p in optimizer.params:
        p.grad_sample = torch.zeros(0, *p.shape, dtype=p.dtype, device=p.device)
        if p.grad is None:
            p.grad = torch.zeros_like(p)


def widest_activation(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """The most floats one example occupies in any layer's output (or the input)."""
    sizes = [math.prod(input_shape)]
    hooks = [m.register_forward_hook(lambda _m, _i, out: sizes.append(out[0].numel()))
             for m in model.modules() if not list(m.children())]
    try:
        with torch.no_grad():
            model.eval()
            model(torch.zeros(1, *input_shape, device=next(model.parameters()).device))
    finally:
        for h in hooks:
            h.remove()
    return max(sizes)


@torch.no_grad()
def predict(model: nn.Module, x: np.ndarray, y: np.ndarray, rows: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """(correct bool [m], margin float16 [m]) of one model in eval mode, ``rows`` at a time."""
    model.eval()
    device = next(model.parameters()).device
    xt = torch.as_tensor(np.asarray(x, dtype=np.float32))
    yt = torch.as_tensor(np.asarray(y, dtype=np.int64))
    correct = np.empty(len(xt), dtype=bool)
    margin = np.empty(len(xt), dtype=np.float16)
    for start in range(0, len(xt), rows):
        logits = model(xt[start:start + rows].to(device)).cpu()
        yb = yt[start:start + rows].unsqueeze(1)
        true_logit = logits.gather(1, yb).squeeze(1)
        best_other = logits.scatter(1, yb, -torch.inf).amax(dim=1)
        correct[start:start + len(yb)] = (logits.argmax(dim=1) == yb.squeeze(1)).numpy()
        margin[start:start + len(yb)] = (true_logit - best_other).numpy().astype(np.float16)
    return correct, margin


def train(spec: TrainSpec, req: TrainRequest, *, device: str | torch.device = "cpu",
          progress: Callable[[int], None] | None = None) -> dict[str, np.ndarray]:
    """Train the K models of ``req.masks`` one by one; ``progress(model_steps_done)`` gets the
    running count of model-steps (out of K * spec.steps)."""
    device = resolve_device(device)
    retain_freed_memory()
    layout = canary_layout(spec, req)
    masks = np.asarray(req.masks, dtype=bool)
    K = masks.shape[0]
    x_all = torch.as_tensor(np.asarray(req.x_train, dtype=np.float32))
    y_all = torch.as_tensor(np.asarray(req.y_train, dtype=np.int64))
    if len(x_all) != masks.shape[1] or len(y_all) != masks.shape[1]:
        raise ValueError(f"masks cover {masks.shape[1]} examples, x_train has {len(x_all)}, y_train {len(y_all)}")
    streams = model_streams(req)
    out = {}
    for name, (_, y) in req.evals.items():
        out[f"{name}_correct"] = np.empty((K, len(y)), dtype=bool)
        out[f"{name}_margin"] = np.empty((K, len(y)), dtype=np.float16)
    if spec.canaries:
        out["canary_score"] = np.empty((K, spec.canaries), dtype=np.float32)
    stats = ExampleStats(K, len(layout.real), dp=spec.dp is not None, device=device)
    # real example i of the request is row position[i] of layout.real (the "train" split's order)
    position = torch.full((masks.shape[1],), -1, dtype=torch.long)
    position[torch.from_numpy(layout.real)] = torch.arange(len(layout.real))
    rows = None
    for k in range(K):
        sid = int(streams[k])
        subset = torch.from_numpy(layout.real[masks[k, layout.real]])
        report = None if progress is None else (lambda s, base=k * spec.steps: progress(base + s))
        model, theta = train_one(
            spec, initial_model(spec, req.seed, sid), x_all[subset], y_all[subset],
            batch_seed=stream_seeds(req.seed, sid, count=2)[1], noise_seed=stream_seeds(req.noise_seed, sid)[0],
            device=device, canary_members=layout.members[k],
            canary_seeds=(stream_seeds(req.seed, sid, CANARY_STREAM)[0], stream_seeds(req.noise_seed, sid, CANARY_STREAM)[0]),
            augment_seed=stream_seeds(req.seed, sid, AUGMENT_STREAM)[0], stats=stats, stats_row=k,
            subset=position[subset], progress=report)
        if rows is None:
            rows = max(1, EVAL_BLOCK_FLOATS // widest_activation(model, spec.input_shape))
        for name, (x, y) in req.evals.items():
            out[f"{name}_correct"][k], out[f"{name}_margin"][k] = predict(model, x, y, rows=rows)
        if theta is not None:
            out["canary_score"][k] = theta.numpy()
    out.update(stats.arrays())
    return out

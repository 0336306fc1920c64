"""K models trained together as one stack (``ModelStack``): Poisson batches, the DP-SGD step on the
wide network (wide.py) with per-layer rules (samplers/), noise (noise.py) and the SGD update.

A non-private step is ordinary autograd on the wide module (parameter gradients of the summed,
normalised loss). A DP step takes autograd only for the gradients with respect to each
parametrised layer's *output* (``torch.autograd.grad`` on the saved outputs; the parameters'
own gradients are never formed), and each layer's registered rule turns its saved input and
output gradient into per-example squared norms and then, once the clip factors are known, into
the clipped gradient sum (book-keeping; no second backward pass). Clipping, noise and
normalisation follow Opacus exactly (see ``models/spec.py``), then a ``torch.optim.SGD`` step
(weight decay added to the noisy gradient, momentum buffer ``buf = m * buf + grad``, dampening 0).
A step computes the K models in *groups* (``STEP_KEPT_FLOATS`` on a CPU, ``GROUP_FLOATS`` on a GPU);
a model's numbers depend on its group only in float rounding (the convolution kernels may round
differently for another number of groups).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.profiler import record_function

from dpmem.models.augment import CROP_PADDING, apply, crops, draw, flips
from dpmem.models.canary_stack import GradientCanaries
from dpmem.models.example_stats import ExampleStats
from dpmem.models.graph import GraphNet, supports, wide_network
from dpmem.models.nets import build_model
from dpmem.models.noise import CounterNoise, GaussianNoise, counter_keys
from dpmem.models.philox import counter_uniforms, philox_keys, uses_counter
from dpmem.models.runtime import PROGRESS_EVERY, resolve_device, retain_freed_memory
from dpmem.models.samplers import sampler_for
from dpmem.models.spec import AUGMENT_STREAM, CLIP_EPS, TrainSpec, expected_batch_sizes
from dpmem.models.streams import coin_generator, coin_seed, initial_params, stream_generator
from dpmem.models.wide import Record, WideNet, frozen_layers

# Evaluation runs at least this many rows per forward pass when the budget allows.
EVAL_ROWS = 256
# Evaluation runs blocks of models and rows whose largest activation holds about this many floats:
# on a CPU, tensors that stay in cache (4 MiB) run several times faster than tensors that stream
# through memory; a GPU wants them as wide as memory allows.
GROUP_FLOATS = {"cpu": 1 << 20, "cuda": 1 << 28}
# A step runs the K models in groups. On a CPU a group holds about STEP_KEPT_FLOATS floats of what the
# step keeps for its per-layer rules (Footprint.kept: every parametrised layer's input and output),
# measured in one process, interleaved: the built-in CNN's DP step ran 15% faster in groups of about 10
# models than one at a time, while ResNet-20's, which keeps 9x as much per model, ran 25% slower in
# groups of 8 than one at a time; this budget gives the CNN 9 models per group at batch 64, ResNet-8 4,
# ResNet-20 1. On a GPU a group's widest activation holds up to GROUP_FLOATS["cuda"] floats.
STEP_KEPT_FLOATS = 5 << 23
# Batches are padded to a multiple of this many rows (see sample_batch).
WIDTH_BLOCK = 16
# The named spans of a step that torch's profiler shows (``phase``; the speed tool's phase table).
PHASES = ("sample", "forward", "backward", "norms", "clipped_sums", "noise", "example_stats", "update")
SPAN_PREFIX = "step."


def phase(name: str) -> record_function:
    """A span of the step under ``step.<name>`` in torch's profiler, so that a profile says how the
    step's time divides between the forward pass, the backward pass, the per-example rules, the
    noise and the update (a few microseconds per span when no profiler is running)."""
    assert name in PHASES, name
    return record_function(SPAN_PREFIX + name)


def _loss(logits: Tensor, y: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    """sum over models and rows of weight * cross-entropy (weight 0 on padded rows), and the
    rows' cross-entropies [K, B] (detached)."""
    K, B, C = logits.shape
    ce = F.cross_entropy(logits.reshape(K * B, C), y.reshape(K * B), reduction="none").view(K, B)
    return (ce * weight).sum(), ce.detach()


def _example_losses(ce: Tensor, copies: int) -> Tensor:
    """Per-example losses [K, B] from the rows' [K, B * copies]: the mean over an example's copies."""
    if copies == 1:
        return ce
    K, rows = ce.shape
    return ce.view(K, rows // copies, copies).mean(dim=2)


def clip_factors(sq_norms: Tensor, max_grad_norm: float) -> Tensor:
    return (max_grad_norm / (sq_norms.sqrt() + CLIP_EPS)).clamp(max=1.0)


def _row_weights(valid: Tensor, copies: int, dtype: torch.dtype) -> Tensor:
    """Per-row loss weights [K, B * copies]: 1 / copies on an example's copies, 0 on padding."""
    if copies == 1:
        return valid.to(dtype)
    return valid.to(dtype).repeat_interleave(copies, dim=1) / copies


def dp_gradients(net: WideNet | GraphNet, params: list[Tensor], x: Tensor, y: Tensor, valid: Tensor,
                 max_grad_norm: float, copies: int = 1, trainable: list[bool] | None = None,
                 loss_out: Tensor | None = None) -> tuple[list[Tensor], Tensor]:
    """Clipped per-example gradient sums (one per parameter, [K, *shape]) and the per-example
    gradient norms [K, B] (zero on padded rows) of the summed cross-entropy.

    With ``copies`` m > 1, ``x`` and ``y`` hold m augmented copies per example ([K, B * m],
    example-major) and an example's gradient is the mean of its copies' gradients.
    ``trainable`` (per parameter; None: all) marks frozen parameters as Opacus treats them: they
    add nothing to the norms and their sums are zero. ``loss_out`` ([K, B]), if given, receives
    the per-example losses (models/example_stats.py)."""
    frozen = frozen_layers(net.param_slots, trainable)
    records: list[Record] = []
    with phase("forward"):
        logits = net.forward([p.detach() for p in params], x, records)
        loss, ce = _loss(logits, y, _row_weights(valid, copies, logits.dtype))
        if loss_out is not None:
            loss_out.copy_(_example_losses(ce, copies))
    own = {j: frozenset(name for layer, name in net.param_slots if layer == j) for j in frozen}
    records = [r for r in records if r.layer not in frozen or frozen[r.layer] != own[r.layer]]
    if not records:   # every parameter frozen: nothing to clip or sum
        return [torch.zeros_like(p) for p in params], torch.zeros(valid.shape, dtype=logits.dtype, device=logits.device)
    with phase("backward"):
        grads = torch.autograd.grad(loss, [r.output for r in records])
    with torch.no_grad():
        with phase("norms"):
            samplers = {r.layer: sampler_for(net.layers[r.layer], net.K, r.saved, g, copies=copies,
                                             frozen=frozen.get(r.layer, frozenset()))
                        for r, g in zip(records, grads)}
            del records, grads, logits, loss
            sq: Tensor | None = None
            for s in samplers.values():
                term = s.sq_norms()
                sq = term if sq is None else sq + term
            assert sq is not None, "a network has at least one trainable layer"
            factors = clip_factors(sq, max_grad_norm) * valid
        with phase("clipped_sums"):
            sums: dict[int, list[Tensor]] = {j: s.clipped(factors) for j, s in samplers.items()}
    out = []
    position: dict[int, int] = {}
    for (j, name), p in zip(net.param_slots, params, strict=True):
        i = position.get(j, 0)
        position[j] = i + 1
        out.append(torch.zeros_like(p) if name in frozen.get(j, ()) else sums[j][i])
    return out, sq.sqrt()


def sgd_gradients(net: WideNet | GraphNet, params: list[Tensor], x: Tensor, y: Tensor, weight: Tensor,
                  trainable: list[bool] | None = None, loss_out: Tensor | None = None,
                  copies: int = 1) -> list[Tensor]:
    """Gradients of sum_k sum_b weight[k, b] * CE by ordinary autograd on the wide network
    (zero for parameters that ``trainable`` marks frozen). ``loss_out`` ([K, B]), if given,
    receives the per-example losses (the mean over an example's ``copies`` rows)."""
    trainable = [True] * len(params) if trainable is None else trainable
    leaves = [p.detach().requires_grad_(t) for p, t in zip(params, trainable, strict=True)]
    wanted = [leaf for leaf, t in zip(leaves, trainable) if t]
    if not wanted:
        return [torch.zeros_like(p) for p in params]
    with phase("forward"):
        loss, ce = _loss(net.forward(leaves, x), y, weight)
        if loss_out is not None:
            loss_out.copy_(_example_losses(ce, copies))
    with phase("backward"):
        grads = iter(torch.autograd.grad(loss, wanted))
    return [next(grads) if t else torch.zeros_like(p) for p, t in zip(params, trainable)]


@dataclass(frozen=True, kw_only=True)
class PoissonBatch:
    x: Tensor       # float32 [K, B * copies, *input_shape], padded rows hold example 0
    y: Tensor       # int64 [K, B * copies]
    valid: Tensor   # bool [K, B]: example b of model k is real (its copies are rows b * copies ...)
    copies: int = 1  # augmented copies per example (models/augment.py)
    counts: Tensor | None = None   # int64 [K] on the host: valid.sum(dim=1), known when it was sampled
    index: Tensor | None = None    # int64 [K, B]: the training example of each row (padding: 0); None: unknown
    drawn: Tensor | None = None    # bool [K, n]: the Poisson draws the batch holds (the same examples as index)


class ModelStack:
    """K copies of ``build_model(spec)`` trained together. ``step()`` draws the K Poisson batches
    and takes one DP-SGD (or SGD) step; ``step_on(batch)`` takes the step on a given batch.

    ``x_train``, ``y_train`` and ``masks`` hold real examples only (gradient canaries are given
    as ``canary_members`` [K, m_c] and never reach the network)."""

    def __init__(self, spec: TrainSpec, x_train: np.ndarray | Tensor, y_train: np.ndarray | Tensor,
                 masks: np.ndarray | Tensor, *, seed: int, noise_seed: int, stream_ids: np.ndarray | None = None,
                 canary_members: np.ndarray | None = None, device: str | torch.device = "cpu",
                 record_stats: bool = True):
        self.spec = spec
        self.device = resolve_device(device)
        retain_freed_memory()
        module = build_model(spec)
        problem = supports(module, spec.input_shape)
        if problem is not None:
            raise ValueError(f"the batched engine cannot train this model: {problem}")
        masks = np.asarray(masks, dtype=bool)
        self.K, self.n = masks.shape
        self.x_train = torch.as_tensor(np.asarray(x_train, dtype=np.float32)).reshape(-1, *spec.input_shape).to(self.device)
        self.y_train = torch.as_tensor(np.asarray(y_train, dtype=np.int64)).to(self.device)
        if self.x_train.shape[0] != self.n or self.y_train.shape[0] != self.n:
            raise ValueError(f"masks cover {self.n} examples, x_train has {self.x_train.shape[0]}, "
                             f"y_train {self.y_train.shape[0]}")
        self.masks = torch.as_tensor(masks).to(self.device)
        self.streams = (np.arange(self.K, dtype=np.int64) if stream_ids is None
                        else np.asarray(stream_ids, dtype=np.int64).reshape(-1))
        if self.streams.shape != (self.K,):
            raise ValueError(f"stream_ids must have shape ({self.K},), got {self.streams.shape}")
        self.module = module
        self._nets: dict[int, WideNet | GraphNet] = {}
        self.net = self._net(self.K)
        self.footprint = wide_network(module, 1).trace(spec.input_shape)
        self.widest = self.footprint.widest
        self.params = [p.to(self.device) for p in initial_params(spec, self.streams, seed)]
        # requires_grad=False, as Opacus: no gradient, no share of the clipping norm, no noise, no update
        self.trainable = [p.requires_grad for p in module.parameters()]
        # Poisson coins: each model's own generator (the CPU), or Philox keyed by the same stream seed,
        # all K models in a few kernels (a GPU; philox.RANDOM_SCHEMES)
        self.counter = uses_counter(self.device)
        if self.counter:
            self.coin_keys = philox_keys([coin_seed(seed, int(s)) for s in self.streams], self.device)
        else:
            self.coins = [coin_generator(seed, int(s), self.device) for s in self.streams]
        self._coin_step = 0
        ebs = torch.tensor(expected_batch_sizes(masks, spec.sample_rate), dtype=torch.float32, device=self.device)
        self.inv_ebs = ebs.reciprocal()
        self.momentum_bufs = [torch.zeros_like(p) for p in self.params] if spec.momentum else None
        self.steps_done = 0
        self._uniform = torch.empty(self.K, self.n, device=self.device)
        self.noise: CounterNoise | GaussianNoise | None = None
        if spec.dp is not None:
            size = sum(p[0].numel() for p, t in zip(self.params, self.trainable) if t)
            if self.counter:
                self.noise = CounterNoise(counter_keys(noise_seed, self.streams, self.device), size)
            else:
                self.noise = GaussianNoise([stream_generator(noise_seed, int(s), device=self.device) for s in self.streams],
                                           size, self.device)
        self.augmenters: list[torch.Generator] | None = None
        if spec.augment != "none" or spec.augment_multiplicity > 1:
            if spec.augment != "none" and len(spec.input_shape) != 3:
                raise ValueError(f"augment {spec.augment!r} needs (C, H, W) inputs, got {spec.input_shape}")
            self.augmenters = [stream_generator(seed, int(s), AUGMENT_STREAM, device=self.device) for s in self.streams]
        self.canaries = None
        if spec.canaries:
            members = np.zeros((self.K, spec.canaries), bool) if canary_members is None else np.asarray(canary_members, bool)
            if members.shape != (self.K, spec.canaries):
                raise ValueError(f"canary_members must have shape ({self.K}, {spec.canaries}), got {members.shape}")
            self.canaries = GradientCanaries(spec, members, seed=seed, noise_seed=noise_seed, streams=self.streams,
                                             inv_ebs=self.inv_ebs, device=self.device)
        # per-example training statistics (example_stats.py); off only to measure what they cost
        self.stats = ExampleStats(self.K, self.n, dp=spec.dp is not None, device=self.device) if record_stats else None

    # -- sampling --
    def sample_batch(self) -> PoissonBatch:
        """Each model's Poisson batch: i in T_k included with probability q, padded to the largest."""
        if self.counter:
            self._uniform = counter_uniforms(self.coin_keys, self._coin_step, self.n)
        else:
            for k, generator in enumerate(self.coins):
                torch.rand(self.n, generator=generator, out=self._uniform[k])
        self._coin_step += 1
        draw = (self._uniform < self.spec.sample_rate).logical_and_(self.masks)
        counts = draw.sum(dim=1)
        # the step's one wait for the device: the largest batch sizes the padded tensors
        host_counts = counts.cpu()
        # padded to a multiple of WIDTH_BLOCK rows: elementwise kernels treat a tensor's last partial
        # vector differently from full ones, and the width depends on the other models of the call
        width = -(-max(1, int(host_counts.max())) // WIDTH_BLOCK) * WIDTH_BLOCK
        # each pick's slot in its model's row (its picks in example order), the rest into a spare
        # column: the gather index without nonzero, whose output size would be a second wait
        slots = torch.where(draw, draw.cumsum(dim=1) - 1, width)
        index = torch.zeros(self.K, width + 1, dtype=torch.long, device=self.device)
        index.scatter_(1, slots, torch.arange(self.n, device=self.device).expand(self.K, -1))
        index = index[:, :width]   # padded rows hold example 0
        x = self.x_train.index_select(0, index.reshape(-1)).view(self.K, width, *self.x_train.shape[1:])
        y = self.y_train.index_select(0, index.reshape(-1)).view(self.K, width)
        valid = torch.arange(width, device=self.device).unsqueeze(0) < counts.unsqueeze(1)
        if self.augmenters is None:
            return PoissonBatch(x=x, y=y, valid=valid, counts=host_counts, index=index, drawn=draw)
        return self._augmented(x, y, valid, host_counts, index, draw)

    def _augmented(self, x: Tensor, y: Tensor, valid: Tensor, counts: Tensor, index: Tensor,
                   drawn: Tensor) -> PoissonBatch:
        """Each model's real examples as ``augment_multiplicity`` augmented copies, drawn by its own
        generator (b * m draws for b examples: never for padding, so not depending on other models)."""
        m = self.spec.augment_multiplicity
        rows = x.repeat_interleave(m, dim=1) if m > 1 else x
        K, width = rows.shape[:2]
        # each model's choices from its own generator (augment.draw, as augment_batch draws them), then
        # one pass over every row; padded rows keep the identity (no shift, no flip)
        shifts = torch.full((K, width, 2), CROP_PADDING, dtype=torch.long, device=self.device)
        flip = torch.zeros(K, width, dtype=torch.bool, device=self.device)
        assert self.augmenters is not None
        for k, (generator, count) in enumerate(zip(self.augmenters, counts.tolist(), strict=True)):
            drawn_shifts, drawn_flip = draw(self.spec.augment, count * m, generator)
            if drawn_shifts is not None:
                shifts[k, :count * m] = drawn_shifts
            if drawn_flip is not None:
                flip[k, :count * m] = drawn_flip
        if crops(self.spec.augment) or flips(self.spec.augment):
            flat = apply(rows.reshape(K * width, *rows.shape[2:]), shifts.view(-1, 2) if crops(self.spec.augment)
                         else None, flip.view(-1) if flips(self.spec.augment) else None)
            rows = flat.view_as(rows)
        return PoissonBatch(x=rows, y=y.repeat_interleave(m, dim=1) if m > 1 else y, valid=valid, copies=m,
                            counts=counts, index=index, drawn=drawn)

    # -- one step --
    def _groups(self, batch: PoissonBatch):
        """Groups of models that a step computes together, as (index, x, y, valid) with ``index``
        a slice or a tensor of model indices, each batch trimmed to the group's largest Poisson
        batch. When a step takes several groups, models are grouped by batch size, so that little
        of each group is padding: for Poisson batches of 56 rows on average, groups of 16 models
        in index order compute 22% more rows than there are examples, in size order 2%. A
        model's numbers depend on its group only in float rounding (tested), so the grouping changes time,
        not results beyond their last bits."""
        B = batch.valid.shape[1]
        m = batch.copies
        if self.device.type == "cpu":
            size = STEP_KEPT_FLOATS // max(1, B * m * self.footprint.kept)
        else:
            size = GROUP_FLOATS.get(self.device.type, GROUP_FLOATS["cuda"]) // max(1, B * m * self.widest)
        size = max(1, min(self.K, size))
        counts = batch.valid.sum(dim=1).cpu() if batch.counts is None else batch.counts
        if size >= self.K:
            width = max(1, int(counts.max()))
            yield slice(0, self.K), batch.x[:, :width * m], batch.y[:, :width * m], batch.valid[:, :width]
            return
        order = torch.argsort(counts, stable=True)
        for start in range(0, self.K, size):
            members = order[start:start + size]
            width = max(1, int(counts[members].max()))
            index = members.to(self.device)
            yield (index, batch.x.index_select(0, index)[:, :width * m], batch.y.index_select(0, index)[:, :width * m],
                   batch.valid.index_select(0, index)[:, :width])

    def _net(self, K: int) -> WideNet | GraphNet:
        if K not in self._nets:
            self._nets[K] = wide_network(self.module, K)
        return self._nets[K]

    def dp_noise(self) -> CounterNoise | GaussianNoise:
        """The DP noise of the step (a DP variant's stack only)."""
        assert self.noise is not None, "a non-private stack draws no noise"
        return self.noise

    def gradients(self, batch: PoissonBatch) -> list[Tensor]:
        """The step's normalised gradient per parameter (clipped and noised for DP), before weight decay."""
        dp = self.spec.dp
        if dp is not None:
            self.dp_noise().begin()
        grads = [torch.empty_like(p) for p in self.params]
        recording = self.stats is not None and batch.index is not None
        if recording:   # the groups' per-example values, gathered for one scatter per step (example_stats.py)
            step_losses = torch.zeros(batch.valid.shape, device=self.device)
            step_norms = torch.zeros(batch.valid.shape, device=self.device) if dp is not None else None
        for index, x, y, valid in self._groups(batch):
            params = [p[index] for p in self.params]
            net = self._net(len(x))
            losses = torch.empty(valid.shape, device=self.device) if recording else None
            if dp is None:
                weight = valid.float() * self.inv_ebs[index].unsqueeze(1)
                if batch.copies > 1:  # an example's gradient: the mean over its copies
                    weight = weight.repeat_interleave(batch.copies, dim=1) / batch.copies
                part = sgd_gradients(net, params, x, y, weight, self.trainable, losses, batch.copies)
                norms = None
            else:
                part, norms = dp_gradients(net, params, x, y, valid, dp.max_grad_norm, batch.copies, self.trainable,
                                           losses)
            if recording:
                assert losses is not None
                width = valid.shape[1]
                step_losses[index, :width] = losses
                if step_norms is not None and norms is not None:
                    step_norms[index, :width] = norms
            for g, q in zip(grads, part, strict=True):
                g[index] = q
        if recording:
            assert self.stats is not None and batch.index is not None
            with phase("example_stats"):
                if batch.drawn is not None:
                    self.stats.add_draws(batch.drawn)
                self.stats.add(slice(0, self.K), batch.index, batch.valid, step_losses, step_norms,
                               None if dp is None else dp.max_grad_norm, draws=batch.drawn is None)
        if dp is None:
            return grads
        with phase("noise"):
            noise = self.dp_noise().take()
            std = dp.noise_multiplier * dp.max_grad_norm
            offset = 0
            for g, t in zip(grads, self.trainable, strict=True):
                if not t:
                    continue
                size = g[0].numel()
                z = noise[:, offset:offset + size].view_as(g)
                offset += size
                g.add_(z, alpha=std).mul_(self.inv_ebs.view(-1, *(1,) * (g.dim() - 1)))
        return grads

    @torch.no_grad()
    def apply(self, params: list[Tensor], grads: list[Tensor], bufs: list[Tensor] | None,
              trainable: list[bool] | None = None) -> None:
        """torch.optim.SGD's update (weight decay, momentum with dampening 0) in place; parameters
        that ``trainable`` marks frozen are left alone (SGD skips a parameter without a gradient)."""
        spec = self.spec
        for j, (p, g) in enumerate(zip(params, grads, strict=True)):
            if trainable is not None and not trainable[j]:
                continue
            if spec.weight_decay:
                g = g.add(p, alpha=spec.weight_decay)
            if bufs is not None:
                g = bufs[j].mul_(spec.momentum).add_(g)
            p.add_(g, alpha=-spec.lr)

    def step_on(self, batch: PoissonBatch) -> None:
        grads = self.gradients(batch)
        with phase("update"):
            self.apply(self.params, grads, self.momentum_bufs, self.trainable)
        if self.canaries is not None:
            self.canaries.step(self)
        self.steps_done += 1

    def step(self) -> None:
        with phase("sample"):
            batch = self.sample_batch()
        self.step_on(batch)

    def train(self, steps: int, progress: Callable[[int], None] | None = None) -> None:
        """``steps`` steps; ``progress(model_steps_done)`` gets the running count of model-steps
        (K per step) now and then and at the end."""
        for s in range(steps):
            self.step()
            if progress is not None and ((s + 1) % PROGRESS_EVERY == 0 or s + 1 == steps):
                progress(self.steps_done * self.K)

    # -- outputs --
    @torch.no_grad()
    def predict(self, x: np.ndarray | Tensor, y: np.ndarray | Tensor) -> tuple[np.ndarray, np.ndarray]:
        """(correct bool [K, m], margin float16 [K, m]) of all K models, in blocks of models and
        rows whose largest activation stays within the step's budget."""
        x = torch.as_tensor(np.asarray(x, dtype=np.float32)).reshape(-1, *self.spec.input_shape)
        y = torch.as_tensor(np.asarray(y, dtype=np.int64))
        K, m = self.K, x.shape[0]
        budget = GROUP_FLOATS.get(self.device.type, GROUP_FLOATS["cuda"])
        group = max(1, min(K, budget // (EVAL_ROWS * self.widest)))
        rows = max(1, budget // (group * self.widest))
        correct = np.empty((K, m), dtype=bool)
        margin = np.empty((K, m), dtype=np.float16)
        for start in range(0, m, rows):
            xb = x[start:start + rows].to(self.device)
            yb = y[start:start + rows].to(self.device)
            for k0 in range(0, K, group):
                k1 = min(K, k0 + group)
                params = [p[k0:k1] for p in self.params]
                logits = self._net(k1 - k0).forward(params, xb.unsqueeze(0).expand(k1 - k0, *xb.shape))  # [k, B, C]
                label = yb.view(1, -1, 1).expand(k1 - k0, -1, 1)
                true_logit = logits.gather(2, label).squeeze(2)
                best_other = logits.scatter(2, label, -math.inf).amax(dim=2)
                correct[k0:k1, start:start + len(yb)] = (logits.argmax(dim=2) == label.squeeze(2)).cpu().numpy()
                margin[k0:k1, start:start + len(yb)] = (true_logit - best_other).to(torch.float16).cpu().numpy()
        return correct, margin

    def evaluate(self, evals: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        for name, (x, y) in evals.items():
            out[f"{name}_correct"], out[f"{name}_margin"] = self.predict(x, y)
        if self.canaries is not None:
            out["canary_score"] = self.canaries.theta.detach().cpu().numpy().astype(np.float32)
        if self.stats is not None:
            out.update(self.stats.arrays())
        return out

    def model_state(self, k: int) -> dict[str, Tensor]:
        """Model k as a state_dict of ``build_model(spec)``."""
        return export_params(self.spec, self.params, k)

    def close(self) -> None:
        """Stop the background noise threads (also done when the trainer is collected)."""
        if self.noise is not None:
            self.noise.close()


def export_params(spec: TrainSpec, params: list[Tensor], k: int) -> dict[str, Tensor]:
    """Model k of stacked parameters as a state_dict for ``build_model(spec)``."""
    names = [name for name, _ in build_model(spec).named_parameters()]
    return {name: p[k].detach().cpu().clone() for name, p in zip(names, params, strict=True)}


def import_params(spec: TrainSpec, state_dicts: list[Mapping[str, Tensor]]) -> list[Tensor]:
    """The converse of ``export_params``: stack the state_dicts of K models from build_model."""
    names = [name for name, _ in build_model(spec).named_parameters()]
    return [torch.stack([sd[name].detach() for sd in state_dicts]).float().contiguous() for name in names]

"""The many-model engine: K logistic regressions or MLPs trained at once as batched tensors.

Model k's layer l is ``W_l[k]`` ([out, in], nn.Linear's layout) and ``b_l[k]`` ([out]); a
forward pass is one batched matmul per layer over the K models' own Poisson batches, padded to
the largest batch with a validity mask (padded rows get a zero output error, so they add
nothing to any gradient or norm). Forward and backward are written out by hand (ReLU, softmax
cross-entropy), which is what makes DP-SGD cheap here: for a linear layer the per-example
gradient is the outer product ``delta_i a_i^T`` (plus ``delta_i`` for the bias), so

    ||g_i||^2 = sum_l (||a_i^{l-1}||^2 + 1) * ||delta_i^l||^2

needs no per-example gradient in memory, and the clipped sum is one more batched product
``(c * delta)^T a``. Clipping, noise and normalisation follow Opacus exactly (see
``models/spec.py``): factor ``min(1, C / (||g_i|| + 1e-6))``, Gaussian noise of std
``sigma * C`` per coordinate, division by ``max(1, int(q * |T_k|))``, then a
``torch.optim.SGD`` step (momentum buffer ``buf = m * buf + grad``, dampening 0).

Randomness: initialisation (nn.Linear's default distribution) and then every Poisson draw come
from one generator seeded by ``seed``, so a non-private and a DP variant with the same seed
start identically and see identical batches; DP noise comes from separate generators seeded
by ``noise_seed``.
"""
from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache

import numpy as np
import torch
from torch import Tensor, nn

from dpmem.models.nets import build_model, flat_dim, layer_widths
from dpmem.models.spec import Outputs, TrainRequest, TrainSpec

# One layer's parameters for K models, in nn.Linear's layout: weight [K, out, in], bias [K, out].
# (Keeping [out, in] lets every batched product put its narrow dimension first, which is what
# the BLAS kernels are fast at; see _forward / _backward.)
Layer = tuple[Tensor, Tensor]
Params = list[Layer]

# Opacus's constant in the clip factor C / (norm + eps).
CLIP_EPS = 1e-6
# DP noise is drawn from this many independent generators (each fills its own slice of the
# noise buffer), so two threads can draw it at once; fixed, so results never depend on the
# number of threads.
NOISE_STREAMS = 2
# Background threads drawing the noise, and whether they draw one step ahead (GaussianNoise).
NOISE_WORKERS = 2
NOISE_AHEAD = True
# Evaluation keeps the largest activation block at about this many floats (64 MiB).
EVAL_BLOCK_FLOATS = 1 << 24
# Probabilities below this are treated as zero in the output error (see _output_error).
PROB_FLOOR = 1e-10
# How often (in steps) the progress callback is called at most.
PROGRESS_EVERY = 10


# -- what the engine trains ------------------------------------------------------------------------

def supports(module: nn.Module) -> str | None:
    """None when ``module`` is a stack this engine trains, else the reason it is not.

    The hand-written forward and backward passes cover ``nn.Sequential(Flatten?, Linear, (ReLU,
    Linear)*)`` with biases: logistic regression, MLPs, and user factories of that shape."""
    if type(module) is not nn.Sequential:
        return f"it trains nn.Sequential stacks of Linear and ReLU layers, not {type(module).__name__}"
    layers = list(module.children())
    if layers and type(layers[0]) is nn.Flatten:
        if (layers[0].start_dim, layers[0].end_dim) != (1, -1):
            return "its Flatten layer must flatten every dimension but the batch"
        layers = layers[1:]
    for j, layer in enumerate(layers):
        expected = nn.Linear if j % 2 == 0 else nn.ReLU
        if type(layer) is not expected:
            return (f"it trains Flatten, Linear, ReLU, Linear, ... stacks; layer {j} is "
                    f"{type(layer).__name__}, not {expected.__name__}")
        if expected is nn.Linear and layer.bias is None:
            return f"its Linear layers need a bias (layer {j} has none)"
    if not layers or len(layers) % 2 == 0:
        return "the stack must end with a Linear layer"
    return None


# -- parameters --------------------------------------------------------------------------------

def init_params(spec: TrainSpec, K: int, generator: torch.Generator) -> Params:
    """K models initialised like ``nn.Linear``: weight and bias ~ U(-1/sqrt(in), 1/sqrt(in))."""
    params: Params = []
    widths = layer_widths(spec)
    for fan_in, fan_out in zip(widths[:-1], widths[1:]):
        bound = 1.0 / math.sqrt(fan_in)
        weight = torch.rand(K, fan_out, fan_in, generator=generator).mul_(2 * bound).sub_(bound)
        bias = torch.rand(K, fan_out, generator=generator).mul_(2 * bound).sub_(bound)
        params.append((weight, bias))
    return params


@cache
def _linear_names(spec: TrainSpec) -> tuple[str, ...]:
    model = build_model(spec)
    return tuple(name for name, m in model.named_modules() if isinstance(m, nn.Linear))


def export_params(spec: TrainSpec, params: Params, k: int) -> dict[str, Tensor]:
    """Model k as a state_dict for ``build_model(spec)``."""
    names = _linear_names(spec)
    if len(names) != len(params):
        raise ValueError(f"spec has {len(names)} linear layers, params have {len(params)}")
    state: dict[str, Tensor] = {}
    for name, (weight, bias) in zip(names, params):
        state[f"{name}.weight"] = weight[k].clone()
        state[f"{name}.bias"] = bias[k].clone()
    return state


def import_params(spec: TrainSpec, state_dicts: list[Mapping[str, Tensor]]) -> Params:
    """The converse of ``export_params``: stack the state_dicts of K models from build_model."""
    params: Params = []
    for name in _linear_names(spec):
        weight = torch.stack([sd[f"{name}.weight"].detach() for sd in state_dicts]).float()
        bias = torch.stack([sd[f"{name}.bias"].detach() for sd in state_dicts]).float()
        params.append((weight.contiguous(), bias.contiguous()))
    return params


def expected_batch_sizes(masks: np.ndarray | Tensor, sample_rate: float) -> list[int]:
    """``max(1, int(q * |T_k|))`` per model, rounded as Opacus does."""
    sizes = np.asarray(masks).sum(axis=1)
    return [max(1, int(sample_rate * int(s))) for s in sizes]


# -- forward / backward ------------------------------------------------------------------------
# Activations and errors are [K, B, width]. The output layer is computed transposed ([K, C, B]
# in memory, returned as a [K, B, C] view): with C ~ 10 classes, a product whose last output
# dimension is C runs 3-4x slower than its transpose.

class Workspace:
    """Reused flat buffers for a step's large intermediates. Writing into memory that the last
    step used (still in cache, already mapped) instead of fresh allocations saves ~20% of a step."""

    def __init__(self):
        self._buffers: dict[str, Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> Tensor:
        size = math.prod(shape)
        buffer = self._buffers.get(name)
        if buffer is None or buffer.numel() < size or buffer.dtype != dtype:
            buffer = self._buffers[name] = torch.empty(size, dtype=dtype)
        return buffer[:size].view(shape)


def _forward(params: Params, x: Tensor, work: Workspace | None = None) -> list[Tensor]:
    """Inputs of every layer and the logits: ``[x, a_1, ..., a_{L-1}, logits]``."""
    acts = [x]
    last = len(params) - 1
    K, B = x.shape[:2]
    for j, (weight, bias) in enumerate(params):
        if j < last:
            out = None if work is None else work.get(f"act{j}", (K, B, weight.shape[1]))
            acts.append(torch.baddbmm(bias.unsqueeze(1), acts[-1], weight.transpose(1, 2), out=out).relu_())
        else:
            acts.append(torch.baddbmm(bias.unsqueeze(2), weight, acts[-1].transpose(1, 2)).transpose(1, 2))
    return acts


def _output_error(logits: Tensor, y: Tensor, valid: Tensor | None) -> Tensor:
    """d(sum of per-example cross-entropies)/d logits = softmax - onehot; zero on padded rows.

    ``logits`` is the transposed view from ``_forward``; so is the result."""
    delta = logits.transpose(1, 2).softmax(dim=1)  # [K, C, B], contiguous
    # Confident models put probabilities far below float32's normal range (< 1e-38) on wrong
    # classes; arithmetic on such subnormal numbers is many times slower on x86 CPUs. Zeroing
    # probabilities below PROB_FLOOR moves each gradient coordinate by less than float32
    # already rounds the true-class term p - 1 (by up to 6e-8), so the update is unchanged.
    delta.masked_fill_(delta < PROB_FLOOR, 0.0)
    label = y.unsqueeze(1)
    delta.scatter_(1, label, delta.gather(1, label).sub_(1.0))
    if valid is not None:
        delta.mul_(valid.unsqueeze(1).to(delta.dtype))
    return delta.transpose(1, 2)


def _backward(params: Params, acts: list[Tensor], delta_out: Tensor, work: Workspace | None = None) -> list[Tensor]:
    """Output errors ``delta_l`` ([K, B, out]) of every layer, first layer first."""
    deltas = [delta_out]
    K, B = delta_out.shape[:2]
    for j in range(len(params) - 1, 0, -1):
        weight = params[j][0]
        out = None if work is None else work.get(f"err{j}", (K, B, weight.shape[2]))
        d = torch.bmm(deltas[0], weight, out=out)
        # ReLU derivative, fused and in place: keep d where the post-ReLU activation is positive
        deltas.insert(0, torch.ops.aten.threshold_backward.grad_input(d, acts[j], 0.0, grad_input=d))
    return deltas


def _row_sq_norms(t: Tensor) -> Tensor:
    """||t[k, i, :]||^2 as [K, B]. A transposed view (the output layer's errors) is reduced in
    its memory order: vector_norm over a strided dimension is ~30x slower than this."""
    if t.stride(2) != 1 and t.stride(1) == 1:
        return t.transpose(1, 2).square().sum(dim=1)
    return torch.linalg.vector_norm(t, dim=2).square_()


def _ghost_sq_norms(acts: list[Tensor], deltas: list[Tensor], input_sq: Tensor | None = None) -> Tensor:
    """Per-example squared gradient norm over all layers, [K, B]:
    sum_l (||a^{l-1}||^2 + 1) * ||delta^l||^2 (weight and bias together)."""
    total = None
    for j, (a, d) in enumerate(zip(acts[:-1], deltas)):
        a_sq = input_sq if (j == 0 and input_sq is not None) else _row_sq_norms(a)
        term = _row_sq_norms(d).mul_(a_sq + 1.0)
        total = term if total is None else total.add_(term)
    return total


def _clip_factors(sq_norms: Tensor, max_grad_norm: float) -> Tensor:
    return (max_grad_norm / (sq_norms.sqrt() + CLIP_EPS)).clamp(max=1.0)


def _batch(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    if x.dim() == 2:  # one model's batch
        x, y = x.unsqueeze(0), y.unsqueeze(0)
    return x.reshape(x.shape[0], x.shape[1], -1).float(), y.long()


def per_example_grad_norms(params: Params, x: Tensor, y: Tensor, valid: Tensor | None = None) -> Tensor:
    """||g_i|| of every example's loss gradient (all layers together), [K, B].

    ``x`` is [K, B, *input_shape], ``y`` [K, B], ``valid`` bool [K, B] (padded rows: False)."""
    x, y = _batch(x, y)
    acts = _forward(params, x)
    deltas = _backward(params, acts, _output_error(acts[-1], y, valid))
    return _ghost_sq_norms(acts, deltas).sqrt()


def clipped_grad_sum(params: Params, x: Tensor, y: Tensor, max_grad_norm: float,
                     valid: Tensor | None = None) -> list[tuple[Tensor, Tensor]]:
    """Sum over the batch of per-example gradients clipped as Opacus does, per layer
    ``(dW [K, out, in], db [K, out])`` (nn.Linear layout); no noise, no normalisation."""
    x, y = _batch(x, y)
    acts = _forward(params, x)
    deltas = _backward(params, acts, _output_error(acts[-1], y, valid))
    factors = _clip_factors(_ghost_sq_norms(acts, deltas), max_grad_norm).unsqueeze(2)
    grads = []
    for a, d in zip(acts[:-1], deltas):
        d = d * factors
        grads.append((torch.bmm(d.transpose(1, 2), a), d.sum(dim=1)))
    return grads


# -- evaluation --------------------------------------------------------------------------------

@torch.no_grad()
def evaluate(params: Params, x: np.ndarray | Tensor, y: np.ndarray | Tensor) -> Outputs:
    """Correctness and margin of all K models on one split, in row blocks of bounded size."""
    x = torch.as_tensor(np.asarray(x, dtype=np.float32)) if not isinstance(x, Tensor) else x.float()
    y = torch.as_tensor(np.asarray(y, dtype=np.int64)) if not isinstance(y, Tensor) else y.long()
    x = x.reshape(x.shape[0], -1)
    K, m = params[0][0].shape[0], x.shape[0]
    widest = max(w.shape[1] for w, _ in params)
    rows = max(1, EVAL_BLOCK_FLOATS // (K * widest))
    last = len(params) - 1
    correct = torch.empty(K, m, dtype=torch.bool)
    margin = torch.empty(K, m, dtype=torch.float16)
    for start in range(0, m, rows):
        stop = min(m, start + rows)
        a = x[start:stop]  # the first layer's input is shared by all K models (broadcast)
        for j, (weight, bias) in enumerate(params):
            if j < last:
                a = torch.matmul(a, weight.transpose(1, 2)).add_(bias.unsqueeze(1)).relu_()
            else:  # transposed logits [K, C, rows], as in _forward
                a = torch.matmul(weight, a.transpose(-1, -2)).add_(bias.unsqueeze(2))
        label = y[start:stop].view(1, 1, -1).expand(K, 1, -1)
        true_logit = a.gather(1, label).squeeze(1)
        best_other = a.scatter(1, label, -math.inf).amax(dim=1)
        correct[:, start:stop] = a.argmax(dim=1) == label.squeeze(1)
        margin[:, start:stop] = (true_logit - best_other).to(torch.float16)
    return Outputs(correct=correct.numpy(), margin=margin.numpy())


# -- training ----------------------------------------------------------------------------------

class GaussianNoise:
    """Standard normal noise for one step at a time, drawn by NOISE_STREAMS generators (each
    fills its own slice, in a fixed order, so the values never depend on timing or threads).

    Drawing Gaussians is the one serial cost of a DP step (~4 ns per coordinate per core), so
    the draws run in background threads: with ``ahead`` the next step's noise is drawn while
    this step computes (two buffers, used in turn)."""

    def __init__(self, size: int, *, seed: int, workers: int | None = None, ahead: bool | None = None):
        states = np.random.SeedSequence(int(seed)).generate_state(NOISE_STREAMS, dtype=np.uint64)
        self.generators = [torch.Generator().manual_seed(int(s) >> 1) for s in states]
        if workers is None:
            cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
            workers = NOISE_WORKERS if cpus > 1 else 0
        self.workers = workers
        self.ahead = NOISE_AHEAD if ahead is None else ahead
        self.buffers = [torch.empty(size) for _ in range(2 if (self.ahead and self.workers) else 1)]
        bounds = np.linspace(0, size, NOISE_STREAMS + 1).astype(int)
        self._slices = [[b[lo:hi] for lo, hi in zip(bounds[:-1], bounds[1:])] for b in self.buffers]
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="dp-noise") if self.workers else None
        self._pending = None
        self._turn = 0

    def _fill(self, turn: int) -> list:
        def draw(j):
            self._slices[turn][j].normal_(generator=self.generators[j])
        if self._pool is None:
            for j in range(NOISE_STREAMS):
                draw(j)
            return []
        return [self._pool.submit(draw, j) for j in range(NOISE_STREAMS)]

    def begin(self) -> None:
        """A step starts: make sure its noise is being drawn."""
        if self._pending is None and self._pool is not None:
            self._pending = self._fill(self._turn)

    def take(self) -> int:
        """Wait for this step's noise; returns the index of the buffer that holds it."""
        if self._pending is None:
            self._pending = self._fill(self._turn)
        for future in self._pending:
            future.result()
        turn, self._pending = self._turn, None
        if len(self.buffers) == 2:
            self._turn ^= 1
            self._pending = self._fill(self._turn)
        return turn

    def close(self) -> None:
        if self._pool is not None:
            for future in self._pending or []:
                future.result()
            self._pool.shutdown()
            self._pool = None
            self._pending = None

    def __del__(self):
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.shutdown(wait=False)


@dataclass(frozen=True, kw_only=True)
class PoissonBatch:
    x: Tensor       # float32 [K, B, d], padded rows hold example 0
    y: Tensor       # int64 [K, B]
    valid: Tensor   # bool [K, B]
    x_sq: Tensor | None = None  # float32 [K, B]: ||x||^2 of each row, if known


class BatchedTrainer:
    """K models of one spec trained together. ``step()`` draws the K Poisson batches and takes
    one DP-SGD (or SGD) step; ``step_on(batch)`` takes the step on a given batch."""

    def __init__(self, spec: TrainSpec, x_train: np.ndarray | Tensor, y_train: np.ndarray | Tensor,
                 masks: np.ndarray | Tensor, *, seed: int, noise_seed: int, groups: np.ndarray | None = None):
        reason = supports(build_model(spec))
        if reason is not None:
            raise ValueError(f"the batched engine cannot train {spec.arch!r}: {reason}")
        self.spec = spec
        self.x_train = torch.as_tensor(np.asarray(x_train, dtype=np.float32)).reshape(-1, flat_dim(spec))
        self.y_train = torch.as_tensor(np.asarray(y_train, dtype=np.int64))
        self.x_sq_train = self.x_train.square().sum(dim=1)  # first-layer input norms, gathered per batch
        self.masks = torch.as_tensor(np.asarray(masks, dtype=bool))
        self.K, self.n = self.masks.shape
        if self.x_train.shape[0] != self.n or self.y_train.shape[0] != self.n:
            raise ValueError(f"masks cover {self.n} examples, x_train has {self.x_train.shape[0]}, "
                             f"y_train {self.y_train.shape[0]}")
        self.generator = torch.Generator().manual_seed(int(seed))
        # Models of one group share their initialisation and their sampling coins: draw for the
        # groups, then hand each model its group's draw (no groups: one group per model).
        self.groups = None
        n_draws = self.K
        if groups is not None:
            groups = np.asarray(groups)
            if groups.shape != (self.K,):
                raise ValueError(f"groups must have shape ({self.K},), got {groups.shape}")
            self.groups = torch.as_tensor(np.unique(groups, return_inverse=True)[1].reshape(-1), dtype=torch.long)
            n_draws = int(self.groups.max()) + 1
        self.params = init_params(spec, n_draws, self.generator)
        if self.groups is not None:
            self.params = [(w.index_select(0, self.groups), b.index_select(0, self.groups)) for w, b in self.params]
        self._group_uniform = torch.empty(n_draws, self.n) if self.groups is not None else None
        ebs = torch.tensor(expected_batch_sizes(self.masks.numpy(), spec.sample_rate), dtype=torch.float32)
        self.inv_ebs = ebs.reciprocal()
        self.momentum_bufs = ([(torch.zeros_like(w), torch.zeros_like(b)) for w, b in self.params]
                              if spec.momentum else None)
        self.steps_done = 0
        self._work = Workspace()
        self._uniform = torch.empty(self.K, self.n)
        self._draw = torch.empty(self.K, self.n, dtype=torch.bool)
        if spec.dp is not None:
            self.noise = GaussianNoise(sum(w.numel() + b.numel() for w, b in self.params), seed=noise_seed)
            self._noise_views = self._split_noise(self.noise.buffers)
            # noise std per coordinate after normalisation: sigma * C / expected batch size
            self._noise_std = (spec.dp.noise_multiplier * spec.dp.max_grad_norm) * self.inv_ebs

    def _split_noise(self, buffers: list[Tensor]) -> list[list[tuple[Tensor, Tensor]]]:
        """Per noise buffer, its (weight, bias) views for every layer."""
        out = []
        for buffer in buffers:
            views, offset = [], 0
            for w, b in self.params:
                nw, nb = w.numel(), b.numel()
                views.append((buffer[offset:offset + nw].view_as(w), buffer[offset + nw:offset + nw + nb].view_as(b)))
                offset += nw + nb
            out.append(views)
        return out

    # -- sampling --
    def sample_batch(self, *, reuse: bool = False) -> PoissonBatch:
        """Each model's Poisson batch: i in T_k included with probability q, padded to the largest.

        ``reuse``: gather the inputs into the trainer's workspace (valid until the next call)."""
        if self.groups is None:
            torch.rand(self.K, self.n, generator=self.generator, out=self._uniform)
        else:
            torch.rand(self._group_uniform.shape, generator=self.generator, out=self._group_uniform)
            torch.index_select(self._group_uniform, 0, self.groups, out=self._uniform)
        draw = torch.lt(self._uniform, self.spec.sample_rate, out=self._draw).logical_and_(self.masks)
        counts = draw.sum(dim=1)
        width = max(1, int(counts.max()))
        rows, cols = draw.nonzero(as_tuple=True)  # row-major: each model's picks in order
        starts = counts.cumsum(0) - counts
        slots = rows * width + (torch.arange(rows.numel()) - starts[rows])
        index = torch.zeros(self.K * width, dtype=torch.long)
        index[slots] = cols
        out = self._work.get("x", (self.K * width, self.x_train.shape[1])) if reuse else None
        x = torch.index_select(self.x_train, 0, index, out=out).view(self.K, width, -1)
        y = self.y_train.index_select(0, index).view(self.K, width)
        x_sq = self.x_sq_train.index_select(0, index).view(self.K, width)
        valid = torch.arange(width).unsqueeze(0) < counts.unsqueeze(1)
        return PoissonBatch(x=x, y=y, valid=valid, x_sq=x_sq)

    # -- one step --
    @torch.no_grad()
    def step_on(self, batch: PoissonBatch) -> None:
        spec = self.spec
        dp = spec.dp
        if dp is not None:
            self.noise.begin()
        acts = _forward(self.params, batch.x, self._work)
        delta_out = _output_error(acts[-1], batch.y, batch.valid)
        if dp is None:
            # Normalisation is linear, so it can scale the output error before backprop.
            delta_out.mul_(self.inv_ebs.view(-1, 1, 1))
            deltas = _backward(self.params, acts, delta_out, self._work)
        else:
            deltas = _backward(self.params, acts, delta_out, self._work)
            scale = _clip_factors(_ghost_sq_norms(acts, deltas, batch.x_sq), dp.max_grad_norm)
            scale.mul_(self.inv_ebs.view(-1, 1)).unsqueeze_(2)
            for d in deltas:
                d.mul_(scale)
        if dp is not None:
            noise_views = self._noise_views[self.noise.take()]
        wd = spec.weight_decay
        for j, ((weight, bias), a, d) in enumerate(zip(self.params, acts[:-1], deltas)):
            if self.momentum_bufs is None:
                if wd:  # torch.optim.SGD: the step uses grad + wd * (pre-step weights)
                    weight.mul_(1 - spec.lr * wd)
                    bias.mul_(1 - spec.lr * wd)
                weight.baddbmm_(d.transpose(1, 2), a, alpha=-spec.lr)
                bias.add_(d.sum(dim=1), alpha=-spec.lr)
                if dp is not None:
                    noise_w, noise_b = noise_views[j]
                    weight.addcmul_(noise_w, self._noise_std.view(-1, 1, 1), value=-spec.lr)
                    bias.addcmul_(noise_b, self._noise_std.view(-1, 1), value=-spec.lr)
            else:
                buf_w, buf_b = self.momentum_bufs[j]
                buf_w.mul_(spec.momentum).baddbmm_(d.transpose(1, 2), a)
                buf_b.mul_(spec.momentum).add_(d.sum(dim=1))
                if wd:
                    buf_w.add_(weight, alpha=wd)
                    buf_b.add_(bias, alpha=wd)
                if dp is not None:
                    noise_w, noise_b = noise_views[j]
                    buf_w.addcmul_(noise_w, self._noise_std.view(-1, 1, 1))
                    buf_b.addcmul_(noise_b, self._noise_std.view(-1, 1))
                weight.add_(buf_w, alpha=-spec.lr)
                bias.add_(buf_b, alpha=-spec.lr)
        self.steps_done += 1

    def step(self) -> None:
        self.step_on(self.sample_batch(reuse=True))

    def train(self, steps: int, progress: Callable[[int], None] | None = None) -> None:
        """``steps`` steps; ``progress(model_steps_done)`` gets the running count of model-steps
        (K per step) now and then and at the end."""
        for s in range(steps):
            self.step()
            if progress is not None and ((s + 1) % PROGRESS_EVERY == 0 or s + 1 == steps):
                progress(self.steps_done * self.K)

    def evaluate(self, evals: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, Outputs]:
        return {name: evaluate(self.params, x, y) for name, (x, y) in evals.items()}

    def close(self) -> None:
        """Stop the background noise threads (also done when the trainer is collected)."""
        if self.spec.dp is not None:
            self.noise.close()


def train_batched(spec: TrainSpec, req: TrainRequest,
                  progress: Callable[[int], None] | None = None) -> dict[str, Outputs]:
    """Train the K models of ``req.masks`` for ``spec.steps`` steps; predict on ``req.evals``."""
    trainer = BatchedTrainer(spec, req.x_train, req.y_train, req.masks, seed=req.seed, noise_seed=req.noise_seed,
                             groups=req.groups)
    try:
        trainer.train(spec.steps, progress)
        return trainer.evaluate(req.evals)
    finally:
        trainer.close()


def train(spec: TrainSpec, req: TrainRequest, *, device: str = "cpu",
          progress: Callable[[int], None] | None = None) -> dict[str, np.ndarray]:
    """The engine registry's entry point (``models.ENGINES``): flat ``{split}_{correct,margin}`` arrays."""
    if device != "cpu":
        raise ValueError(f"the batched engine runs on the CPU, not {device!r}")
    return {f"{split}_{key}": getattr(out, key) for split, out in train_batched(spec, req, progress=progress).items()
            for key in ("correct", "margin")}

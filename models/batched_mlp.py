"""The hand-written fast path of the batched engine for multilayer perceptrons (and logistic
regression): ``Flatten`` (optional), then ``Linear`` layers with ``ReLU`` between them.

It trains the same models with the same randomness as the general engine (``ModelStack``:
same initialisation, Poisson coins, noise, canaries and SGD semantics), but writes forward and
backward out by hand (ReLU, softmax cross-entropy), which is what makes DP-SGD cheap here: for a
linear layer the per-example gradient is the outer product ``delta_i a_i^T`` (plus ``delta_i``
for the bias), so

    ||g_i||^2 = sum_l (||a_i^{l-1}||^2 + 1) * ||delta_i^l||^2

needs no per-example gradient in memory, and the clipped, normalised sum, the noise and the
SGD step are fused into one batched product per layer written straight into the weights. It is
1.3-1.7x faster per model-step than the general engine on these networks (models/README.md, "Speed").
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor, nn

from dpmem.models.spec import CLIP_EPS
from dpmem.models.stack import ModelStack, PoissonBatch, phase
from dpmem.models.wide import leaf_layers

# Probabilities below this are treated as zero in the output error (see _output_error).
PROB_FLOOR = 1e-10

Layer = tuple[Tensor, Tensor]
Params = list[Layer]


def is_mlp(module: nn.Module) -> bool:
    """Flatten(1, -1)? then Linear (ReLU Linear)*, every Linear with a bias."""
    layers = leaf_layers(module) if isinstance(module, nn.Sequential) else [module]
    if layers and isinstance(layers[0], nn.Flatten) and (layers[0].start_dim, layers[0].end_dim) == (1, -1):
        layers = layers[1:]
    if not layers or len(layers) % 2 == 0:
        return False
    for j, layer in enumerate(layers):
        wanted = nn.Linear if j % 2 == 0 else nn.ReLU
        if type(layer) is not wanted or (wanted is nn.Linear and layer.bias is None):
            return False
    return True


# -- forward / backward ------------------------------------------------------------------------
# Activations and errors are [K, B, width]. The output layer is computed transposed ([K, C, B]
# in memory, returned as a [K, B, C] view): with C ~ 10 classes, a product whose last output
# dimension is C runs 3-4x slower than its transpose.

class Workspace:
    """Reused flat buffers for a step's large intermediates. Writing into memory that the last
    step used (still in cache, already mapped) instead of fresh allocations saves ~20% of a step."""

    def __init__(self, device: torch.device):
        self.device = device
        self._buffers: dict[str, Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> Tensor:
        size = math.prod(shape)
        buffer = self._buffers.get(name)
        if buffer is None or buffer.numel() < size or buffer.dtype != dtype:
            buffer = self._buffers[name] = torch.empty(size, dtype=dtype, device=self.device)
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


def _output_error(logits: Tensor, y: Tensor, valid: Tensor | None) -> tuple[Tensor, Tensor]:
    """d(sum of per-example cross-entropies)/d logits = softmax - onehot; zero on padded rows.

    ``logits`` is [K, B, C] (the transposed view from ``_forward``, or its contiguous copy); the
    result is [K, B, C], contiguous. The
    softmax runs over each example's contiguous row of C logits, so an example's values do not
    depend on the batch width or the number of models (a softmax over a strided dimension
    vectorises across examples and treats the last ones differently)."""
    delta = logits.contiguous().softmax(dim=2)  # [K, B, C]
    # Confident models put probabilities far below float32's normal range (< 1e-38) on wrong
    # classes; arithmetic on such subnormal numbers is many times slower on x86 CPUs. Zeroing
    # probabilities below PROB_FLOOR moves each gradient coordinate by less than float32
    # already rounds the true-class term p - 1 (by up to 6e-8), so the update is unchanged.
    delta.masked_fill_(delta < PROB_FLOOR, 0.0)
    label = y.unsqueeze(2)
    true_prob = delta.gather(2, label)
    delta.scatter_(2, label, true_prob - 1.0)
    if valid is not None:
        delta.mul_(valid.unsqueeze(2).to(delta.dtype))
    return delta, true_prob.squeeze(2)


def _example_losses(logits: Tensor, y: Tensor, true_prob: Tensor) -> Tensor:
    """Per-example cross-entropies [K, B] from the step's softmax: -log p_y (a softmax over C ~ 10
    classes costs as much as the rest of a small MLP's step, so it is not taken twice). -log p_y
    is within float32 rounding of log_softmax's value (6e-8 where p_y ~ 1); where p_y fell below
    PROB_FLOOR (a loss above 23) the loss is computed exactly, logsumexp minus the true logit."""
    losses = true_prob.log().neg_()
    tiny = true_prob < PROB_FLOOR
    if bool(tiny.any()):
        exact = logits.logsumexp(dim=2) - logits.gather(2, y.unsqueeze(2)).squeeze(2)
        losses = torch.where(tiny, exact, losses)
    return losses


def _column_sums(d: Tensor) -> Tensor:
    """d.sum(dim=1) for [K, B, out] errors, as a product with ones: a batched matrix product is
    unchanged by the zero rows that pad a batch, a reduction is not (its blocking depends on B),
    and the padded width depends on the other models of the call. Two columns of ones, not one:
    with one column and K = 1 the product becomes a matrix-vector product, blocked by B again."""
    K, B, _ = d.shape
    return torch.bmm(d.transpose(1, 2), torch.ones(K, B, 2, dtype=d.dtype, device=d.device))[:, :, 0]


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
    total: Tensor | None = None
    for j, (a, d) in enumerate(zip(acts[:-1], deltas)):
        a_sq = input_sq if (j == 0 and input_sq is not None) else _row_sq_norms(a)
        term = _row_sq_norms(d).mul_(a_sq + 1.0)
        total = term if total is None else total.add_(term)
    assert total is not None, "an MLP has at least one layer"
    return total



def _clip_factors(norms: Tensor, max_grad_norm: float) -> Tensor:
    """Opacus's min(1, C / (||g|| + 1e-6)) from the per-example norms."""
    return (max_grad_norm / (norms + CLIP_EPS)).clamp(max=1.0)


class MLPStack(ModelStack):
    """``ModelStack`` with the hand-written step and evaluation for MLPs."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not is_mlp(self.module):
            raise ValueError("MLPStack trains Flatten? Linear (ReLU Linear)* modules only")
        if not all(self.trainable):
            raise ValueError("MLPStack trains every parameter; frozen ones (requires_grad=False) need ModelStack")
        self.layers: Params = list(zip(self.params[0::2], self.params[1::2]))  # views of self.params
        self._work = Workspace(self.device)
        if self.spec.dp is not None:
            self._noise_std = (self.spec.dp.noise_multiplier * self.spec.dp.max_grad_norm) * self.inv_ebs

    def _noise_views(self, noise: Tensor) -> list[tuple[Tensor, Tensor]]:
        views, offset = [], 0
        for w, b in self.layers:
            nw, nb = w[0].numel(), b[0].numel()
            views.append((noise[:, offset:offset + nw].view_as(w), noise[:, offset + nw:offset + nw + nb].view_as(b)))
            offset += nw + nb
        return views

    @torch.no_grad()
    def step_on(self, batch: PoissonBatch) -> None:
        spec = self.spec
        dp = spec.dp
        if dp is not None:
            self.dp_noise().begin()
        x = batch.x.reshape(self.K, batch.x.shape[1], -1)
        recording = self.stats is not None and batch.index is not None
        with phase("forward"):
            acts = _forward(self.layers, x, self._work)
            logits = acts[-1].contiguous()
            delta_out, true_prob = _output_error(logits, batch.y, batch.valid)
            if recording:   # the per-example losses the step differentiates (example_stats.py)
                losses = _example_losses(logits, batch.y, true_prob)
        if recording and batch.drawn is not None:
            assert self.stats is not None
            with phase("example_stats"):
                self.stats.add_draws(batch.drawn)
        if dp is None:
            with phase("backward"):
                # Normalisation is linear, so it can scale the output error before backprop.
                delta_out.mul_(self.inv_ebs.view(-1, 1, 1))
                deltas = _backward(self.layers, acts, delta_out, self._work)
            if recording:
                assert self.stats is not None and batch.index is not None
                with phase("example_stats"):
                    self.stats.add(slice(0, self.K), batch.index, batch.valid, losses, draws=batch.drawn is None)
        else:
            with phase("backward"):
                deltas = _backward(self.layers, acts, delta_out, self._work)
            with phase("norms"):
                norms = _ghost_sq_norms(acts, deltas).sqrt_()
                scale = _clip_factors(norms, dp.max_grad_norm)
            if recording:
                assert self.stats is not None and batch.index is not None
                with phase("example_stats"):
                    self.stats.add(slice(0, self.K), batch.index, batch.valid, losses, norms, clipped=scale < 1.0,
                                   draws=batch.drawn is None)
            # the clipped sums are formed inside the update's products (one per layer)
            with phase("clipped_sums"):
                scale.mul_(self.inv_ebs.view(-1, 1)).unsqueeze_(2)
                for d in deltas:
                    d.mul_(scale)
            with phase("noise"):
                noise_views = self._noise_views(self.dp_noise().take())
        with phase("update"):
            self._update(acts, deltas, None if dp is None else noise_views)
        if self.canaries is not None:
            self.canaries.step(self)
        self.steps_done += 1

    def _update(self, acts: list[Tensor], deltas: list[Tensor], noise_views: list[tuple[Tensor, Tensor]] | None) -> None:
        """torch.optim.SGD's update from each layer's product of (clip-scaled) output errors and inputs,
        plus the noise (DP), written straight into the weights and momentum buffers."""
        spec = self.spec
        wd = spec.weight_decay
        for j, ((weight, bias), a, d) in enumerate(zip(self.layers, acts[:-1], deltas)):
            if self.momentum_bufs is None:
                if wd:  # torch.optim.SGD: the step uses grad + wd * (pre-step weights)
                    weight.mul_(1 - spec.lr * wd)
                    bias.mul_(1 - spec.lr * wd)
                weight.baddbmm_(d.transpose(1, 2), a, alpha=-spec.lr)
                bias.add_(_column_sums(d), alpha=-spec.lr)
                if noise_views is not None:
                    noise_w, noise_b = noise_views[j]
                    weight.addcmul_(noise_w, self._noise_std.view(-1, 1, 1), value=-spec.lr)
                    bias.addcmul_(noise_b, self._noise_std.view(-1, 1), value=-spec.lr)
            else:
                buf_w, buf_b = self.momentum_bufs[2 * j], self.momentum_bufs[2 * j + 1]
                buf_w.mul_(spec.momentum).baddbmm_(d.transpose(1, 2), a)
                buf_b.mul_(spec.momentum).add_(_column_sums(d))
                if wd:
                    buf_w.add_(weight, alpha=wd)
                    buf_b.add_(bias, alpha=wd)
                if noise_views is not None:
                    noise_w, noise_b = noise_views[j]
                    buf_w.addcmul_(noise_w, self._noise_std.view(-1, 1, 1))
                    buf_b.addcmul_(noise_b, self._noise_std.view(-1, 1))
                weight.add_(buf_w, alpha=-spec.lr)
                bias.add_(buf_b, alpha=-spec.lr)

    @torch.no_grad()
    def predict(self, x: np.ndarray | Tensor, y: np.ndarray | Tensor) -> tuple[np.ndarray, np.ndarray]:
        """(correct bool [K, m], margin float16 [K, m]) of all K models, in row blocks of bounded size."""
        x = torch.as_tensor(np.asarray(x, dtype=np.float32)).reshape(len(y), -1)
        y = torch.as_tensor(np.asarray(y, dtype=np.int64))
        K, m = self.K, x.shape[0]
        widest = max(w.shape[1] for w, _ in self.layers)
        rows = max(1, EVAL_BLOCK_FLOATS // (K * widest))
        last = len(self.layers) - 1
        correct = np.empty((K, m), dtype=bool)
        margin = np.empty((K, m), dtype=np.float16)
        for start in range(0, m, rows):
            stop = min(m, start + rows)
            a = x[start:stop].to(self.device)  # the first layer's input is shared by all K models (broadcast)
            for j, (weight, bias) in enumerate(self.layers):
                if j < last:
                    a = torch.matmul(a, weight.transpose(1, 2)).add_(bias.unsqueeze(1)).relu_()
                else:  # transposed logits [K, C, rows], as in _forward
                    a = torch.matmul(weight, a.transpose(-1, -2)).add_(bias.unsqueeze(2))
            label = y[start:stop].to(self.device).view(1, 1, -1).expand(K, 1, -1)
            true_logit = a.gather(1, label).squeeze(1)
            best_other = a.scatter(1, label, -math.inf).amax(dim=1)
            correct[:, start:stop] = (a.argmax(dim=1) == label.squeeze(1)).cpu().numpy()
            margin[:, start:stop] = (true_logit - best_other).to(torch.float16).cpu().numpy()
        return correct, margin


# Evaluation keeps the largest activation block at about this many floats (64 MiB).
EVAL_BLOCK_FLOATS = 1 << 24

"""The per-model reference path: each of the K models trained on its own through Opacus.

It is the only path for the CNN and the yardstick the batched engine is tested against. DP-SGD
is Opacus's own machinery (``GradSampleModule`` in hooks mode + ``DPOptimizer``) fed by
Opacus's ``DPDataLoader`` (Poisson sampling at exactly ``spec.sample_rate``); the noise
multiplier and clipping norm are taken as given (calibration lives in privacy/accounting.py).
The non-private variant takes plain SGD steps on Poisson batches drawn the same way, with the
summed loss divided by the same expected batch size.

Seeding: model k's Poisson batches and its DP noise come from generators seeded by
``(seed, k)`` and ``(noise_seed, k)``. Logistic regression and MLP start from exactly the
batched engine's initial weights for the same request (``init_params`` + ``export_params``);
the CNN uses torch's default initialisation under a seed derived from ``(seed, k)``.
"""
from __future__ import annotations

import copy

import math
import warnings
from collections.abc import Callable, Iterator

import numpy as np
import torch
from opacus import GradSampleModule
from opacus.data_loader import DPDataLoader
from opacus.optimizers import DPOptimizer
from opacus.validators import ModuleValidator
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from dpmem.models.batched import PROGRESS_EVERY, expected_batch_sizes, export_params, init_params
from dpmem.models.nets import build_model
from dpmem.models.spec import Outputs, TrainRequest, TrainSpec

# Evaluation forward passes keep the largest activation at about this many floats (64 MiB).
EVAL_BLOCK_FLOATS = 1 << 24


def _child_seed(seed: int, k: int) -> int:
    return int(np.random.SeedSequence([int(seed), int(k)]).generate_state(1, dtype=np.uint32)[0])


def initial_models(spec: TrainSpec, K: int, seed: int) -> list[nn.Module]:
    """The K initial models of a request; for logreg / mlp exactly the batched engine's."""
    if spec.arch in ("logreg", "mlp"):
        params = init_params(spec, K, torch.Generator().manual_seed(int(seed)))
        models = []
        for k in range(K):
            model = build_model(spec)
            model.load_state_dict(export_params(spec, params, k))
            models.append(model)
        return models
    models = []
    for k in range(K):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_child_seed(seed, k))
            models.append(build_model(spec))
    return models


def _poisson_batches(x: Tensor, y: Tensor, spec: TrainSpec, generator: torch.Generator) -> Iterator[tuple[Tensor, Tensor]]:
    """``spec.steps`` Poisson batches of (x, y) at rate ``spec.sample_rate`` (possibly empty)."""
    if len(x) == 0:  # an empty subset: every batch is empty (DPDataLoader refuses empty datasets)
        for _ in range(spec.steps):
            yield x, y
        return
    loader = DPDataLoader(TensorDataset(x, y), sample_rate=spec.sample_rate, generator=generator)
    done = 0
    while done < spec.steps:
        for xb, yb in loader:
            yield xb, yb
            done += 1
            if done == spec.steps:
                return


def train_one(spec: TrainSpec, model: nn.Module, x: Tensor, y: Tensor, *, batch_seed: int,
              noise_seed: int, progress: Callable[[int], None] | None = None) -> nn.Module:
    """Train one model on (x, y) = its own subset for ``spec.steps`` steps; returns the model."""
    expected_batch_size = expected_batch_sizes(np.ones((1, len(x)), dtype=bool), spec.sample_rate)[0]
    batch_generator = torch.Generator().manual_seed(batch_seed)
    model.train()
    for p in model.parameters():
        # a zero gradient rather than None, so an empty batch still takes an SGD step
        # (torch.optim.SGD skips parameters without a gradient, momentum included)
        p.grad = torch.zeros_like(p)
    if spec.dp is None:
        optimizer = torch.optim.SGD(model.parameters(), lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay)
        for s, (xb, yb) in enumerate(_poisson_batches(x, y, spec, batch_generator)):
            optimizer.zero_grad(set_to_none=False)
            if len(xb):
                loss = nn.functional.cross_entropy(model(xb), yb, reduction="sum") / expected_batch_size
                loss.backward()
            optimizer.step()
            _report(progress, s + 1, spec.steps)
        return model

    gsm = GradSampleModule(model, batch_first=True, loss_reduction="sum")
    optimizer = DPOptimizer(
        torch.optim.SGD(gsm.parameters(), lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay),
        noise_multiplier=spec.dp.noise_multiplier,
        max_grad_norm=spec.dp.max_grad_norm,
        expected_batch_size=expected_batch_size,
        loss_reduction="mean",  # the optimizer divides the noisy clipped sum by expected_batch_size
        generator=torch.Generator().manual_seed(noise_seed),
    )
    with warnings.catch_warnings():
        # Opacus's backward hooks make torch note that the input needs no gradient; expected.
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        for s, (xb, yb) in enumerate(_poisson_batches(x, y, spec, batch_generator)):
            optimizer.zero_grad(set_to_none=False)
            if len(xb):
                loss = nn.functional.cross_entropy(gsm(xb), yb, reduction="sum")
                loss.backward()
            else:
                _empty_grad_samples(optimizer)
            optimizer.step()
            _report(progress, s + 1, spec.steps)
    gsm.remove_hooks()
    return model


def _report(progress: Callable[[int], None] | None, done: int, total: int) -> None:
    if progress is not None and (done % PROGRESS_EVERY == 0 or done == total):
        progress(done)


def _empty_grad_samples(optimizer: DPOptimizer) -> None:
    """An empty Poisson batch: zero per-example gradients, so the step is noise alone (as in
    Opacus, whose collate yields zero-length batches; done here directly because not every
    layer accepts a zero-length input)."""
    for p in optimizer.params:
        p.grad_sample = torch.zeros(0, *p.shape, dtype=p.dtype)
        if p.grad is None:
            p.grad = torch.zeros_like(p)


def eval_rows(spec: TrainSpec) -> int:
    """Rows per evaluation forward pass, so the widest activation stays near EVAL_BLOCK_FLOATS."""
    widest = max((*spec.hidden, spec.n_classes, 1))
    spatial = math.prod(spec.input_shape[1:]) if len(spec.input_shape) == 3 else 1  # conv maps keep H x W
    per_row = max(math.prod(spec.input_shape), widest * spatial)
    return max(1, EVAL_BLOCK_FLOATS // per_row)


@torch.no_grad()
def predict(model: nn.Module, x: np.ndarray, y: np.ndarray, rows: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """(correct bool [m], margin float16 [m]) of one model in eval mode, ``rows`` at a time."""
    model.eval()
    xt = torch.as_tensor(np.asarray(x, dtype=np.float32))
    yt = torch.as_tensor(np.asarray(y, dtype=np.int64))
    correct = np.empty(len(xt), dtype=bool)
    margin = np.empty(len(xt), dtype=np.float16)
    for start in range(0, len(xt), rows):
        logits = model(xt[start:start + rows])
        yb = yt[start:start + rows].unsqueeze(1)
        true_logit = logits.gather(1, yb).squeeze(1)
        best_other = logits.scatter(1, yb, -torch.inf).amax(dim=1)
        correct[start:start + len(yb)] = (logits.argmax(dim=1) == yb.squeeze(1)).numpy()
        margin[start:start + len(yb)] = (true_logit - best_other).numpy().astype(np.float16)
    return correct, margin


def train_opacus(spec: TrainSpec, req: TrainRequest,
                 progress: Callable[[int], None] | None = None) -> dict[str, Outputs]:
    """Train the K models of ``req.masks`` one by one; ``progress(model_steps_done)`` gets the
    running count of model-steps (out of K * spec.steps)."""
    masks = np.asarray(req.masks, dtype=bool)
    K = masks.shape[0]
    x_all = torch.as_tensor(np.asarray(req.x_train, dtype=np.float32))
    y_all = torch.as_tensor(np.asarray(req.y_train, dtype=np.int64))
    if len(x_all) != masks.shape[1] or len(y_all) != masks.shape[1]:
        raise ValueError(f"masks cover {masks.shape[1]} examples, x_train has {len(x_all)}, y_train {len(y_all)}")
    # Models of one group (leave-one-out pairs) start from the same weights and seed their Poisson
    # coins alike; DPDataLoader draws over each model's own subset, so the pairing of batches is
    # close but not coin-for-coin as in the batched engine.
    groups = (np.arange(K) if req.groups is None
              else np.unique(np.asarray(req.groups), return_inverse=True)[1].reshape(-1))
    if groups.shape != (K,):
        raise ValueError(f"groups must have shape ({K},), got {groups.shape}")
    group_models = initial_models(spec, int(groups.max()) + 1, req.seed)
    models = [group_models[g] if req.groups is None else copy.deepcopy(group_models[g]) for g in groups]
    results = {name: (np.empty((K, len(y)), dtype=bool), np.empty((K, len(y)), dtype=np.float16))
               for name, (_, y) in req.evals.items()}
    for k in range(K):
        subset = torch.from_numpy(np.flatnonzero(masks[k]))
        report = None if progress is None else (lambda s, base=k * spec.steps: progress(base + s))
        model = train_one(spec, models[k], x_all[subset], y_all[subset],
                          batch_seed=_child_seed(req.seed, int(groups[k])), noise_seed=_child_seed(req.noise_seed, k),
                          progress=report)
        for name, (x, y) in req.evals.items():
            results[name][0][k], results[name][1][k] = predict(model, x, y, rows=eval_rows(spec))
        models[k] = None  # free as we go
    return {name: Outputs(correct=c, margin=m) for name, (c, m) in results.items()}


def supports(module: nn.Module) -> str | None:
    """None when Opacus can train ``module`` (its ModuleValidator finds nothing), else the reason."""
    problems = ModuleValidator.validate(module, strict=False)
    return str(problems[0]) if problems else None


def train(spec: TrainSpec, req: TrainRequest, *, device: str = "cpu",
          progress: Callable[[int], None] | None = None) -> dict[str, np.ndarray]:
    """The engine registry's entry point (``models.ENGINES``): flat ``{split}_{correct,margin}`` arrays."""
    if device != "cpu":
        raise ValueError(f"the Opacus path runs on the CPU here, not {device!r}")
    return {f"{split}_{key}": getattr(out, key) for split, out in train_opacus(spec, req, progress=progress).items()
            for key in ("correct", "margin")}

"""Bring your own DP training: a trainer written with plain Opacus, audited by `dpmem check`.

dpmem calls fit once per model with that model's training indices, its seeds and the DP-SGD
parameters it calibrated; fit trains a fresh model its own way and returns per-example
correctness and margins on every evaluation split, and (optional) each training example's loss
and gradient norms summed over the steps that sampled it, for `dpmem proxies`.
"""
import numpy as np
import torch
from opacus import PrivacyEngine
from opacus.data_loader import DPDataLoader
from torch import nn
from torch.utils.data import TensorDataset

from dpmem.models.example_stats import ExampleStats


def fit(*, index, train_indices, x_train, y_train, evals, seed, noise_seed, params):
    torch.manual_seed(seed)                                   # this model's initialisation
    n_classes = int(y_train.max()) + 1
    model = nn.Sequential(nn.Flatten(), nn.Linear(int(np.prod(x_train.shape[1:])), 64), nn.ReLU(),
                          nn.Linear(64, n_classes))
    optimizer = torch.optim.SGD(model.parameters(), lr=params.lr, momentum=params.momentum,
                                weight_decay=params.weight_decay)
    subset = TensorDataset(torch.as_tensor(x_train[train_indices]), torch.as_tensor(y_train[train_indices]),
                           torch.as_tensor(train_indices))   # each row's example, for the statistics
    stats = ExampleStats(1, len(x_train), dp=params.private)
    # Poisson sampling at exactly the rate dpmem's accountant was told.
    loader = DPDataLoader(subset, sample_rate=params.sample_rate, generator=torch.Generator().manual_seed(seed))
    if params.private:
        model, optimizer, loader = PrivacyEngine().make_private(
            module=model, optimizer=optimizer, data_loader=loader,
            noise_multiplier=params.noise_multiplier, max_grad_norm=params.max_grad_norm,
            poisson_sampling=False,          # the loader above already draws Poisson batches
            noise_generator=torch.Generator().manual_seed(noise_seed))
    steps = 0
    while steps < params.steps:
        for xb, yb, rows in loader:
            optimizer.zero_grad()
            if len(xb):
                losses = nn.functional.cross_entropy(model(xb), yb, reduction="none")
                losses.mean().backward()
                norms = None
                if params.private:   # each example's whole pre-clip gradient norm, as Opacus clips it
                    norms = torch.stack([g.reshape(len(g), -1).norm(dim=1) for g in optimizer.grad_samples]).norm(dim=0)
                stats.add_rows(0, rows, losses, norms, params.max_grad_norm)
            optimizer.step()
            steps += 1
            if steps == params.steps:
                break
    model.eval()
    out = {}
    with torch.no_grad():
        for split, (x, y) in evals.items():
            logits = model(torch.as_tensor(x))
            y = torch.as_tensor(y).unsqueeze(1)
            others = logits.scatter(1, y, -torch.inf).amax(dim=1)
            out[f"{split}_correct"] = (logits.argmax(dim=1) == y.squeeze(1)).numpy()
            out[f"{split}_margin"] = (logits.gather(1, y).squeeze(1) - others).numpy()
    return out | stats.model(0)

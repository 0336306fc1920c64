"""Planted bugs in a user's own DP training (never for results): the README's Opacus trainer with
gradient canaries, on a logistic regression (the audit config's model), with a switch.

``bench/tools/trainer_audit_power.py`` names these functions as ``trainer = "dpmem.bench.tools.planted_trainer:BUG"``
and measures how often ``dpmem check`` refutes the claim. The bugs live in the user's code, not in
dpmem: dpmem calibrates and passes the honest parameters, the trainer misuses them.

- ``honest``: the README trainer (Poisson batches at ``params.sample_rate``, ``make_private`` with
  the calibrated noise multiplier and clipping norm);
- ``half_noise``: passes half the noise multiplier to ``make_private``;
- ``noise_x075``: passes 0.75 of the noise multiplier (at claim 4 the true epsilon is about 5.6: too
  close to the claim for the threshold test at these sizes, the parametric bound's case);
- ``no_clipping``: clipping off (a clipping norm of 1e12) with the noise std of the claim,
  ``noise_multiplier * max_grad_norm``, kept;
- ``fixed_batches``: shuffled fixed-size batches of ``round(sample_rate * rows)`` while dpmem's
  accountant was told Poisson sampling at ``params.sample_rate`` (at sample rate 1 both draw
  every row at every step, so this bug exists only at rates below 1).
"""
from __future__ import annotations

import numpy as np
import torch
from opacus import PrivacyEngine
from opacus.data_loader import DPDataLoader
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dpmem.models import canaries as dpmem_canaries

BUGS = ("honest", "half_noise", "noise_x075", "no_clipping", "fixed_batches")
# "Clipping off": every per-example gradient passes whole (the same constant as privacy/faults.py).
NO_CLIP = 1e12


def fit(*, index, train_indices, x_train, y_train, evals, seed, noise_seed, params, canaries=None, bug="honest"):
    if bug not in BUGS:
        raise ValueError(f"unknown bug {bug!r}; choose from {', '.join(BUGS)}")
    torch.manual_seed(seed)
    # every label seen anywhere: a rare class can be missing from a small training set
    n_classes = 1 + max(int(y_train.max()), *(int(np.max(y)) for _, y in evals.values()))
    kit = dpmem_canaries.Canaries(canaries, params)
    model = kit.model(nn.Sequential(nn.Flatten(), nn.Linear(int(np.prod(x_train.shape[1:])), n_classes)))
    optimizer = torch.optim.SGD(model.parameters(), lr=params.lr, momentum=params.momentum,
                                weight_decay=params.weight_decay)
    subset = kit.dataset(TensorDataset(torch.as_tensor(x_train[train_indices]), torch.as_tensor(y_train[train_indices])))
    criterion = kit.loss(nn.CrossEntropyLoss())
    generator = torch.Generator().manual_seed(seed)
    if bug == "fixed_batches" and params.private:
        loader = DataLoader(subset, batch_size=max(1, round(params.sample_rate * len(subset))), shuffle=True,
                            generator=generator)
    else:
        loader = DPDataLoader(subset, sample_rate=params.sample_rate, generator=generator)
    if params.private:
        sigma, clip = params.noise_multiplier, params.max_grad_norm
        if bug == "half_noise":
            sigma = sigma / 2
        elif bug == "noise_x075":
            sigma = sigma * 0.75
        elif bug == "no_clipping":
            sigma, clip = sigma * clip / NO_CLIP, NO_CLIP
        model, optimizer, loader = PrivacyEngine().make_private(
            module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=sigma, max_grad_norm=clip,
            poisson_sampling=False, noise_generator=torch.Generator().manual_seed(noise_seed))
        kit.attach(optimizer)
    steps = 0
    while steps < params.steps:
        for xb, yb, ids in loader:
            optimizer.zero_grad()
            if len(xb):
                criterion(model(xb, ids), yb).backward()
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
    if canaries is not None:
        out["canary_score"] = kit.scores()
        out["canary_update"] = kit.update()
    return out


def honest(**kw):
    return fit(**kw, bug="honest")


def half_noise(**kw):
    return fit(**kw, bug="half_noise")


def noise_x075(**kw):
    return fit(**kw, bug="noise_x075")


def no_clipping(**kw):
    return fit(**kw, bug="no_clipping")


def fixed_batches(**kw):
    return fit(**kw, bug="fixed_batches")

"""Bring your own DP training, guarded: the plain Opacus trainer with gradient canaries.

With gradient_canaries = m, dpmem passes fit the canaries of this model's subset. They become
extra rows of the model's data and one extra scalar each beside the model, so the
PrivacyEngine samples, clips and noises them with everything else; fit returns their final
values, and `dpmem check` audits the training with them.
"""
import numpy as np
import torch
from opacus import PrivacyEngine
from opacus.data_loader import DPDataLoader
from torch import nn
from torch.utils.data import TensorDataset

from dpmem import canaries as dpmem_canaries


def fit(*, index, train_indices, x_train, y_train, evals, seed, noise_seed, params, canaries=None):
    torch.manual_seed(seed)                                   # this model's initialisation
    n_classes = int(y_train.max()) + 1
    kit = dpmem_canaries.Canaries(canaries, params)           # None: no canaries, training unchanged
    model = kit.model(nn.Sequential(nn.Flatten(), nn.Linear(int(np.prod(x_train.shape[1:])), 64), nn.ReLU(),
                                    nn.Linear(64, n_classes)))
    optimizer = torch.optim.SGD(model.parameters(), lr=params.lr, momentum=params.momentum,
                                weight_decay=params.weight_decay)
    subset = TensorDataset(torch.as_tensor(x_train[train_indices]), torch.as_tensor(y_train[train_indices]))
    subset = kit.dataset(subset)                              # + one row per member canary, and a canary-id column
    criterion = kit.loss(nn.CrossEntropyLoss())               # cross-entropy on real rows, the canary term on canary rows
    # Poisson sampling at exactly the rate dpmem's accountant was told.
    loader = DPDataLoader(subset, sample_rate=params.sample_rate, generator=torch.Generator().manual_seed(seed))
    if params.private:
        model, optimizer, loader = PrivacyEngine().make_private(
            module=model, optimizer=optimizer, data_loader=loader,
            noise_multiplier=params.noise_multiplier, max_grad_norm=params.max_grad_norm,
            poisson_sampling=False,          # the loader above already draws Poisson batches
            noise_generator=torch.Generator().manual_seed(noise_seed))
        kit.attach(optimizer)                                 # divide by the real examples' expected batch size
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
        out["canary_score"] = kit.scores()                    # theta_c after training
        out["canary_update"] = kit.update()                   # SGD's settings and steps: the parametric bound
    return out

# %% [markdown]
# # Audit your own Opacus training
#
# You train with Opacus and claim (epsilon, delta)-DP. This tutorial audits that claim from the
# outside: dpmem plants **gradient canaries** in your own training loop (`dpmem.canaries`), trains
# through your code, and tests the canaries' final values against the claim.
# With one model per variant the test is the **one-run audit** (Steinke et al.'s guessing game:
# each canary is in the training data with probability 1/2, and the audit guesses which ones
# were). Then we plant a classic bug in the loop and watch the audit catch it, and end with the
# recipe that guards the claim in CI.
#
# The settings are small so that this page runs in about a minute on a laptop CPU; the audit's
# measured power at full size is in [the audits' results](../results/audits.md).
#
# Run it yourself: `python .docs/tutorials/audit_opacus.py` from a clone (or open it as a notebook
# with jupytext).

# %%
import warnings

import numpy as np
import torch
from opacus import PrivacyEngine
from opacus.data_loader import DPDataLoader
from torch import nn
from torch.utils.data import TensorDataset

import dpmem

torch.set_num_threads(1)
# Opacus reminds us that its secure RNG is off and that no input needs a gradient: both expected here
warnings.filterwarnings("ignore", message="Secure RNG turned off")
warnings.filterwarnings("ignore", message="Full backward hook is firing")

# %% [markdown]
# ## Your training loop, with canaries
#
# dpmem calls your trainer once per model (the *trainer protocol*): it passes the data, the
# indices of the model's training subset, seeds, and `params` (the noise multiplier dpmem
# calibrated for the claim, the clipping norm, the Poisson sample rate, the number of steps, ...),
# and your function returns per-example correctness on each evaluation split.
#
# Four lines add the canaries. `kit = dpmem.canaries.Canaries(canaries, params)` ties them to this call;
# `kit.model(module)` adds one trainable scalar per canary beside your network, `kit.dataset(...)`
# appends one row per canary to your data (so your loader samples them like any example),
# `kit.loss(criterion)` gives canary rows their chosen gradient, and `kit.attach(optimizer)` makes
# the DP optimizer normalise by the real examples' expected batch. Everything else (sampling,
# clipping, noise) is your Opacus loop, unchanged. `bug=True` plants the bug we audit below.

# %%
def fit(*, index, train_indices, x_train, y_train, evals, seed, noise_seed, params, canaries=None, bug=False):
    torch.manual_seed(seed)
    kit = dpmem.canaries.Canaries(canaries, params)
    n_classes = 1 + int(max(y_train.max(), *(y.max() for _, y in evals.values())))
    model = kit.model(nn.Sequential(nn.Flatten(), nn.Linear(int(np.prod(x_train.shape[1:])), n_classes)))
    optimizer = torch.optim.SGD(model.parameters(), lr=params.lr)
    data = kit.dataset(TensorDataset(torch.as_tensor(x_train[train_indices]),
                                     torch.as_tensor(y_train[train_indices])))
    criterion = kit.loss(nn.CrossEntropyLoss())
    loader = DPDataLoader(data, sample_rate=params.sample_rate, generator=torch.Generator().manual_seed(seed))
    if params.private:
        plain_optimizer = optimizer
        model, optimizer, loader = PrivacyEngine().make_private(
            module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=params.noise_multiplier,
            max_grad_norm=params.max_grad_norm, poisson_sampling=False,
            noise_generator=torch.Generator().manual_seed(noise_seed))
        kit.attach(optimizer)
        if bug:   # the bug: step the optimizer we made, not the private one make_private returned
            optimizer = plain_optimizer
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
    with torch.no_grad():   # per example: correct, and the margin of the true class over the best other
        for split, (x, y) in evals.items():
            logits, y = model(torch.as_tensor(x)), torch.as_tensor(y)
            true = logits.gather(1, y[:, None]).squeeze(1)
            out[f"{split}_correct"] = (logits.argmax(1) == y).numpy()
            out[f"{split}_margin"] = (true - logits.scatter(1, y[:, None], -torch.inf).amax(1)).numpy()
    if canaries is not None:
        out["canary_score"] = kit.scores()     # the canaries' final values: what the audit reads
    return out


def buggy_fit(**kw):
    return fit(**kw, bug=True)


# %% [markdown]
# ## One run, audited
#
# `trainer = "module:function"` names your trainer. Your trainer lives in a module of your project
# (say `my_trainer.py`, and you write `trainer="my_trainer:fit"`); here this tutorial is the
# module, `__main__`. The config is the shipped `audit-one-run` config (`dpmem configs` lists the
# shipped configs) with fewer canaries and one claim, epsilon 4: one model per variant, each canary
# included with probability q = 1/2.

# %%
settings = dict(gradient_canaries=2000, epochs=5, epsilons=[4], seed=1)
honest = dpmem.run("audit-one-run", out="runs/honest", trainer="__main__:fit", **settings)
print(honest.audit[["variant", "epsilon_claimed", "violations"]].to_string(index=False))
one_run = honest.summary["variants"]["dp-eps4"]["one_run_audit"]
print({k: one_run[k] for k in ("epsilon_claimed", "eps_lb", "power_eps", "consistent")})

# %% [markdown]
# The one-run audit's lower bound on epsilon, `eps_lb`, stays below the claimed 4: the honest loop
# is **consistent** with its claim (an audit can refute a claim, never prove it).
#
# ## A planted bug, caught
#
# Now the same loop with the bug: after `make_private`, the loop keeps stepping the plain SGD
# optimizer it created first. Nothing crashes, the accuracy looks fine, and the model is not private
# at all: no clipping, no noise.

# %%
buggy = dpmem.run("audit-one-run", out="runs/buggy", trainer="__main__:buggy_fit", **settings)
one_run = buggy.summary["variants"]["dp-eps4"]["one_run_audit"]
print({k: one_run[k] for k in ("epsilon_claimed", "eps_lb", "power_eps", "consistent")})
assert not one_run["consistent"], "the audit should refute the buggy loop's claim"

# %% [markdown]
# The audit refutes the claim: the canaries show an epsilon far above 4.
#
# ## The CI recipe
#
# `dpmem check RUN_DIR` is the same verdict as an exit code (0: consistent, 1: a claim refuted, 2:
# unusable input), with `--json` for the machine-readable verdict. In CI, train with your trainer
# and check:

# %%
import subprocess
import sys

for run_dir in ("runs/honest", "runs/buggy"):
    done = subprocess.run([sys.executable, "-m", "dpmem.bench.cli", "check", run_dir], capture_output=True, text=True)
    print(f"dpmem check {run_dir}: exit {done.returncode}")

# %% [markdown]
# A GitHub Actions job that guards your claim on every push (your trainer in `my_trainer.py`):
#
# ```yaml
# - run: pip install dpmem
# - run: dpmem run trainer_audit trainer=my_trainer:fit --out runs/audit --quiet
# - run: dpmem check runs/audit --json
# ```
#
# `trainer_audit` is the shipped config for a trainer with gradient canaries (300 models, the
# threshold test; its measured power against planted bugs is in
# [the audits' results](../results/audits.md)); `audit-one-run` is the one-model version used here.
# What the canaries cover, and what they do not, is in [Your trainer](../howto/your-trainer.md).

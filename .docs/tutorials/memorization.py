# %% [markdown]
# # Memorization and the cost of DP on your data
#
# Your data set, as an `.npz` of arrays; a small paired run (non-private SGD and DP-SGD on the same
# random subsets with the same seeds); then what the run measured: which training examples the
# models memorize, what DP costs each subgroup, and the figures and galleries that show it.
#
# The settings are small so that this page runs in about a minute on a laptop CPU: 64 models per
# variant where the default benchmark trains 1,000, so the estimates here are noisy (their
# intervals say how noisy). Run it yourself: `python .docs/tutorials/memorization.py` from a clone.

# %%
import matplotlib.pyplot as plt
import numpy as np
import torch
from sklearn.datasets import load_digits

import dpmem

torch.set_num_threads(1)

# %% [markdown]
# ## Your data as an `.npz`
#
# dpmem reads `x_train`, `y_train`, `x_test`, `y_test` (labels 0..C-1) and, if you have them,
# `subgroup_train` and `subgroup_test`: your own subpopulations (writers, sites, demographics).
# Without them dpmem derives subgroups by k-means inside each class. Images are `[n, channels,
# height, width]`; here: scikit-learn's 8x8 digits, with a subgroup per (digit, ink level).

# %%
digits = load_digits()
x = digits.images[:, None].astype(np.float32) / 16.0          # [1797, 1, 8, 8]
y = digits.target.astype(np.int64)
ink = (x.reshape(len(x), -1).mean(1) > np.median(x)).astype(np.int64)
order = np.random.default_rng(0).permutation(len(y))
train, test = order[:600], order[600:1200]
np.savez("my_data.npz", x_train=x[train], y_train=y[train], x_test=x[test], y_test=y[test],
         subgroup_train=2 * y[train] + ink[train], subgroup_test=2 * y[test] + ink[test])

# %% [markdown]
# ## A small run
#
# `dataset="file"` reads the file. dpmem resamples the training set into a long tail over your
# subgroups (`zipf_a`; `zipf_a=0` keeps your data as given), draws each model's random subset
# (each example in with probability `q`), and trains every model twice: without DP and with DP-SGD
# calibrated to epsilon 4. The same call from the shell is
# `dpmem run dataset=file data_path=my_data.npz models=64 ... --out runs/mine`.

# %%
run = dpmem.run(dict(dataset="file", data_path="my_data.npz", n_train=300, models=64, unit_size=64, epochs=8,
                     hidden=[32], epsilons=[4], seed=0), out="runs/mine")
print(run.path.name, "|", ", ".join(run.summary["variants"]))
for name, v in run.summary["variants"].items():
    print(f"{name:10s} test accuracy {v['test_accuracy']:.3f}  mean memorization {v['mean_mem']:.3f}")

# %% [markdown]
# ## Memorization, example by example
#
# `run.memorization` has one row per (variant, training example): `p_in` and `p_out` are the
# accuracy on the example of the models that trained on it and of those that did not; `mem` is
# their difference (Feldman and Zhang's estimator), `mem_se` its standard error. `bound` is what
# (epsilon, delta)-DP allows `mem` to be given `p_out`.

# %%
mem = run.memorization
top = mem[mem.variant == "nonprivate"].nlargest(5, "mem")
print(top[["index", "label", "subgroup", "p_in", "p_out", "mem", "mem_se"]].to_string(index=False))
dp = mem[mem.variant == "dp-eps4"]
print(f"\nunder DP-SGD at epsilon 4: largest mem {dp['mem'].max():.2f}, examples above their DP bound: "
      f"{int(dp['violation'].sum())}")

# %% [markdown]
# ## The cost of DP, subgroup by subgroup
#
# `run.subgroups` gives every subgroup's test accuracy per variant and `acc_loss`, the accuracy
# DP loses against the non-private models, with 95% intervals over models and test examples.
# `run.frequency_bins` groups subgroups by how often they occur in training: the long tail is
# where DP's cost concentrates.

# %%
bins = run.frequency_bins
print(bins[bins.variant == "dp-eps4"][["freq_bin", "subgroups", "test_acc", "acc_loss", "acc_loss_lo",
                                       "acc_loss_hi"]].to_string(index=False))

# %% [markdown]
# ## Figures and galleries
#
# The run wrote its figures (PNG and PDF) under `figures/` and a self-contained `report.html`.
# The accuracy loss against training frequency:

# %%
image = plt.imread(run.path / "figures" / "acc_loss_vs_frequency.png")
plt.figure(figsize=(8, 4))
plt.imshow(image)
plt.axis("off")
plt.show()

# %% [markdown]
# A gallery shows the most memorized training examples, each followed by typical examples of its
# class; `run.gallery` returns the rows it draws, to make your own.

# %%
gallery = run.gallery("memorized", "nonprivate", rows=3)
print(gallery[["index", "label", "mem", "mem_lo", "mem_hi"]].head(8).to_string(index=False))
image = plt.imread(run.path / "figures" / "gallery_memorized_nonprivate.png")
plt.figure(figsize=(8, 4))
plt.imshow(image)
plt.axis("off")
plt.show()

# %% [markdown]
# Open `runs/mine/report.html` for everything at once: the summary, the audit, the findings with
# false-discovery control, every figure and gallery, and the run's provenance (dpmem's version
# and commit included). What each output file holds is in [Output files](../reference/outputs.md);
# how to read the intervals and findings is in [the estimator](../concepts/estimator.md).

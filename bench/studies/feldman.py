"""Feldman's long-tail theorem (Theorem 2.3 of "Does learning require memorization?") measured on a run.

For the discrete model (``dataset = "feldman"``: t points, point x drawn with probability D(x), labels a
random function f uniform over k classes) every learner A trained on n i.i.d. samples S satisfies

    E[err_P(A(S))] >= opt_n + tau_n * E[errn_S(A(S), 1)],
    tau_n = E_{a~pi*}[a^2 (1-a)^(n-1)] / E_{a~pi*}[a (1-a)^(n-1)],

where errn_S(h, 1) is the number of examples that occur exactly once in S and that h gets wrong, and pi*
is the distribution of the frequency D(x) of a uniformly random point x of the domain (the prior over
frequencies induced on the t points). The dataset assigns the t normalised prior frequencies to the points
by a random permutation (Feldman draws each independently from the prior, then normalises), so pi* puts
mass 1/t on each D(x) exactly, and tau is a finite sum, computed exactly.

opt_n is the least expected error any learner can reach. Labels of points absent from S are uniform and
independent of S, so every learner errs on them with probability 1 - 1/k, and a learner that returns the
seen label elsewhere errs nowhere else: opt_n = (1 - 1/k) * sum_x D(x) (1 - D(x))^n (not 0, although the
labels are deterministic: the Bayes error given f is 0, but a learner does not know f off S).

Which sample is "S" for a model of the benchmark: model k trains on T_k, the training examples in its
mask. The masks do not depend on the data, so given its size m_k, T_k is itself an i.i.d. sample of m_k
draws from P and the theorem applies to model k with n = m_k and S = T_k. The singletons of model k are
therefore the examples of T_k whose point occurs exactly once in T_k (a point twice in the full set but
once in T_k is a singleton for model k; a full-set singleton outside T_k is not a training example of
model k at all). Each model gets its own tau(m_k), opt(m_k) and bound; tables average over models.

The theorem bounds an expectation over the meta-distribution (random D from the prior, random f); a run
measures one draw of D and f, averaged over the K models' subsets, initialisations and noise, and estimates
err_P with the run's test sample. The bound therefore holds in expectation, not necessarily per run.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import special

from dpmem.bench.studies.utility import model_interval
from dpmem.privacy.errors import UsageError


def tau(frequencies: np.ndarray, n: int, weights: np.ndarray | None = None) -> float:
    """tau_n for the discrete prior pi* with atoms ``frequencies`` and masses ``weights`` (default uniform).

    Computed in log space (the terms (1-a)^(n-1) underflow for frequent points and large n).
    """
    a = np.asarray(frequencies, np.float64)
    w = np.full(len(a), 1.0 / len(a)) if weights is None else np.asarray(weights, np.float64)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if np.any(a <= 0) or np.any(a > 1) or np.any(w < 0) or w.sum() <= 0:
        raise ValueError("frequencies must lie in (0, 1] and weights be non-negative")
    tail = special.xlog1py(n - 1, -a)                       # (n-1) log(1-a), 0 when n = 1
    num = special.logsumexp(2 * np.log(a) + tail, b=w)
    den = special.logsumexp(np.log(a) + tail, b=w)
    return float(np.exp(num - den))


def optimal_error(frequencies: np.ndarray, n: int, n_classes: int) -> float:
    """opt_n = (1 - 1/k) * sum_x D(x) (1 - D(x))^n: the mass of points absent from S, guessed at random."""
    d = np.asarray(frequencies, np.float64)
    return float((1.0 - 1.0 / n_classes) * np.sum(d * np.exp(special.xlog1py(n, -d))))


def subset_counts(masks: np.ndarray, g_train: np.ndarray, n_points: int) -> np.ndarray:
    """int [K, t]: how often each point occurs in each model's training subset T_k."""
    onehot = np.zeros((len(g_train), n_points), np.float32)
    onehot[np.arange(len(g_train)), g_train] = 1.0
    return np.rint(np.asarray(masks, np.float32) @ onehot).astype(np.int64)


def singleton_mask(masks: np.ndarray, g_train: np.ndarray, n_points: int) -> np.ndarray:
    """bool [K, n]: example i is in T_k and its point occurs exactly once in T_k."""
    counts = subset_counts(masks, g_train, n_points)
    masks = np.asarray(masks, bool)
    return masks & (np.take_along_axis(counts, np.broadcast_to(g_train, masks.shape), axis=1) == 1)


def unfitted_singletons(masks: np.ndarray, train_correct: np.ndarray, g_train: np.ndarray,
                        n_points: int) -> tuple[np.ndarray, np.ndarray]:
    """Per model: (singletons of T_k, those of them the model gets wrong) — errn_{T_k}(h_k, 1)."""
    single = singleton_mask(masks, g_train, n_points)
    wrong = single & ~np.asarray(train_correct, bool)
    return single.sum(1), wrong.sum(1)


def variant_rows(*, variant: str, epsilon: float | None, masks: np.ndarray, train_correct: np.ndarray,
                 test_correct: np.ndarray, g_train: np.ndarray, probability: np.ndarray,
                 n_classes: int) -> pd.DataFrame:
    """One row per model: m_k, tau(m_k), opt(m_k), singletons, unfitted singletons, test error, bound."""
    t = len(probability)
    sizes = np.asarray(masks, bool).sum(1)
    taus = {m: tau(probability, int(m)) for m in np.unique(sizes)}
    opts = {m: optimal_error(probability, int(m), n_classes) for m in np.unique(sizes)}
    singles, unfit = unfitted_singletons(masks, train_correct, g_train, t)
    # the part of opt this subset realises: guessing on the mass of the points absent from T_k
    unseen = (subset_counts(masks, g_train, t) == 0) @ np.asarray(probability, np.float64)
    frame = pd.DataFrame({"variant": variant, "epsilon": epsilon, "model": np.arange(len(sizes)), "n": sizes,
                          "tau": [taus[m] for m in sizes], "opt": [opts[m] for m in sizes],
                          "opt_given_T": (1.0 - 1.0 / n_classes) * unseen,
                          "singletons": singles, "unfit_singletons": unfit,
                          "test_error": 1.0 - np.asarray(test_correct, bool).mean(1)})
    frame["bound"] = frame["opt"] + frame["tau"] * frame["unfit_singletons"]
    return frame


def summary_table(per_model: pd.DataFrame, probability: np.ndarray, n_train: int, n_classes: int) -> pd.DataFrame:
    """Per variant: means over models with 95% t-intervals over models, and how much of DP's extra error the
    bound explains. The test error's interval is over models only: the theorem bounds the error on P, which a
    test set of 10,000 draws estimates to about +-0.008 (95%) on top of it.

    ``tau_S`` and ``opt_S`` are the values for the whole training set (n = n_train), for reference.
    ``opt_given_T`` is (1 - 1/k) times the mass of the points absent from the model's own subset: what opt
    becomes for the subsets this run drew (opt averages it over the draw of S, which the K models share).
    ``dp_excess_error`` = error(variant) - error(nonprivate) and ``dp_excess_bound`` the same difference of
    the bounds (= tau times the extra unfitted singletons, opt being shared); ``explained`` is their ratio.
    Both differences are paired by model index (same subsets and initialisations).
    """
    rows = []
    ref = per_model.loc[per_model["variant"] == "nonprivate"].set_index("model")
    for variant, g in per_model.groupby("variant", sort=False):
        g = g.set_index("model")
        row = {"variant": variant, "epsilon": g["epsilon"].iloc[0], "models": len(g), "n_mean": g["n"].mean(),
               "tau": g["tau"].mean(), "opt": g["opt"].mean(), "opt_given_T": g["opt_given_T"].mean(),
               "singletons": g["singletons"].mean()}
        for col in ("unfit_singletons", "test_error", "bound"):
            row.update(model_interval(g[col].to_numpy(float), col))
        row.update(model_interval((g["test_error"] - g["bound"]).to_numpy(float), "error_minus_bound"))
        if len(ref) and variant != "nonprivate":
            common = g.index.intersection(ref.index)
            d_err = (g.loc[common, "test_error"] - ref.loc[common, "test_error"]).to_numpy(float)
            d_bound = (g.loc[common, "bound"] - ref.loc[common, "bound"]).to_numpy(float)
            row.update(dp_excess_error=float(d_err.mean()), dp_excess_bound=float(d_bound.mean()),
                       explained=float(d_bound.mean() / d_err.mean()) if d_err.mean() > 0 else float("nan"))
        else:
            row.update(dp_excess_error=np.nan, dp_excess_bound=np.nan, explained=np.nan)
        rows.append(row)
    out = pd.DataFrame(rows)
    out.insert(4, "tau_S", tau(probability, n_train))
    out.insert(5, "opt_S", optimal_error(probability, n_train, n_classes))
    return out


def analyse_run(store) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, dict]:
    """(per-model rows, per-variant summary, per-point table, facts) for a finished ``dataset = "feldman"`` run."""
    from dpmem.bench.data import load_dataset
    cfg = store.config()
    if cfg.dataset != "feldman":
        raise UsageError(f"{store.root} is a {cfg.dataset!r} run; this study needs dataset = \"feldman\"")
    ds = load_dataset(cfg)
    data = store.data()
    if not (np.array_equal(data["g_train"], ds.g_train) and np.array_equal(data["y_train"], ds.y_train)):
        raise UsageError(f"{store.root}: stored training data differ from the data its config generates")
    masks = store.masks()
    probability = np.asarray(ds.info["point_probability"], np.float64)
    frames = []
    for name, eps in cfg.variants:
        arrays = store.variant_arrays(name)
        frames.append(variant_rows(variant=name, epsilon=eps, masks=masks, train_correct=arrays["train_correct"],
                                   test_correct=arrays["test_correct"], g_train=ds.g_train,
                                   probability=probability, n_classes=ds.n_classes))
    per_model = pd.concat(frames, ignore_index=True)
    summary = summary_table(per_model, probability, ds.n_train, ds.n_classes)
    points = pd.DataFrame({"point": np.arange(ds.n_subgroups), "probability": probability,
                           "label": ds.subgroup_label, "train_count": np.bincount(ds.g_train, minlength=ds.n_subgroups),
                           "test_count": np.bincount(ds.g_test, minlength=ds.n_subgroups)})
    facts = {"points": int(ds.n_subgroups), "n_train": int(ds.n_train), "n_test": int(ds.n_test),
             "n_classes": int(ds.n_classes), "prior": cfg.feldman_prior, "zipf_a": cfg.zipf_a,
             "inputs": cfg.feldman_inputs, "model": cfg.model, "q": cfg.q, "sampling": cfg.sampling,
             "singletons_in_S": int((points["train_count"] == 1).sum()),
             "tau_S": tau(probability, ds.n_train), "opt_S": optimal_error(probability, ds.n_train, ds.n_classes),
             "singleton_count": "per model: points occurring exactly once in the model's subset T_k"}
    return per_model, summary, points, facts


SUMMARY_COLUMNS = ["variant", "epsilon", "models", "n_mean", "tau", "opt", "opt_given_T", "singletons",
                   "unfit_singletons", "test_error", "test_error_lo", "test_error_hi", "bound", "bound_lo", "bound_hi",
                   "error_minus_bound", "dp_excess_error", "dp_excess_bound", "explained"]


def write_report(per_model: pd.DataFrame, summary: pd.DataFrame, points: pd.DataFrame, facts: dict, out) -> None:
    """feldman_bound.{csv,parquet}, per-model and per-point tables, Markdown/LaTeX, and the figure."""
    from pathlib import Path

    import matplotlib.pyplot as plt
    import seaborn as sns

    from dpmem.bench.report.figures import save_figure
    from dpmem.bench.report.tables import latex, markdown, write_frame
    from dpmem.bench.store.files import atomic_write_bytes, atomic_write_json
    out = Path(out)
    write_frame(summary, out / "feldman_bound")
    write_frame(per_model, out / "feldman_per_model")
    write_frame(points, out / "feldman_points")
    records = summary.astype(object).where(summary.notna(), None).to_dict(orient="records")   # NaN -> null
    atomic_write_json(out / "feldman.json", {**facts, "variants": records})
    table = summary[SUMMARY_COLUMNS]
    atomic_write_bytes(out / "tables" / "feldman_bound.md", markdown(table).encode())
    atomic_write_bytes(out / "tables" / "feldman_bound.tex", latex(
        table, "Feldman's Theorem 2.3: measured test error against opt + tau x (unfitted singletons), "
               "per variant (means over models, 95% intervals).").encode())

    sns.set_theme(style="whitegrid", context="paper")
    variants = list(dict.fromkeys(per_model["variant"]))
    fig, axes = plt.subplots(1, len(variants) + 1, figsize=(3.2 * (len(variants) + 1), 3.3), squeeze=False)
    axes = axes[0]
    lim = [0, max(per_model["test_error"].max(), per_model["bound"].max()) * 1.05 + 1e-3]
    for ax, name in zip(axes, variants):
        rows = per_model.loc[per_model["variant"] == name]
        s = summary.loc[summary["variant"] == name].iloc[0]
        ax.scatter(rows["bound"], rows["test_error"], s=5, alpha=0.3, color="C0")
        ax.errorbar([s["bound"]], [s["test_error"]], xerr=[[s["bound"] - s["bound_lo"]], [s["bound_hi"] - s["bound"]]],
                    yerr=[[s["test_error"] - s["test_error_lo"]], [s["test_error_hi"] - s["test_error"]]],
                    fmt="o", color="C3", ms=5, label="mean (95% CI)")
        ax.plot(lim, lim, "k--", lw=0.8, label="error = bound")
        ax.set(xlim=lim, ylim=lim, xlabel="opt + tau x unfitted singletons", title=f"{name}: tau = {s['tau']:.2g}")
        ax.legend(fontsize=6, loc="lower right")
    axes[0].set_ylabel("test error (per model)")
    ax = axes[-1]
    x = np.arange(len(summary))
    ax.bar(x - 0.2, summary["test_error"], 0.4, yerr=[summary["test_error"] - summary["test_error_lo"],
                                                   summary["test_error_hi"] - summary["test_error"]],
           label="test error", color="C0", capsize=2)
    ax.bar(x + 0.2, summary["bound"], 0.4, yerr=[summary["bound"] - summary["bound_lo"],
                                              summary["bound_hi"] - summary["bound"]],
           label="opt + tau x unfitted", color="C1", capsize=2)
    ax.plot(x, summary["opt"], "k_", ms=18, mew=2, label="opt")
    ax.set_xticks(x, summary["variant"], rotation=30)
    ax.set(title=f"t = {facts['points']}, n = {facts['n_train']}, q = {facts['q']:g}", ylabel="error")
    ax.legend(fontsize=6)
    fig.tight_layout()
    save_figure(fig, out / "figures", "feldman_bound")

"""The marginal utility of memorized examples (Feldman & Zhang), with the critique's distribution-shift control.

For each memorization threshold, the training examples whose non-private memorization estimate (from the
run) is at or above it are removed from the training set, and K models of every variant are retrained on
the rest with the run's config (DP variants recalibrated by the accountant for the smaller set). Two
controls remove as many examples:

- ``random``: uniformly random training examples;
- ``matched``: for each removed memorized example, a random not-memorized example of the same subgroup
  (falling back to the same class, then to any example): the training distribution over subgroups and
  classes shifts as it does when the memorized examples go (the critique's point), but the memorized
  examples themselves stay.

Each control model draws its own removal set, so intervals over models include the randomness of the
draw. K reference models per variant train on the whole training set (the run's own models train on
subsets of size q n, so they are not the reference). Every model trains on the whole training set minus
its removed examples, as in Feldman & Zhang's experiment, expressed as a mask over the full set: model k
of every cell shares its initialisation and batch coins with model k of the reference (it sees the
reference's batches minus the removed examples), so accuracy drops are paired differences over models.

Each cell (threshold, removal, variant) is a unit of the study store: its arrays are written atomically
with a completion record, so an interrupted study resumes where it stopped.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from dpmem.bench.config import Config
from dpmem.bench.data import load_dataset
from dpmem.bench.estimators import memorization
from dpmem.bench.estimators.subgroups import crossed_mean_ci
from dpmem.bench.run import execution, plan, units
from dpmem.bench.store.files import atomic_write_json, read_json
from dpmem.bench.store.run_store import ModelRange, RunStore
from dpmem.privacy.errors import UsageError

KINDS = ("memorized", "random", "matched")
REFERENCE = "full"


# -- removal sets ----------------------------------------------------------------------------

def matched_removal(removed: np.ndarray, g_train: np.ndarray, y_train: np.ndarray, candidates: np.ndarray,
                    rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """One replacement per removed example: same subgroup, else same class, else any; never a removed one.

    Returns the chosen indices (sorted) and how many came from the subgroup, the class, or anywhere.
    """
    removed = np.asarray(removed, np.int64)
    pool = np.setdiff1d(candidates, removed)
    taken = np.zeros(len(g_train), bool)
    chosen, fallback = [], {"subgroup": 0, "class": 0, "any": 0}
    for i in rng.permutation(removed):
        free = pool[~taken[pool]]
        if free.size == 0:
            raise UsageError(f"cannot match {len(removed)} removed examples: too few examples remain; "
                             "use a higher threshold")
        for level, same in (("subgroup", g_train[free] == g_train[i]), ("class", y_train[free] == y_train[i]),
                            ("any", np.ones(free.size, bool))):
            if same.any():
                j = int(rng.choice(free[same]))
                fallback[level] += 1
                break
        taken[j] = True
        chosen.append(j)
    return np.sort(np.array(chosen, np.int64)), fallback


def memorized_sets(mem: np.ndarray, candidates: np.ndarray, thresholds: list[float]) -> list[dict]:
    """For each threshold that at least one candidate reaches: the candidates at or above it."""
    out = []
    for thr in thresholds:
        memorized = candidates[mem[candidates] >= thr]
        if memorized.size:
            out.append({"threshold": float(thr), "memorized": memorized.tolist()})
    return out


def removal_masks(kind: str, memorized: np.ndarray, *, g_train: np.ndarray, y_train: np.ndarray,
                  candidates: np.ndarray, models: range, seed: int, threshold: float) -> tuple[np.ndarray, dict]:
    """bool [len(models), n]: the examples each model loses, and the matched draws' fallback counts.

    The memorized removal is the same for every model. Each control model draws its own removal set of the
    same size (from its own stream, so model k's draw does not depend on K): an interval over models then
    covers the randomness of the control's draw, not only that of training.
    """
    n = len(g_train)
    removed = np.zeros((len(models), n), bool)
    fallback = {"subgroup": 0, "class": 0, "any": 0}
    for row, k in enumerate(models):
        if kind == "memorized":
            removed[row, memorized] = True
            continue
        rng = np.random.default_rng(np.random.SeedSequence(
            [seed, plan.STUDY_STREAMS["utility"], int(round(threshold * 1e6)), KINDS.index(kind), k]))
        if kind == "random":
            removed[row, rng.choice(candidates, size=len(memorized), replace=False)] = True
        else:
            chosen, fb = matched_removal(memorized, g_train, y_train, candidates, rng)
            removed[row, chosen] = True
            fallback = {key: fallback[key] + fb[key] for key in fallback}
    return removed, fallback


def high_influence(masks: np.ndarray, test_correct: np.ndarray, infl_threshold: float) -> np.ndarray:
    """bool [n, m]: infl(i, j) >= infl_threshold (streamed in blocks; undefined influence counts as low)."""
    return np.concatenate([np.nan_to_num(infl, nan=-np.inf) >= infl_threshold
                           for _, infl in memorization.influence_blocks(masks, test_correct)], axis=0)


def influenced_test(high: np.ndarray, removed: np.ndarray) -> np.ndarray:
    """bool [K, m]: test examples on which some example removed from model k has high influence."""
    return (np.asarray(removed, np.float32) @ high.astype(np.float32)) > 0


# -- training --------------------------------------------------------------------------------

def _cell_name(kind: str, threshold: float | None, variant: str) -> str:
    return f"{REFERENCE}-{variant}" if threshold is None else f"t{threshold:g}-{kind}-{variant}"


def run_utility(store: RunStore, out: str | Path, *, thresholds: list[float], models: int = 100,
                config: Config | None = None, progress: bool = True, ray_address: str | None = None) -> dict:
    """Train (or resume) every cell; returns the study: settings, influence, and each cell's arrays.

    ``config``: the run's config with other execution settings (device, workers, threads)."""
    cfg = store.config() if config is None else config
    if models < 2:
        raise UsageError(f"--models must be >= 2, got {models}")
    execution.set_threads(cfg.threads)
    ds = load_dataset(cfg)
    data = store.data()
    if not (np.array_equal(data["y_train"], ds.y_train) and np.array_equal(data["g_train"], ds.g_train)):
        raise UsageError(f"{store.root}: stored training data differ from the data its config generates")
    study_store = RunStore(out)
    meta_path = study_store.root / "utility.json"
    # the run's stored hash (not a recomputed one) identifies it even after new config keys appear
    settings = {"run_hash": store.meta().get("hash"), "thresholds": [float(t) for t in thresholds],
                "models": int(models)}
    masks = store.masks()
    np_arrays = store.variant_arrays("nonprivate")
    candidates = np.flatnonzero(~ds.is_canary)       # canaries stay in every training set
    if meta_path.exists():
        meta = read_json(meta_path)
        if {k: meta.get(k) for k in settings} != settings:
            raise UsageError(f"{study_store.root} holds a utility study with other settings; use another --out "
                             "or the same settings to resume it")
    else:
        mem = memorization.memorization(masks, np_arrays["train_correct"]).mem
        mem = np.nan_to_num(mem, nan=-np.inf)            # never out (or never in): not removable as memorized
        sets = memorized_sets(mem, candidates, thresholds)
        if not sets:
            raise UsageError(f"no training example reaches memorization {min(thresholds):g} "
                             f"(largest: {np.max(mem):.3f}); lower --thresholds")
        for s in sets:   # the matched control draws each replacement from the examples that stay
            if 2 * len(s["memorized"]) > len(candidates):
                raise UsageError(f"--thresholds {s['threshold']:g}: {len(s['memorized'])} of {len(candidates)} "
                                 "examples reach it, too many to match with as many others; use a higher threshold")
        study_store.root.mkdir(parents=True, exist_ok=True)
        atomic_write_json(meta_path, {**settings, "run": str(store.root), "run_config": cfg.to_dict(),
                                      "infl_threshold": cfg.infl_threshold,
                                      "removals": sets, "skipped_thresholds": [
                                          t for t in thresholds if t not in [s["threshold"] for s in sets]]})
        meta = read_json(meta_path)
    high = high_influence(masks, np_arrays["test_correct"], cfg.infl_threshold)

    x_train = plan.as_inputs(ds.x_train)
    inputs = {"x_train": x_train, "y_train": ds.y_train, "evals": {"test": (plan.as_inputs(ds.x_test), ds.y_test)}}
    jobs: list[tuple[float | None, str, np.ndarray]] = [(None, REFERENCE, np.zeros(0, np.int64))]
    jobs += [(s["threshold"], kind, np.array(s["memorized"], np.int64)) for s in meta["removals"] for kind in KINDS]
    # the study's models train from a seed of its own, so they are not the run's models
    study = cfg.replace(seed=plan.study_seed(cfg, "utility"))
    cells, rows = [], []
    for thr, kind, memorized in jobs:
        if thr is None:   # the reference cell
            removed, fallback = np.zeros((models, ds.n_train), bool), None
        else:
            removed, fallback = removal_masks(kind, memorized, g_train=ds.g_train, y_train=ds.y_train,
                                              candidates=candidates, models=range(models), seed=cfg.seed,
                                              threshold=thr)
        n_keep = ds.n_train - len(memorized)
        for variant, eps in cfg.variants:
            name = _cell_name(kind, thr, variant)
            cell_plan = study_store.plan(name)
            if cell_plan is None:
                sched = plan.schedule(cfg, n_keep, expected=float(n_keep))
                cell_plan = {**plan.plan_variant(cfg, eps, sched), "n_train": int(n_keep)}
                study_store.save_plan(name, cell_plan)

            def stored(unit: ModelRange, arrays: dict, removed=removed) -> dict:
                return {**arrays, "removed": removed[unit.start:unit.stop]}

            # every model trains on the whole training set minus its removed examples; the masks keep the
            # example positions, so a model shares its reference partner's initialisation and batch coins
            cells.append(units.Cell(name=name, spec=plan.train_spec(cfg, ds, cell_plan), models=models,
                                    seed=plan.run_seed(study), noise_seed=plan.noise_seed(study, variant),
                                    engine=cfg.engine, masks=~removed, stored=stored))
            rows.append({"threshold": thr, "kind": kind, "variant": variant, "epsilon": eps,
                         "removed": int(len(memorized)), "fallback": fallback, "memorized": memorized})
    units.train_units(study_store, cells, inputs, cfg, ray_address=ray_address, progress=progress, desc="utility")
    result: dict[str, Any] = {"meta": meta, "high_influence": high, "cells": []}
    for cell, row in zip(cells, rows):
        arrays = study_store.variant_arrays(cell.name)
        result["cells"].append({**row, "plan": study_store.plan(cell.name),
                                "removed_mask": arrays["removed"].astype(bool),
                                "test_correct": arrays["test_correct"].astype(bool)})
    return result


# -- tables and figure -----------------------------------------------------------------------

def model_interval(values: np.ndarray, prefix: str, level: float = 0.95) -> dict:
    """Mean over models with a t-interval over models; models where the value is undefined (NaN) are left out.

    For per-model quantities with no test examples behind them (a bound, a count) or with a different set
    of test examples per model."""
    values = np.asarray(values, np.float64)
    values = values[np.isfinite(values)]
    k = values.size
    if k < 2:
        return {prefix: float(values.mean()) if k else np.nan, f"{prefix}_lo": np.nan, f"{prefix}_hi": np.nan}
    half = stats.t.ppf(0.5 + level / 2, df=k - 1) * values.std(ddof=1) / np.sqrt(k)
    mean = float(values.mean())
    return {prefix: mean, f"{prefix}_lo": mean - half, f"{prefix}_hi": mean + half}


def crossed_interval(values: np.ndarray, prefix: str, value_range: tuple[float, float]) -> dict:
    """Mean of values[k, j] over models and test examples, with the crossed interval (both noise sources)."""
    values = np.asarray(values, np.float32)
    if values.shape[1] == 0:
        return {prefix: np.nan, f"{prefix}_lo": np.nan, f"{prefix}_hi": np.nan}
    mean, lo, hi = crossed_mean_ci(values, np.zeros(values.shape[1], np.int64), 1, value_range=value_range)
    return {prefix: float(mean[0]), f"{prefix}_lo": float(lo[0]), f"{prefix}_hi": float(hi[0])}


def _mean_on(correct: np.ndarray, subset: np.ndarray) -> np.ndarray:
    """Per model k: accuracy on the test examples subset[k] (NaN where the subset is empty)."""
    subset = np.broadcast_to(subset, correct.shape)
    count = subset.sum(1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(count > 0, (correct & subset).sum(1) / np.maximum(count, 1), np.nan)


def utility_table(study: dict) -> pd.DataFrame:
    """One row per (variant, threshold, removal), means with 95% intervals:

    - ``test_acc`` and ``drop`` = accuracy of the full-data model k minus that of model k of the cell
      (paired: same initialisation and batch coins), over models and test examples, with the crossed
      interval (which models were trained and which test examples were drawn);
    - ``drop_infl_mem``: the same on the test examples the memorized set influences (infl >= the run's
      infl_threshold, non-private estimates), for every removal, so that the three removals are compared on
      the same test examples;
    - ``drop_infl_own``: on the test examples that the examples removed from model k influence
      (``infl_test_own``: their mean number); these differ between control models, so the interval is over
      models only.
    """
    high = study["high_influence"]
    ref = {c["variant"]: c["test_correct"] for c in study["cells"] if c["kind"] == REFERENCE}
    rows = []
    for c in study["cells"]:
        correct = c["test_correct"]
        base = ref[c["variant"]]
        k = min(len(correct), len(base))
        correct, base = correct[:k], base[:k]
        row = {"variant": c["variant"], "epsilon": c["epsilon"], "threshold": c["threshold"], "removal": c["kind"],
               "removed": c["removed"], "n_train": c["plan"].get("n_train"),
               "noise_multiplier": c["plan"].get("noise_multiplier"), "models": k}
        row.update(crossed_interval(correct, "test_acc", (0.0, 1.0)))
        paired = base.astype(np.float32) - correct
        row.update(crossed_interval(paired, "drop", (-1.0, 1.0)))
        fb = c["fallback"]
        row["matched_in_subgroup"] = (fb["subgroup"] / max(1, sum(fb.values()))) if c["kind"] == "matched" else np.nan
        if c["kind"] == REFERENCE:
            own = np.zeros(correct.shape, bool)
            mem_tests = np.zeros(0, np.int64)
        else:
            own = influenced_test(high, c["removed_mask"][:k])
            mem_removed = np.zeros(high.shape[0], bool)
            mem_removed[c["memorized"]] = True
            mem_tests = np.flatnonzero(influenced_test(high, mem_removed[None, :])[0])
        row["infl_test_own"] = float(own.sum(1).mean()) if c["kind"] != REFERENCE else np.nan
        on_cell, on_base = _mean_on(correct, own), _mean_on(base, own)
        row.update(model_interval(on_cell, "acc_infl_own"))
        row.update(model_interval(on_base - on_cell, "drop_infl_own"))
        row["infl_test_mem"] = len(mem_tests) if c["kind"] != REFERENCE else np.nan
        row.update(crossed_interval(correct[:, mem_tests], "acc_infl_mem", (0.0, 1.0)))
        row.update(crossed_interval(paired[:, mem_tests], "drop_infl_mem", (-1.0, 1.0)))
        rows.append(row)
    table = pd.DataFrame(rows)
    order = {k: i for i, k in enumerate((REFERENCE,) + KINDS)}
    variants = list(dict.fromkeys(table["variant"]))
    table["_v"] = table["variant"].map(variants.index)
    table["_k"] = table["removal"].map(order)
    table = table.sort_values(["_v", "threshold", "_k"], na_position="first").drop(columns=["_v", "_k"])
    return table.reset_index(drop=True)


def _ci(row, col: str) -> str:
    if pd.isna(row[col]):
        return ""
    return f"{row[col]:.3f} [{row[f'{col}_lo']:.3f}, {row[f'{col}_hi']:.3f}]"


def display_table(table: pd.DataFrame) -> pd.DataFrame:
    """The columns a reader needs, intervals written as 'mean [lo, hi]'."""
    return pd.DataFrame({
        "variant": table["variant"], "mem >=": table["threshold"].map(lambda t: "" if pd.isna(t) else f"{t:g}"),
        "removal": table["removal"], "removed": table["removed"],
        "test acc": table.apply(lambda r: _ci(r, "test_acc"), axis=1),
        "drop": table.apply(lambda r: _ci(r, "drop"), axis=1),
        "influenced (own)": table["infl_test_own"].map(lambda v: "" if pd.isna(v) else f"{v:.0f}"),
        "drop on own influenced": table.apply(lambda r: _ci(r, "drop_infl_own"), axis=1),
        "drop on memorized' influenced": table.apply(lambda r: _ci(r, "drop_infl_mem"), axis=1)})


def markdown_summary(table: pd.DataFrame) -> str:
    return display_table(table).to_markdown(index=False) + "\n"


def write_report(table: pd.DataFrame, out: str | Path) -> None:
    """utility.{csv,parquet}, tables/utility.{md,tex} and figures/utility.{png,pdf}."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    from dpmem.bench.report.figures import save_figure
    from dpmem.bench.report.tables import write_frame
    from dpmem.bench.store.files import atomic_write_bytes
    out = Path(out)
    write_frame(table, out / "utility")
    shown = display_table(table)
    atomic_write_bytes(out / "tables" / "utility.md", markdown_summary(table).encode())
    atomic_write_bytes(out / "tables" / "utility.tex", shown.to_latex(
        index=False, escape=True, caption="Marginal utility of memorized examples: test accuracy drop (paired "
        "with the full-data models, 95% intervals over models) after removing the examples with memorization "
        "at or above the threshold, uniformly random examples, or subgroup-matched random examples.").encode())

    sns.set_theme(style="whitegrid", context="paper")
    variants = list(dict.fromkeys(table["variant"]))
    rows = table.loc[table["removal"] != REFERENCE]
    thresholds = sorted(rows["threshold"].unique())
    fig, axes = plt.subplots(2, len(variants), figsize=(3.3 * len(variants), 6.2), squeeze=False, sharey="row")
    width = 0.26
    for col, variant in enumerate(variants):
        for r, (metric, label) in enumerate((("drop", "drop in test accuracy"),
                                             ("drop_infl_mem", "drop on test examples\ninfluenced by memorized"))):
            ax = axes[r][col]
            for k, kind in enumerate(KINDS):
                sel = rows.loc[(rows["variant"] == variant) & (rows["removal"] == kind)].set_index("threshold")
                sel = sel.reindex(thresholds)
                x = np.arange(len(thresholds)) + (k - 1) * width
                ax.bar(x, sel[metric], width, color=f"C{k}", label=kind,
                       yerr=[sel[metric] - sel[f"{metric}_lo"], sel[f"{metric}_hi"] - sel[metric]], capsize=2)
            ax.axhline(0, color="k", lw=0.8)
            removed = (rows.loc[rows["variant"] == variant].drop_duplicates("threshold")
                       .set_index("threshold")["removed"])
            ax.set_xticks(np.arange(len(thresholds)), [f">= {t:g}\n({removed.get(t, 0)} ex.)" for t in thresholds])
            if r == 0:
                ax.set_title(variant)
            if r == 1:
                ax.set_xlabel("memorization threshold (examples removed)")
            if col == 0:
                ax.set_ylabel(label)
    axes[0][0].legend(fontsize=7, title="removed", title_fontsize=7)
    fig.tight_layout()
    save_figure(fig, out / "figures", "utility")

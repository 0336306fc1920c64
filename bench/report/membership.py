"""Membership inference on a stored run: per (variant, attack) metrics, per-example vulnerability,
TPR by subgroup frequency, and the DP region check (no training).

Every attack of ``bench.estimators.membership`` runs leave-one-model-out on each variant's stored
margins; the population of RMIA is the run's test examples. Pooled metrics use the real training
examples (canaries are left out of the ROC and the bins, and kept in the per-example table).

The DP region check (an ESTIMATE): for each DP variant and attack, at each FPR of ``REGION_FPRS``
the attack's TPR gets a one-sided lower bound from the bootstrap over target models; a point above
the (epsilon, delta) region max TPR = min(e^eps FPR + delta, 1 - e^-eps (1 - FPR - delta)) flags
the variant. The run's alpha is split (Bonferroni) over every (DP variant, attack, FPR) point, so
an honest run is flagged with probability about alpha at most, as far as the bootstrap's normal
approximation holds; pooled trials share models, so a flag is evidence, not a refutation.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from dpmem.bench.estimators import membership as mb
from dpmem.bench.estimators import memorization, subgroups
from dpmem.bench.store.run_store import RunStore
from dpmem.privacy.errors import UsageError

HEADLINE = "lira-online"
VULNERABILITY_FPR = 0.01
REGION_FPRS = (1e-4, 1e-3, 1e-2, 0.05, 0.1, 0.2, 0.3, 0.5)
TABLE_COLUMNS = ["variant", "epsilon", "attack", "auc", "auc_lo", "auc_hi", "tpr@1%", "tpr@1%_lo", "tpr@1%_hi",
                 "tpr@0.1%", "tpr@0.1%_lo", "tpr@0.1%_hi", "tpr@0.01%", "tpr@0.01%_lo", "tpr@0.01%_hi", "trials",
                 "in_trials", "out_trials", "models", "examples", "min_fpr", "bootstrap", "dp_region_flag",
                 "dp_region_fpr"]
TREND = ("TPR at 1% FPR of lira-online (the attack's global threshold) per subgroup, weighted least squares on "
         "log2(subgroup training frequency) weighted by in-trials; SE = HC1 robust + variance over models")


@dataclass(frozen=True, kw_only=True)
class MembershipAnalysis:
    table: pd.DataFrame               # one row per (variant, attack)
    examples: pd.DataFrame            # one row per (variant, training example)
    bins: pd.DataFrame                # one row per (variant, frequency bin): TPR at 1% FPR of HEADLINE
    trends: pd.DataFrame              # one row per variant: the slope per doubling of that TPR
    curves: dict = field(default_factory=dict)     # (variant, attack) -> (roc_fpr, roc_tpr)
    regions: dict = field(default_factory=dict)    # (variant, attack) -> RegionCheck (DP variants)
    claims: dict = field(default_factory=dict)     # variant -> (epsilon, delta) of DP variants
    seconds: float = 0.0

    def summary(self, variant: str) -> dict:
        """summary.json's membership entry of a variant: the headline attack and the baseline."""
        rows = self.table.loc[self.table["variant"] == variant].set_index("attack")
        head, base = rows.loc[HEADLINE], rows.loc["global"]
        trend = self.trends.loc[self.trends["variant"] == variant].iloc[0]
        out = {"attack": HEADLINE, "auc": head["auc"], "auc_lo": head["auc_lo"], "auc_hi": head["auc_hi"],
               "tpr@0.1%": head["tpr@0.1%"], "tpr@0.1%_lo": head["tpr@0.1%_lo"], "tpr@0.1%_hi": head["tpr@0.1%_hi"],
               "global_tpr@0.1%": base["tpr@0.1%"], "min_fpr": head["min_fpr"],
               "dp_region_flag": None if pd.isna(head["dp_region_flag"]) else bool(rows["dp_region_flag"].any()),
               "tpr@1%_slope": trend["slope"], "tpr@1%_slope_lo": trend["slope_lo"],
               "tpr@1%_slope_hi": trend["slope_hi"]}
        return {k: (None if isinstance(v, float) and not np.isfinite(v) else
                    v.item() if hasattr(v, "item") else v) for k, v in out.items()}


def _margins(store: RunStore, name: str) -> dict[str, np.ndarray]:
    arrays = store.variant_arrays(name)
    missing = [k for k in ("train_margin", "test_margin") if k not in arrays]
    if missing:
        raise UsageError(f"run {store.root}: variant {name!r} has no {' or '.join(m + '.npy' for m in missing)} "
                         "(a run stored before margins, or a trainer that returns only correctness); "
                         "membership inference needs margins")
    return arrays


def analyse_membership(store: RunStore, *, alpha: float | None = None, attacks=mb.ATTACKS, block: int = mb.BLOCK,
                       bootstrap: int = mb.BOOTSTRAP, seed: int | None = None) -> MembershipAnalysis:
    """Every attack on every finished variant of a run; a UsageError naming what is missing when the
    run has no margins or no example with enough in- and out-models."""
    import time
    t0 = time.perf_counter()
    if HEADLINE not in attacks or "global" not in attacks or set(attacks) - set(mb.ATTACKS):
        raise ValueError(f"attacks must be among {', '.join(mb.ATTACKS)} and include {HEADLINE} and global, "
                         f"got {attacks}")
    cfg = store.config()
    alpha = cfg.alpha if alpha is None else alpha
    seed = cfg.seed if seed is None else seed
    masks = store.masks()
    if masks is None:
        raise UsageError(f"run {store.root} has no masks.npy")
    data = store.data()
    g_train, is_canary = data["g_train"], data["is_canary"].astype(bool)
    real = ~is_canary
    usable = mb.attackable(masks)
    if not (usable & real).any():
        raise UsageError(f"run {store.root}: no training example has {mb.MIN_REFERENCES + 1} in- and "
                         f"{mb.MIN_REFERENCES + 1} out-models ({masks.shape[0]} models); membership inference "
                         "needs more models")
    n_sub = len(data["subgroup_label"])
    train_count = np.bincount(g_train[real], minlength=n_sub)
    labels = subgroups.frequency_bin(train_count)
    order = subgroups.bin_order(labels)
    bin_of_subgroup = np.array([order.index(b) for b in labels], np.int64)
    dp = [(n, t) for n, t in cfg.variants if t is not None]
    points = max(1, len(dp) * len(attacks) * len(REGION_FPRS))
    rows, examples, bins, trends, curves, regions, claims = [], [], [], [], {}, {}, {}
    fprs = tuple(sorted(set(mb.FPRS) | set(REGION_FPRS), reverse=True))
    for name, target in cfg.variants:
        arrays = _margins(store, name)
        plan = store.plan(name) or {}
        planned = plan.get("delta")
        delta = float(cfg.delta if planned is None else planned)
        mem = memorization.memorization(masks, arrays["train_correct"]).mem
        fits = mb.gaussian_fits(masks, arrays["train_margin"].astype(np.float64))
        ex = pd.DataFrame({"variant": name, "epsilon": target, "index": np.arange(len(g_train)),
                           "label": data["y_train"], "subgroup": g_train, "subgroup_count": train_count[g_train],
                           "freq_bin": labels[g_train], "is_canary": is_canary, "mem": mem, "attackable": usable,
                           **{f"margin_{k}": v for k, v in fits.items()}, "at_fpr": VULNERABILITY_FPR})
        if target is not None:
            claims[name] = (float(target), float(delta))
        for attack in attacks:
            scores = mb.attack_scores(attack, masks, arrays["train_margin"], population=arrays["test_margin"],
                                      block=block)
            met = mb.roc_metrics(scores, masks, use=real, fprs=fprs, bootstrap=bootstrap, seed=seed)
            curves[(name, attack)] = (met.roc_fpr, met.roc_tpr)
            row = {"variant": name, "epsilon": target, "attack": attack, **_three(met),
                   "examples": int((usable & real).sum()), "dp_region_flag": None, "dp_region_fpr": None}
            if target is not None:
                check = mb.region_check(met, epsilon=float(target), delta=float(delta), level=alpha / points)
                regions[(name, attack)] = check
                row["dp_region_flag"] = check.flagged
                row["dp_region_fpr"] = check.worst_fpr if check.flagged else None
            rows.append(row)
            threshold = met.thresholds[met.fprs.index(VULNERABILITY_FPR)]
            tpr, fpr = mb.example_rates(scores, masks, threshold)
            ex[f"{attack}_tpr"], ex[f"{attack}_fpr"] = tpr, fpr
            if attack == HEADLINE:
                b, t = _bins(scores, masks, threshold, g_train, real, bin_of_subgroup, order, train_count, n_sub,
                             bootstrap=bootstrap, seed=seed)
                bins.append(b.assign(variant=name, epsilon=target))
                trends.append({"variant": name, "epsilon": target, **t})
        examples.append(ex)
    table = pd.DataFrame(rows)
    table["dp_region_flag"] = table["dp_region_flag"].astype(object)
    table["dp_region_fpr"] = table["dp_region_fpr"].astype(float)
    bin_frame = pd.concat(bins, ignore_index=True)
    bin_frame = bin_frame[["variant", "epsilon"] + [c for c in bin_frame.columns if c not in ("variant", "epsilon")]]
    return MembershipAnalysis(table=table[TABLE_COLUMNS], examples=pd.concat(examples, ignore_index=True),
                              bins=bin_frame, trends=pd.DataFrame(trends), curves=curves, regions=regions,
                              claims=claims, seconds=time.perf_counter() - t0)


def _three(met: mb.AttackMetrics) -> dict:
    """The table's metrics: AUC and TPR at the three headline FPRs (the region's extra FPRs left out)."""
    row = met.row()
    keep = {f"tpr@{mb.fpr_label(f)}{s}" for f in mb.FPRS for s in ("", "_lo", "_hi")}
    return {k: v for k, v in row.items() if not k.startswith("tpr@") or k in keep}


def _bins(scores, masks, threshold, g_train, real, bin_of_subgroup, order, train_count, n_sub, *, bootstrap, seed):
    """TPR at the global threshold per frequency bin and its slope per doubling.

    The bin's interval counts both sources of noise, as the accuracy bins do: which models were
    trained (the standard deviation of a bootstrap over target models) and which examples the bin
    happened to get (the variance of the examples' own TPRs over the bin's examples), added in
    quadrature, 95% normal. The threshold is the attack's global one at 1% FPR, held fixed."""
    finite = np.isfinite(scores).all(0) & real
    groups = np.where(finite, g_train, n_sub)        # left-out examples go to a dropped extra group
    hits, trials = mb.per_model_group_tpr(scores, masks & finite, threshold, groups, n_sub + 1)
    hits, trials = hits[:, :n_sub], trials[:, :n_sub]
    n_bins = len(order)
    to_bin = np.zeros((n_sub, n_bins))
    to_bin[np.arange(n_sub), bin_of_subgroup] = 1.0
    bh, bt = hits @ to_bin, trials @ to_bin                  # [K, bins]
    k = scores.shape[0]
    w = np.random.default_rng(seed).multinomial(k, np.full(k, 1.0 / k), size=bootstrap).astype(np.float64)
    ex_tpr, _ = mb.example_rates(scores, masks, threshold)
    ex_bin = bin_of_subgroup[g_train]
    with np.errstate(divide="ignore", invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)     # a bin without in-trials (frequency 0)
        tpr = bh.sum(0) / bt.sum(0)
        se_models = np.nanstd((w @ bh) / (w @ bt), axis=0, ddof=1) if bootstrap > 1 else np.zeros(n_bins)
        n_ex = np.bincount(ex_bin[finite], minlength=n_bins).astype(float)
        mean_ex = np.bincount(ex_bin[finite], weights=ex_tpr[finite], minlength=n_bins) / n_ex
        ss_ex = np.bincount(ex_bin[finite], weights=(ex_tpr[finite] - mean_ex[ex_bin[finite]]) ** 2, minlength=n_bins)
        se_examples = np.sqrt(np.where(n_ex > 1, ss_ex / np.maximum(n_ex - 1, 1), 0.25) / n_ex)
        half = 1.959964 * np.hypot(se_models, se_examples)
        sub_tpr = hits.sum(0) / trials.sum(0)
        per_model = hits / trials
    frame = pd.DataFrame({"freq_bin": order, "subgroups": np.bincount(bin_of_subgroup, minlength=n_bins),
                          "train_examples": (to_bin * train_count[:, None]).sum(0).astype(np.int64),
                          "in_trials": bt.sum(0).astype(np.int64), "tpr@1%": tpr,
                          "tpr@1%_lo": np.clip(tpr - half, 0, 1), "tpr@1%_hi": np.clip(tpr + half, 0, 1),
                          "se_models": se_models, "se_examples": se_examples})
    trend = subgroups.wls_trend(sub_tpr, train_count, trials.sum(0), per_model=per_model)
    return frame, {"slope": trend.slope, "slope_lo": trend.lo, "slope_hi": trend.hi, "slope_se": trend.se,
                   "subgroups": trend.subgroups}


def membership_or_note(store: RunStore, **kwargs) -> tuple[MembershipAnalysis | None, str | None]:
    """The analysis, or None and the one-line reason (for `dpmem run` and `dpmem report`, where a run
    without margins is not a failure)."""
    try:
        return analyse_membership(store, **kwargs), None
    except UsageError as e:
        return None, f"membership inference skipped: {e}"

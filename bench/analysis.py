"""From stored per-model arrays to the benchmark's tables and summary (no training)."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from dpmem.bench import estimators, subgroups
from dpmem.bench.store import RunStore, read_json
from dpmem.privacy.audit import AuditResult, audit_variant


@dataclass(frozen=True, kw_only=True)
class Analysis:
    memorization: pd.DataFrame      # one row per (variant, training example)
    subgroups: pd.DataFrame         # one row per (variant, subgroup)
    bins: pd.DataFrame              # one row per (variant, frequency bin)
    pairs: pd.DataFrame             # high-memorization / high-influence pairs
    audits: dict[str, AuditResult]
    summary: dict = field(default_factory=dict)


def analyse(store: RunStore, *, claims: dict[str, float] | None = None, alpha: float | None = None,
            with_pairs: bool = True) -> Analysis:
    """Estimators, DP-bound audit and subgroup tables for every finished variant of a run.

    ``claims`` audits a variant against a budget it was not trained for (variant -> epsilon).
    """
    cfg = store.config()
    claims = claims or {}
    data = store.data()
    masks = store.masks()
    if masks is None:
        raise ValueError("run has no masks.npy")
    g_train, y_train, is_canary = data["g_train"], data["y_train"], data["is_canary"].astype(bool)
    n_sub = len(data["subgroup_label"])
    train_count = np.bincount(g_train[~is_canary], minlength=n_sub)
    record_path = store.root / "data" / "dataset.json"
    data_record = read_json(record_path) if record_path.exists() else {}
    mem_rows, sub_rows, pair_rows, audits, variants = [], [], [], {}, {}
    for name, target in cfg.variants:
        arrays = store.variant_arrays(name)
        plan = store.plan(name) or {}
        claimed = claims.get(name, target)
        delta = plan.get("delta") if plan.get("delta") is not None else cfg.delta
        audit, per_example = audit_variant(variant=name, masks=masks, correct=arrays["train_correct"],
                                           epsilon=claimed, delta=delta,
                                           alpha=cfg.alpha if alpha is None else alpha, sampling=cfg.sampling)
        audits[name] = audit
        mem = estimators.memorization(masks, arrays["train_correct"])
        frame = mem.frame()
        frame.insert(0, "variant", name)
        frame.insert(1, "epsilon", claimed)
        frame.insert(2, "index", np.arange(len(g_train)))
        frame.insert(3, "label", y_train)
        frame.insert(4, "subgroup", g_train)
        frame.insert(5, "subgroup_count", train_count[g_train])
        for col in ("bound", "violation", "eps_lb", "L_in", "U_out"):
            frame[col] = per_example[col].to_numpy()
        frame["is_canary"] = is_canary
        frame["label_noisy"] = data["label_noisy"].astype(bool)
        mem_rows.append(frame)
        sub_rows.append(subgroups.subgroup_table(
            variant=name, epsilon=claimed, correct_test=arrays["test_correct"], g_test=data["g_test"],
            subgroup_label=data["subgroup_label"], train_count=train_count, mem=mem.mem, g_train=g_train,
            is_canary=is_canary))
        if with_pairs:
            pairs = estimators.high_influence_pairs(masks, arrays["test_correct"], mem.mem,
                                                    mem_threshold=cfg.mem_threshold,
                                                    infl_threshold=cfg.infl_threshold)
            pairs.insert(0, "variant", name)
            pairs["train_subgroup"] = g_train[pairs["train_index"].to_numpy()]
            pairs["test_subgroup"] = data["g_test"][pairs["test_index"].to_numpy()]
            pairs["same_subgroup"] = pairs["train_subgroup"] == pairs["test_subgroup"]
            pair_rows.append(pairs)
        real = ~is_canary
        variants[name] = {
            "epsilon": claimed, "delta": plan.get("delta"), "noise_multiplier": plan.get("noise_multiplier"),
            "max_grad_norm": plan.get("max_grad_norm"), "sample_rate": plan.get("sample_rate"),
            "steps": plan.get("steps"), "accountant": plan.get("accountant"),
            "epsilon_reported": plan.get("epsilon_reported"), "trained_for_epsilon": target,
            "fault": plan.get("fault"),
            "engine": plan.get("engine"), "model": plan.get("model"), "trainer": plan.get("trainer"),
            "test_accuracy": float(arrays["test_correct"].mean()),
            "train_accuracy": float(arrays["train_correct"].mean()),
            "mean_mem": float(np.nanmean(mem.mem[real])),
            "mean_mem_se": float(np.nanmean(mem.se[real])),
            "high_mem_examples": int(np.sum(mem.mem[real] >= cfg.mem_threshold)),
            "violations": audit.violations, "eps_lb": audit.eps_lb, "power_eps": audit.power_eps,
            "audit_level": audit.level, "consistent": audit.consistent, "models": int(arrays["test_correct"].shape[0]),
            "high_influence_pairs": int(len(pair_rows[-1])) if with_pairs else None,
            "train_seconds": store.variant_record(name).get("train_seconds"),
        }
    memorization = pd.concat(mem_rows, ignore_index=True)
    sub = subgroups.add_accuracy_loss(pd.concat(sub_rows, ignore_index=True))
    bins = subgroups.bin_table(sub, memorization)
    pairs = pd.concat(pair_rows, ignore_index=True) if pair_rows else pd.DataFrame()
    summary = {"variants": variants, "run": {
        "config_hash": cfg.hash(), "dataset": cfg.dataset, "model": cfg.model, "trainer": cfg.trainer or None,
        "sampling": cfg.sampling, "subgroups": data_record.get("subgroups"),
        "data_fingerprint": data_record.get("fingerprint"),
        "q": cfg.q, "n_train": int(len(g_train)), "n_test": int(len(data["g_test"])),
        "n_subgroups": int(n_sub), "canaries": int(is_canary.sum()), "alpha": cfg.alpha if alpha is None else alpha,
        "versions": store.meta().get("versions", {})}}
    return Analysis(memorization=memorization, subgroups=sub, bins=bins, pairs=pairs, audits=audits,
                    summary=summary)

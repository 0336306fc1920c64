"""From stored per-model arrays to the benchmark's tables and summary (no training)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from dpmem.bench.estimators import findings, memorization, subgroups
from dpmem.bench.report import membership as membership_mod
from dpmem.bench.report import proxies as proxies_mod
from dpmem.bench.store.files import read_json
from dpmem.bench.store.run_store import CANARY_MASKS_FILE, RunStore
from dpmem.models.spec import expected_batch_sizes
from dpmem.privacy.audit import AuditResult, audit_variant
from dpmem.privacy.canary_audit import CanaryAudit, canary_audit, oracle_eps_lb
from dpmem.privacy.errors import UsageError
from dpmem.privacy.family import bonferroni_share
from dpmem.privacy.margin_audit import MIN_MODELS as MARGIN_MIN_MODELS
from dpmem.privacy.margin_audit import MarginAudit, margin_audit
from dpmem.privacy.one_run import ONE_RUN_MAX_MODELS, OneRunAudit, gdp_mu, one_run_audit
from dpmem.privacy.parametric import ENGINE_ASSUMPTION, ParametricBound, parametric_bound, trainer_update

INTERVAL_LEVEL = 0.95
INTERVALS = ("test_acc and acc_loss: 95% t-intervals over the K models and the test examples (crossed design, "
             "Satterthwaite df); acc_loss pairs the non-private and DP model with the same index")
TREND = ("weighted least-squares slope on log2(subgroup training frequency): acc_loss weighted by test count, "
         "mean_mem by covered training examples; SE = HC1 robust + variance over models; t(subgroups - 2) interval")


@dataclass(frozen=True, kw_only=True)
class Analysis:
    memorization: pd.DataFrame      # one row per (variant, training example)
    subgroups: pd.DataFrame         # one row per (variant, subgroup)
    bins: pd.DataFrame              # one row per (variant, frequency bin)
    pairs: pd.DataFrame             # high-influence pairs that pass false-discovery control
    audits: dict[str, AuditResult]
    summary: dict = field(default_factory=dict)
    canary_audits: dict[str, CanaryAudit] = field(default_factory=dict)   # runs with gradient canaries
    one_run_audits: dict[str, OneRunAudit] = field(default_factory=dict)  # canary runs of few models
    parametric: dict[str, ParametricBound] = field(default_factory=dict)  # DP variants of canary runs
    parametric_refusals: dict[str, str] = field(default_factory=dict)     # variant -> why it has no parametric bound
    margin_audits: dict[str, MarginAudit] = field(default_factory=dict)   # with margin=True: runs with margins
    membership: membership_mod.MembershipAnalysis | None = None          # LiRA, RMIA, ... (runs with margins)
    membership_note: str | None = None                                    # why membership inference was skipped
    proxies: proxies_mod.ProxyAnalysis | None = None                      # memorization proxies (report/proxies.py)


def audit_family(cfg, has_canaries: bool, *, parametric: bool = True, has_margins: bool = False,
                 trainer_updates: dict[str, str | None] | None = None) -> dict[str, list[str]]:
    """variant -> the audits one `dpmem check` reports for it (each one test of the family).

    Every variant gets the black-box audit, and, when asked for (``has_margins``: `dpmem check
    --margin-audit` on a run with stored margins) and with at least ``privacy.margin_audit.MIN_MODELS``
    models, the margin audit (a per-example threshold on the margin, rigorous;
    privacy/margin_audit.py). It is off by default: each test added shrinks every test's share of
    alpha, and on the default run the margin audit gained at epsilon 1 and 4 only (results/mia.md). With
    gradient canaries, each also gets one canary
    audit: the multi-model threshold test, or, with at most ONE_RUN_MAX_MODELS models, the
    one-run guessing game; and each DP variant gets the parametric bound (unless ``parametric``
    is off) when its update form is known: always for dpmem's engines, and for a user's trainer
    when ``trainer_updates[variant]`` is None (no reason to refuse: dpmem.canaries recorded
    torch.optim.SGD). The family depends on the config and the recorded update forms, never on
    the canary memberships or scores, so the Bonferroni split is fixed before the tests see data."""
    family = {}
    for name, target in cfg.variants:
        kinds = ["black-box"]
        if has_margins and cfg.models >= MARGIN_MIN_MODELS:
            kinds.append("margin")
        if has_canaries:
            kinds.append("one-run" if cfg.models <= ONE_RUN_MAX_MODELS else "gradient canary")
            known = not cfg.trainer or (trainer_updates or {}).get(name, "no update form") is None
            if parametric and target is not None and known:
                kinds.append("parametric")
        family[name] = kinds
    return family


def has_margins(store: RunStore) -> bool:
    """Whether every variant of the run stored its training margins."""
    return all((store.variant_dir(name) / "train_margin.npy").is_file() for name, _ in store.config().variants)


def analyse(store: RunStore, *, claims: dict[str, float] | None = None, alpha: float | None = None,
            with_pairs: bool = True, parametric: bool = True, membership: bool = False,
            margin: bool = False, proxies: bool = False) -> Analysis:
    """Estimators, DP-bound audit and subgroup tables for every finished variant of a run.

    ``claims`` audits a variant against a budget it was not trained for (variant -> epsilon).
    ``alpha`` (default: the config's) is family-wise over every audit of every variant
    (privacy/family.py): each (variant, audit kind) gets an equal share (``audit_family``).
    ``parametric``: also compute (and count) the parametric white-box bound of DP variants.
    ``membership``: also run the membership inference attacks (report/membership.py); a run
    without margins gets a note instead.
    ``margin``: also compute (and count) the margin audit (``audit_family``).
    ``proxies``: also compare the memorization proxies with mem (report/proxies.py; runs with margins
    and at least 4 models, else skipped).
    """
    cfg = store.config()
    alpha = cfg.alpha if alpha is None else alpha
    canary_masks = store.canary_masks()
    updates = {}
    if cfg.trainer and canary_masks is not None:
        updates = {name: trainer_update(store.variant_arrays(name).get("canary_update"))
                   for name, target in cfg.variants if target is not None}
    family = audit_family(cfg, canary_masks is not None, parametric=parametric,
                          has_margins=margin and has_margins(store),
                          trainer_updates={n: refusal for n, (_, refusal) in updates.items()})
    tests = sum(len(kinds) for kinds in family.values())
    share = bonferroni_share(alpha, tests)
    canary_audits, one_run_audits, parametric_bounds, parametric_refusals = {}, {}, {}, {}
    margin_audits = {}
    claims = claims or {}
    data = store.data()
    masks = store.masks()
    g_train, y_train, is_canary = data["g_train"], data["y_train"], data["is_canary"].astype(bool)
    n_sub = len(data["subgroup_label"])
    train_count = np.bincount(g_train[~is_canary], minlength=n_sub)
    record_path = store.root / "data" / "dataset.json"
    data_record = read_json(record_path) if record_path.exists() else {}
    real = ~is_canary
    mem_rows, sub_rows, bin_rows, pair_rows, audits, variants = [], [], [], [], {}, {}
    reference = store.variant_arrays(cfg.variants[0][0])["test_correct"]     # the non-private models
    for name, target in cfg.variants:
        arrays = store.variant_arrays(name)
        plan = store.plan(name) or {}
        claimed = claims.get(name, target)
        delta = float(plan["delta"]) if plan.get("delta") is not None else cfg.delta
        audit, per_example = audit_variant(variant=name, masks=masks, correct=arrays["train_correct"],
                                           epsilon=claimed, delta=delta,
                                           alpha=share, sampling=cfg.sampling)
        audits[name] = audit
        if "margin" in family[name]:
            margin_audits[name], _ = margin_audit(variant=name, masks=masks, margins=arrays["train_margin"],
                                                  epsilon=claimed, delta=delta, alpha=share, sampling=cfg.sampling)
        if canary_masks is not None:
            if "canary_score" not in arrays:
                raise UsageError(f"run {store.root} has {CANARY_MASKS_FILE} but variant {name!r} has no canary_score.npy")
            # theta_c times the model's expected batch size (the update's normaliser): the models' scores
            # then share one scale. B_k depends on the real-data masks only, never on canary memberships,
            # so the rescaled observations stay i.i.d. and every threshold test stays valid.
            batch_sizes = np.asarray(expected_batch_sizes(masks, plan["sample_rate"]), dtype=np.float64)
            scaled = arrays["canary_score"] * batch_sizes[:, None]
            if "one-run" in family[name]:
                one_run_audits[name] = one_run_audit(variant=name, scores=scaled, masks=canary_masks,
                                                     epsilon=claimed, delta=delta, alpha=share,
                                                     sample_rate=plan.get("sample_rate"))
            else:
                canary_audits[name] = canary_audit(variant=name, scores=scaled, masks=canary_masks,
                                                   epsilon=claimed, delta=delta, alpha=share)
            if "parametric" in family[name]:
                form, _ = updates.get(name, (None, None))
                update = (dict(lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, steps=plan["steps"],
                               assumption=ENGINE_ASSUMPTION) if form is None else form)
                parametric_bounds[name] = parametric_bound(
                    variant=name, scores=arrays["canary_score"], masks=canary_masks, batch_sizes=batch_sizes,
                    max_grad_norm=plan["max_grad_norm"], sample_rate=plan["sample_rate"],
                    epsilon=claimed, delta=delta, level=share, **update)
            elif name in updates and parametric:
                parametric_refusals[name] = str(updates[name][1])
        mem = memorization.memorization(masks, arrays["train_correct"])
        estimable = (mem.n_in > 0) & (mem.n_out > 0)
        found = findings.controlled_findings(
            masks, arrays["train_correct"], arrays["test_correct"] if with_pairs else None, eligible=real,
            mem_threshold=cfg.mem_threshold, infl_threshold=cfg.infl_threshold, fdr=cfg.fdr, seed=cfg.seed)
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
        frame["no_in_or_out"] = ~estimable
        frame["mem_z"] = np.nan
        frame.loc[found.examples["index"].to_numpy(), "mem_z"] = found.examples["mem_z"].to_numpy()
        frame["high_mem"] = False
        frame.loc[found.examples["index"].to_numpy(), "high_mem"] = found.examples["passes_fdr"].to_numpy()
        mem_rows.append(frame)
        tables: dict[str, Any] = dict(variant=name, epsilon=claimed, correct_test=arrays["test_correct"], g_test=data["g_test"],
                      train_count=train_count, mem=mem.mem, g_train=g_train, is_canary=is_canary,
                      reference_correct=None if name == cfg.variants[0][0] else reference)
        sub = subgroups.subgroup_table(subgroup_label=data["subgroup_label"], **tables)
        sub_rows.append(sub)
        bin_rows.append(subgroups.bin_table(**tables))
        if with_pairs:
            assert found.pairs is not None, "findings with influence pairs"
            pairs = found.pairs.loc[found.pairs["passes_fdr"]].drop(columns="passes_fdr").reset_index(drop=True)
            pairs["mem"] = mem.mem[pairs["train_index"].to_numpy()]
            pairs.insert(0, "variant", name)
            pairs["train_subgroup"] = g_train[pairs["train_index"].to_numpy()]
            pairs["test_subgroup"] = data["g_test"][pairs["test_index"].to_numpy()]
            pairs["same_subgroup"] = pairs["train_subgroup"] == pairs["test_subgroup"]
            pair_rows.append(pairs)
        if name == cfg.variants[0][0]:      # the reference loses nothing against itself
            loss_trend = subgroups.wls_trend(np.array([]), np.array([]), np.array([]))
        else:
            loss_per_model = subgroups.per_model_group_mean(
                reference.astype(np.float32) - arrays["test_correct"].astype(np.float32), data["g_test"], n_sub)
            loss_trend = subgroups.wls_trend(sub["acc_loss"].to_numpy(), train_count, sub["test_count"].to_numpy(),
                                             per_model=loss_per_model)
        mem_trend = subgroups.wls_trend(sub["mean_mem"].to_numpy(), train_count, sub["mem_examples"].to_numpy(),
                                        per_model=_per_model_mem(masks, arrays["train_correct"], mem, real & estimable,
                                                                 g_train, n_sub))
        covered = real & estimable
        variants[name] = {
            "epsilon": claimed, "delta": plan.get("delta"), "noise_multiplier": plan.get("noise_multiplier"),
            "max_grad_norm": plan.get("max_grad_norm"), "sample_rate": plan.get("sample_rate"),
            "steps": plan.get("steps"), "accountant": plan.get("accountant"),
            "epsilon_reported": plan.get("epsilon_reported"), "trained_for_epsilon": target,
            "fault": plan.get("fault"),
            "engine": plan.get("engine"), "model": plan.get("model"), "trainer": plan.get("trainer"),
            "test_accuracy": float(arrays["test_correct"].mean()),
            "train_accuracy": float(arrays["train_correct"].mean()),
            "mean_mem": float(np.mean(mem.mem[covered])) if covered.any() else None,
            "mean_mem_se": float(np.mean(mem.se[covered])) if covered.any() else None,
            "mean_mem_examples": int(covered.sum()),
            "examples_without_in_or_out": int((real & ~estimable).sum()),
            "high_mem_examples_raw": found.high_mem_examples_raw,
            "high_mem_examples": found.high_mem_examples,
            "expected_false_high_mem": found.expected_false_high_mem,
            "models_needed_high_mem": found.models_needed_high_mem,
            "violations": audit.violations, "eps_lb": audit.eps_lb, "power_eps": audit.power_eps,
            "audit_level": audit.level, "consistent": audit.consistent, "models": int(arrays["test_correct"].shape[0]),
            "high_influence_pairs_raw": found.high_influence_pairs_raw if with_pairs else None,
            "high_influence_pairs": found.high_influence_pairs if with_pairs else None,
            "expected_false_pairs": found.expected_false_pairs if with_pairs else None,
            "models_needed_pairs": found.models_needed_pairs if with_pairs else None,
            **_finite(loss_trend.to_dict("acc_loss")), **_finite(mem_trend.to_dict("mem")),
            "train_seconds": store.variant_record(name).get("train_seconds"),
            "canary_audit": canary_audits[name].to_dict() if name in canary_audits else None,
            "one_run_audit": one_run_audits[name].to_dict() if name in one_run_audits else None,
            "parametric_bound": parametric_bounds[name].to_dict() if name in parametric_bounds else None,
            "parametric_not_computed": parametric_refusals.get(name),
            "oracle_eps_lb": _oracle(canary_audits.get(name), claimed, delta, canary_masks),
            "margin_audit": margin_audits[name].to_dict() if name in margin_audits else None,
        }
    mem_table = pd.concat(mem_rows, ignore_index=True)
    sub = pd.concat(sub_rows, ignore_index=True)
    bins = pd.concat(bin_rows, ignore_index=True)
    pairs = pd.concat(pair_rows, ignore_index=True) if pair_rows else pd.DataFrame()
    summary = {"variants": variants, "run": {
        "config_hash": cfg.hash(), "dataset": cfg.dataset, "model": cfg.model, "trainer": cfg.trainer or None,
        "sampling": cfg.sampling, "subgroups": data_record.get("subgroups"),
        "data_fingerprint": data_record.get("fingerprint"),
        "q": cfg.q, "n_train": int(len(g_train)), "n_test": int(len(data["g_test"])),
        "n_subgroups": int(n_sub), "canaries": int(is_canary.sum()), "alpha": alpha, "audit_tests": tests,
        "alpha_per_test": share,
        "audit_family": family,
        "gradient_canaries": 0 if canary_masks is None else int(canary_masks.shape[1]),
        "fdr": cfg.fdr, "null_permutations": findings.NULL_PERMUTATIONS, "interval_level": INTERVAL_LEVEL,
        "intervals": INTERVALS, "trend": TREND,
        "versions": store.meta().get("versions", {})}}
    mia, note = membership_mod.membership_or_note(store, alpha=alpha) if membership else (None, None)
    if mia is not None:
        for name in variants:
            variants[name]["membership"] = mia.summary(name)
        summary["run"]["membership_trend"] = membership_mod.TREND
    if note is not None:
        summary["run"]["membership_note"] = note
    proxy_analysis = None
    if proxies and has_margins(store) and masks.shape[0] >= 4:
        proxy_analysis = proxies_mod.analyse_proxies(store)
        if proxy_analysis.notes:
            summary["run"]["proxies_notes"] = proxy_analysis.notes
    return Analysis(memorization=mem_table, subgroups=sub, bins=bins, pairs=pairs, audits=audits,
                    summary=summary, canary_audits=canary_audits, one_run_audits=one_run_audits,
                    parametric=parametric_bounds, parametric_refusals=parametric_refusals,
                    margin_audits=margin_audits, membership=mia, membership_note=note, proxies=proxy_analysis)


def _oracle(audit: CanaryAudit | None, claimed: float | None, delta: float,
            canary_masks: np.ndarray | None) -> float | None:
    """The oracle single-threshold reference of a canary audit: the best bound any one threshold,
    known in advance and tested on ALL the run's observations at the audit's level, gives for
    Gaussian scores at the claimed epsilon (privacy/canary_audit.py ``oracle_eps_lb``)."""
    if audit is None or claimed is None or canary_masks is None:
        return None
    n_in, n_out = int(canary_masks.sum()), int((~canary_masks).sum())
    return oracle_eps_lb(n_in, n_out, gdp_mu(float(claimed), delta), delta=delta, level=audit.alpha / 2)


def audit_failures(result) -> list[str]:
    """Every claim refuted by an audit of ``result`` (an analysis.Analysis): the gate's failures."""
    failures = [f"{a.variant}: {a.violations} example(s) violate the ({a.epsilon_tested:g}, {a.delta_tested:g}) "
                f"bound; eps_lb = {a.eps_lb:.3f} > claimed {a.epsilon_claimed:g}"
                for a in result.audits.values() if not a.consistent]
    failures += [f"{c.variant}: gradient canaries refute the claim: eps_lb = {c.eps_lb:.3f} > claimed "
                 f"{c.epsilon_claimed:g} (TPR >= {c.tpr_lo:.4f}, FPR <= {c.fpr_hi:.2e} over {c.evaluation_models} "
                 f"models x {c.canaries} canaries)"
                 for c in result.canary_audits.values() if not c.consistent]
    failures += [f"{o.variant}: the one-run audit refutes the claim: eps_lb = {o.eps_lb:.3f} > claimed "
                 f"{o.epsilon_claimed:g} ({o.canaries} canaries over {o.models} model(s))"
                 for o in getattr(result, "one_run_audits", {}).values() if not o.consistent]
    failures += [f"{p.variant}: the parametric bound refutes the claim: eps_lb = "
                 f"{'inf' if p.eps_lb is None or p.eps_lb == float('inf') else format(p.eps_lb, '.3f')} > claimed "
                 f"{p.epsilon_claimed:g} (effective noise multiplier <= {p.noise_multiplier_hi:.4g} per sensitivity "
                 f">= {p.sensitivity_lo:.4g}; {p.kind})"
                 for p in getattr(result, "parametric", {}).values() if not p.consistent]
    failures += [f"{m.variant}: the margin audit refutes the claim: {m.violations} example(s) violate the "
                 f"({m.epsilon_tested:g}, {m.delta_tested:g}) bound; eps_lb = {m.eps_lb:.3f} > claimed {m.epsilon_claimed:g}"
                 for m in getattr(result, "margin_audits", {}).values() if not m.consistent]
    return failures


def _finite(d: dict) -> dict:
    """NaN becomes None, so summary.json stays valid JSON."""
    return {k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in d.items()}


def _per_model_mem(masks: np.ndarray, correct: np.ndarray, mem: memorization.Memorization, use: np.ndarray,
                   g_train: np.ndarray, n_sub: int) -> np.ndarray:
    """[K, G]: per-model terms whose mean over models is each subgroup's mean memorization.

    mem(i) = sum_k correct[k, i] (masks[k, i] / n_in(i) - (1 - masks[k, i]) / n_out(i)), so K times the
    k-th term, averaged over the subgroup's examples, has the subgroup's mean memorization as its mean.
    """
    idx = np.flatnonzero(use)
    k = masks.shape[0]
    m, c = masks[:, idx], correct[:, idx]
    terms = c * np.where(m, (k / mem.n_in[idx]).astype(np.float32), (-k / mem.n_out[idx]).astype(np.float32))
    return subgroups.per_model_group_mean(terms, g_train[idx], n_sub)

"""dpmem: what neural networks memorize, and what differential privacy costs.

The public Python API (everything else is private by convention)::

    import dpmem

    run = dpmem.run("bench/configs/ci.toml", out="runs/ci", models=64)   # or a dict, or a Config
    run.summary["variants"]["dp-eps1"]["eps_lb"]
    run.memorization          # DataFrame: one row per (variant, training example)
    run.subgroups             # DataFrame: one row per (variant, subgroup)
    run.frequency_bins        # DataFrame: one row per (variant, frequency bin)
    run.audit                 # DataFrame: one row per variant, the DP-bound audit
    run.gallery("memorized", "nonprivate")   # the examples a gallery shows: indices, scores, intervals

    again = dpmem.open_run("runs/ci")                       # a finished run, no training
    mem = dpmem.memorization(masks, correct)                # from your own [K, n] arrays
    infl = dpmem.influence(masks, correct_test)             # [n, m]
    verdict, per_example = dpmem.audit(masks, correct, epsilon=1.0, delta=1e-5, alpha=0.05)
    run.mia, run.mia_examples                               # membership inference: per attack, per example
    table = dpmem.mia(masks, margins, population=test_margins)   # LiRA / RMIA / global on your arrays
    run.proxies                                             # memorization proxies against mem, per variant
    table = dpmem.proxies(masks, correct, margins, loss_sum=...)   # the same on your own arrays

    from dpmem import canaries    # gradient canaries inside your own Opacus loop (trainer protocol)

The repository's folders install as ``dpmem.bench`` (data, pipeline, store, estimators, reports,
the command line), ``dpmem.models`` (architectures, engines, the trainer protocol) and
``dpmem.privacy`` (accounting, bounds, audits, planted faults).
"""
from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

from dpmem.bench.config import Config
from dpmem.bench.config import load as _load
from dpmem.privacy.errors import ConfigError, UsageError
from dpmem.privacy.release import VERSION

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

__version__ = VERSION
__all__ = ["Config", "ConfigError", "Run", "UsageError", "audit", "canaries", "influence", "load_config",
           "memorization", "mia", "mia_scores", "open_run", "proxies", "run"]


def __getattr__(name: str):
    """``dpmem.canaries`` (models/canaries.py: gradient canaries in your own Opacus loop), imported on
    first use so that ``import dpmem`` stays free of torch."""
    if name == "canaries":
        import importlib
        return importlib.import_module("dpmem.models.canaries")
    raise AttributeError(f"module 'dpmem' has no attribute {name!r}")


def load_config(config: str | Path | dict | Config | None = None, **overrides) -> Config:
    """A validated ``Config`` from a TOML/YAML/JSON file, a dict or a Config, with ``overrides``
    (the config keys of ``dpmem run``, e.g. ``models=64, epsilons=(1, 4)``) applied on top."""
    if isinstance(config, Config):
        return _load(None, overrides, base=config) if overrides else config
    if isinstance(config, dict):
        return _load(None, {**config, **overrides})
    if config is not None and not isinstance(config, (str, Path)):
        raise UsageError(f"config: expected a file path (str or Path), a dict, a Config or None, got {config!r}")
    return _load(config, overrides)


class Run:
    """A run directory: its config, summary and tables, read lazily from what is stored."""

    def __init__(self, path: str | Path):
        if not isinstance(path, (str, Path)):
            raise UsageError(f"path: expected a run directory (str or Path), got {path!r}")
        from dpmem.bench.store.run_store import RunStore
        self._store = RunStore.open(path)
        self.path = self._store.root
        """The run directory."""

    def __repr__(self) -> str:
        return f"dpmem.Run({str(self.path)!r})"

    @cached_property
    def config(self) -> Config:
        """The run's validated config, as stored in its config.json."""
        return self._store.config()

    @cached_property
    def _analysis(self):
        from dpmem.bench.report import analysis
        return analysis.analyse(self._store, with_pairs=False)

    def _table(self, name: str, fallback: str) -> pd.DataFrame:
        import pandas as pd
        stored = self.path / f"{name}.parquet"
        return pd.read_parquet(stored) if stored.is_file() else getattr(self._analysis, fallback)

    @cached_property
    def summary(self) -> dict:
        """summary.json: per variant epsilon, noise, engine, accuracy, memorization, audit; the run's provenance."""
        from dpmem.bench.store.files import read_json
        stored = self.path / "summary.json"
        return read_json(stored) if stored.is_file() else self._analysis.summary

    @cached_property
    def memorization(self) -> pd.DataFrame:
        """One row per (variant, training example): p_in, p_out, n_in, n_out, mem, mem_se, bound, eps_lb, ..."""
        return self._table("memorization", "memorization")

    @cached_property
    def subgroups(self) -> pd.DataFrame:
        """One row per (variant, subgroup): train/test counts, test accuracy with its interval, acc_loss, mean_mem."""
        return self._table("subgroups", "subgroups")

    @cached_property
    def frequency_bins(self) -> pd.DataFrame:
        """One row per (variant, training-frequency bin 1, 2-3, 4-7, ...)."""
        return self._table("frequency_bins", "bins")

    @cached_property
    def _membership(self):
        from dpmem.bench.report import membership
        return membership.analyse_membership(self._store)

    @cached_property
    def mia(self) -> pd.DataFrame:
        """One row per (variant, attack): AUC and TPR at FPR 1%, 0.1%, 0.01% with 95% intervals over target
        models, trials, the smallest resolvable FPR, the DP region flag (an estimate)."""
        import pandas as pd
        stored = self.path / "mia.parquet"
        return pd.read_parquet(stored) if stored.is_file() else self._membership.table

    @cached_property
    def mia_examples(self) -> pd.DataFrame:
        """One row per (variant, training example): each attack's TPR and FPR at its 1%-FPR threshold,
        the margin's in/out fits, mem, subgroup and frequency bin."""
        import pandas as pd
        stored = self.path / "mia_examples.parquet"
        return pd.read_parquet(stored) if stored.is_file() else self._membership.examples

    @cached_property
    def proxies(self) -> pd.DataFrame:
        """One row per (variant, memorization proxy): Spearman and Pearson correlation with mem and
        precision at its top 5%, with 95% bootstrap intervals over examples (bench/estimators/proxies.py)."""
        import pandas as pd
        stored = self.path / "proxies.parquet"
        if stored.is_file():
            return pd.read_parquet(stored)
        from dpmem.bench.report import proxies
        return proxies.analyse_proxies(self._store).table

    @cached_property
    def audit(self) -> pd.DataFrame:
        """One row per variant: the claim tested, violations, eps_lb, power_eps, consistent."""
        import pandas as pd
        return pd.DataFrame([a.to_dict() for a in self._analysis.audits.values()])

    def gallery(self, kind: str, variant: str, *, rows: int = 8, beside: int = 3) -> pd.DataFrame:
        """The examples a gallery of this run shows, as a DataFrame (draw your own from it).

        ``kind``: ``"memorized"`` (training examples with the highest memorization, each followed by
        ``beside`` typical examples of its class: index, label, subgroup, mem, mem_lo, mem_hi, ...),
        ``"pairs"`` (high-influence pairs that passed false-discovery control: train_index,
        test_index, infl, infl_lo, infl_hi, z, same_subgroup, ...) or ``"hardest_dp"`` (for a DP
        variant: test examples with the largest accuracy loss against the non-private models, each
        followed by the easiest of its class: test_index, acc_nonprivate, acc_dp, acc_loss,
        acc_loss_lo, acc_loss_hi, ...). Intervals are 95% Newcombe intervals."""
        import pandas as pd

        from dpmem.bench.report import gallery
        pairs = None
        if kind == "pairs":
            stored = self.path / "influence_pairs.parquet"
            if stored.is_file():
                pairs = pd.read_parquet(stored)
            else:
                from dpmem.bench.report import analysis
                pairs = analysis.analyse(self._store).pairs
        return gallery.select(kind, variant, store=self._store,
                              memorization=self.memorization if kind == "memorized" else None,
                              pairs=pairs, rows=rows, beside=beside)


def run(config: str | Path | dict | Config | None = None, *, out: str | Path, **overrides) -> Run:
    """Train (or resume) a benchmark into ``out``, write its tables, figures, galleries and
    report.html, and open it.

    ``config``: a config file, a dict of config keys or a ``Config`` (None: the defaults);
    ``overrides``: config keys on top. A bad value raises ``dpmem.ConfigError``
    naming the field before anything is written, as ``dpmem run`` does."""
    from dpmem.bench import report
    from dpmem.bench.report import analysis, page
    from dpmem.bench.run import pipeline
    from dpmem.bench.store.run_store import RunStore
    if not isinstance(out, (str, Path)):
        raise UsageError(f"out: expected a run directory (str or Path), got {out!r}")
    cfg = load_config(config, **overrides)
    ds, engine = pipeline.check_inputs(cfg)
    # the lock is the directory's while this call writes it, not until the process exits
    with RunStore.create_or_resume(out, cfg) as store:
        pipeline.run(store, cfg, progress=False, ds=ds, engine=engine)
        result = analysis.analyse(store, membership=True)
        report.write_all(result, store.root)
        page.write_report_page(result, store, store.root, ds=ds)
    return Run(store.root)


def open_run(path: str | Path) -> Run:
    """Open a run directory written by ``dpmem run`` or ``dpmem.run`` (finished variants only)."""
    return Run(path)


def memorization(masks: np.ndarray, correct: np.ndarray) -> pd.DataFrame:
    """Feldman & Zhang's subset-sampling memorization from bool ``masks`` [K, n] (model k trained on
    example i) and ``correct`` [K, n] (bool or 0/1 integers; floats and NaN are refused with a
    ValueError naming the argument): one row per example with p_in, p_out, n_in, n_out, mem and its
    standard error mem_se. Masks that leave no example both in and out of some models are refused."""
    from dpmem.bench.estimators import memorization
    masks, correct = memorization.checked_pair(masks, correct, "correct", same_n=True)
    _something_compared(masks)
    return memorization.memorization(masks, correct).frame()


def _something_compared(masks: np.ndarray) -> None:
    """A ValueError when no example has both in- and out-models: every estimate would be NaN."""
    from dpmem.bench.estimators import memorization
    if not memorization.comparable(masks).any():
        raise ValueError("masks: every example is in all models or in none, so no in/out comparison "
                         "is possible (each model must leave out some examples and train on others)")


def influence(masks: np.ndarray, correct_test: np.ndarray) -> np.ndarray:
    """infl[i, j] = P(test example j correct | i trained on) - P(... | i not), float [n, m], from
    ``masks`` [K, n] and ``correct_test`` [K, m] (bool or 0/1; a ValueError naming the argument
    otherwise). Rows of examples in every model or in none are NaN."""
    from dpmem.bench.estimators import memorization
    masks, correct_test = memorization.checked_pair(masks, correct_test, "correct_test", same_n=False)
    _something_compared(masks)
    return memorization.influence(masks, correct_test)


def audit(masks: np.ndarray, correct: np.ndarray, *, epsilon: float | None, delta: float | None,
          alpha: float = 0.05, sampling: str = "bernoulli"):
    """Test per-example in/out correctness against an (epsilon, delta)-DP claim.

    Returns ``(verdict, per_example)``: the ``AuditResult`` (violations, eps_lb, power_eps,
    consistent, ...) and a DataFrame with L_in, U_out, bound, violation and eps_lb per example.
    ``sampling`` is how the masks were drawn ("bernoulli", "balanced": add/remove adjacency;
    "fixed": replace-one). ``alpha`` is family-wise over the examples."""
    from dpmem.bench.estimators import memorization
    from dpmem.privacy.audit import audit_variant
    masks, correct = memorization.checked_pair(masks, correct, "correct", same_n=True)
    _something_compared(masks)   # else "consistent" would mean "tested nothing"
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    return audit_variant(variant="audit", masks=masks, correct=correct, epsilon=epsilon, delta=delta,
                         alpha=alpha, sampling=sampling)


def mia_scores(masks: np.ndarray, scores: np.ndarray, attack: str = "lira-online", *,
               population: np.ndarray | None = None, block: int = 1024) -> np.ndarray:
    """float [K, n]: each model's membership score on each example, leave-one-model-out (the other
    K - 1 models are the references). ``masks`` bool [K, n], ``scores`` [K, n] (margins: true-label
    logit minus the largest other logit), ``population`` [K, m] scores on examples no model trained
    on (``attack="rmia"`` only). ``attack``: "lira-online", "lira-offline", "lira-fixed", "rmia" or
    "global". NaN where an example lacks 2 in- and 2 out-reference models. A ValueError names a bad
    argument."""
    from dpmem.bench.estimators import membership
    return membership.attack_scores(attack, masks, scores, population=population, block=block)


def mia(masks: np.ndarray, scores: np.ndarray, *, population: np.ndarray | None = None,
        attacks: tuple[str, ...] | None = None, epsilon: float | None = None, delta: float = 0.0,
        alpha: float = 0.05, bootstrap: int = 1000, seed: int = 0) -> pd.DataFrame:
    """One row per attack on your own arrays: AUC and TPR at FPR 1%, 0.1%, 0.01% with 95% intervals
    (bootstrap over the K target models), trials and the smallest resolvable FPR. With ``epsilon``,
    also the DP region check (an estimate; ``alpha`` split over the attacks and FPRs checked).
    Without ``population`` RMIA is left out."""
    import pandas as pd

    from dpmem.bench.estimators import membership
    from dpmem.bench.report.membership import REGION_FPRS
    if attacks is None:
        attacks = tuple(a for a in membership.ATTACKS if a != "rmia" or population is not None)
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    fprs = tuple(sorted(set(membership.FPRS) | set(REGION_FPRS), reverse=True))
    rows = []
    for attack in attacks:
        s = membership.attack_scores(attack, masks, scores, population=population)
        met = membership.roc_metrics(s, masks, fprs=fprs, bootstrap=bootstrap, seed=seed)
        row = {"attack": attack, **{k: v for k, v in met.row().items()
                                    if not k.startswith("tpr@") or k.split("@")[1].split("_")[0] in
                                    {membership.fpr_label(f) for f in membership.FPRS}}}
        if epsilon is not None:
            check = membership.region_check(met, epsilon=epsilon, delta=delta,
                                            level=alpha / (len(attacks) * len(fprs)))
            row |= {"dp_region_flag": check.flagged, "dp_region_fpr": check.worst_fpr if check.flagged else None}
        rows.append(row)
    return pd.DataFrame(rows)


def proxies(masks: np.ndarray, correct: np.ndarray, margins: np.ndarray, *, loss_sum: np.ndarray | None = None,
            draws: np.ndarray | None = None, grad_norm_sum: np.ndarray | None = None, clips: np.ndarray | None = None,
            private: bool = False, bootstrap: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Memorization proxies on your own [K, n] arrays (K >= 4): mem from the first half of the models,
    every proxy from the second, one row per proxy (bench/estimators/proxies.py). The training
    statistics are optional; a proxy whose statistics are not given gets a note, not a number."""
    import numpy as np

    from dpmem.bench.estimators import memorization as mem_mod
    from dpmem.bench.estimators import proxies as px
    masks, correct = mem_mod.checked_pair(masks, correct, "correct", same_n=True)
    given = {"train_loss_sum": loss_sum, "train_draws": draws, "train_grad_norm_sum": grad_norm_sum,
             "train_clips": clips}
    stats = {}
    for key, value in [("margins", margins), *given.items()]:
        if value is None:
            continue
        value = np.asarray(value)
        if value.shape != masks.shape or not np.issubdtype(value.dtype, np.number) or not np.isfinite(value).all():
            raise ValueError(f"{key} must be a finite numeric array of the masks' shape {masks.shape}, got "
                             f"{value.dtype} {value.shape}")
        if key != "margins":
            stats[key] = value
    return px.proxy_table(px.ProxyInputs(masks=masks, correct=correct, margin=np.asarray(margins), stats=stats),
                          private=private, bootstrap=bootstrap, seed=seed)

"""False-discovery control of the high-memorization examples and high-influence pairs.

Feldman & Zhang's thresholds (mem >= 0.25, infl >= 0.15) pass noise when K is small; this module
keeps only the findings a permutation null says are real, at the configured false-discovery rate.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from dpmem.privacy.audit import per_example_counts

# A "raw" finding passes Feldman & Zhang's thresholds (mem >= mem_threshold; for a pair also
# infl >= infl_threshold). With few models, noise alone passes them: mem and infl are differences
# of two means over ~qK and ~(1-q)K models, with a spread of order 1/sqrt(K).
#
# The null is "membership has no effect on correctness". It is simulated by permuting the rows of
# the masks (which model trained on which subset) across models: every example keeps its in-count,
# every model keeps its subset size and its correctness arrays, and every real link between a subset
# and a model's outcomes is broken. The findings of a permuted run are false by construction, so
# their mean count over the permutations is the expected number of false findings among the raw ones
# (conservative: it assumes every raw finding could be null).
#
# Findings are ranked by their standardised effect z = estimate / its null standard deviation,
# sqrt(p (1 - p) (1/n_in + 1/n_out)) with p the pooled accuracy (invariant under the permutation).
# The controlled list keeps the raw findings with z >= tau, where tau is the smallest threshold whose
# estimated false-discovery rate, (mean null count with z >= tau) / (observed count with z >= tau),
# is at most ``fdr`` (the permutation FDR of Tusher et al. 2001 / Storey & Tibshirani 2003).
# For examples a permuted run repeats the selection, so its noise is part of the null. A pair claims a
# link from training example i to test example j; its null keeps the observed candidate rows i (the
# raw high-memorization examples) and breaks their masks' link to the test outcomes.

NULL_PERMUTATIONS = 10
NULL_ROWS = 1024        # candidate rows one permutation scores in full before it samples a share


def _null_sd(k_total: np.ndarray, n_in: np.ndarray, n_out: np.ndarray) -> np.ndarray:
    """Standard deviation of (mean over in-models - mean over out-models) when membership has no effect."""
    with np.errstate(divide="ignore", invalid="ignore"):
        p = k_total / (n_in + n_out)
        return np.sqrt(p * (1 - p) * (1.0 / n_in + 1.0 / n_out))


def _z(effect: np.ndarray, sd: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(sd > 0, effect / np.where(sd > 0, sd, 1.0), 0.0)


def high_mem_candidates(masks: np.ndarray, correct_train: np.ndarray, *, eligible: np.ndarray,
                        mem_threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Raw high-memorization examples (mem >= mem_threshold among ``eligible``, with in- and out-models)
    and their standardised memorization z."""
    counts = per_example_counts(masks, correct_train)
    n_in, n_out = counts["n_in"], counts["n_out"]
    with np.errstate(divide="ignore", invalid="ignore"):
        mem = counts["k_in"] / n_in - counts["k_out"] / n_out
    rows = np.flatnonzero(eligible & (n_in > 0) & (n_out > 0) & (mem >= mem_threshold))
    sd = _null_sd(counts["k_in"][rows] + counts["k_out"][rows], n_in[rows], n_out[rows])
    return rows, _z(mem[rows], sd)


@dataclass(frozen=True, kw_only=True)
class RawPairs:
    pairs: pd.DataFrame         # train_index, test_index, infl, z (at most max_pairs rows, largest z)
    count: int                  # raw pair count (exact, even when the frame was trimmed)
    tests: int                  # pairs examined: rows x test examples


def high_influence_candidates(masks: np.ndarray, correct_test: np.ndarray, rows: np.ndarray, *,
                              infl_threshold: float, max_pairs: int = 100_000, block: int = 1024) -> RawPairs:
    """Pairs (i, j) with i in ``rows`` and infl(i, j) >= infl_threshold, with their standardised z.

    Influence is computed only for ``rows``, in blocks of two matrix products (masks^T @ correct / n_in
    minus the complement), so the n x m matrix is never held.
    """
    c = np.asarray(correct_test, np.float32)
    k_models = c.shape[0]
    total = c.sum(0)                                                # [m]
    p_test = total / k_models
    sd_test = np.sqrt(p_test * (1 - p_test))                        # [m]
    kept: list[pd.DataFrame] = []
    n_kept = n_raw = 0
    for start in range(0, len(rows), block):
        idx = rows[start:start + block]
        m_block = np.asarray(masks[:, idx], np.float32)
        hits_in = m_block.T @ c                                     # [b, m]
        n_in = m_block.sum(0)
        n_out = k_models - n_in
        with np.errstate(divide="ignore", invalid="ignore"):
            infl = hits_in / n_in[:, None] - (total[None, :] - hits_in) / n_out[:, None]
        ti, tj = np.nonzero(infl >= infl_threshold)
        if not len(ti):
            continue
        n_raw += len(ti)
        sd = sd_test[tj] * np.sqrt(1.0 / n_in[ti] + 1.0 / n_out[ti])
        kept.append(pd.DataFrame({"train_index": idx[ti], "test_index": tj, "infl": infl[ti, tj].astype(float),
                                  "z": _z(infl[ti, tj], sd).astype(float)}))
        n_kept += len(ti)
        if n_kept > 2 * max_pairs:     # trim as we go so memory stays bounded; the count stays exact
            kept = [pd.concat(kept).nlargest(max_pairs, "z")]
            n_kept = len(kept[0])
    if kept:
        pairs = pd.concat(kept).nlargest(max_pairs, "z").reset_index(drop=True)
    else:
        pairs = pd.DataFrame({"train_index": np.array([], np.int64), "test_index": np.array([], np.int64),
                              "infl": np.array([], float), "z": np.array([], float)})
    return RawPairs(pairs=pairs, count=n_raw, tests=len(rows) * c.shape[1])


def permutation_fdr_threshold(z_observed: np.ndarray, z_null: np.ndarray, permutations: int, fdr: float,
                              null_weights: np.ndarray | None = None) -> float:
    """The smallest tau with (count of z_null >= tau) / permutations <= fdr * (count of z_observed >= tau).

    ``z_null`` pools the findings of ``permutations`` permuted runs; ``null_weights`` (default 1) lets one
    null finding count for several (a run that scored a share of the candidates, or findings trimmed from
    a capped list). Returns +inf when no tau qualifies.
    """
    obs = np.sort(np.asarray(z_observed, float))
    if not len(obs):
        return float("inf")
    z_null = np.asarray(z_null, float)
    weights = np.ones(len(z_null)) if null_weights is None else np.asarray(null_weights, float)
    order = np.argsort(z_null, kind="stable")
    null = z_null[order]
    at_or_above = np.append(np.cumsum(weights[order][::-1])[::-1], 0.0)    # weight of null[i:]
    taus = np.unique(obs)
    n_obs = len(obs) - np.searchsorted(obs, taus, side="left")
    n_null = at_or_above[np.searchsorted(null, taus, side="left")] / permutations
    ok = n_null <= fdr * n_obs
    return float(taus[np.argmax(ok)]) if ok.any() else float("inf")


def models_needed(*, in_fraction: float, threshold: float, tests: int, fdr: float) -> int | None:
    """About how many models make a pure-noise finding at ``threshold`` rare (expected count <= fdr).

    Under the null a difference of means over in_fraction * K and (1 - in_fraction) * K models has
    standard deviation at most 0.5 sqrt(1/in_fraction + 1/(1 - in_fraction)) / sqrt(K) (accuracy 1/2, the
    noisiest case). The threshold must sit z = Phi^-1(1 - fdr / tests) of those out. None when undefined.
    """
    from scipy import stats
    if not (0 < in_fraction < 1) or tests < 1 or threshold <= 0:
        return None
    z_needed = float(stats.norm.isf(fdr / tests))
    spread = 0.5 * np.sqrt(1 / in_fraction + 1 / (1 - in_fraction))
    return int(np.ceil((z_needed * spread / threshold) ** 2))


@dataclass(frozen=True, kw_only=True)
class ControlledFindings:
    examples: pd.DataFrame          # index, mem_z, passes_fdr: every raw high-memorization example
    pairs: pd.DataFrame | None      # train_index, test_index, infl, z, passes_fdr: the raw pairs (None: not asked)
    high_mem_examples_raw: int
    high_mem_examples: int
    expected_false_high_mem: float
    high_influence_pairs_raw: int | None
    high_influence_pairs: int | None
    expected_false_pairs: float | None
    models_needed_high_mem: int | None
    models_needed_pairs: int | None
    permutations: int


def controlled_findings(masks: np.ndarray, correct_train: np.ndarray, correct_test: np.ndarray | None, *,
                        eligible: np.ndarray, mem_threshold: float, infl_threshold: float, fdr: float,
                        seed: int, permutations: int = NULL_PERMUTATIONS, max_pairs: int = 100_000,
                        block: int = 1024) -> ControlledFindings:
    """Raw findings, their permutation null, and the ones that pass false-discovery control at ``fdr``.

    Examples: each permuted run selects its own high-memorization examples. Pairs: the candidate
    training examples are the observed raw high-memorization ones (a pair claims a link from i to j,
    whether or not i's memorization is real), and the permutation breaks the link between their masks
    and the test outcomes.
    """
    masks = np.asarray(masks, bool)
    rows, z_rows = high_mem_candidates(masks, correct_train, eligible=eligible, mem_threshold=mem_threshold)
    observed = (high_influence_candidates(masks, correct_test, rows, infl_threshold=infl_threshold,
                                          max_pairs=max_pairs, block=block) if correct_test is not None else None)
    rng = np.random.default_rng(np.random.SeedSequence([seed, 12]))
    # With many candidate rows, each permutation scores a random share of them, so the null costs
    # about one pass over the candidates in all; counts are scaled back to every candidate row.
    rows_per_permutation = len(rows) if len(rows) <= NULL_ROWS else max(NULL_ROWS, -(-len(rows) // permutations))
    null_ex_z, null_pair_z, null_pair_w, null_pair_n = [], [], [], 0.0
    for _ in range(permutations):
        shuffled = masks[rng.permutation(masks.shape[0])]
        null_ex_z.append(high_mem_candidates(shuffled, correct_train, eligible=eligible,
                                             mem_threshold=mem_threshold)[1])
        if observed is not None and correct_test is not None:
            share = rows if rows_per_permutation == len(rows) else np.sort(
                rng.choice(rows, rows_per_permutation, replace=False))
            null = high_influence_candidates(shuffled, correct_test, share, infl_threshold=infl_threshold,
                                             max_pairs=max_pairs, block=block)
            scale = len(rows) / len(share) if len(rows) else 1.0
            z, w = null.pairs["z"].to_numpy(), np.full(len(null.pairs), scale)
            if null.count > len(z):
                # the capped list dropped its weakest pairs: count them at the weakest kept z, which
                # overcounts only below it (conservative) and is exact above it
                z, w = np.append(z, z.min()), np.append(w, scale * (null.count - len(z)))
            null_pair_z.append(z)
            null_pair_w.append(w)
            null_pair_n += scale * null.count
    tau_ex = permutation_fdr_threshold(z_rows, np.concatenate(null_ex_z), permutations, fdr)
    examples = pd.DataFrame({"index": rows, "mem_z": z_rows, "passes_fdr": z_rows >= tau_ex})
    in_fraction = float(masks.mean())
    need_ex = models_needed(in_fraction=in_fraction, threshold=mem_threshold, tests=int(eligible.sum()), fdr=fdr)
    pairs, need_pairs = None, None
    if observed is not None:
        tau_pair = permutation_fdr_threshold(observed.pairs["z"].to_numpy(), np.concatenate(null_pair_z),
                                             permutations, fdr, null_weights=np.concatenate(null_pair_w))
        pairs = observed.pairs.assign(passes_fdr=observed.pairs["z"].to_numpy() >= tau_pair)
        need_pairs = models_needed(in_fraction=in_fraction, threshold=infl_threshold, tests=observed.tests, fdr=fdr)
    return ControlledFindings(
        examples=examples, pairs=pairs,
        high_mem_examples_raw=len(rows), high_mem_examples=int(examples["passes_fdr"].sum()),
        expected_false_high_mem=sum(len(z) for z in null_ex_z) / permutations,
        high_influence_pairs_raw=observed.count if observed is not None else None,
        high_influence_pairs=int(pairs["passes_fdr"].sum()) if pairs is not None else None,
        expected_false_pairs=null_pair_n / permutations if observed is not None else None,
        models_needed_high_mem=need_ex, models_needed_pairs=need_pairs, permutations=permutations)

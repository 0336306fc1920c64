"""Membership inference from the model pool: LiRA, RMIA and a global threshold, leave-one-model-out.

A run trains K models of a variant on random subsets, so every (model k, training example i) is
one membership trial with a known answer ``masks[k, i]``. Each model in turn is the *target*; the
other K - 1 models of the same variant are its *reference* models, split per example into those
trained with i ("in") and without it ("out"). Every attack maps the target's score on i and the
references' scores on i to one number; larger means "member".

The score is the stored margin: the true-label logit minus the largest other logit. LiRA
(Carlini et al. 2022, "Membership inference attacks from first principles") fits Gaussians to the
logit-scaled confidence phi(p) = log(p / (1 - p)) of the true class. For a softmax,
p / (1 - p) = e^{z_y} / sum_{j != y} e^{z_j}, so phi(p) = margin - log(sum_{j != y} e^{z_j - z_max}),
which equals the margin up to a term between 0 and log(C - 1) that only moves when the runner-up
logits change their gaps; for confident models the two agree closely. The margin is what every
run stores (float16), and it is itself a logit-scale, roughly Gaussian statistic, which is what
LiRA's fits need.

Attacks (``ATTACKS``), for target k and example i with target score s:
- ``lira-online``: log N(s; mu_in, var_in) - log N(s; mu_out, var_out), both Gaussians fitted to
  the reference models' scores on i (per-example means and variances);
- ``lira-offline``: the one-sided test against the out-Gaussian only:
  -log P[Z >= s] with Z ~ N(mu_out, var_out) (a monotone transform of the paper's 1 - P[Z > s]
  that keeps its resolution in the far tail);
- ``lira-fixed``: the online ratio with one global variance, the pooled within-example variance
  of the target's reference scores over all examples (in and out pooled);
- ``rmia``: RMIA (Zarifzadeh et al. 2024, "Low-cost high-power membership inference attacks"):
  with Pr(x | theta) = sigmoid(margin) (the true class's probability in the two-way contest with
  the runner-up, the probability-like reading of a margin) and the population z = the run's test
  examples, which no model trains on, the score is the fraction of z with
  [Pr(x | theta) / Pr(x)] / [Pr(z | theta) / Pr(z)] > gamma. Pr(.) is the offline estimate of the
  paper, 1/2 ((1 + a) Pr_OUT(.) + (1 - a)), from the out-reference models for x and from all
  reference models for z (out for every z); ``a = 1`` uses Pr_OUT itself. The fraction takes only
  m + 1 values, and with a few hundred z the top value alone holds more than 0.1% of the
  out-trials; ties are therefore broken by x's own ratio (adding less than 1 / (2m)), which keeps
  every threshold of the published score and adds the points between them
  (``rmia_fraction`` recovers the published score);
- ``global``: the target's margin itself, one threshold for every example (the baseline attack
  of Yeom et al. 2018 on the same score).

Efficiency: per example, sums and sums of squares of the (centred) scores over all K models, split
by in/out, are computed once; target k's own contribution is subtracted to get its reference
statistics, so all K targets cost O(K n) together. RMIA compares every target's n ratios with
its m population ratios by one sort per target row (O(K (n + m) log(n + m))), never an n x m
matrix. Work proceeds in blocks of examples, so memory is O(K * block) besides the [K, n] result.

Metrics (``roc_metrics``): AUC and TPR at FPR 1%, 0.1% and 0.01%, pooled over all trials, with
95% intervals from a bootstrap over target models (trials that share a model are dependent, so
models, not trials, are resampled).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
from scipy import special, stats

ATTACKS = ("lira-online", "lira-offline", "lira-fixed", "rmia", "global")
FPRS = (1e-2, 1e-3, 1e-4)
# Examples per block: the attack's temporaries are about 20 float64 arrays of K x BLOCK (150 MB at K = 1,000).
BLOCK = 1024
# Trials per block when the metrics bin the scores of a block of models.
METRIC_BLOCK = 1 << 22
# Reference models each target needs of each kind (in and out) on an example: two give a variance.
MIN_REFERENCES = 2
# A fitted variance never falls below this (float16 margins of a saturated example can all be equal).
MIN_VARIANCE = 1e-8
BOOTSTRAP = 1000
RMIA_A = 0.3
RMIA_GAMMA = 1.0
# The bootstrap evaluates the ROC at every out-score in the top TOP_REGION x min(largest FPR, EXACT_FPR)
# of the out-scores (at most TOP_EDGES of them) and at QUANTILE_EDGES quantiles below.
TOP_REGION, TOP_EDGES, QUANTILE_EDGES, EXACT_FPR = 2.0, 4000, 256, 0.01


# -- input -----------------------------------------------------------------------------------------

def checked_scores(masks: np.ndarray, scores: np.ndarray, name: str = "scores", *,
                   float64: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """``masks`` bool [K, n] and finite float ``scores`` [K, n] (as float64, or in their own float dtype
    when not ``float64``: the attacks convert block by block); a ValueError naming the argument."""
    masks, scores = np.asarray(masks), np.asarray(scores)
    if masks.ndim != 2 or masks.dtype != np.bool_:
        raise ValueError(f"masks must be a bool [K, n] array, got {masks.dtype} of shape {masks.shape}")
    if scores.shape != masks.shape:
        raise ValueError(f"{name} must have the masks' shape {masks.shape}, got {scores.shape}")
    if not np.issubdtype(scores.dtype, np.floating) and not np.issubdtype(scores.dtype, np.integer):
        raise ValueError(f"{name} must be numbers, got {scores.dtype}")
    if float64 or not np.issubdtype(scores.dtype, np.floating):
        scores = scores.astype(np.float64)
    if not np.all(np.isfinite(scores)):
        raise ValueError(f"{name} must be finite (found NaN or inf)")
    return masks, scores


def attackable(masks: np.ndarray) -> np.ndarray:
    """bool [n]: examples where every target has at least MIN_REFERENCES in- and out-reference models."""
    n_in = masks.sum(0)
    return (n_in >= MIN_REFERENCES + 1) & (masks.shape[0] - n_in >= MIN_REFERENCES + 1)


# -- the attacks -----------------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class _References:
    """Target k's reference statistics on each example of a block, [K, b] each (float64)."""
    centred: np.ndarray       # the target's own score minus the example's mean over all K models
    mean_in: np.ndarray
    var_in: np.ndarray        # ddof = 1
    mean_out: np.ndarray
    var_out: np.ndarray
    ss: np.ndarray            # within-class sums of squares, in + out (for the pooled variance)


def _references(masks: np.ndarray, scores: np.ndarray) -> _References:
    """Leave-one-model-out Gaussian fits: all-model sums minus the target's own term."""
    m = masks.astype(np.float64)
    d = scores - scores.mean(0)       # centred per example: the sums of squares lose no precision
    n_in, n_all = m.sum(0), float(masks.shape[0])
    s_in, q_in = (m * d).sum(0), (m * d * d).sum(0)
    s_all, q_all = d.sum(0), (d * d).sum(0)
    # the target's own term leaves the class it belongs to
    ni, si, qi = n_in - m, s_in - m * d, q_in - m * d * d
    no = (n_all - n_in) - (1.0 - m)
    so = (s_all - s_in) - (1.0 - m) * d
    qo = (q_all - q_in) - (1.0 - m) * d * d
    with np.errstate(divide="ignore", invalid="ignore"):
        mean_in, mean_out = si / ni, so / no
        ss_in, ss_out = np.maximum(qi - si * mean_in, 0.0), np.maximum(qo - so * mean_out, 0.0)
        var_in, var_out = ss_in / (ni - 1.0), ss_out / (no - 1.0)
    return _References(centred=d, mean_in=mean_in, var_in=np.maximum(var_in, MIN_VARIANCE), mean_out=mean_out,
                       var_out=np.maximum(var_out, MIN_VARIANCE), ss=ss_in + ss_out)


def _gauss_logpdf(x: np.ndarray, mean: np.ndarray, var: np.ndarray) -> np.ndarray:
    return -0.5 * (np.log(2.0 * np.pi * var) + (x - mean) ** 2 / var)


def _log_sigmoid(x: np.ndarray) -> np.ndarray:
    return -np.logaddexp(0.0, -x)


def _rmia_log_prior(p_out_mean: np.ndarray, a: float) -> np.ndarray:
    """log Pr(.) = log(1/2 ((1 + a) Pr_OUT + (1 - a))), RMIA's offline estimate."""
    return np.log(0.5 * ((1.0 + a) * p_out_mean + (1.0 - a)))


def _count_below(values: np.ndarray, sorted_rows: np.ndarray) -> np.ndarray:
    """[K, b]: per row k, how many of sorted_rows[k] are strictly below values[k, j].

    One stable argsort per row of [values | sorted_rows]: values come first, so a population
    value equal to a target value sorts after it and is not counted."""
    k, b = values.shape
    joined = np.concatenate([values, sorted_rows], axis=1)
    order = np.argsort(joined, axis=1, kind="stable")
    below = np.cumsum(order >= b, axis=1)                  # population values up to each position
    out = np.empty((k, b), dtype=np.int64)
    rows, cols = np.nonzero(order < b)
    out[rows, order[rows, cols]] = below[rows, cols]
    return out


def _rmia_population(population: np.ndarray, a: float) -> np.ndarray:
    """[K, m], each row sorted: log Pr(z | theta_k) - log Pr(z), Pr(z) from the other K - 1 models."""
    k = population.shape[0]
    p = special.expit(population)
    others = (p.sum(0) - p) / (k - 1)                       # every model is "out" for a test example
    return np.sort(_log_sigmoid(population) - _rmia_log_prior(others, a), axis=1)


def _block_scores(attack: str, masks: np.ndarray, scores: np.ndarray, *, pooled_var: np.ndarray | None,
                  population: np.ndarray | None, a: float, gamma: float) -> np.ndarray:
    if attack == "global":
        return scores.copy()
    if attack == "rmia":
        if population is None:
            raise ValueError("rmia needs the population's scores")
        m = masks.astype(np.float64)
        p = special.expit(scores)
        n_out = (1.0 - m).sum(0) - (1.0 - m)
        p_out = ((p * (1.0 - m)).sum(0) - (1.0 - m) * p) / n_out
        ratio = _log_sigmoid(scores) - _rmia_log_prior(p_out, a) - math.log(gamma)
        # ties of the count (it takes m + 1 values) are broken by the ratio itself, a monotone map
        # into [0, 1/2): a threshold on the count is still a threshold on this score
        tie = np.arctan(ratio) / np.pi + 0.5
        return (_count_below(ratio, population) + 0.5 * tie) / population.shape[1]
    ref = _references(masks, scores)
    x = ref.centred
    if attack == "lira-online":
        return _gauss_logpdf(x, ref.mean_in, ref.var_in) - _gauss_logpdf(x, ref.mean_out, ref.var_out)
    if attack == "lira-offline":
        return -special.log_ndtr(-(x - ref.mean_out) / np.sqrt(ref.var_out))
    if attack == "lira-fixed":
        if pooled_var is None:
            raise ValueError("lira-fixed needs the pooled variance")
        var = pooled_var[:, None]
        return ((x - ref.mean_out) ** 2 - (x - ref.mean_in) ** 2) / (2.0 * var)
    raise ValueError(f"attack must be one of {', '.join(ATTACKS)}, got {attack!r}")


def _pooled_variance(masks: np.ndarray, scores: np.ndarray, use: np.ndarray, block: int) -> np.ndarray:
    """[K]: target k's pooled within-example variance of its reference scores (in and out pooled)."""
    k = masks.shape[0]
    ss, dof = np.zeros(k), 0.0
    for start in range(0, masks.shape[1], block):
        cols = np.flatnonzero(use[start:start + block]) + start
        if cols.size:
            ss += _references(masks[:, cols], scores[:, cols].astype(np.float64)).ss.sum(1)
            dof += cols.size * (k - 3.0)     # (n_in' - 1) + (n_out' - 1) = K - 3 for every target
    return np.maximum(ss / max(dof, 1.0), MIN_VARIANCE)


def attack_scores(attack: str, masks: np.ndarray, scores: np.ndarray, *, population: np.ndarray | None = None,
                  block: int = BLOCK, rmia_a: float = RMIA_A, rmia_gamma: float = RMIA_GAMMA) -> np.ndarray:
    """float64 [K, n]: the attack's membership score of target model k on example i (larger: member).

    ``masks`` bool [K, n] (model k trained on i) and ``scores`` [K, n] (margins) of one variant;
    ``population`` [K, m] the same models' scores on examples none of them trained on (RMIA only).
    Examples without MIN_REFERENCES in- and out-reference models for every target are NaN.
    ``block`` bounds the memory (examples per block); the result does not depend on it.
    """
    masks, scores = checked_scores(masks, scores, "scores", float64=False)
    if attack not in ATTACKS:
        raise ValueError(f"attack must be one of {', '.join(ATTACKS)}, got {attack!r}")
    if int(block) != block or block < 1:
        raise ValueError(f"block must be a positive integer, got {block}")
    if masks.shape[0] < 2 * MIN_REFERENCES + 1:
        raise ValueError(f"masks: need at least {2 * MIN_REFERENCES + 1} models, got {masks.shape[0]}")
    sorted_population, pooled = None, None
    if attack == "rmia":
        if population is None:
            raise ValueError("population: RMIA needs the models' scores on population examples [K, m]")
        population = np.asarray(population, dtype=np.float64)
        if population.ndim != 2 or population.shape[0] != masks.shape[0] or population.shape[1] < 1:
            raise ValueError(f"population must be [K={masks.shape[0]}, m >= 1], got {population.shape}")
        if not np.all(np.isfinite(population)):
            raise ValueError("population must be finite (found NaN or inf)")
        if not (0.0 <= rmia_a <= 1.0):
            raise ValueError(f"rmia_a must be in [0, 1], got {rmia_a}")
        if not rmia_gamma > 0:
            raise ValueError(f"rmia_gamma must be > 0, got {rmia_gamma}")
        sorted_population = _rmia_population(population, rmia_a)
    use = attackable(masks)
    if attack == "lira-fixed":
        pooled = _pooled_variance(masks, scores, use, block)
    out = np.full(masks.shape, np.nan)
    for start in range(0, masks.shape[1], block):
        cols = np.flatnonzero(use[start:start + block]) + start
        if cols.size:
            out[:, cols] = _block_scores(attack, masks[:, cols], scores[:, cols].astype(np.float64), pooled_var=pooled,
                                         population=sorted_population, a=rmia_a, gamma=rmia_gamma)
    return out


def rmia_fraction(score: np.ndarray, population_size: int) -> np.ndarray:
    """The published RMIA score (the fraction of population examples below x) of an ``rmia`` score."""
    return np.round(np.asarray(score) * population_size - 0.25) / population_size


def gaussian_fits(masks: np.ndarray, scores: np.ndarray) -> dict[str, np.ndarray]:
    """Per example, over all K models: n_in, n_out, mu_in, sd_in, mu_out, sd_out of the scores (ddof 1)."""
    m = masks.astype(np.float64)
    n_in, n_out = m.sum(0), (1.0 - m).sum(0)
    with np.errstate(divide="ignore", invalid="ignore"):
        mu_in, mu_out = (m * scores).sum(0) / n_in, ((1 - m) * scores).sum(0) / n_out
        sd_in = np.sqrt((m * (scores - mu_in) ** 2).sum(0) / (n_in - 1))
        sd_out = np.sqrt(((1 - m) * (scores - mu_out) ** 2).sum(0) / (n_out - 1))
    return {"n_in": n_in.astype(np.int64), "n_out": n_out.astype(np.int64), "mu_in": mu_in, "sd_in": sd_in,
            "mu_out": mu_out, "sd_out": sd_out}


# -- ROC metrics with a bootstrap over target models -------------------------------------------------

def tpr_at_fpr(pos: np.ndarray, neg_desc: np.ndarray, fpr: float) -> tuple[float, float]:
    """(TPR, threshold): the largest TPR of a rule "score > t" whose FPR is at most ``fpr``.

    ``neg_desc``: out-scores sorted in decreasing order. t is the (floor(fpr N) + 1)-th largest
    out-score, so at most floor(fpr N) out-trials lie above it."""
    allowed = int(math.floor(fpr * neg_desc.size + 1e-9))
    if allowed >= neg_desc.size:
        return 1.0, -math.inf
    t = float(neg_desc[allowed])
    return float(np.count_nonzero(pos > t)) / pos.size, t


def auc(pos: np.ndarray, neg: np.ndarray, *, neg_sorted: bool = False) -> float:
    """P(in-score > out-score) + 1/2 P(tie), the Mann-Whitney form of the area under the ROC
    (out-scores sorted once, in-scores placed among them in chunks: memory O(chunk))."""
    neg = np.asarray(neg) if neg_sorted else np.sort(neg)
    pos = np.asarray(pos)
    below = ties = 0
    for start in range(0, pos.size, METRIC_BLOCK):
        chunk = pos[start:start + METRIC_BLOCK]
        left = np.searchsorted(neg, chunk, side="left")
        below += int(left.sum())
        ties += int((np.searchsorted(neg, chunk, side="right") - left).sum())
    return (below + 0.5 * ties) / (pos.size * neg.size)


@dataclass(frozen=True, kw_only=True)
class AttackMetrics:
    """One attack on one variant, pooled over every (target model, example) trial.

    Intervals are 95% bootstrap percentile intervals over target models (resampled with
    replacement, all their trials with them), shifted by the difference between the exact point
    estimate and the binned one (the replicates evaluate the ROC on score bins that contain every
    out-score of the low-FPR region, so the shift is 0 there unless TOP_EDGES caps the bins).
    ``min_fpr`` = 1 / out_trials: a TPR at a smaller FPR is not resolved by these trials."""
    auc: float
    auc_lo: float
    auc_hi: float
    fprs: tuple[float, ...]
    tpr: tuple[float, ...]             # at each of fprs
    tpr_lo: tuple[float, ...]
    tpr_hi: tuple[float, ...]
    thresholds: tuple[float, ...]      # the global threshold reaching each FPR
    in_trials: int
    out_trials: int
    models: int
    min_fpr: float
    bootstrap: int
    roc_fpr: np.ndarray = dataclasses.field(repr=False)     # the ROC at the binned thresholds (figures)
    roc_tpr: np.ndarray = dataclasses.field(repr=False)
    replicate_tpr: np.ndarray = dataclasses.field(repr=False)   # [bootstrap, len(fprs)] (shifted)

    def row(self) -> dict:
        out = {"auc": self.auc, "auc_lo": self.auc_lo, "auc_hi": self.auc_hi}
        for f, t, lo, hi in zip(self.fprs, self.tpr, self.tpr_lo, self.tpr_hi):
            key = fpr_label(f)
            out |= {f"tpr@{key}": t, f"tpr@{key}_lo": lo, f"tpr@{key}_hi": hi}
        return out | {"trials": self.in_trials + self.out_trials, "in_trials": self.in_trials,
                      "out_trials": self.out_trials, "models": self.models, "min_fpr": self.min_fpr,
                      "bootstrap": self.bootstrap}


def fpr_label(fpr: float) -> str:
    """0.01 -> '1%', 0.001 -> '0.1%', 0.0001 -> '0.01%'."""
    return f"{fpr * 100:g}%"


def _edges(neg_desc: np.ndarray, top_fpr: float) -> np.ndarray:
    """Increasing thresholds: every out-score of the top region, then quantiles of the rest."""
    n = neg_desc.size
    top = min(n, int(math.ceil(TOP_REGION * top_fpr * n)) + 1)
    idx = np.arange(top) if top <= TOP_EDGES else np.unique(np.geomspace(1, top, TOP_EDGES).astype(np.int64) - 1)
    rest = np.quantile(neg_desc[top - 1:], np.linspace(0.0, 1.0, QUANTILE_EDGES)) if top < n else np.array([])
    return np.unique(np.concatenate([neg_desc[idx], rest]))


def roc_metrics(scores: np.ndarray, masks: np.ndarray, *, use: np.ndarray | None = None, fprs=FPRS,
                bootstrap: int = BOOTSTRAP, level: float = 0.95, seed: int = 0) -> AttackMetrics:
    """AUC and TPR at ``fprs`` of scores [K, n] (NaN columns and ~use columns left out), with intervals."""
    masks = np.asarray(masks, dtype=bool)
    scores = np.asarray(scores, np.float64)
    cols = np.all(np.isfinite(scores), axis=0) if use is None else np.asarray(use, bool) & np.all(np.isfinite(scores), 0)
    s, m = (scores, masks) if cols.all() else (scores[:, cols], masks[:, cols])
    k = s.shape[0]
    pos, neg = np.sort(s[m]), np.sort(s[~m])     # the trials' only copies besides the scores themselves
    if pos.size == 0 or neg.size == 0:
        raise ValueError("scores: need both in- and out-trials")
    neg_desc = neg[::-1]
    fprs = tuple(float(f) for f in fprs)
    point = [tpr_at_fpr(pos, neg_desc, f) for f in fprs]
    area = auc(pos, neg, neg_sorted=True)
    del pos
    # per-model histograms on the edges (bin g holds the scores in (e_{g-1}, e_g]), a block of models at a time
    edges = _edges(neg_desc, min(max(fprs), EXACT_FPR))
    n_bins = edges.size + 1
    h_in, h_out = np.zeros((k, n_bins), np.float32), np.zeros((k, n_bins), np.float32)
    rows = max(1, METRIC_BLOCK // max(s.shape[1], 1))
    for start in range(0, k, rows):
        g = np.searchsorted(edges, s[start:start + rows], side="left")        # [rows, n]: # edges < score
        mm = m[start:start + rows]
        flat = np.arange(g.shape[0])[:, None] * n_bins + g
        h_in[start:start + rows] = np.bincount(flat[mm], minlength=g.shape[0] * n_bins).reshape(-1, n_bins)
        h_out[start:start + rows] = np.bincount(flat[~mm], minlength=g.shape[0] * n_bins).reshape(-1, n_bins)
    rng = np.random.default_rng(seed)
    weights = rng.multinomial(k, np.full(k, 1.0 / k), size=bootstrap).astype(np.float32)
    weights = np.vstack([np.ones((1, k), np.float32), weights])          # row 0: the sample itself
    tpr_b, fpr_b = _binned_roc(weights @ h_in), _binned_roc(weights @ h_out)
    rep_tpr = np.stack([_tpr_at(tpr_b, fpr_b, f) for f in fprs], axis=1)      # [B + 1, F]
    rep_auc = _binned_auc(tpr_b, fpr_b)
    q = (1 - level) / 2
    shift_tpr = np.array([p[0] for p in point]) - rep_tpr[0]
    rep_tpr = np.clip(rep_tpr[1:] + shift_tpr, 0.0, 1.0)
    rep_auc = np.clip(rep_auc[1:] + (area - rep_auc[0]), 0.0, 1.0)
    lo, hi = np.quantile(rep_tpr, [q, 1 - q], axis=0)
    a_lo, a_hi = np.quantile(rep_auc, [q, 1 - q])
    return AttackMetrics(auc=area, auc_lo=float(a_lo), auc_hi=float(a_hi), fprs=fprs,
                         tpr=tuple(p[0] for p in point), tpr_lo=tuple(map(float, lo)), tpr_hi=tuple(map(float, hi)),
                         thresholds=tuple(p[1] for p in point), in_trials=int(m.sum()), out_trials=int(neg.size),
                         models=k, min_fpr=1.0 / neg.size, bootstrap=int(bootstrap),
                         roc_fpr=fpr_b[0].copy(), roc_tpr=tpr_b[0].copy(), replicate_tpr=rep_tpr)


def _binned_roc(counts: np.ndarray) -> np.ndarray:
    """[B, G + 1]: share of the trials above edge j (j = 0..G-1: score > e_j), then 1.0 (no threshold)."""
    above = np.cumsum(counts[:, ::-1], axis=1)[:, ::-1]          # above[:, g] = count in bins >= g
    total = above[:, :1]
    share = np.concatenate([above[:, 1:], total], axis=1) / np.maximum(total, 1)
    return share.astype(np.float64)


def _tpr_at(tpr_b: np.ndarray, fpr_b: np.ndarray, fpr: float) -> np.ndarray:
    """Per replicate: the largest TPR over the thresholds whose FPR is <= fpr."""
    return np.where(fpr_b <= fpr + 1e-12, tpr_b, 0.0).max(axis=1)


def _binned_auc(tpr_b: np.ndarray, fpr_b: np.ndarray) -> np.ndarray:
    """Trapezoid area under the binned ROC (from (0, 0) through the edges to (1, 1))."""
    t = np.concatenate([np.zeros((tpr_b.shape[0], 1)), tpr_b], axis=1)
    f = np.concatenate([np.zeros((fpr_b.shape[0], 1)), fpr_b], axis=1)
    return np.sum(np.diff(f, axis=1) * (t[:, 1:] + t[:, :-1]) / 2.0, axis=1)


# -- the DP region --------------------------------------------------------------------------------

def dp_region_tpr(fpr, epsilon: float, delta: float) -> np.ndarray:
    """The largest TPR an (epsilon, delta)-DP mechanism allows at this FPR:
    min(e^eps FPR + delta, 1 - e^-eps (1 - FPR - delta)), clipped to [0, 1]."""
    fpr = np.asarray(fpr, dtype=float)
    return np.clip(np.minimum(np.exp(epsilon) * fpr + delta, 1.0 - np.exp(-epsilon) * (1.0 - fpr - delta)), 0.0, 1.0)


@dataclass(frozen=True, kw_only=True)
class RegionCheck:
    """Does an attack's ROC leave the DP region of a claim? An ESTIMATE, not a bound.

    At each FPR f of ``fprs`` the attack's TPR (at FPR <= f) gets a one-sided lower bound
    TPR - z * SE from the bootstrap over target models (normal, at ``level`` per point: the
    caller splits its alpha over the points it checks). A point is flagged when that bound
    exceeds ``dp_region_tpr(f)``. Pooled trials share models and the bootstrap's coverage is
    approximate, so a flag is evidence, not a refutation (``dpmem check`` holds the rigorous audits)."""
    epsilon: float
    delta: float
    level: float
    fprs: tuple[float, ...]
    tpr_lo: tuple[float, ...]
    boundary: tuple[float, ...]
    flagged: bool
    worst_fpr: float | None            # the point with the largest excess of tpr_lo over the boundary

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def region_check(metrics: AttackMetrics, *, epsilon: float, delta: float, level: float) -> RegionCheck:
    """Check ``metrics`` (its fprs, its bootstrap replicates) against the (epsilon, delta) region."""
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    z = float(stats.norm.isf(level))
    se = metrics.replicate_tpr.std(axis=0, ddof=1)
    lo = np.asarray(metrics.tpr) - z * se
    bound = dp_region_tpr(np.asarray(metrics.fprs), epsilon, delta)
    excess = lo - bound
    worst = int(np.argmax(excess))
    return RegionCheck(epsilon=float(epsilon), delta=float(delta), level=float(level), fprs=metrics.fprs,
                       tpr_lo=tuple(map(float, lo)), boundary=tuple(map(float, bound)),
                       flagged=bool(excess[worst] > 0), worst_fpr=float(metrics.fprs[worst]))


# -- per example ----------------------------------------------------------------------------------

def example_rates(scores: np.ndarray, masks: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Per example: the share of its in-trials (TPR) and out-trials (FPR) whose score is above the
    attack's global ``threshold`` (NaN where the example has no such trial or no score)."""
    above = np.asarray(scores) > threshold
    finite = np.isfinite(scores)
    with np.errstate(divide="ignore", invalid="ignore"):
        tpr = (above & masks & finite).sum(0) / (masks & finite).sum(0)
        fpr = (above & ~masks & finite).sum(0) / (~masks & finite).sum(0)
    return tpr, fpr


def per_model_group_tpr(scores: np.ndarray, masks: np.ndarray, threshold: float, groups: np.ndarray,
                        n_groups: int) -> tuple[np.ndarray, np.ndarray]:
    """[K, G] hits and in-trials of each group's examples per target model (rule: score > threshold)."""
    hit = ((np.asarray(scores) > threshold) & masks).astype(np.float64)
    trials = (masks & np.isfinite(scores)).astype(np.float64)
    onehot = np.zeros((scores.shape[1], n_groups))
    onehot[np.arange(scores.shape[1]), np.asarray(groups, np.int64)] = 1.0
    return hit @ onehot, trials @ onehot

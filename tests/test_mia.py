"""Membership inference from the model pool (bench/estimators/membership.py, bench/report/membership.py)
and the margin audit (privacy/margin_audit.py): agreement with the published formulas written as
plain loops, planted memberships with a known ROC, a Gaussian mechanism against the DP region,
block-size invariance, and the command line's answers to runs it cannot attack."""
import json
import shutil

import numpy as np
import pandas as pd
import pytest
from cli_helpers import run_cli
from scipy import optimize, stats

import dpmem
from dpmem.bench.estimators import membership as mb
from dpmem.privacy.audit import audit_variant
from dpmem.privacy.canary_audit import gdp_delta
from dpmem.privacy.margin_audit import margin_audit


def _fixed_arrays(k=14, n=7, m=5, seed=3):
    """Masks with >= 3 in- and 3 out-models per example, margins, and population margins."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((k, n), bool)
    for i in range(n):
        masks[rng.permutation(k)[:rng.integers(4, k - 3)], i] = True
    scores = rng.normal(1.0, 2.0, (k, n)) + 1.5 * masks
    population = rng.normal(0.5, 2.0, (k, m))
    return masks, scores, population


# -- the published formulas, one (target, example) at a time ------------------------------------

def _refs(masks, scores, k, i):
    others = np.arange(masks.shape[0]) != k
    return scores[others & masks[:, i], i], scores[others & ~masks[:, i], i]


def _lira_reference(masks, scores, version):
    K, n = masks.shape
    out = np.zeros((K, n))
    if version == "lira-fixed":
        pooled = []
        for k in range(K):
            ss = dof = 0.0
            for i in range(n):
                a, b = _refs(masks, scores, k, i)
                ss += np.sum((a - a.mean()) ** 2) + np.sum((b - b.mean()) ** 2)
                dof += a.size - 1 + b.size - 1
            pooled.append(ss / dof)
    for k in range(K):
        for i in range(n):
            s = scores[k, i]
            a, b = _refs(masks, scores, k, i)
            if version == "lira-online":
                out[k, i] = (stats.norm.logpdf(s, a.mean(), a.std(ddof=1))
                             - stats.norm.logpdf(s, b.mean(), b.std(ddof=1)))
            elif version == "lira-offline":       # Lambda = 1 - P[Z > s]; compared as -log P[Z >= s]
                out[k, i] = -np.log(stats.norm.sf(s, b.mean(), b.std(ddof=1)))
            else:
                sd = np.sqrt(pooled[k])
                out[k, i] = stats.norm.logpdf(s, a.mean(), sd) - stats.norm.logpdf(s, b.mean(), sd)
    return out


def _rmia_reference(masks, scores, population, a, gamma):
    K, n = masks.shape
    m = population.shape[1]
    sig = lambda v: 1.0 / (1.0 + np.exp(-v))          # noqa: E731
    out = np.zeros((K, n))
    for k in range(K):
        others = np.arange(K) != k
        pr_z = [0.5 * ((1 + a) * np.mean(sig(population[others, j])) + (1 - a)) for j in range(m)]
        ratio_z = [sig(population[k, j]) / pr_z[j] for j in range(m)]
        for i in range(n):
            _, out_refs = _refs(masks, scores, k, i)
            pr_x = 0.5 * ((1 + a) * np.mean(sig(out_refs)) + (1 - a))
            ratio_x = sig(scores[k, i]) / pr_x
            out[k, i] = np.mean([ratio_x / rz > gamma for rz in ratio_z])
    return out


@pytest.mark.parametrize("version", ["lira-online", "lira-offline", "lira-fixed"])
def test_lira_equals_the_published_formula(version):
    masks, scores, _ = _fixed_arrays()
    ours = mb.attack_scores(version, masks, scores)
    np.testing.assert_allclose(ours, _lira_reference(masks, scores, version), rtol=0, atol=1e-6)


@pytest.mark.parametrize("a, gamma", [(0.3, 1.0), (1.0, 1.0), (0.0, 2.0)])
def test_rmia_equals_the_published_formula(a, gamma):
    masks, scores, population = _fixed_arrays()
    ours = mb.attack_scores("rmia", masks, scores, population=population, rmia_a=a, rmia_gamma=gamma)
    expected = _rmia_reference(masks, scores, population, a, gamma)
    np.testing.assert_allclose(mb.rmia_fraction(ours, population.shape[1]), expected, rtol=0, atol=1e-6)
    # the tie-break only orders equal fractions: it never crosses to the next fraction
    assert np.all(ours >= expected - 1e-12) and np.all(ours < expected + 0.5 / population.shape[1] + 1e-12)


def test_the_global_attack_is_the_score_and_unattackable_examples_are_nan():
    masks, scores, population = _fixed_arrays()
    masks[:, 0] = np.arange(masks.shape[0]) < 2            # only two in-models: one reference for some targets
    g = mb.attack_scores("global", masks, scores)
    assert np.all(np.isnan(g[:, 0])) and np.array_equal(g[:, 1:], scores[:, 1:])
    for attack in mb.ATTACKS:
        s = mb.attack_scores(attack, masks, scores, population=population)
        assert np.all(np.isnan(s[:, 0])) and np.all(np.isfinite(s[:, 1:])), attack


@pytest.mark.parametrize("attack", mb.ATTACKS)
def test_blocks_of_examples_give_the_same_scores(attack):
    rng = np.random.default_rng(0)
    masks = rng.random((40, 53)) < 0.6
    scores = rng.normal(size=(40, 53)) + masks
    population = rng.normal(size=(40, 17))
    whole = mb.attack_scores(attack, masks, scores, population=population, block=10_000)
    for block in (1, 7):
        # lira-fixed sums its pooled variance block by block: equal up to the order of the additions
        np.testing.assert_allclose(mb.attack_scores(attack, masks, scores, population=population, block=block),
                                   whole, rtol=1e-12, atol=0)


# -- planted memberships with a known ROC -------------------------------------------------------

def _planted(k=300, n=250, shift=2.0, seed=1, spread=3.0):
    """Scores mu_i + shift * member + N(0, 1): per example the in/out Gaussians differ by ``shift``,
    so the optimal per-example test has TPR(alpha) = Phi(shift - z_{1 - alpha}) and AUC = Phi(shift / sqrt 2)."""
    rng = np.random.default_rng(seed)
    masks = rng.random((k, n)) < 0.5
    scores = rng.normal(0.0, spread, n) + shift * masks + rng.normal(size=(k, n))
    return masks, scores


def test_lira_recovers_the_planted_roc_and_the_global_threshold_does_not():
    masks, scores = _planted()
    table = dpmem.mia(masks, scores, attacks=("lira-online", "lira-fixed", "lira-offline", "global"), bootstrap=200)
    table = table.set_index("attack")
    auc, tpr1 = stats.norm.cdf(2.0 / np.sqrt(2)), stats.norm.cdf(2.0 - stats.norm.isf(0.01))
    for attack in ("lira-online", "lira-fixed"):
        row = table.loc[attack]
        assert row["auc"] == pytest.approx(auc, abs=0.01)
        assert row["tpr@1%"] == pytest.approx(tpr1, abs=0.03)
        assert row["auc_lo"] < row["auc"] < row["auc_hi"] and row["auc_hi"] - row["auc_lo"] < 0.02
        assert row["tpr@1%_lo"] - 0.01 < tpr1 < row["tpr@1%_hi"] + 0.01
        assert row["trials"] == masks.size and row["min_fpr"] == pytest.approx(1 / (~masks).sum())
    # offline (out-Gaussian only): the same test for equal variances
    assert table.loc["lira-offline", "auc"] == pytest.approx(auc, abs=0.015)
    # the per-example offsets (sd 3) drown a single global threshold
    assert table.loc["global", "auc"] < auc - 0.15 and table.loc["global", "tpr@1%"] < tpr1 / 4


def test_tpr_at_fpr_and_auc_on_hand_counted_scores():
    pos, neg = np.array([5.0, 4.0, 3.0, 1.0]), np.array([4.5, 2.0, 1.0, 0.0, -1.0])
    neg_desc = np.sort(neg)[::-1]
    assert mb.tpr_at_fpr(pos, neg_desc, 0.0) == (0.25, 4.5)         # above the largest out-score
    assert mb.tpr_at_fpr(pos, neg_desc, 0.2) == (0.75, 2.0)         # one false positive allowed
    # pairs (pos > neg): 5 beats 5, 4 beats 4, 3 beats 4, 1 beats 2 and ties 1: 15.5 of 20
    assert mb.auc(pos, neg) == pytest.approx(15.5 / 20)


def test_bootstrap_resamples_models_not_trials():
    """Scores that move together within a model: the model-level bootstrap sees that variance."""
    rng = np.random.default_rng(2)
    masks = rng.random((60, 400)) < 0.5
    shared = rng.normal(0, 1.0, (60, 1))                         # a model-wide offset
    scores = masks * 0.5 + shared * masks + rng.normal(size=(60, 400))
    met = mb.roc_metrics(scores, masks, bootstrap=400)
    # a trial bootstrap would give about sqrt(AUC (1 - AUC) / trials) ~ 0.002 half-width
    assert met.auc_hi - met.auc_lo > 0.03


# -- the DP region --------------------------------------------------------------------------------

def _gdp_mu(eps, delta):
    return optimize.brentq(lambda m: gdp_delta(eps, m) - delta, 1e-4, 30.0)


def test_the_region_boundary_holds_the_gaussian_trade_off():
    eps, delta = 3.0, 1e-5
    mu = _gdp_mu(eps, delta)
    fpr = np.geomspace(1e-6, 1, 400)
    trade_off = stats.norm.cdf(mu - stats.norm.isf(fpr))
    assert np.all(trade_off <= mb.dp_region_tpr(fpr, eps, delta) + 1e-9)
    # and touches it: the mechanism is exactly (eps, delta)-DP
    assert np.min(mb.dp_region_tpr(fpr, eps, delta) - trade_off) < 2e-3


@pytest.mark.parametrize("factor, flagged", [(1.0, False), (2.0, True)])
def test_region_check_flags_a_gaussian_mechanism_at_twice_the_claim(factor, flagged):
    """Scores N(mu member, 1): exactly mu-GDP. At the claim's own mu nothing is flagged; at the mu of
    twice the claimed epsilon the ROC leaves the region."""
    eps, delta = 3.0, 1e-5
    rng = np.random.default_rng(7)
    masks = rng.random((400, 250)) < 0.5
    scores = _gdp_mu(factor * eps, delta) * masks + rng.normal(size=masks.shape)
    table = dpmem.mia(masks, scores, attacks=("global", "lira-online"), epsilon=eps, delta=delta, bootstrap=300)
    assert bool(table["dp_region_flag"].any()) is flagged


# -- the margin audit -----------------------------------------------------------------------------

def test_margin_audit_sees_what_correctness_cannot():
    """Every model is right on every example (margins > 0), but members are more confident: the
    correctness audit refutes nothing, the margin audit refutes a small claim."""
    rng = np.random.default_rng(4)
    masks = rng.random((600, 40)) < 0.5
    margins = 5.0 + 3.0 * masks + rng.normal(size=masks.shape)
    correct = margins > 0
    assert correct.all()
    black_box, _ = audit_variant(variant="v", masks=masks, correct=correct, epsilon=1.0, delta=1e-5, alpha=0.05,
                                 sampling="bernoulli")
    result, frame = margin_audit(variant="v", masks=masks, margins=margins, epsilon=1.0, delta=1e-5, alpha=0.05,
                                 sampling="bernoulli")
    assert (black_box.eps_lb is None or black_box.eps_lb < 0.1) and black_box.consistent
    assert not result.consistent and result.eps_lb > 1.0 and result.kind == "rigorous"
    assert result.selection_models == 30 and result.evaluation_models == 570
    assert (frame["threshold"] > 5).all() and (frame["n_in"] + frame["n_out"] == 570).all()
    half, _ = audit_variant(variant="v", masks=masks, correct=correct, epsilon=1.0, delta=1e-5, alpha=0.025,
                            sampling="bernoulli")
    assert result.eps_lb >= (half.eps_lb if half.eps_lb is not None else -np.inf)


def test_margin_audit_does_not_refute_an_honest_gaussian_mechanism():
    eps, delta = 1.0, 1e-5
    rng = np.random.default_rng(5)
    masks = rng.random((600, 60)) < 0.5
    margins = _gdp_mu(eps, delta) * masks + rng.normal(size=masks.shape)
    result, _ = margin_audit(variant="v", masks=masks, margins=margins, epsilon=eps, delta=delta, alpha=0.05,
                             sampling="bernoulli")
    assert result.consistent and (result.eps_lb is None or result.eps_lb < eps)


def test_margin_audit_keeps_margin_zero_where_it_is_the_better_rule():
    """A margin that carries nothing but its sign: every threshold the audit uses is equivalent to
    margin 0, and its bound is the correctness audit's at half the level (never below it)."""
    rng = np.random.default_rng(6)
    masks = rng.random((400, 30)) < 0.5
    correct = rng.random(masks.shape) < np.where(masks, 0.95, 0.2)
    margins = np.where(correct, 1.0, -1.0)
    result, frame = margin_audit(variant="v", masks=masks, margins=margins, epsilon=None, delta=1e-5, alpha=0.05,
                                 sampling="bernoulli")
    black_box, _ = audit_variant(variant="v", masks=masks, correct=correct, epsilon=None, delta=1e-5, alpha=0.05,
                                 sampling="bernoulli")
    half, per_example = audit_variant(variant="v", masks=masks, correct=correct, epsilon=None, delta=1e-5,
                                      alpha=0.025, sampling="bernoulli")
    assert ((frame["threshold"] > -1) & (frame["threshold"] < 1)).all()
    assert (frame["eps_lb"].to_numpy() >= per_example["eps_lb"].to_numpy() - 1e-12).all()   # example by example
    at_zero = (frame["threshold"] == 0).to_numpy()
    assert at_zero.sum() >= 15
    np.testing.assert_allclose(frame["eps_lb"].to_numpy()[at_zero], per_example["eps_lb"].to_numpy()[at_zero])
    assert half.eps_lb <= result.eps_lb <= black_box.eps_lb + 0.05


# -- bad input and the run outputs ----------------------------------------------------------------

def test_bad_arrays_are_refused_naming_the_argument():
    masks, scores, population = _fixed_arrays()
    bad = scores.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="scores must be finite"):
        dpmem.mia_scores(masks, bad)
    with pytest.raises(ValueError, match="population"):
        dpmem.mia_scores(masks, scores, "rmia")
    with pytest.raises(ValueError, match="masks must be a bool"):
        dpmem.mia_scores(masks.astype(int), scores)
    with pytest.raises(ValueError, match="attack must be one of"):
        dpmem.mia_scores(masks, scores, "lira")



def test_a_run_writes_the_membership_outputs(tiny_digits_run):
    run_dir, _ = tiny_digits_run
    table = pd.read_parquet(run_dir / "mia.parquet")
    assert list(dict.fromkeys(table["variant"])) == ["nonprivate", "dp-eps4"]
    assert len(table) == 2 * len(mb.ATTACKS) and (table["models"] == 24).all()
    examples = pd.read_parquet(run_dir / "mia_examples.parquet")
    run = dpmem.open_run(run_dir)
    assert len(examples) == 2 * run.summary["run"]["n_train"]
    pd.testing.assert_frame_equal(run.mia, table)
    for stem in ("mia_roc", "mia_vulnerability_vs_mem", "mia_tpr_vs_frequency"):
        assert (run_dir / "figures" / f"{stem}.png").is_file()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["variants"]["nonprivate"]["membership"]["attack"] == "lira-online"
    assert summary["variants"]["dp-eps4"]["margin_audit"] is None     # off unless check --margin-audit asks
    assert 'id="mia-table"' in (run_dir / "report.html").read_text()


def test_mia_on_a_run_without_margins_exits_2_and_report_notes_it(tiny_digits_run, tmp_path):
    run_dir, _ = tiny_digits_run
    old = tmp_path / "old"
    shutil.copytree(run_dir, old)
    record_path = old / "variants" / "dp-eps4" / "complete.json"
    record = json.loads(record_path.read_text())
    for key in ("train_margin", "test_margin"):
        record["arrays"].remove(key)
        record["sha256"].pop(key)
        (old / "variants" / "dp-eps4" / f"{key}.npy").unlink()
    record_path.write_text(json.dumps(record))
    code, _, err = run_cli(["mia", str(old)])
    assert code == 2 and err.count("\n") == 1 and "train_margin.npy" in err and "'dp-eps4'" in err
    code, _, err = run_cli(["report", str(old)])
    assert code == 0 and "note: membership inference skipped" in err and "train_margin.npy" in err


def test_too_few_models_exit_2_in_mia_and_a_note_in_run(tmp_path):
    """Four models cannot give every target 2 in- and 2 out-references: `dpmem run` finishes with a
    note, `dpmem mia` says what is missing in one line and exits 2."""
    code, _, err = run_cli(["run", "--out", str(tmp_path / "four"), "--quiet", "dataset=digits", "models=4",
                         "unit_size=4", "epochs=1", "epsilons=4", "hidden=8", "threads=1"])
    assert code == 0 and "note: membership inference skipped" in err and "needs more models" in err
    assert not (tmp_path / "four" / "mia.csv").exists()
    code, _, err = run_cli(["mia", str(tmp_path / "four")])
    assert code == 2 and err.count("\n") == 1 and "3 in- and 3 out-models (4 models)" in err

"""Memorization proxies (bench/estimators/proxies.py, report/proxies.py, `dpmem proxies`)."""
import json
import shutil

import numpy as np
import pandas as pd
import pytest
from cli_helpers import run_cli

import dpmem
from dpmem.bench.estimators import proxies as px


def _synthetic(K=400, n=300, seed=0, noise=0.0):
    """Models whose correctness follows a known memorization: p_in = 0.5 + mem / 2, p_out = 0.5 - mem / 2;
    the recorded loss falls with the in-model margin, which carries mem."""
    rng = np.random.default_rng(seed)
    mem = rng.uniform(0, 1, n)
    masks = rng.random((K, n)) < 0.5
    p = np.where(masks, 0.5 + mem / 2, 0.5 - mem / 2)
    correct = rng.random((K, n)) < p
    margin = np.where(masks, 2 - 2 * mem, -mem) + rng.normal(0, 0.3 + noise, (K, n))
    draws = np.where(masks, rng.integers(5, 10, (K, n)), 0)
    loss_sum = draws * np.log1p(np.exp(-margin)) * masks
    return mem, masks, correct, margin.astype(np.float16), loss_sum, draws


def test_agreement_of_a_perfect_and_a_reversed_proxy():
    mem = np.linspace(0, 1, 200)
    same = px.agreement(mem * 3 + 1, mem, bootstrap=200)
    assert same["spearman"] == pytest.approx(1) and same["pearson"] == pytest.approx(1)
    assert same["precision@5%"] == 1 and same["examples"] == 200
    rev = px.agreement(-mem, mem, bootstrap=200)
    assert rev["spearman"] == pytest.approx(-1) and rev["precision@5%"] == 0
    assert rev["spearman_lo"] <= rev["spearman"] <= rev["spearman_hi"]


def test_precision_at_the_top_counts_shared_examples():
    mem = np.arange(40.0)                   # mem's top 5%: examples 38 and 39
    proxy = np.zeros(40)
    proxy[[39, 0]] = [5, 6]                 # the proxy's top two: 0 (wrong) and 39 (right)
    assert px._precision(proxy, mem) == 0.5


def test_a_proxy_that_carries_mem_tracks_it_and_noise_does_not():
    mem, masks, correct, margin, loss_sum, draws = _synthetic()
    noise = np.random.default_rng(1).normal(size=masks.shape)
    table = px.proxy_table(px.ProxyInputs(masks=masks, correct=correct, margin=margin,
                                          stats={"train_loss_sum": loss_sum, "train_draws": draws}),
                           private=False, bootstrap=200).set_index("proxy")
    assert table.loc["csl_mean", "spearman"] > 0.8 and table.loc["in_margin_mean", "spearman"] > 0.8
    assert table.loc["csl", "spearman_lo"] < table.loc["csl", "spearman"] < table.loc["csl", "spearman_hi"]
    assert table.loc["csl", "spread_lo"] <= table.loc["csl", "spearman"] <= table.loc["csl", "spread_hi"]
    assert table.loc["csl", "models"] == 1 and table.loc["csl_mean", "models"] == 200
    assert 0 < table.loc["mem_other_half", "spearman"] < 1
    assert table["ceiling"].iloc[0] == pytest.approx(np.sqrt(table.loc["mem_other_half", "spearman"]))
    # a proxy of pure noise: correlation near 0, its interval covering 0
    junk = px.proxy_table(px.ProxyInputs(masks=masks, correct=correct, margin=noise.astype(np.float16),
                                         stats={"train_loss_sum": np.abs(noise) * masks, "train_draws": draws}),
                          private=False, bootstrap=200).set_index("proxy")
    assert junk.loc["csl_mean", "spearman_lo"] < 0 < junk.loc["csl_mean", "spearman_hi"]


def test_unrecorded_statistics_are_a_note_never_a_zero_column():
    _, masks, correct, margin, _, _ = _synthetic(K=40, n=50)
    table = px.proxy_table(px.ProxyInputs(masks=masks, correct=correct, margin=margin, stats={}),
                           private=True, bootstrap=50).set_index("proxy")
    for proxy in ("csl", "csg", "clip_rate", "csl_mean", "csg_mean"):
        assert table.loc[proxy, "note"].startswith("not recorded: train_") and np.isnan(table.loc[proxy, "spearman"])
    assert table.loc["in_margin", "note"] == "" and np.isfinite(table.loc["in_margin", "spearman"])
    private = px.proxy_table(px.ProxyInputs(masks=masks, correct=correct, margin=margin, stats={}),
                             private=False, bootstrap=50).set_index("proxy")
    assert private.loc["csg", "note"] == "non-private training computes no per-example gradients"


def test_the_python_api_checks_its_arrays():
    mem, masks, correct, margin, loss_sum, draws = _synthetic(K=40, n=50)
    table = dpmem.proxies(masks, correct, margin, loss_sum=loss_sum, draws=draws, bootstrap=50)
    assert list(table["proxy"]) == list(px.PROXIES)
    with pytest.raises(ValueError, match="loss_sum must be a finite numeric array"):
        dpmem.proxies(masks, correct, margin, loss_sum=loss_sum[:, :3])
    with pytest.raises(ValueError, match="at least 4 models"):
        dpmem.proxies(masks[:3], correct[:3], margin[:3])



def test_a_run_records_the_statistics_and_writes_the_proxy_table(tiny_digits_run):
    run_dir, err = tiny_digits_run
    assert "train_loss_sum" not in err
    for name, dp in (("nonprivate", False), ("dp-eps4", True)):
        arrays = json.loads((run_dir / "variants" / name / "complete.json").read_text())["arrays"]
        assert ("train_grad_norm_sum" in arrays) == dp and "train_loss_sum" in arrays and "train_draws" in arrays
    draws = np.load(run_dir / "variants" / "dp-eps4" / "train_draws.npy")
    masks = np.load(run_dir / "masks.npy")
    assert draws.sum() > 0 and not draws[~masks].any()
    table = pd.read_parquet(run_dir / "proxies.parquet")
    assert len(table) == 2 * len(px.PROXIES)
    assert (run_dir / "figures" / "proxies_vs_mem.png").is_file()
    pd.testing.assert_frame_equal(dpmem.open_run(run_dir).proxies, table)
    dp_rows = table.loc[table["variant"] == "dp-eps4"].set_index("proxy")
    assert np.isfinite(dp_rows.loc["csg_mean", "spearman"]) and dp_rows.loc["csg_mean", "note"] == ""


def test_proxies_on_a_run_without_statistics_names_them(tiny_digits_run, tmp_path):
    run_dir, _ = tiny_digits_run
    old = tmp_path / "old"
    shutil.copytree(run_dir, old)
    record_path = old / "variants" / "dp-eps4" / "complete.json"
    record = json.loads(record_path.read_text())
    for key in ("train_loss_sum", "train_draws", "train_grad_norm_sum", "train_clips"):
        record["arrays"].remove(key)
        record["sha256"].pop(key)
        (old / "variants" / "dp-eps4" / f"{key}.npy").unlink()
    record_path.write_text(json.dumps(record))
    code, out, err = run_cli(["proxies", str(old), "--bootstrap", "50"])
    assert code == 0 and "note: variant dp-eps4: train_loss_sum, train_draws, train_grad_norm_sum, train_clips not " \
                          "recorded" in err
    table = pd.read_parquet(old / "proxies.parquet").set_index(["variant", "proxy"])
    assert np.isnan(table.loc[("dp-eps4", "csl"), "spearman"]) and np.isfinite(table.loc[("nonprivate", "csl"), "spearman"])
    code, _, err = run_cli(["proxies", str(old), "--bootstrap", "3"])
    assert code == 2 and err.count("\n") == 1 and "--bootstrap must be >= 10" in err

"""Gradient canaries in both engines: real training untouched, canary scores as predicted."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from scipy import stats

from dpmem.models import train_models
from dpmem.models.spec import DPParams, TrainRequest, TrainSpec, canary_layout

N, D, M = 60, 10, 20


@pytest.fixture(autouse=True)
def _one_thread_quiet():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        yield
    torch.set_num_threads(previous)


def _spec(dp, canaries=0, **kw):
    base = dict(arch="logreg", input_shape=(D,), n_classes=3, steps=20, sample_rate=0.3, lr=0.2, momentum=0.5,
                weight_decay=0.01, dp=dp, canaries=canaries)
    return TrainSpec(**(base | kw))


def _requests(K, seed=0):
    """The same request without and with M canaries (placeholder rows, canary ids in reverse order)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(N, D)).astype(np.float32)
    y = rng.integers(0, 3, N)
    masks = rng.random((K, N)) < 0.5
    canary_masks = rng.random((K, M)) < 0.5
    plain = TrainRequest(x_train=x, y_train=y, masks=masks, seed=1, noise_seed=2, evals={"train": (x, y)})
    with_canaries = TrainRequest(
        x_train=np.concatenate([x, np.zeros((M, D), np.float32)]), y_train=np.concatenate([y, np.zeros(M, int)]),
        masks=np.concatenate([masks, canary_masks[:, ::-1]], axis=1), seed=1, noise_seed=2, evals={"train": (x, y)},
        canary=np.concatenate([-np.ones(N, int), np.arange(M)[::-1]]))
    return plain, with_canaries, canary_masks


DP = DPParams(noise_multiplier=1.0, max_grad_norm=0.5)


@pytest.mark.parametrize("engine", ["batched", "opacus"])
@pytest.mark.parametrize("dp", [None, DP], ids=["nonprivate", "dp"])
def test_real_training_is_bit_for_bit_unchanged_by_canaries(engine, dp):
    plain, with_canaries, canary_masks = _requests(K=6 if engine == "opacus" else 30)
    a = train_models(_spec(dp), plain, engine=engine)
    b = train_models(_spec(dp, M), with_canaries, engine=engine)
    assert "canary_score" not in a and b["canary_score"].shape == canary_masks.shape
    assert b["canary_score"].dtype == np.float32
    np.testing.assert_array_equal(a["train_margin"], b["train_margin"])
    np.testing.assert_array_equal(a["train_correct"], b["train_correct"])


def test_nonprivate_scores_are_the_noise_free_shift_and_engines_agree():
    # without noise a canary's score is lr * canary_norm * (times sampled) / ebs through the SGD
    # recursion; both engines draw the canaries' coins from the same stream, so they agree exactly
    _, req, canary_masks = _requests(K=8)
    spec = _spec(None, M, momentum=0.0, weight_decay=0.0, canary_norm=2.0)
    batched = train_models(spec, req, engine="batched")["canary_score"]
    ref = train_models(spec, req, engine="opacus")["canary_score"]
    np.testing.assert_allclose(batched, ref, rtol=1e-5, atol=1e-6)
    assert np.all(batched[~canary_masks] == 0) and np.all(batched[canary_masks] >= 0)
    ebs = np.maximum(1, (0.3 * req.masks[:, :N].sum(axis=1)).astype(int))
    times = batched * ebs[:, None] / (0.2 * 2.0)   # how often each canary was sampled
    np.testing.assert_allclose(times, np.round(times), atol=1e-4)
    assert times.max() <= spec.steps and times[canary_masks].mean() == pytest.approx(0.3 * spec.steps, rel=0.35)


def test_dp_scores_shift_and_noise_as_predicted_and_engines_agree_in_distribution():
    # no momentum or weight decay: out-scores ~ N(0, s^2), s = lr sigma C sqrt(T) / ebs; in-scores
    # are shifted by lr * C * (times sampled) / ebs, on average lr C q T / ebs
    K = 400
    _, req, canary_masks = _requests(K=K, seed=3)
    spec = _spec(DP, M, momentum=0.0, weight_decay=0.0)
    scores = train_models(spec, req, engine="batched")["canary_score"].astype(float)
    ebs = np.maximum(1, (0.3 * req.masks[:, :N].sum(axis=1)).astype(int)).reshape(-1, 1)
    s = 0.2 * 1.0 * 0.5 * np.sqrt(20) / ebs
    z_out = (scores / s)[~canary_masks]
    assert stats.kstest(z_out, "norm").pvalue > 0.001
    shift = (0.2 * 0.5 * 0.3 * 20 / ebs) * np.ones_like(scores)
    z_in = ((scores - shift) / s)[canary_masks]   # the count adds variance q(1-q)T / (sigma^2 T)
    assert abs(z_in.mean()) < 4 * np.sqrt(1.21 / z_in.size)
    assert abs(z_in.var() - (1 + 0.3 * 0.7 / 1.0 ** 2)) < 0.1
    # the Opacus path's canaries (Opacus's own clipping and noise) agree in distribution
    _, small, small_masks = _requests(K=40, seed=3)
    ref = train_models(spec, small, engine="opacus")["canary_score"].astype(float)
    small_ebs = np.maximum(1, (0.3 * small.masks[:, :N].sum(axis=1)).astype(int)).reshape(-1, 1)
    ref_z_out = (ref * small_ebs)[~small_masks]
    assert stats.ks_2samp(ref_z_out, (scores * ebs)[~canary_masks]).pvalue > 0.001
    assert stats.ks_2samp((ref * small_ebs)[small_masks], (scores * ebs)[canary_masks]).pvalue > 0.001


def test_bad_canary_markers_are_refused():
    _, req, _ = _requests(K=3)
    bad = np.array(req.canary)
    bad[-1] = M  # a canary id outside [0, M)
    with pytest.raises(ValueError, match="canary"):
        canary_layout(_spec(None, M), TrainRequest(**{**req.__dict__, "canary": bad}))
    with pytest.raises(ValueError, match="marks none"):
        canary_layout(_spec(None, M), TrainRequest(**{**req.__dict__, "canary": None}))

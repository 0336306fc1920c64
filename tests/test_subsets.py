import numpy as np
import pytest

from dpmem.bench.run.subsets import make_masks, subset_sizes
from dpmem.privacy.audit import adjacency_of, per_example_counts
from dpmem.privacy.errors import ConfigError


def in_out_counts(masks):
    c = per_example_counts(masks, masks)
    return c["n_in"], c["n_out"]


def test_bernoulli_rate_and_independence():
    K, n, q = 400, 300, 0.7
    masks = make_masks(sampling="bernoulli", models=K, n=n, q=q, seed=3)
    assert masks.shape == (K, n) and masks.dtype == bool
    total = K * n
    # overall rate within 4 binomial standard deviations
    assert abs(masks.sum() - q * total) < 4 * np.sqrt(total * q * (1 - q))
    # every example's inclusion count is Binomial(K, q): no example is systematically in or out
    n_in, _ = in_out_counts(masks)
    assert abs(n_in.mean() - q * K) < 4 * np.sqrt(K * q * (1 - q) / n)
    variance_ratio = n_in.var(ddof=1) / (K * q * (1 - q))
    assert 0.6 < variance_ratio < 1.4          # standard error of the ratio ~ sqrt(2 / (n - 1)) = 0.08
    # rows vary in size (not the fixed scheme in disguise)
    assert np.unique(subset_sizes(masks)).size > 5


def test_fixed_rows_have_exactly_m_and_are_uniform():
    K, n, q = 2000, 10, 0.7
    masks = make_masks(sampling="fixed", models=K, n=n, q=q, seed=1)
    assert (subset_sizes(masks) == 7).all()
    # every example equally likely to be in: column rates 0.7 within binomial tolerance
    n_in, n_out = in_out_counts(masks)
    assert (np.abs(n_in - q * K) < 4.5 * np.sqrt(K * q * (1 - q))).all()
    assert (n_in + n_out == K).all()
    # all C(10, 7) = 120 subsets occur (uniform over subsets, not a few patterns)
    patterns = {row.tobytes() for row in masks}
    assert len(patterns) == 120


def test_fixed_rounds_q_times_n():
    masks = make_masks(sampling="fixed", models=5, n=33, q=0.7, seed=0)
    assert (masks.sum(axis=1) == round(0.7 * 33)).all()


def test_balanced_columns_have_exactly_qK():
    K, n, q = 50, 400, 0.7
    masks = make_masks(sampling="balanced", models=K, n=n, q=q, seed=2)
    n_in, n_out = in_out_counts(masks)
    assert (n_in == 35).all() and (n_out == 15).all()
    # rows are random sizes around q*n, not identical
    sizes = subset_sizes(masks)
    assert abs(sizes.mean() - q * n) < 1e-9          # exact: total ones = 35 * n
    assert np.unique(sizes).size > 3
    assert len({row.tobytes() for row in masks}) == K


@pytest.mark.parametrize("sampling", ["bernoulli", "fixed", "balanced"])
def test_deterministic_per_seed(sampling):
    a = make_masks(sampling=sampling, models=20, n=100, q=0.7, seed=5)
    b = make_masks(sampling=sampling, models=20, n=100, q=0.7, seed=5)
    c = make_masks(sampling=sampling, models=20, n=100, q=0.7, seed=6)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_schemes_without_in_or_out_models_are_refused():
    with pytest.raises(ConfigError) as e:
        make_masks(sampling="balanced", models=2, n=10, q=0.2, seed=0)   # round(0.4) = 0 models per example
    assert e.value.field == "models"
    with pytest.raises(ConfigError) as e:
        make_masks(sampling="fixed", models=4, n=3, q=0.9, seed=0)       # round(2.7) = 3 = n
    assert e.value.field == "q"
    with pytest.raises(ConfigError):
        make_masks(sampling="poisson", models=4, n=3, q=0.5, seed=0)


def test_adjacency_per_scheme():
    assert [adjacency_of(s) for s in ("bernoulli", "balanced", "fixed")] == ["add/remove", "add/remove", "replace-one"]

"""The counter-based random numbers of the GPU path (models/philox.py: DP noise, Poisson coins and
canary draws), run here on the CPU with the same code: Philox4x32-10's published answers, rows that
depend only on (seed, stream id, step), the normal and uniform distributions, and a whole DP run with
canaries that does not depend on the split."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from dpmem.models import batched, noise, philox
from dpmem.models.spec import DPParams, TrainSpec

# Random123's known-answer vectors for philox4x32-10: (counter, key) -> output words
KNOWN_ANSWERS = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("counter, key, expected", KNOWN_ANSWERS)
def test_philox_gives_the_published_answers(counter, key, expected):
    words = philox.philox4x32(tuple(torch.tensor(c) for c in counter), tuple(torch.tensor(k) for k in key))
    assert tuple(int(w) for w in words) == expected


def test_a_models_noise_depends_only_on_its_key_and_step():
    keys = noise.counter_keys(7, np.arange(8), torch.device("cpu"))
    whole = philox.counter_normals(keys, 3, 1001)
    assert whole.shape == (8, 1001)
    parts = torch.cat([philox.counter_normals(keys[:3], 3, 1001), philox.counter_normals(keys[3:], 3, 1001)])
    assert torch.equal(whole, parts)
    assert torch.equal(philox.counter_normals(keys[5:6], 3, 1001), whole[5:6])
    reordered = noise.counter_keys(7, np.array([5, 2]), torch.device("cpu"))
    assert torch.equal(philox.counter_normals(reordered, 3, 1001), whole[[5, 2]])
    assert not torch.equal(philox.counter_normals(keys, 4, 1001), whole)                # another step
    assert not torch.equal(philox.counter_normals(noise.counter_keys(8, np.arange(8), torch.device("cpu")), 3, 1001),
                           whole)                                                        # another noise seed
    assert not torch.equal(whole[0], whole[1])


def test_counter_noise_is_standard_normal():
    keys = noise.counter_keys(0, np.arange(4), torch.device("cpu"))
    z = torch.cat([philox.counter_normals(keys, step, 25_000) for step in range(2)]).flatten().double().numpy()
    assert stats.kstest(z, "norm").pvalue > 1e-3
    assert abs(z.mean()) < 0.01 and abs(z.std() - 1) < 0.01
    # no correlation between a model's consecutive steps or neighbouring models
    assert abs(np.corrcoef(z[:25_000], z[100_000:125_000])[0, 1]) < 0.03


def test_counter_uniforms_depend_only_on_key_and_step_and_are_uniform():
    keys = philox.philox_keys([11, 2**40 + 3, 5, 7], torch.device("cpu"))
    whole = philox.counter_uniforms(keys, 2, 10_001)
    assert whole.shape == (4, 10_001) and whole.dtype == torch.float32
    assert torch.equal(torch.cat([philox.counter_uniforms(keys[:1], 2, 10_001), philox.counter_uniforms(keys[1:], 2, 10_001)]),
                       whole)
    assert not torch.equal(philox.counter_uniforms(keys, 3, 10_001), whole)             # another step
    # the coin domain differs from the noise domain: the same key and step give other words
    assert not torch.equal(philox.counter_uniforms(keys, 2, 8, domain=philox.NOISE_DOMAIN), whole[:, :8])
    u = whole.double().numpy()
    assert 0 < u.min() and u.max() < 1
    assert stats.kstest(u.ravel(), "uniform").pvalue > 1e-3
    assert abs(np.corrcoef(u[0], u[1])[0, 1]) < 0.03


def test_counter_coins_sample_each_subset_at_the_rate(monkeypatch):
    """The GPU's Poisson coins on the CPU: every example of a model's subset is drawn with probability
    q, independently across steps, never an example outside the subset."""
    monkeypatch.setitem(philox.RANDOM_SCHEMES, "cpu", "counter")
    spec = TrainSpec(arch="mlp", input_shape=(4,), n_classes=2, hidden=(3,), steps=1, sample_rate=0.2, lr=0.1)
    rng = np.random.default_rng(1)
    n, steps = 500, 40
    masks = rng.random((3, n)) < 0.5
    t = batched.stack_class(spec)(spec, rng.normal(size=(n, 4)).astype(np.float32), rng.integers(0, 2, n), masks,
                                  seed=3, noise_seed=4)
    assert t.counter
    counts = np.zeros((3, n))
    for _ in range(steps):
        b = t.sample_batch()
        for k in range(3):
            picked = b.x[k][b.valid[k]].numpy()
            index = {tuple(r): i for i, r in enumerate(t.x_train.numpy())}
            for row in picked:
                counts[k, index[tuple(row)]] += 1
    assert counts[~masks].sum() == 0
    rate = counts[masks].sum() / (masks.sum() * steps)
    assert abs(rate - 0.2) < 4 * np.sqrt(0.2 * 0.8 / (masks.sum() * steps))


def test_a_dp_run_with_counter_noise_does_not_depend_on_the_split(monkeypatch):
    """The GPU's random scheme on the CPU (noise, coins and canaries): models [0, 6) together equal
    [0, 3) and [3, 6) apart, bit for bit (the MLP step, whose arithmetic does not depend on K either;
    models/README.md)."""
    monkeypatch.setitem(philox.RANDOM_SCHEMES, "cpu", "counter")
    spec = TrainSpec(arch="mlp", input_shape=(12,), n_classes=3, hidden=(8,), steps=5, sample_rate=0.3, lr=0.3,
                     momentum=0.5, dp=DPParams(noise_multiplier=1.0, max_grad_norm=1.0), canaries=30)
    rng = np.random.default_rng(0)
    x, y, masks = rng.normal(size=(40, 12)).astype(np.float32), rng.integers(0, 3, 40), rng.random((6, 40)) < 0.7
    members = rng.random((6, 30)) < 0.5

    def trained(rows):
        t = batched.stack_class(spec)(spec, x, y, masks[rows], seed=0, noise_seed=1, stream_ids=np.arange(6)[rows],
                                      canary_members=members[rows])
        assert isinstance(t.noise, noise.CounterNoise) and t.counter and t.canaries.counter
        t.train(spec.steps)
        t.close()
        return [*t.params, t.canaries.theta]
    whole = trained(slice(0, 6))
    parts = [trained(slice(0, 3)), trained(slice(3, 6))]
    for p, a, b in zip(whole, *parts, strict=True):
        assert torch.equal(p, torch.cat([a, b]))
    assert whole[-1].abs().sum() > 0   # the canaries moved

"""Augmentation (models/augment.py): random crops and flips per example and step from each model's
own stream, multiplicity averaged before clipping, equal clipped sums in both engines, config keys."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer
from torch import nn

from dpmem.bench.config import Config
from dpmem.models import graph, opacus_engine, stack
from dpmem.models.augment import CROP_PADDING, augment_batch
from dpmem.models.nets import build_model
from dpmem.models.spec import AUGMENT_STREAM, DPParams, TrainRequest, TrainSpec
from dpmem.models.streams import stream_generator
from dpmem.privacy.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_torch_thread", "quiet_opacus")


def test_crops_are_zero_filled_shifts_and_flips_mirror_each_copy():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 2, 6, 7, generator=g) + 1.0   # no zeros: shifted-in zeros are visible
    m, p = 4, CROP_PADDING
    out = augment_batch(x, "crop-flip", m, torch.Generator().manual_seed(5))
    replay = torch.Generator().manual_seed(5)
    shifts = torch.randint(0, 2 * p + 1, (3 * m, 2), generator=replay)
    flips = torch.rand(3 * m, generator=replay) < 0.5
    assert out.shape == (3 * m, 2, 6, 7)
    padded = F.pad(x, (p, p, p, p))
    for r in range(3 * m):
        dy, dx = shifts[r].tolist()
        expected = padded[r // m, :, dy:dy + 6, dx:dx + 7]
        torch.testing.assert_close(out[r], expected.flip(-1) if flips[r] else expected, rtol=0, atol=0)
    assert len({tuple(s) for s in shifts.tolist()}) > 1 and 0 < int(flips.sum()) < 3 * m
    assert torch.equal(augment_batch(x, "none", 2, g), x.repeat_interleave(2, dim=0))


def _opacus_clipped_copies(module, rows, y, copies, max_grad_norm):
    """Opacus's per-sample gradients of the copies, summed per example (the engine's rule via
    opacus_engine._sum_copies), clipped and summed by DPOptimizer."""
    gsm = GradSampleModule(module, batch_first=True, loss_reduction="sum")
    optimizer = DPOptimizer(torch.optim.SGD(gsm.parameters(), lr=1.0), noise_multiplier=0.0,
                            max_grad_norm=max_grad_norm, expected_batch_size=1, loss_reduction="sum")
    (F.cross_entropy(gsm(rows), y.repeat_interleave(copies), reduction="sum") / copies).backward()
    opacus_engine._sum_copies(optimizer, copies)
    norms = torch.stack([g.reshape(len(g), -1).norm(2, dim=-1) for g in optimizer.grad_samples], dim=1).norm(2, dim=1)
    optimizer.pre_step()
    grads = [p.grad.clone() for p in gsm.parameters()]
    gsm.remove_hooks()
    return norms, grads


FACTORIES = {
    "cnn": lambda: build_model(TrainSpec(arch="cnn", input_shape=(1, 8, 8), n_classes=5, hidden=(4, 6), steps=1,
                                         sample_rate=0.1, lr=0.1)),
    "resnet20": lambda: build_model(TrainSpec(arch="resnet20", input_shape=(1, 8, 8), n_classes=5, hidden=(4,),
                                              steps=1, sample_rate=0.1, lr=0.1)),
    "mlp": lambda: nn.Sequential(nn.Flatten(), nn.Linear(64, 12), nn.ReLU(), nn.Linear(12, 5)),
}


@pytest.mark.parametrize("name", list(FACTORIES))
def test_multiplicity_clipped_sums_equal_opacus_on_the_same_copies(name):
    """Each model's copies drawn once from its own generator; the engine's clip of the mean over
    copies equals Opacus's per-sample gradients summed over copies, clipped, summed."""
    K, B, m = 3, 6, 3
    torch.manual_seed(0)
    mods = [FACTORIES[name]() for _ in range(K)]
    params = [torch.stack([p.detach() for p in ps]) for ps in zip(*(mod.parameters() for mod in mods))]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(K, B, 1, 8, 8, generator=g)
    y = torch.randint(0, 5, (K, B), generator=g)
    valid = torch.ones(K, B, dtype=torch.bool)
    valid[0, 4:] = False
    rows = torch.stack([augment_batch(x[k], "crop-flip", m, torch.Generator().manual_seed(10 + k)) for k in range(K)])
    net = graph.wide_network(mods[0], K)
    _, norms = stack.dp_gradients(net, params, rows, y.repeat_interleave(m, dim=1), valid, 1e9, copies=m)
    clip = float(norms[valid].median())
    sums, norms = stack.dp_gradients(net, params, rows, y.repeat_interleave(m, dim=1), valid, clip, copies=m)
    assert torch.all(norms[~valid] == 0)
    for k in range(K):
        n = int(valid[k].sum())
        ref_norms, ref_grads = _opacus_clipped_copies(mods[k], rows[k][:n * m], y[k][:n], m, clip)
        torch.testing.assert_close(norms[k][:n], ref_norms, rtol=1e-4, atol=1e-6)
        for mine, ref in zip(sums, ref_grads, strict=True):
            torch.testing.assert_close(mine[k], ref, rtol=1e-4, atol=1e-5)


def _spec(dp=None, augment="crop-flip", copies=2, steps=3, arch="cnn", hidden=(4,)):
    return TrainSpec(arch=arch, input_shape=(1, 8, 8), n_classes=4, hidden=hidden, steps=steps, sample_rate=0.3,
                     lr=0.3, momentum=0.5, dp=dp, augment=augment, augment_multiplicity=copies)


def _data(n=40, K=4):
    rng = np.random.default_rng(0)
    return (rng.normal(size=(n, 1, 8, 8)).astype(np.float32), rng.integers(0, 4, n), rng.random((K, n)) < 0.7)


def test_nonprivate_multiplicity_is_the_mean_gradient_over_copies():
    """Without DP the step's gradient is sum over examples of the mean over copies, / expected batch size."""
    spec = _spec(augment="crop", copies=3)
    x, y, masks = _data(K=2)
    trainer = stack.ModelStack(spec, x, y, masks, seed=0, noise_seed=1)
    batch = trainer.sample_batch()
    assert batch.copies == 3 and batch.x.shape[1] == 3 * batch.valid.shape[1]
    grads = trainer.gradients(batch)
    ebs = trainer.inv_ebs.reciprocal()
    for k in range(2):
        model = build_model(spec)
        model.load_state_dict(trainer.model_state(k))
        n = int(batch.valid[k].sum())
        loss = F.cross_entropy(model(batch.x[k][:3 * n]), batch.y[k][:3 * n], reduction="sum") / 3 / ebs[k]
        loss.backward()
        for mine, p in zip(grads, model.parameters(), strict=True):
            torch.testing.assert_close(mine[k], p.grad, rtol=1e-4, atol=1e-6)
    trainer.close()


def test_augmented_models_do_not_depend_on_their_neighbours():
    """Models [0, 4) trained together equal [0, 2) and [2, 4) apart (their own augmentation streams),
    and augmentation changes the result."""
    spec = _spec(dp=DPParams(noise_multiplier=1.0, max_grad_norm=1.0))
    x, y, masks = _data()

    def trained(rows, s=spec):
        t = stack.ModelStack(s, x, y, masks[rows], seed=0, noise_seed=1, stream_ids=np.arange(4)[rows])
        t.train(s.steps)
        t.close()
        return t.params
    whole = trained(slice(0, 4))
    parts = [trained(slice(0, 2)), trained(slice(2, 4))]
    for p, a, b in zip(whole, *parts, strict=True):
        torch.testing.assert_close(p, torch.cat([a, b]), rtol=1e-5, atol=1e-6)
    plain = trained(slice(0, 4), _spec(dp=DPParams(noise_multiplier=1.0, max_grad_norm=1.0), augment="none",
                                       copies=1))
    assert not torch.allclose(whole[0], plain[0])


def test_the_opacus_path_augments_from_the_same_stream():
    """The Opacus path draws its copies from (seed, stream id, AUGMENT_STREAM): deterministic, and
    with augmentation off it trains as before."""
    x, y, masks = _data(K=2)
    req = TrainRequest(x_train=x, y_train=y, masks=masks, seed=0, noise_seed=1, evals={"train": (x, y)})
    dp = DPParams(noise_multiplier=0.5, max_grad_norm=1.0)
    first = opacus_engine.train(_spec(dp=dp), req)
    again = opacus_engine.train(_spec(dp=dp), req)
    plain = opacus_engine.train(_spec(dp=dp, augment="none", copies=1), req)
    assert np.array_equal(first["train_margin"], again["train_margin"])
    assert not np.array_equal(first["train_margin"], plain["train_margin"])


def test_config_keys_refused_with_the_field_and_absent_from_old_identities():
    assert "augment" not in Config().identity() and "augment_multiplicity" not in Config().identity()
    assert Config(augment="crop").hash() != Config().hash()
    assert Config(augment="crop", augment_multiplicity=4).hash() != Config(augment="crop").hash()
    for kwargs, field in [(dict(augment="rotate"), "augment"), (dict(augment_multiplicity=0), "augment_multiplicity"),
                          (dict(augment_multiplicity=2), "augment_multiplicity")]:
        with pytest.raises(ConfigError) as e:
            Config(**kwargs)
        assert e.value.field == field


def test_the_engines_copies_are_augment_batch_of_each_models_batch_from_its_stream():
    """The engine draws each model's choices from SeedSequence([seed, stream id, AUGMENT_STREAM]) and
    applies them to all rows at once: its copies equal augment_batch (the Opacus path's function)
    of the model's own batch with that generator; padded rows (example 0) stay unaugmented."""
    x, y, masks = _data(K=3)
    streams = np.array([5, 0, 9])
    plain = stack.ModelStack(_spec(augment="none", copies=1), x, y, masks, seed=2, noise_seed=1, stream_ids=streams)
    augmented = stack.ModelStack(_spec(augment="crop-flip", copies=3), x, y, masks, seed=2, noise_seed=1,
                                 stream_ids=streams)
    generators = [stream_generator(2, int(s), AUGMENT_STREAM, device=torch.device("cpu")) for s in streams]
    for _ in range(2):   # two steps: each generator moves on
        base, batch = plain.sample_batch(), augmented.sample_batch()
        assert torch.equal(base.valid, batch.valid) and batch.copies == 3
        for k, gen in enumerate(generators):
            n = int(base.valid[k].sum())
            expected = augment_batch(base.x[k, :n], "crop-flip", 3, gen)
            assert torch.equal(batch.x[k, :3 * n], expected)
            assert torch.equal(batch.y[k, :3 * n], base.y[k, :n].repeat_interleave(3))
            assert torch.equal(batch.x[k, 3 * n:], torch.as_tensor(x[:1]).expand(batch.x.shape[1] - 3 * n, -1, -1, -1))
    plain.close()
    augmented.close()

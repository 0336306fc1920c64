"""The training engines: the batched engine against Opacus, its noise, sampling and determinism."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer
from scipy import stats
from sklearn.datasets import load_digits
from torch import nn

from dpmem import models
import dpmem.models.batched as batched
import dpmem.models.opacus_trainer as opacus_trainer
from dpmem.models import train_models
from dpmem.models.nets import build_model
from dpmem.models.spec import DPParams, Outputs, TrainRequest, TrainSpec

FC_CASES = [("logreg", ()), ("mlp", (24,)), ("mlp", (24, 16))]
FC_IDS = ["logreg", "mlp1", "mlp2"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # These problems are tiny: thread start-up would dominate, and on a busy machine two
    # intra-op threads stall each other. Restored afterwards for the other test files.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(autouse=True)
def _quiet_opacus():
    # Opacus's hooks warn that no input requires grad; irrelevant here.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        yield


def fc_spec(arch, hidden, *, dp=None, momentum=0.0, lr=0.1, steps=1, sample_rate=0.2, d=(8, 8)):
    return TrainSpec(arch=arch, input_shape=d, n_classes=5, hidden=hidden, steps=steps,
                     sample_rate=sample_rate, lr=lr, momentum=momentum, dp=dp)


def random_batch(K=3, B=20, seed=0, d=(8, 8)):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(K, B, *d, generator=g) * 2.0
    y = torch.randint(0, 5, (K, B), generator=g)
    valid = torch.rand(K, B, generator=g) < 0.75
    return x, y, valid


def opacus_clipped(spec, params, k, x, y, max_grad_norm):
    """Opacus's per-example norms and clipped gradient sum for model k on its valid rows."""
    model = build_model(spec)
    model.load_state_dict(batched.export_params(spec, params, k))
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="sum")
    optimizer = DPOptimizer(torch.optim.SGD(gsm.parameters(), lr=1.0), noise_multiplier=0.0,
                            max_grad_norm=max_grad_norm, expected_batch_size=1, loss_reduction="sum")
    nn.functional.cross_entropy(gsm(x), y, reduction="sum").backward()
    norms = torch.stack([g.reshape(len(g), -1).norm(2, dim=-1) for g in optimizer.grad_samples], dim=1).norm(2, dim=1)
    optimizer.pre_step()  # clip, accumulate, zero noise, no scaling
    return norms, [p.grad.clone() for p in gsm.parameters()]


# -- exactness against Opacus -------------------------------------------------------------------

@pytest.mark.parametrize(("arch", "hidden"), FC_CASES, ids=FC_IDS)
def test_norms_and_clipped_sum_equal_opacus(arch, hidden):
    spec = fc_spec(arch, hidden)
    params = batched.init_params(spec, 3, torch.Generator().manual_seed(1))
    x, y, valid = random_batch()
    norms = batched.per_example_grad_norms(params, x, y, valid)
    assert torch.all(norms[~valid] == 0), "padded rows must have zero gradient"
    max_grad_norm = float(norms[valid].median())  # about half the examples get clipped
    sums = batched.clipped_grad_sum(params, x, y, max_grad_norm, valid)
    clipped_somewhere = False
    for k in range(3):
        ref_norms, ref_grads = opacus_clipped(spec, params, k, x[k][valid[k]], y[k][valid[k]], max_grad_norm)
        torch.testing.assert_close(norms[k][valid[k]], ref_norms, rtol=1e-4, atol=1e-6)
        clipped_somewhere |= bool((ref_norms > max_grad_norm).any() and (ref_norms < max_grad_norm).any())
        engine_grads = [t for dW, db in sums for t in (dW[k], db[k])]
        for mine, ref in zip(engine_grads, ref_grads, strict=True):
            torch.testing.assert_close(mine, ref, rtol=1e-4, atol=1e-6)
    assert clipped_somewhere


@pytest.mark.parametrize(("arch", "hidden"), FC_CASES, ids=FC_IDS)
@pytest.mark.parametrize("private", [False, True], ids=["sgd", "dpsgd"])
def test_training_steps_equal_opacus_steps(arch, hidden, private):
    """Two steps with momentum from the same weights on the same batches (DP noise off): the
    engine's update equals Opacus's DPOptimizer (or plain SGD on summed loss / expected batch)."""
    dp = DPParams(noise_multiplier=0.0, max_grad_norm=0.5) if private else None
    spec = fc_spec(arch, hidden, dp=dp, momentum=0.9, lr=0.3, sample_rate=0.25)
    K, n = 3, 40
    rng = np.random.default_rng(0)
    x_train = rng.normal(size=(n, 8, 8)).astype(np.float32) * 2
    y_train = rng.integers(0, 5, n)
    masks = rng.random((K, n)) < 0.6
    trainer = batched.BatchedTrainer(spec, x_train, y_train, masks, seed=3, noise_seed=4)
    start = [batched.export_params(spec, trainer.params, k) for k in range(K)]
    draws = [trainer.sample_batch() for _ in range(2)]
    for batch in draws:
        trainer.step_on(batch)
    ebs = batched.expected_batch_sizes(masks, spec.sample_rate)
    for k in range(K):
        model = build_model(spec)
        model.load_state_dict(start[k])
        if private:
            module = GradSampleModule(model, batch_first=True, loss_reduction="sum")
            optimizer = DPOptimizer(torch.optim.SGD(module.parameters(), lr=spec.lr, momentum=spec.momentum),
                                    noise_multiplier=0.0, max_grad_norm=dp.max_grad_norm,
                                    expected_batch_size=ebs[k], loss_reduction="mean")
        else:
            module = model
            optimizer = torch.optim.SGD(model.parameters(), lr=spec.lr, momentum=spec.momentum)
        for batch in draws:
            xb, yb = batch.x[k][batch.valid[k]], batch.y[k][batch.valid[k]]
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(module(xb), yb, reduction="sum")
            (loss if private else loss / ebs[k]).backward()
            optimizer.step()
        mine = batched.export_params(spec, trainer.params, k)
        for name, ref in model.state_dict().items():
            torch.testing.assert_close(mine[name], ref, rtol=1e-4, atol=1e-6)


def test_export_import_round_trip_and_prediction_match_modules():
    spec = fc_spec("mlp", (24, 16))
    params = batched.init_params(spec, 4, torch.Generator().manual_seed(0))
    back = batched.import_params(spec, [batched.export_params(spec, params, k) for k in range(4)])
    for (w, b), (w2, b2) in zip(params, back, strict=True):
        assert torch.equal(w, w2) and torch.equal(b, b2)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(50, 8, 8)).astype(np.float32)
    y = rng.integers(0, 5, 50)
    out = batched.evaluate(params, x, y)
    for k in range(4):
        model = build_model(spec)
        model.load_state_dict(batched.export_params(spec, params, k))
        correct, margin = opacus_trainer.predict(model, x, y)
        assert np.array_equal(out.correct[k], correct)
        np.testing.assert_allclose(out.margin[k].astype(np.float32), margin.astype(np.float32), rtol=2e-3, atol=2e-3)


def test_init_matches_nn_linear_distribution():
    spec = fc_spec("mlp", (200,), d=(400,))
    (w1, b1), (w2, _) = batched.init_params(spec, 2, torch.Generator().manual_seed(0))
    bound = 1 / np.sqrt(400)
    assert w1.abs().max() <= bound and b1.abs().max() <= bound
    # uniform on [-bound, bound] has variance bound^2 / 3
    assert abs(w1.var().item() / (bound**2 / 3) - 1) < 0.02
    assert abs(w2.var().item() / (1 / 200 / 3) - 1) < 0.05


# -- noise, empty batches, sampling -------------------------------------------------------------

@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_dp_noise_has_the_right_std_and_empty_batch_is_noise_only(momentum):
    """An empty Poisson batch (all models): the update is -lr * noise with per-coordinate std
    sigma * C / expected_batch_size of that model; a non-private step leaves the weights alone.
    (A first step with momentum is the same: the buffer starts as the gradient.)"""
    sigma, C, lr = 1.3, 0.7, 0.5
    n = 300
    masks = np.zeros((2, n), dtype=bool)
    masks[0, :100] = True   # expected batch 20
    masks[1, :250] = True   # expected batch 50
    rng = np.random.default_rng(0)
    x_train = rng.normal(size=(n, 64)).astype(np.float32)
    y_train = rng.integers(0, 5, n)
    ebs = batched.expected_batch_sizes(masks, 0.2)
    assert ebs == [20, 50]
    for dp in (None, DPParams(noise_multiplier=sigma, max_grad_norm=C)):
        spec = fc_spec("mlp", (64,), dp=dp, lr=lr, d=(64,), momentum=momentum)
        trainer = batched.BatchedTrainer(spec, x_train, y_train, masks, seed=0, noise_seed=1)
        before = [t.clone() for layer in trainer.params for t in layer]
        empty = batched.PoissonBatch(x=torch.zeros(2, 1, 64), y=torch.zeros(2, 1, dtype=torch.long),
                                     valid=torch.zeros(2, 1, dtype=torch.bool))
        trainer.step_on(empty)
        after = [t for layer in trainer.params for t in layer]
        if dp is None:
            assert all(torch.equal(a, b) for a, b in zip(before, after))
            continue
        for k in range(2):
            noise = torch.cat([((b[k] - a[k]) / -lr).flatten() for a, b in zip(before, after)]).double()
            m = noise.numel()  # 64*64 + 64 + 64*5 + 5 = 4485 coordinates
            expected_var = (sigma * C / ebs[k]) ** 2
            statistic = (noise.square().sum() / expected_var).item()
            lo, hi = stats.chi2.ppf([1e-4, 1 - 1e-4], m)
            assert lo < statistic < hi, (k, statistic, m)
            assert abs(noise.mean().item()) < 5 * np.sqrt(expected_var / m)
        trainer.close()


def test_poisson_batches_come_from_each_subset_at_the_sample_rate():
    K, n, q, steps = 4, 60, 0.3, 400
    rng = np.random.default_rng(0)
    x_train = np.arange(n, dtype=np.float32).reshape(n, 1).repeat(2, axis=1)
    masks = rng.random((K, n)) < 0.5
    masks[3] = False  # an empty subset: always an empty batch
    spec = TrainSpec(arch="logreg", input_shape=(2,), n_classes=2, steps=1, sample_rate=q, lr=0.1)
    trainer = batched.BatchedTrainer(spec, x_train, np.zeros(n, dtype=np.int64), masks, seed=5, noise_seed=0)
    counts = np.zeros((K, n))
    for _ in range(steps):
        batch = trainer.sample_batch()
        assert batch.x.shape[:2] == batch.valid.shape == batch.y.shape
        for k in range(K):
            rows = batch.x[k][batch.valid[k]][:, 0].long().numpy()
            assert len(set(rows)) == len(rows), "an example appears twice in one batch"
            counts[k, rows] += 1
    assert counts[~masks].sum() == 0, "sampled an example outside the model's subset"
    inside = counts[masks]
    assert np.allclose(inside.mean() / steps, q, atol=0.01)
    p = stats.binomtest(int(inside.sum()), int(masks.sum()) * steps, q).pvalue
    assert p > 1e-4


def test_padded_rows_contribute_nothing():
    spec = fc_spec("mlp", (24,))
    params = batched.init_params(spec, 2, torch.Generator().manual_seed(0))
    x, y, valid = random_batch(K=2, B=12)
    junk_x, junk_y = x.clone(), y.clone()
    junk_x[~valid] = 1e3  # garbage in padded rows
    junk_y[~valid] = 4
    a = batched.clipped_grad_sum(params, x, y, 1.0, valid)
    b = batched.clipped_grad_sum(params, junk_x, junk_y, 1.0, valid)
    for (wa, ba), (wb, bb) in zip(a, b):
        torch.testing.assert_close(wa, wb)
        torch.testing.assert_close(ba, bb)


# -- determinism and outputs --------------------------------------------------------------------

def _small_request(K=5, n=120, seed=0, noise_seed=1):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 16)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64) + 2 * (x[:, 1] > 0)
    return TrainRequest(x_train=x, y_train=y, masks=rng.random((K, n)) < 0.7, seed=seed, noise_seed=noise_seed,
                        evals={"train": (x, y), "test": (x[:37] + 0.1, y[:37])})


def _small_spec(dp):
    return TrainSpec(arch="mlp", input_shape=(16,), n_classes=4, hidden=(32,), steps=30, sample_rate=0.2,
                     lr=0.3, momentum=0.5, dp=dp)


def test_deterministic_and_noise_seed_only_changes_dp_models():
    dp = DPParams(noise_multiplier=1.0, max_grad_norm=1.0)
    runs = {}
    for name, spec, noise_seed in [("np1", _small_spec(None), 1), ("np2", _small_spec(None), 2),
                                   ("dp1", _small_spec(dp), 1), ("dp1b", _small_spec(dp), 1),
                                   ("dp2", _small_spec(dp), 2)]:
        runs[name] = batched.train_batched(spec, _small_request(noise_seed=noise_seed))
    for split in ("train", "test"):
        for a, b in [("np1", "np2"), ("dp1", "dp1b")]:
            assert np.array_equal(runs[a][split].correct, runs[b][split].correct)
            assert np.array_equal(runs[a][split].margin, runs[b][split].margin)
        assert not np.array_equal(runs["dp1"][split].margin, runs["dp2"][split].margin)
        assert not np.array_equal(runs["dp1"][split].margin, runs["np1"][split].margin)


def test_private_and_nonprivate_variants_share_init_and_batches():
    req = _small_request()
    dp = DPParams(noise_multiplier=1.0, max_grad_norm=1.0)
    a = batched.BatchedTrainer(_small_spec(None), req.x_train, req.y_train, req.masks, seed=0, noise_seed=1)
    b = batched.BatchedTrainer(_small_spec(dp), req.x_train, req.y_train, req.masks, seed=0, noise_seed=9)
    assert all(torch.equal(s, t) for la, lb in zip(a.params, b.params) for s, t in zip(la, lb))
    for _ in range(5):
        ba, bb = a.sample_batch(), b.sample_batch()
        assert torch.equal(ba.x, bb.x) and torch.equal(ba.valid, bb.valid)
        a.step_on(ba)
        b.step_on(bb)  # the DP step must not draw from the batch generator
    b.close()


def test_outputs_shapes_dtypes_and_margin_consistency():
    req = _small_request(K=5)
    out = batched.train_batched(_small_spec(None), req)
    assert set(out) == {"train", "test"}
    for split, m in [("train", 120), ("test", 37)]:
        o = out[split]
        assert isinstance(o, Outputs)
        assert o.correct.shape == o.margin.shape == (5, m)
        assert o.correct.dtype == np.bool_ and o.margin.dtype == np.float16
        assert np.all(o.correct[o.margin > 0]) and not np.any(o.correct[o.margin < 0])
    assert out["train"].correct.mean() > 0.8  # the task is learnable


def test_progress_reports_model_steps():
    seen = []
    train_models(_small_spec(None), _small_request(K=5), progress=seen.append)
    assert seen and seen[-1] == 5 * 30 and seen == sorted(seen)


# -- engine versus Opacus on real data ----------------------------------------------------------

@pytest.fixture(scope="module")
def digits():
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    perm = np.random.default_rng(0).permutation(len(x))
    return x[perm[:900]], y[perm[:900]], x[perm[900:]], y[perm[900:]]


@pytest.mark.parametrize("private", [False, True], ids=["sgd", "dpsgd"])
def test_engine_and_opacus_reach_the_same_accuracy_on_digits(digits, private):
    """Same init, independent batches and noise: mean test accuracies over K models agree
    within a Welch interval from their spread (plus half a point for the small K)."""
    x_train, y_train, x_test, y_test = digits
    K = 6
    masks = np.random.default_rng(1).random((K, len(x_train))) < 0.7
    dp = DPParams(noise_multiplier=1.0, max_grad_norm=1.0) if private else None
    spec = TrainSpec(arch="mlp", input_shape=(64,), n_classes=10, hidden=(64,), steps=120,
                     sample_rate=64 / 630, lr=0.5, dp=dp)
    req = TrainRequest(x_train=x_train, y_train=y_train, masks=masks, seed=2, noise_seed=3,
                       evals={"test": (x_test, y_test)})
    acc_engine = train_models(spec, req, engine="batched")["test_correct"].mean(axis=1)
    acc_opacus = train_models(spec, req, engine="opacus")["test_correct"].mean(axis=1)
    assert acc_engine.mean() > (0.85 if private else 0.92)
    se = np.sqrt(acc_engine.var(ddof=1) / K + acc_opacus.var(ddof=1) / K)
    assert abs(acc_engine.mean() - acc_opacus.mean()) < 4 * se + 0.005, (acc_engine, acc_opacus)


def test_opacus_path_empty_subset_is_noise_only_and_starts_from_engine_init():
    sigma, C, lr = 1.0, 0.5, 1.0
    spec = TrainSpec(arch="mlp", input_shape=(64,), n_classes=10, hidden=(32,), steps=1, sample_rate=0.1,
                     lr=lr, dp=DPParams(noise_multiplier=sigma, max_grad_norm=C))
    init = opacus_trainer.initial_models(spec, 1, seed=7)[0]
    ref = batched.export_params(spec, batched.init_params(spec, 1, torch.Generator().manual_seed(7)), 0)
    before = {k: v.clone() for k, v in init.state_dict().items()}
    assert all(torch.equal(before[k], ref[k]) for k in ref)
    empty = torch.zeros(0, 64)
    model = opacus_trainer.train_one(spec, init, empty, torch.zeros(0, dtype=torch.long), batch_seed=0, noise_seed=0)
    change = torch.cat([(v - before[k]).flatten() / -lr for k, v in model.state_dict().items()]).double()
    m = change.numel()
    statistic = (change.square().sum() / (sigma * C) ** 2).item()  # expected batch max(1, 0) = 1
    lo, hi = stats.chi2.ppf([1e-4, 1 - 1e-4], m)
    assert lo < statistic < hi


@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 28, 28), (3, 32, 32)])
def test_cnn_shapes_and_groupnorm(shape):
    spec = TrainSpec(arch="cnn", input_shape=shape, n_classes=7, hidden=(8, 16), steps=1, sample_rate=0.1, lr=0.1)
    model = build_model(spec)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert any(isinstance(m, nn.GroupNorm) for m in model.modules())
    assert model(torch.zeros(3, *shape)).shape == (3, 7)


def test_cnn_trains_through_opacus(digits):
    x_train, y_train, x_test, y_test = digits
    n = 300
    spec = TrainSpec(arch="cnn", input_shape=(1, 8, 8), n_classes=10, hidden=(8, 16), steps=40,
                     sample_rate=0.1, lr=0.1, dp=DPParams(noise_multiplier=0.5, max_grad_norm=1.0))
    masks = np.ones((2, n), dtype=bool)
    masks[1] = False  # an empty subset must not break the per-model path
    req = TrainRequest(x_train=x_train[:n].reshape(-1, 1, 8, 8), y_train=y_train[:n], masks=masks, seed=0,
                       noise_seed=1, evals={"test": (x_test.reshape(-1, 1, 8, 8), y_test)})
    out = train_models(spec, req)
    assert out["test_correct"].shape == (2, len(y_test)) and out["test_margin"].dtype == np.float16
    assert out["test_correct"][0].mean() > 0.3  # learns something in 40 noisy steps (chance is 0.1)


# -- dispatch -----------------------------------------------------------------------------------

def test_train_models_dispatch(monkeypatch):
    calls = []
    for name in ("batched", "opacus"):
        monkeypatch.setattr(models.engine_module(name), "train",
                            lambda spec, req, device="cpu", progress=None, name=name: calls.append(name) or {})
    req = _small_request()
    for arch, engine, expected in [("logreg", "auto", "batched"), ("mlp", "auto", "batched"),
                                   ("mlp", "opacus", "opacus"), ("cnn", "auto", "opacus"),
                                   ("cnn", "opacus", "opacus")]:
        spec = TrainSpec(arch=arch, input_shape=(1, 4, 4), n_classes=4, steps=1, sample_rate=0.1, lr=0.1)
        calls.clear()
        train_models(spec, req, engine=engine)
        assert calls == [expected], (arch, engine)
    cnn = TrainSpec(arch="cnn", input_shape=(1, 4, 4), n_classes=4, steps=1, sample_rate=0.1, lr=0.1)
    with pytest.raises(ValueError, match="batched engine cannot train 'cnn'.*layer 0 is Conv2d"):
        train_models(cnn, req, engine="batched")
    with pytest.raises(ValueError, match="unknown engine"):
        train_models(cnn, req, engine="gpu")
    with pytest.raises(ValueError, match="needs a trainer"):
        train_models(cnn, req, engine="trainer")
    with pytest.raises(ValueError, match="batched engine cannot train 'cnn'"):
        batched.BatchedTrainer(cnn, req.x_train, req.y_train, req.masks, seed=0, noise_seed=0)
    assert models.resolve_engine(cnn) == "opacus"
    assert set(models.ENGINES) == {"batched", "opacus", "trainer"}


def test_engine_registry_entry_points_return_flat_c2_arrays():
    req = _small_request(K=3)
    spec = _small_spec(DPParams(noise_multiplier=1.0, max_grad_norm=1.0))
    for name in ("batched", "opacus"):
        out = models.engine_module(name).train(spec, req)
        assert set(out) == {"train_correct", "train_margin", "test_correct", "test_margin"}, name
        assert out["test_correct"].dtype == np.bool_ and out["test_margin"].dtype == np.float16
        assert out["train_correct"].shape == (3, len(req.y_train))


def test_batched_supports_exactly_flatten_linear_relu_stacks():
    ok = [nn.Sequential(nn.Flatten(), nn.Linear(4, 3)),
          nn.Sequential(nn.Flatten(), nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)),
          nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))]
    for module in ok:
        assert batched.supports(module) is None, module
    refused = [(nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)), "layer 1 is Tanh"),
               (nn.Sequential(nn.Linear(4, 3, bias=False)), "need a bias"),
               (nn.Sequential(nn.Linear(4, 8), nn.ReLU()), "end with a Linear"),
               (nn.Sequential(nn.Flatten(), nn.Conv2d(1, 2, 3)), "layer 0 is Conv2d"),
               (_NotSequential(), "not _NotSequential"),
               (nn.Sequential(nn.Flatten(start_dim=2), nn.Linear(4, 3)), "Flatten layer")]
    for module, expected in refused:
        assert expected in (batched.supports(module) or ""), (expected, batched.supports(module))


class _NotSequential(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(x)

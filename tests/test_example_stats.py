"""The per-example training statistics (models/example_stats.py) against loops written here.

- Opacus engine: bit for bit against a plain Opacus loop (same seeds, per-example losses by
  ``reduction="none"``, norms from ``grad_sample``), private and not.
- Batched engine: draws exactly; the loss sums bit for bit against the same step's losses
  accumulated here in float32 in step order (the bookkeeping), and to float32 rounding against one
  plain torch model per stacked model (its matrix products round differently from the wide network's).
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from opacus import GradSampleModule
from opacus.data_loader import DPDataLoader
from opacus.optimizers import DPOptimizer
from torch.utils.data import TensorDataset

from dpmem.models import DPParams, TrainRequest, TrainSpec, train_models
from dpmem.models.batched import stack_class
from dpmem.models.batched_mlp import PROB_FLOOR, _forward
from dpmem.models.example_stats import ExampleStats, stat_arrays
from dpmem.models.nets import build_model
from dpmem.models.spec import expected_batch_sizes, stream_seeds
from dpmem.models.stack import _loss
from dpmem.models.streams import initial_model

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook")
DP = DPParams(noise_multiplier=1.0, max_grad_norm=2.0)
NETS = [("mlp", (32,), (64,)), ("cnn", (4, 8), (1, 8, 8))]


def _data(shape, n=60, K=3, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, *shape)).astype(np.float32)
    return x, rng.integers(0, 10, n), rng.random((K, n)) < 0.7


def _spec(arch, hidden, shape, dp, steps=12):
    return TrainSpec(arch=arch, input_shape=shape, n_classes=10, hidden=hidden, steps=steps, sample_rate=0.2,
                     lr=0.5, momentum=0.5, weight_decay=1e-3, dp=dp)


def _opacus_loop(spec, x, y, masks, seed, noise_seed):
    """One model at a time: Opacus's DPDataLoader over the subset's positions, the summed loss, and
    the statistics added up in float32 in step order."""
    K, n = masks.shape
    out = {key: np.zeros((K, n), np.float32) for key in stat_arrays(spec.dp is not None)}
    for k in range(K):
        subset = np.flatnonzero(masks[k])
        ebs = expected_batch_sizes(masks[k:k + 1], spec.sample_rate)[0]
        model = initial_model(spec, seed, k)
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        sgd = lambda params: torch.optim.SGD(params, lr=spec.lr, momentum=spec.momentum,  # noqa: E731
                                             weight_decay=spec.weight_decay)
        if spec.dp is None:
            net, opt = model, sgd(model.parameters())
        else:
            net = GradSampleModule(model, batch_first=True, loss_reduction="sum")
            opt = DPOptimizer(sgd(net.parameters()), noise_multiplier=spec.dp.noise_multiplier,
                              max_grad_norm=spec.dp.max_grad_norm, expected_batch_size=ebs, loss_reduction="mean",
                              generator=torch.Generator().manual_seed(stream_seeds(noise_seed, k)[0]))
        positions = DPDataLoader(TensorDataset(torch.arange(len(subset))), sample_rate=spec.sample_rate,
                                 generator=torch.Generator().manual_seed(stream_seeds(seed, k, count=2)[1]))
        steps = 0
        while steps < spec.steps:
            for (pos,) in positions:
                opt.zero_grad(set_to_none=False)
                if len(pos):
                    rows = torch.from_numpy(subset)[pos]
                    losses = F.cross_entropy(net(torch.from_numpy(x)[rows]), torch.from_numpy(y)[rows], reduction="none")
                    (losses.sum() if spec.dp is not None else losses.sum() / ebs).backward()
                    np.add.at(out["train_loss_sum"][k], rows.numpy(), losses.detach().numpy())
                    np.add.at(out["train_draws"][k], rows.numpy(), 1)
                    if spec.dp is not None:
                        grads = [p.grad_sample.reshape(len(pos), -1) for p in net.parameters()]
                        norms = torch.stack([g.norm(2, dim=-1) for g in grads], dim=1).norm(2, dim=1)
                        np.add.at(out["train_grad_norm_sum"][k], rows.numpy(), norms.numpy())
                        clipped = (spec.dp.max_grad_norm / (norms + 1e-6)) < 1
                        np.add.at(out["train_clips"][k], rows.numpy(), clipped.numpy().astype(int))
                else:
                    for p in opt.params if spec.dp is not None else []:
                        p.grad_sample = torch.zeros(0, *p.shape)
                opt.step()
                steps += 1
                if steps == spec.steps:
                    break
    return out


@pytest.mark.parametrize("arch,hidden,shape", NETS)
@pytest.mark.parametrize("dp", [None, DP], ids=["nonprivate", "dp"])
def test_opacus_engine_statistics_equal_a_plain_opacus_loop_bit_for_bit(arch, hidden, shape, dp):
    torch.set_num_threads(1)
    spec = _spec(arch, hidden, shape, dp)
    x, y, masks = _data(shape)
    req = TrainRequest(x_train=x, y_train=y, masks=masks, seed=5, noise_seed=6, evals={})
    got = train_models(spec, req, engine="opacus")
    want = _opacus_loop(spec, x, y, masks, 5, 6)
    assert set(stat_arrays(dp is not None)) <= set(got)
    assert want["train_draws"].sum() > 0
    for key, value in want.items():
        assert got[key].dtype == (np.int32 if key in ("train_draws", "train_clips") else np.float32)
        np.testing.assert_array_equal(got[key], value.astype(got[key].dtype), err_msg=key)
    if dp is not None:
        assert 0 < want["train_clips"].sum() < want["train_draws"].sum()   # some clipped, some not


@pytest.mark.parametrize("arch,hidden,shape", NETS)
@pytest.mark.parametrize("dp", [None, DP], ids=["nonprivate", "dp"])
def test_batched_engine_statistics_equal_the_steps_values_and_plain_models(arch, hidden, shape, dp):
    torch.set_num_threads(1)
    spec = _spec(arch, hidden, shape, dp)
    x, y, masks = _data(shape)
    K, n = masks.shape
    stack = stack_class(spec)(spec, x, y, masks, seed=1, noise_seed=2)
    same = {key: np.zeros((K, n), np.float32) for key in stat_arrays(dp is not None)}   # the wide network's values
    plain = {key: np.zeros((K, n)) for key in stat_arrays(dp is not None)}   # one torch model per row
    for _ in range(spec.steps):
        states = [stack.model_state(k) for k in range(K)]
        params = [p.clone() for p in stack.params]
        batch = stack.sample_batch()
        if arch == "mlp":   # the fast path's own forward, and -log p_y from its softmax
            logits = _forward(list(zip(params[0::2], params[1::2])), batch.x.reshape(K, batch.x.shape[1], -1))[-1]
            z = logits.contiguous()
            p_y = z.softmax(dim=2).gather(2, batch.y.unsqueeze(2)).squeeze(2)
            exact = z.logsumexp(dim=2) - z.gather(2, batch.y.unsqueeze(2)).squeeze(2)
            ce = torch.where(p_y < PROB_FLOOR, exact, -p_y.log())   # tiny p_y: the exact loss
        else:   # a DP step's forward keeps each layer's input and output (the records)
            logits = stack.net.forward(params, batch.x, [] if dp is not None else None)
            _, ce = _loss(logits, batch.y, batch.valid.float())
        for k in range(K):
            valid = batch.valid[k]
            rows = batch.index[k][valid].numpy()
            np.add.at(same["train_loss_sum"][k], rows, ce[k][valid].numpy())
            model = build_model(spec)
            model.load_state_dict(states[k])
            xb, yb = batch.x[k][valid], batch.y[k][valid]
            losses = F.cross_entropy(model(xb), yb, reduction="none")
            np.add.at(plain["train_loss_sum"][k], rows, losses.detach().numpy())
            np.add.at(plain["train_draws"][k], rows, 1)
            if dp is not None:
                for j, i in enumerate(rows):
                    model.zero_grad()
                    F.cross_entropy(model(xb[j:j + 1]), yb[j:j + 1], reduction="sum").backward()
                    norm = torch.cat([p.grad.reshape(-1) for p in model.parameters()]).norm()
                    plain["train_grad_norm_sum"][k, i] += float(norm)
                    plain["train_clips"][k, i] += float(norm) > dp.max_grad_norm
        stack.step_on(batch)
    got = stack.evaluate({})
    stack.close()
    np.testing.assert_array_equal(got["train_draws"], plain["train_draws"])
    assert plain["train_draws"].sum() > 0 and not plain["train_draws"][~masks].any()
    # the recorded losses are the losses the step differentiates, added up bit for bit
    np.testing.assert_array_equal(got["train_loss_sum"], same["train_loss_sum"].astype(np.float32))
    for key in stat_arrays(dp is not None):
        if key in ("train_draws", "train_clips"):
            np.testing.assert_array_equal(got[key], plain[key], err_msg=key)
        else:
            np.testing.assert_allclose(got[key], plain[key], rtol=1e-5, atol=1e-5, err_msg=key)


def test_the_mlp_fast_path_records_what_the_general_stack_records():
    spec = _spec("mlp", (32,), (64,), DP)
    x, y, masks = _data((64,))
    arrays = []
    for cls in (stack_class(spec), stack_class(spec).__mro__[1]):
        stack = cls(spec, x, y, masks, seed=1, noise_seed=2)
        stack.train(spec.steps)
        arrays.append(stack.evaluate({}))
        stack.close()
    assert type(stack).__name__ == "ModelStack"
    for key in stat_arrays(True):
        np.testing.assert_allclose(arrays[0][key], arrays[1][key], rtol=1e-5, atol=1e-6, err_msg=key)


def test_recording_never_changes_the_trained_models():
    spec = _spec("cnn", (4, 8), (1, 8, 8), DP)
    x, y, masks = _data((1, 8, 8))
    outs = []
    for record in (True, False):
        stack = stack_class(spec)(spec, x, y, masks, seed=1, noise_seed=2, record_stats=record)
        stack.train(spec.steps)
        outs.append(stack.evaluate({"train": (x, y)}))
        stack.close()
    np.testing.assert_array_equal(outs[0]["train_margin"], outs[1]["train_margin"])
    assert "train_loss_sum" in outs[0] and "train_loss_sum" not in outs[1]


def test_padding_rows_add_nothing_and_each_model_keeps_its_own_row():
    stats = ExampleStats(3, 4, dp=True)
    index = torch.tensor([[2, 0, 0], [1, 3, 0]])         # model 1: examples 2 and 0 then padding; model 2: 1, 3
    valid = torch.tensor([[True, True, False], [True, True, False]])
    stats.add(slice(1, 3), index, valid, torch.tensor([[1.0, 2.0, 99.0], [3.0, 4.0, 99.0]]),
              torch.tensor([[0.1, 0.9, 99.0], [0.6, 0.2, 99.0]]), 0.5)
    got = stats.arrays()
    np.testing.assert_array_equal(got["train_loss_sum"], [[0, 0, 0, 0], [2, 0, 1, 0], [0, 3, 0, 4]])
    np.testing.assert_array_equal(got["train_draws"], [[0, 0, 0, 0], [1, 0, 1, 0], [0, 1, 0, 1]])
    np.testing.assert_array_equal(got["train_clips"], [[0, 0, 0, 0], [1, 0, 0, 0], [0, 1, 0, 0]])
    np.testing.assert_allclose(got["train_grad_norm_sum"], [[0, 0, 0, 0], [0.9, 0, 0.1, 0], [0, 0.6, 0, 0.2]])


def test_steps_held_back_for_one_scatter_add_in_step_order(monkeypatch):
    """All K models' steps wait and go in together (PENDING_STEPS); the sums are those of a scatter per step."""
    from dpmem.models import example_stats
    rng = torch.Generator().manual_seed(0)
    steps = [(torch.argsort(torch.rand(2, 6, generator=rng), dim=1)[:, :3], torch.rand(2, 3, generator=rng))
             for _ in range(5)]
    valid = torch.ones(2, 3, dtype=torch.bool)
    sums = []
    for pending in (1, 4):
        monkeypatch.setitem(example_stats.PENDING_STEPS, "cpu", pending)
        stats = ExampleStats(2, 6, dp=False)
        for index, loss in steps:
            stats.add(slice(0, 2), index, valid, loss)
        assert len(stats._pending) == (0 if pending == 1 else 1)    # 5 steps: one flush of 4, one left
        sums.append(stats.arrays())
    for key in stat_arrays(False):
        np.testing.assert_array_equal(sums[0][key], sums[1][key])
    assert sums[0]["train_draws"].sum() == 2 * 3 * 5


def _fit_returning(extra):
    def fit(*, index, evals, train_indices, x_train, **kw):
        good = {f"{s}_{k}": (np.ones(len(y), bool) if k == "correct" else np.zeros(len(y), np.float32))
                for s, (_, y) in evals.items() for k in ("correct", "margin")}
        return good | extra(index, len(x_train))
    return fit


@pytest.mark.parametrize("extra,message", [
    (lambda k, n: {"train_loss_sum": np.zeros(n)}, "per-example statistics come together"),
    (lambda k, n: {"train_loss_sum": np.zeros(n - 1), "train_draws": np.zeros(n)}, "train_loss_sum has shape"),
    (lambda k, n: {"train_loss_sum": np.ones(n), "train_draws": np.zeros(n)}, "never sampled"),
    (lambda k, n: {"train_loss_sum": np.zeros(n), "train_draws": np.full(n, 0.5)}, "whole numbers"),
    (lambda k, n: {"train_loss_sum": np.zeros(n), "train_draws": np.zeros(n)} if k else {}, "but not the models before"),
    (lambda k, n: {} if k else {"train_loss_sum": np.zeros(n), "train_draws": np.zeros(n)}, "but not model 1"),
])
def test_a_trainer_returns_the_statistics_whole_or_not_at_all(monkeypatch, extra, message):
    import types

    from dpmem.models import user_engine
    from dpmem.privacy.errors import UsageError
    module = types.ModuleType("stats_trainer")
    module.fit = _fit_returning(extra)
    monkeypatch.setitem(__import__("sys").modules, "stats_trainer", module)
    x, y, masks = _data((4,), n=20, K=2)
    spec = TrainSpec(arch="mlp", input_shape=(4,), n_classes=10, steps=2, sample_rate=0.5, lr=0.1,
                     trainer="stats_trainer:fit")
    req = TrainRequest(x_train=x, y_train=y, masks=masks, seed=0, noise_seed=1, evals={"train": (x, y)})
    with pytest.raises(UsageError, match=message):
        user_engine.train(spec, req)


def test_the_example_trainer_records_its_own_statistics(monkeypatch):
    from pathlib import Path
    monkeypatch.syspath_prepend(str(Path(__file__).parent / "examples"))
    import my_trainer

    from dpmem.models.user_engine import TrainerParams
    x, y, _ = _data((4,), n=30)
    params = TrainerParams(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.5, steps=6, expected_batch_size=7,
                           lr=0.3, momentum=0.0, weight_decay=0.0)
    train = np.arange(0, 30, 2)
    out = my_trainer.fit(index=0, train_indices=train, x_train=x, y_train=y, evals={}, seed=3, noise_seed=4,
                         params=params)
    outside = np.setdiff1d(np.arange(30), train)
    assert out["train_draws"].sum() > 0 and not out["train_draws"][outside].any()
    assert (out["train_loss_sum"][out["train_draws"] > 0] > 0).all()
    assert (out["train_clips"] <= out["train_draws"]).all() and out["train_grad_norm_sum"].sum() > 0


def test_models_computed_in_several_groups_record_what_one_group_records(monkeypatch):
    from dpmem.models import stack as stack_mod
    spec = _spec("cnn", (4, 8), (1, 8, 8), DP)
    x, y, masks = _data((1, 8, 8), K=5)
    arrays = []
    for budget in (1 << 24, 1):          # one group of 5 models; then one model per group
        monkeypatch.setattr(stack_mod, "STEP_KEPT_FLOATS", budget)
        stack = stack_class(spec)(spec, x, y, masks, seed=1, noise_seed=2)
        stack.train(spec.steps)
        arrays.append(stack.evaluate({}))
        stack.close()
    # the wide convolution's width moves the losses in their last bits, never the draws or clips
    for key in stat_arrays(True):
        np.testing.assert_allclose(arrays[0][key], arrays[1][key], rtol=1e-5, atol=1e-5, err_msg=key)
    np.testing.assert_array_equal(arrays[0]["train_draws"], arrays[1]["train_draws"])
    assert arrays[0]["train_draws"].sum() > 0

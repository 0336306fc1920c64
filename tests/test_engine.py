"""The training engines: the batched engine against Opacus (every supported layer, the built-in
CNNs, full steps), per-model randomness, gradient canaries, noise, sampling and determinism."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer
from opacus_reference import assert_two_steps_equal_opacus, opacus_clipped, stacked
from scipy import stats
from sklearn.datasets import load_digits
from torch import nn

import dpmem.models.batched as batched
import dpmem.models.opacus_engine as opacus_engine
from dpmem import models
from dpmem.models import canary_stack, noise, runtime, stack, streams, train_models, wide
from dpmem.models.nets import build_model
from dpmem.models.samplers import conv
from dpmem.models.spec import DPParams, TrainRequest, TrainSpec

pytestmark = pytest.mark.usefixtures("one_torch_thread", "quiet_opacus")


# -- modules covering every supported layer ------------------------------------------------------

def _modules() -> dict[str, tuple[callable, tuple[int, ...]]]:
    """name -> (factory, input shape); each a module the batched engine supports."""
    return {
        "logreg": (lambda: nn.Sequential(nn.Flatten(), nn.Linear(64, 5)), (8, 8)),
        "mlp2": (lambda: nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 16), nn.Tanh(), nn.Linear(16, 5)),
                 (16,)),
        "linear_no_bias": (lambda: nn.Sequential(nn.Linear(16, 12, bias=False), nn.ReLU(),
                                                 nn.Linear(12, 5)), (16,)),
        "conv2d_stride_pad_maxpool": (lambda: nn.Sequential(
            nn.Conv2d(2, 6, 3, stride=2, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(6 * 3 * 3, 5)),
            (2, 12, 12)),
        "conv2d_dilation_groups_avgpool": (lambda: nn.Sequential(
            nn.Conv2d(4, 8, 3, padding=2, dilation=2, groups=2), nn.GroupNorm(4, 8), nn.ReLU(),
            nn.AvgPool2d(2), nn.Conv2d(8, 6, (3, 2), stride=(1, 2), bias=False), nn.AdaptiveMaxPool2d(2),
            nn.Flatten(), nn.Linear(24, 5)), (4, 10, 10)),
        "conv2d_adaptive_avg": (lambda: nn.Sequential(
            nn.Conv2d(1, 4, 5, padding=2), nn.GroupNorm(2, 4), nn.ReLU(), nn.AdaptiveAvgPool2d(3),
            nn.Flatten(), nn.Linear(36, 5)), (1, 9, 9)),
        "conv1d": (lambda: nn.Sequential(
            nn.Conv1d(1, 8, 5, padding=2), nn.GroupNorm(4, 8), nn.ReLU(), nn.MaxPool1d(2),
            nn.Conv1d(8, 6, 3, stride=2, padding=1, groups=2), nn.ReLU(), nn.AvgPool1d(2), nn.AdaptiveAvgPool1d(3),
            nn.AdaptiveMaxPool1d(2), nn.Flatten(), nn.Linear(12, 5)), (1, 40)),
        "conv1d_dilated": (lambda: nn.Sequential(
            nn.Conv1d(2, 4, 3, padding=2, dilation=2, bias=False), nn.ReLU(),
            nn.Conv1d(4, 6, 3, stride=2, padding=1, dilation=3), nn.Flatten(), nn.Linear(42, 5)), (2, 17)),
        # one input channel per group: the lowered convolutions (wide.lowered), with stride, dilation, groups
        "lowered_depthwise": (lambda: nn.Sequential(
            nn.Conv2d(2, 6, (3, 2), stride=(2, 1), padding=(2, 1), dilation=(2, 1), groups=2), nn.ReLU(),
            nn.Conv2d(6, 6, 3, padding=1, groups=6, bias=False), nn.Flatten(), nn.Linear(6 * 5 * 10, 5)), (2, 9, 9)),
        "lowered_conv1d": (lambda: nn.Sequential(
            nn.Conv1d(1, 4, 3, stride=2, padding=3, dilation=3), nn.GroupNorm(2, 4), nn.ReLU(), nn.MaxPool1d(3),
            nn.Flatten(), nn.Linear(4 * 3, 5)), (1, 19)),
        "cnn": (lambda: build_model(TrainSpec(arch="cnn", input_shape=(1, 28, 28), n_classes=5, hidden=(16, 32),
                                              steps=1, sample_rate=0.1, lr=0.1)), (1, 28, 28)),
        "cnn1d": (lambda: build_model(TrainSpec(arch="cnn1d", input_shape=(1, 40), n_classes=5, hidden=(16, 32),
                                                steps=1, sample_rate=0.1, lr=0.1)), (1, 40)),
    }


MODULES = _modules()

# The equality tests also run on a GPU where torch sees one (the engine on it, Opacus on the CPU).
TEST_DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture
def exact_cuda():
    """cuDNN's convolutions use TensorFloat-32 by default; the equality tests need float32."""
    previous = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = previous


@pytest.mark.parametrize("device", TEST_DEVICES)
@pytest.mark.parametrize("rule", ["mixed", "per_example", "ghost"])
@pytest.mark.parametrize("name", list(MODULES))
def test_norms_and_clipped_sums_equal_opacus(name, rule, device, monkeypatch, exact_cuda):
    monkeypatch.setattr(conv.ConvSampler, "rule", rule)
    factory, shape = MODULES[name]
    if rule != "mixed" and not any(isinstance(m, (nn.Conv1d, nn.Conv2d)) for m in factory().modules()):
        pytest.skip("no convolution: the rule does not apply")
    K, B = 3, 10
    mods, params = stacked(factory, K)
    assert batched.supports(mods[0], shape) is None
    g = torch.Generator().manual_seed(1)
    x = torch.randn(K, B, *shape, generator=g) * 2
    y = torch.randint(0, 5, (K, B), generator=g)
    valid = torch.rand(K, B, generator=g) < 0.8
    net = wide.WideNet(mods[0], K)
    on = [t.to(device) for t in (x, y, valid)]
    params_on = [p.to(device) for p in params]
    _, norms = stack.dp_gradients(net, params_on, *on, 1e9)
    norms = norms.cpu()
    assert torch.all(norms[~valid] == 0), "padded rows must have zero gradient"
    max_grad_norm = float(norms[valid].median())  # about half the examples get clipped
    sums, _ = stack.dp_gradients(net, params_on, *on, max_grad_norm)
    sums = [t.cpu() for t in sums]
    for k in range(K):
        ref_norms, ref_grads = opacus_clipped(mods[k], x[k][valid[k]], y[k][valid[k]], max_grad_norm)
        torch.testing.assert_close(norms[k][valid[k]], ref_norms, rtol=1e-4, atol=1e-6)
        for mine, ref in zip(sums, ref_grads, strict=True):
            torch.testing.assert_close(mine[k], ref, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("layer, shape", [
    (nn.Conv2d(1, 4, 3, padding=1), (3, 1, 7, 8)),
    (nn.Conv2d(3, 6, (3, 2), stride=(2, 1), padding=(2, 0), dilation=(2, 1), groups=3, bias=False), (2, 3, 9, 7)),
    (nn.Conv1d(1, 5, 5, padding=2), (4, 1, 12)),
    (nn.Conv1d(2, 4, 3, stride=2, padding=3, dilation=3, groups=2), (2, 2, 17)),
])
@pytest.mark.parametrize("K", [1, 3])
def test_lowered_convolutions_equal_the_grouped_convolution(layer, shape, K):
    """A convolution with one input channel per group runs lowered on the CPU (unfolded input times
    the weights): its output and input gradient equal the K models' grouped convolution, and the
    unfolded input it leaves for the DP step is F.unfold's."""
    assert wide.lowered(layer, torch.device("cpu")) and not wide.lowered(nn.Conv2d(2, 4, 3), torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    B = shape[0]
    x = torch.randn(B, K * shape[1], *shape[2:], generator=g)
    p = {"weight": torch.randn(K, *layer.weight.shape, generator=g)}
    if layer.bias is not None:
        p["bias"] = torch.randn(K, *layer.bias.shape, generator=g)
    mine, ref = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    saved, out = wide.parametrised_layer(layer, p, mine, False, K, True)
    conv = F.conv1d if isinstance(layer, nn.Conv1d) else F.conv2d
    expected = conv(ref, p["weight"].reshape(-1, *layer.weight.shape[1:]),
                    None if layer.bias is None else p["bias"].reshape(-1), layer.stride, layer.padding, layer.dilation,
                    K * layer.groups)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    image = x.unsqueeze(2) if isinstance(layer, nn.Conv1d) else x
    kernel = (1, *layer.kernel_size) if isinstance(layer, nn.Conv1d) else layer.kernel_size
    unfold = F.unfold(image, kernel, dilation=(1, *layer.dilation)[-2:], padding=(0, *layer.padding)[-2:],
                      stride=(1, *layer.stride)[-2:])
    assert torch.equal(saved.reshape(unfold.shape), unfold)
    weights = torch.randn(expected.shape, generator=g)
    (out * weights).sum().backward()
    (expected * weights).sum().backward()
    torch.testing.assert_close(mine.grad, ref.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layer, shape", [
    (nn.AdaptiveAvgPool1d(3), (2, 3, 10)), (nn.AdaptiveAvgPool1d(4), (2, 3, 3)),
    (nn.AdaptiveAvgPool2d((2, 3)), (2, 3, 7, 8)), (nn.AdaptiveAvgPool2d(5), (1, 2, 4, 9)),
    (nn.AdaptiveAvgPool2d((None, 2)), (1, 2, 3, 7)),
    (nn.MaxPool1d(2), (2, 3, 9)), (nn.MaxPool1d(3), (2, 3, 12)), (nn.MaxPool1d(2), (3, 4, 16)),
    (nn.MaxPool2d(2), (2, 3, 8, 9)), (nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True), (2, 3, 9, 7)),
    (nn.MaxPool2d((2, 3), dilation=(1, 2)), (1, 4, 8, 12)),
])
def test_pooling_rewrites_equal_the_layers(layer, shape):
    """The wide network's matrix form of adaptive average pooling, reshape form of tiled max
    pooling and channels-last 2-D max pooling give the layer's values and input gradients (to
    the first maximum on ties)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g).round()   # small integers: many ties
    mine, ref = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    window = wide._tiled_max_pool_window(layer)
    out = (wide._tiled_max_pool1d(mine, window) if window else wide._max_pool2d(layer, mine)
           if isinstance(layer, nn.MaxPool2d) else wide._adaptive_avg_pool(layer, mine, {}))
    expected = layer(ref)
    torch.testing.assert_close(out, expected)
    weights = torch.randn(expected.shape, generator=g)
    (out * weights).sum().backward()
    (expected * weights).sum().backward()
    torch.testing.assert_close(mine.grad, ref.grad)


def test_relu_runs_after_the_max_pool_it_precedes_with_equal_gradients_on_ties():
    """ReLU then max pool runs as max pool then ReLU (a quarter of the elements): per-example
    norms and clipped sums still equal Opacus's on inputs with constant regions (ties at zero)."""
    def factory():
        return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4 * 4 * 4, 5))
    K, B = 2, 6
    mods, params = stacked(factory, K)
    net = wide.WideNet(mods[0], K)
    assert [type(net.layers[j]).__name__ for j in net.order][:3] == ["Conv2d", "MaxPool2d", "ReLU"]
    g = torch.Generator().manual_seed(2)
    x = torch.zeros(K, B, 1, 8, 8)
    x[..., 2:5, 3:6] = torch.randn(K, B, 1, 3, 3, generator=g)   # the rest is constant: ties everywhere
    y = torch.randint(0, 5, (K, B), generator=g)
    valid = torch.ones(K, B, dtype=torch.bool)
    sums, norms = stack.dp_gradients(net, params, x, y, valid, 0.5)
    for k in range(K):
        ref_norms, ref_grads = opacus_clipped(mods[k], x[k], y[k], 0.5)
        torch.testing.assert_close(norms[k], ref_norms, rtol=1e-4, atol=1e-6)
        for mine, ref in zip(sums, ref_grads, strict=True):
            torch.testing.assert_close(mine[k], ref, rtol=1e-4, atol=1e-6)


def test_mixed_rule_uses_both_paths_on_the_cnn():
    """The built-in CNN's first conv (28x28 map) takes per-example gradients; a conv on a 2x2 map ghost norms."""
    seen = []
    original = conv.ConvSampler.__init__

    def spy(self, *args, **kwargs):
        original(self, *args, **kwargs)
        seen.append(self.direct)

    factory, shape = MODULES["conv2d_stride_pad_maxpool"]
    mods, params = stacked(factory, 2)
    small = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.Flatten(), nn.Linear(64, 5))
    torch.manual_seed(0)
    small_params = [p.detach().unsqueeze(0).repeat(2, *([1] * p.dim())) for p in small.parameters()]
    conv.ConvSampler.__init__ = spy
    try:
        for module, ps, shp in [(mods[0], params, shape), (small, small_params, (8, 2, 2))]:
            x = torch.randn(2, 4, *shp)
            stack.dp_gradients(wide.WideNet(module, 2), ps, x, torch.zeros(2, 4, dtype=torch.long),
                                 torch.ones(2, 4, dtype=torch.bool), 1.0)
    finally:
        conv.ConvSampler.__init__ = original
    assert seen == [True, False]


def test_mixed_rule_takes_ghost_norms_only_on_the_last_stage_of_resnet20():
    """By multiply-adds: the 3x3 stride-1 convolutions on ResNet-20's 7x7 maps take ghost norms (a
    padded 9x9 input's Gram matrix is 4x cheaper than per-example gradients); the strided ones into
    that stage, the 1x1 shortcuts and every convolution on the 28x28 and 14x14 maps take per-example
    gradients."""
    from dpmem.models import graph
    seen = []
    original = conv.ConvSampler.__init__

    def spy(self, layer, K, saved, grad, **kwargs):
        original(self, layer, K, saved, grad, **kwargs)
        seen.append((tuple(grad.shape[2:]), layer.stride, layer.kernel_size, self.direct))

    spec = TrainSpec(arch="resnet20", input_shape=(1, 28, 28), n_classes=10, hidden=(16, 32, 64), steps=1,
                     sample_rate=0.1, lr=0.1)
    module = build_model(spec)
    params = [p.detach().unsqueeze(0) for p in module.parameters()]
    conv.ConvSampler.__init__ = spy
    try:
        stack.dp_gradients(graph.wide_network(module, 1), params, torch.randn(1, 2, 1, 28, 28),
                           torch.zeros(1, 2, dtype=torch.long), torch.ones(1, 2, dtype=torch.bool), 1.0)
    finally:
        conv.ConvSampler.__init__ = original
    ghost = [(shape, stride, kernel) for shape, stride, kernel, direct in seen if not direct]
    assert len(seen) == 21 and ghost == [((7, 7), (1, 1), (3, 3))] * 5


# -- full steps ----------------------------------------------------------------------------------

STEP_CASES = [("mlp", (16,), (24,)), ("cnn", (1, 12, 12), (8, 16)), ("cnn1d", (1, 40), (8, 16))]


@pytest.mark.parametrize(("arch", "shape", "hidden"), STEP_CASES, ids=[c[0] for c in STEP_CASES])
@pytest.mark.parametrize("private", [False, True], ids=["sgd", "dpsgd"])
@pytest.mark.parametrize("device", TEST_DEVICES)
def test_training_steps_equal_opacus_steps(arch, shape, hidden, private, device, exact_cuda):
    """Two steps with momentum and weight decay from the same weights on the same batches (DP
    noise off): the engine's update equals Opacus's DPOptimizer (or plain SGD on summed loss /
    expected batch)."""
    dp = DPParams(noise_multiplier=0.0, max_grad_norm=0.5) if private else None
    spec = TrainSpec(arch=arch, input_shape=shape, n_classes=5, hidden=hidden, steps=2, sample_rate=0.25,
                     lr=0.3, momentum=0.9, weight_decay=0.01, dp=dp)
    assert_two_steps_equal_opacus(spec, device=device)


def test_export_import_round_trip_and_prediction_match_modules():
    spec = TrainSpec(arch="cnn1d", input_shape=(1, 40), n_classes=5, hidden=(8,), steps=1, sample_rate=0.1, lr=0.1)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(50, 1, 40)).astype(np.float32)
    y = rng.integers(0, 5, 50)
    trainer = stack.ModelStack(spec, x, y, np.ones((4, 50), bool), seed=0, noise_seed=0)
    back = stack.import_params(spec, [trainer.model_state(k) for k in range(4)])
    assert all(torch.equal(a, b) for a, b in zip(trainer.params, back, strict=True))
    correct, margin = trainer.predict(x, y)
    for k in range(4):
        model = build_model(spec)
        model.load_state_dict(trainer.model_state(k))
        ref_correct, ref_margin = opacus_engine.predict(model, x, y)
        assert np.array_equal(correct[k], ref_correct)
        np.testing.assert_allclose(margin[k].astype(np.float32), ref_margin.astype(np.float32), rtol=2e-3, atol=2e-3)


def test_supports_names_the_problem():
    assert batched.supports(nn.Sequential(nn.Flatten(), nn.Linear(4, 2))) is None
    assert "BatchNorm" in batched.supports(nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)))
    assert "reads weight directly" in batched.supports(nn.Linear(3, 2))   # a module's own forward: its graph
    assert "padding" in batched.supports(nn.Sequential(nn.Conv1d(1, 2, 2, padding="same")))   # uneven padding
    assert batched.supports(nn.Sequential(nn.Conv1d(1, 2, 3, padding="same"), nn.Conv1d(2, 2, 3, padding="valid"),
                                          nn.Flatten(), nn.Linear(6, 2)), (1, 5)) is None
    assert "Linear" in batched.supports(nn.Sequential(nn.Linear(5, 3)), (2, 5))  # Linear on a sequence
    assert batched.supports(nn.Sequential(nn.Conv1d(1, 2, 3), nn.Flatten(), nn.Linear(6, 2)), (1, 5)) is None


# -- per-model randomness (C1) ---------------------------------------------------------------------

def _request(K, n=60, shape=(16,), seed=0, noise_seed=1, canary=None, stream_ids=None, masks=None):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, *shape)).astype(np.float32)
    flat = x.reshape(n, -1)
    y = (flat[:, 0] > 0).astype(np.int64) + 2 * (flat[:, 1] > 0)
    if masks is None:
        masks = rng.random((K, n)) < 0.7
    return TrainRequest(x_train=x, y_train=y, masks=masks, seed=seed, noise_seed=noise_seed,
                        evals={"train": (x, y), "test": (x[:17] + 0.1, y[:17])}, canary=canary, stream_ids=stream_ids)


def _spec(arch="mlp", shape=(16,), hidden=(32,), dp=None, steps=30, **kw):
    return TrainSpec(arch=arch, input_shape=shape, n_classes=4, hidden=hidden, steps=steps, sample_rate=0.2,
                     lr=0.3, momentum=0.5, dp=dp, **kw)


DP = DPParams(noise_multiplier=1.0, max_grad_norm=1.0)


@pytest.mark.parametrize("engine", ["batched", "opacus"])
@pytest.mark.parametrize(("arch", "shape", "hidden"), [("mlp", (16,), (32,)), ("cnn1d", (1, 16), (4,))],
                         ids=["mlp", "cnn1d"])
def test_a_model_does_not_depend_on_its_neighbours(engine, arch, shape, hidden):
    """Models [0, 8) in one call equal [0, 4) and [4, 8) trained apart, bit for bit."""
    spec = _spec(arch, shape, hidden, dp=DP, steps=6 if engine == "opacus" else 20)
    whole = _request(8, shape=shape)
    together = train_models(spec, whole, engine=engine, device="cpu")
    parts = [train_models(spec, _request(4, shape=shape, masks=whole.masks[s], stream_ids=np.arange(s.start, s.stop)),
                          engine=engine, device="cpu") for s in (slice(0, 4), slice(4, 8))]
    for key, value in together.items():
        assert np.array_equal(value, np.concatenate([p[key] for p in parts])), key


@pytest.mark.parametrize(("arch", "shape", "hidden"), [("cnn1d", (1, 16), (4,)), ("cnn", (1, 8, 8), (4,))],
                         ids=["cnn1d", "cnn"])
@pytest.mark.parametrize("dp", [None, DP], ids=["sgd", "dpsgd"])
def test_models_grouped_by_batch_size_get_the_gradients_of_one_group(arch, shape, hidden, dp, monkeypatch):
    """A step whose models do not fit one group computes them in groups of similar batch size,
    reordered: each model gets the gradient (clipped and noised for DP) it gets in one group, to
    float rounding (oneDNN may pick another convolution kernel for another number of groups)."""
    spec = _spec(arch, shape, hidden, dp=dp)
    req = _request(9, shape=shape)
    trainers = [stack.ModelStack(spec, req.x_train, req.y_train, req.masks, seed=0, noise_seed=1) for _ in "ab"]
    batch = trainers[0].sample_batch()
    assert len(set(batch.valid.sum(dim=1).tolist())) > 1          # batch sizes differ: the order changes
    whole = trainers[0].gradients(batch)
    seen = []
    original = stack.ModelStack._groups

    def spy(self, b):
        for part in original(self, b):
            seen.append(int(part[0]))
            yield part
    monkeypatch.setattr(stack.ModelStack, "_groups", spy)
    monkeypatch.setattr(stack, "STEP_KEPT_FLOATS", 1)   # one model per group
    grouped = trainers[1].gradients(batch)
    assert sorted(seen) == list(range(9)) and seen != list(range(9))
    for a, b in zip(whole, grouped, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for t in trainers:
        t.close()


def test_equal_stream_ids_share_init_and_batches_minus_the_left_out_example():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 4)).astype(np.float32)
    y = rng.integers(0, 3, 50)
    masks = np.ones((4, 50), bool)
    masks[1, 7] = False                       # model 1 = model 0 without example 7 (stream 5)
    masks[3, 9] = False                       # model 3 = model 2 without example 9 (stream 8)
    spec = TrainSpec(arch="mlp", input_shape=(4,), n_classes=3, hidden=(8,), steps=1, sample_rate=0.3, lr=0.1)
    tr = stack.ModelStack(spec, x, y, masks, seed=3, noise_seed=4, stream_ids=np.array([5, 5, 8, 8]))
    for p in tr.params:
        assert torch.equal(p[0], p[1]) and torch.equal(p[2], p[3]) and not torch.equal(p[0], p[2])
    rows = lambda batch, k: {tuple(r) for r in batch.x[k][batch.valid[k]].numpy().round(6)}  # noqa: E731
    for _ in range(20):
        batch = tr.sample_batch()
        a, b_ = rows(batch, 0), rows(batch, 1)
        assert b_ <= a and a - b_ <= {tuple(x[7].round(6))}
        c_, d_ = rows(batch, 2), rows(batch, 3)
        assert d_ <= c_ and c_ - d_ <= {tuple(x[9].round(6))}
    tr.close()


def test_both_engines_start_from_the_same_models():
    spec = _spec("cnn1d", (1, 16), (4,))
    tr = stack.ModelStack(spec, np.zeros((5, 1, 16), np.float32), np.zeros(5, np.int64), np.ones((3, 5), bool),
                                seed=7, noise_seed=0, stream_ids=np.array([4, 9, 2]))
    for k, model in enumerate(opacus_engine.initial_models(spec, 3, 7, np.array([4, 9, 2]))):
        for name, value in model.state_dict().items():
            assert torch.equal(tr.model_state(k)[name], value)


# -- gradient canaries (C3) ------------------------------------------------------------------------

def _with_canaries(req: TrainRequest, m_c: int, rng) -> TrainRequest:
    """The request with m_c canary rows (placeholders) inserted at random positions."""
    n = len(req.y_train)
    K = req.masks.shape[0]
    at = np.sort(rng.choice(n + m_c, size=m_c, replace=False))
    real = np.setdiff1d(np.arange(n + m_c), at)
    x = np.zeros((n + m_c, *req.x_train.shape[1:]), np.float32)
    y = np.zeros(n + m_c, np.int64)
    masks = np.zeros((K, n + m_c), bool)
    canary = np.full(n + m_c, -1)
    x[real], y[real], masks[:, real] = req.x_train, req.y_train, req.masks
    x[at] = 1e6  # placeholders the network must never see
    masks[:, at] = rng.random((K, m_c)) < 0.5
    canary[at] = rng.permutation(m_c)
    return TrainRequest(x_train=x, y_train=y, masks=masks, seed=req.seed, noise_seed=req.noise_seed,
                        evals=req.evals, canary=canary, stream_ids=req.stream_ids)


@pytest.mark.parametrize("engine", ["batched", "opacus"])
@pytest.mark.parametrize("dp", [None, DP], ids=["sgd", "dpsgd"])
def test_canaries_leave_real_training_unchanged(engine, dp):
    plain = _request(4)
    with_canaries = _with_canaries(plain, 6, np.random.default_rng(3))
    steps = 8 if engine == "opacus" else 30
    a = train_models(_spec(dp=dp, steps=steps), plain, engine=engine, device="cpu")
    b = train_models(_spec(dp=dp, steps=steps, canaries=6), with_canaries, engine=engine, device="cpu")
    assert set(b) == set(a) | {"canary_score"}
    for key in a:
        assert np.array_equal(a[key], b[key]), key
    assert b["canary_score"].shape == (4, 6) and b["canary_score"].dtype == np.float32


def test_canary_scores_are_noise_for_out_models_and_shifted_for_in_models():
    """No momentum or weight decay: theta_c = lr/ebs * (s * f * times sampled - sigma C * sum of T
    standard normals). Out-models: N(0, T (lr sigma C / ebs)^2). In-models without noise: an integer
    count of lr s f / ebs, with mean q T."""
    K, n, m_c, steps, lr, C = 40, 50, 30, 25, 0.5, 0.8
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 16)).astype(np.float32)
    base = TrainRequest(x_train=x, y_train=np.zeros(n, np.int64), masks=np.ones((K, n), bool), seed=1, noise_seed=2)
    req = _with_canaries(base, m_c, rng)
    ebs = max(1, int(0.2 * n))
    members = np.zeros((K, m_c), bool)
    for row in np.flatnonzero(req.canary >= 0):
        members[:, req.canary[row]] = req.masks[:, row]
    for sigma in (1.3, 0.0):
        spec = TrainSpec(arch="logreg", input_shape=(16,), n_classes=2, steps=steps, sample_rate=0.2, lr=lr,
                         dp=DPParams(noise_multiplier=sigma, max_grad_norm=C), canaries=m_c, canary_norm=1.0)
        score = train_models(spec, req, engine="batched", device="cpu")["canary_score"].astype(np.float64)
        if sigma:
            out = score[~members] / (np.sqrt(steps) * lr * sigma * C / ebs)
            assert stats.kstest(out, "norm").pvalue > 1e-3
            assert score[members].mean() > score[~members].mean() + 3 * out.std() / np.sqrt(members.sum())
        else:
            assert np.all(score[~members] == 0)
            unit = lr * C * (C / (C + 1e-6)) / ebs
            counts = score[members] / unit
            np.testing.assert_allclose(counts, np.round(counts), atol=1e-3)
            assert abs(counts.mean() - 0.2 * steps) < 4 * np.sqrt(0.2 * 0.8 * steps / counts.size)


def test_canary_clipped_sums_equal_opacus():
    """Opacus's own per-example machinery on the canary block gives the engine's clipped sum."""
    m_c, C = 5, 0.7
    for canary_norm in (0.5, 1.0, 3.0):
        spec = TrainSpec(arch="logreg", input_shape=(2,), n_classes=2, steps=1, sample_rate=0.5, lr=1.0,
                         dp=DPParams(noise_multiplier=0.0, max_grad_norm=C), canaries=m_c, canary_norm=canary_norm)
        sampled = torch.tensor([[True, False, True, True, False]])
        engine = canary_stack.GradientCanaries(spec, np.ones((1, m_c), bool), seed=0, noise_seed=0, streams=np.arange(1),
                                          inv_ebs=torch.ones(1), device=torch.device("cpu")).clipped_sum(sampled)
        block = opacus_engine.CanaryBlock(m_c, canary_norm * C)
        gsm = GradSampleModule(block, batch_first=True, loss_reduction="sum")
        optimizer = DPOptimizer(torch.optim.SGD(gsm.parameters(), lr=1.0), noise_multiplier=0.0, max_grad_norm=C,
                                expected_batch_size=1, loss_reduction="sum")
        gsm(torch.nonzero(sampled[0]).flatten()).backward()
        optimizer.pre_step()
        torch.testing.assert_close(block.theta.weight.grad.reshape(1, -1), engine, rtol=1e-6, atol=1e-7)


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
    ebs = models.spec.expected_batch_sizes(masks, 0.2)
    assert ebs == [20, 50]
    for dp in (None, DPParams(noise_multiplier=sigma, max_grad_norm=C)):
        spec = TrainSpec(arch="mlp", input_shape=(64,), n_classes=5, hidden=(64,), steps=1, sample_rate=0.2,
                         lr=lr, momentum=momentum, dp=dp)
        trainer = stack.ModelStack(spec, x_train, y_train, masks, seed=0, noise_seed=1)
        before = [t.clone() for t in trainer.params]
        empty = stack.PoissonBatch(x=torch.zeros(2, 1, 64), y=torch.zeros(2, 1, dtype=torch.long),
                                     valid=torch.zeros(2, 1, dtype=torch.bool))
        trainer.step_on(empty)
        if dp is None:
            assert all(torch.equal(a, b) for a, b in zip(before, trainer.params))
            continue
        for k in range(2):
            noise = torch.cat([((b[k] - a[k]) / -lr).flatten() for a, b in zip(before, trainer.params)]).double()
            m = noise.numel()  # 64*64 + 64 + 64*5 + 5 = 4485 coordinates
            expected_var = (sigma * C / ebs[k]) ** 2
            statistic = (noise.square().sum() / expected_var).item()
            lo, hi = stats.chi2.ppf([1e-4, 1 - 1e-4], m)
            assert lo < statistic < hi, (k, statistic, m)
            assert abs(noise.mean().item()) < 5 * np.sqrt(expected_var / m)
        trainer.close()


def test_noise_drawn_ahead_in_the_background_equals_noise_drawn_inline(monkeypatch):
    """Background threads draw step t+1's noise during step t, into the other buffer: every step
    still gets exactly the numbers its models' generators give inline, in order."""
    def generators():
        return [streams.stream_generator(7, s, device=torch.device("cpu")) for s in (0, 5, 9)]

    gens = generators()
    inline = [torch.stack([torch.empty(50).normal_(generator=g) for g in gens]) for _ in range(4)]
    monkeypatch.setattr(noise, "cpu_count", lambda: 2)
    drawn = noise.GaussianNoise(generators(), 50, torch.device("cpu"))
    assert drawn._pool is not None and len(drawn.buffers) == 2
    for step in range(4):
        drawn.begin()
        torch.testing.assert_close(drawn.take(), inline[step], rtol=0, atol=0)
    drawn.close()
    monkeypatch.setattr(noise, "cpu_count", lambda: 1)
    drawn = noise.GaussianNoise(generators(), 50, torch.device("cpu"))
    assert drawn._pool is None
    for step in range(4):
        torch.testing.assert_close(drawn.take(), inline[step], rtol=0, atol=0)


def test_poisson_batches_come_from_each_subset_at_the_sample_rate():
    K, n, q, steps = 4, 60, 0.3, 400
    rng = np.random.default_rng(0)
    x_train = np.arange(n, dtype=np.float32).reshape(n, 1).repeat(2, axis=1)
    masks = rng.random((K, n)) < 0.5
    masks[3] = False  # an empty subset: always an empty batch
    spec = TrainSpec(arch="logreg", input_shape=(2,), n_classes=2, steps=1, sample_rate=q, lr=0.1)
    trainer = stack.ModelStack(spec, x_train, np.zeros(n, dtype=np.int64), masks, seed=5, noise_seed=0)
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


def test_a_batch_holds_each_models_coin_picks_in_example_order_then_padding():
    """The gather index (built without nonzero) against the step's coins: model k's rows are the
    examples whose coin fell under q, in example order, then example 0 as padding; the host counts
    the batch carries are its valid rows."""
    K, n, q = 5, 37, 0.4
    rng = np.random.default_rng(2)
    x_train = np.arange(n, dtype=np.float32).reshape(n, 1)
    masks = rng.random((K, n)) < 0.6
    spec = TrainSpec(arch="logreg", input_shape=(1,), n_classes=2, steps=1, sample_rate=q, lr=0.1)
    trainer = stack.ModelStack(spec, x_train, np.zeros(n, dtype=np.int64), masks, seed=1, noise_seed=0)
    for _ in range(20):
        batch = trainer.sample_batch()
        picks = ((trainer._uniform < q) & torch.as_tensor(masks)).numpy()
        assert batch.x.shape[1] % stack.WIDTH_BLOCK == 0
        assert torch.equal(batch.counts, batch.valid.sum(dim=1))
        for k in range(K):
            chosen = np.flatnonzero(picks[k])
            rows = batch.x[k, :, 0].long().numpy()
            assert (rows[:len(chosen)] == chosen).all() and (rows[len(chosen):] == 0).all()
            assert int(batch.counts[k]) == len(chosen)


def test_padded_rows_contribute_nothing():
    factory, shape = MODULES["cnn1d"]
    mods, params = stacked(factory, 2)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 12, *shape, generator=g)
    y = torch.randint(0, 5, (2, 12), generator=g)
    valid = torch.rand(2, 12, generator=g) < 0.7
    junk_x, junk_y = x.clone(), y.clone()
    junk_x[~valid] = 1e3  # garbage in padded rows
    junk_y[~valid] = 4
    net = wide.WideNet(mods[0], 2)
    a, _ = stack.dp_gradients(net, params, x, y, valid, 1.0)
    b, _ = stack.dp_gradients(net, params, junk_x, junk_y, valid, 1.0)
    for ga, gb in zip(a, b):
        torch.testing.assert_close(ga, gb)


# -- determinism and outputs --------------------------------------------------------------------

def test_deterministic_and_noise_seed_only_changes_dp_models():
    runs = {}
    for name, spec, noise_seed in [("np1", _spec(), 1), ("np2", _spec(), 2), ("dp1", _spec(dp=DP), 1),
                                   ("dp1b", _spec(dp=DP), 1), ("dp2", _spec(dp=DP), 2)]:
        runs[name] = batched.train(_spec(dp=spec.dp), _request(5, noise_seed=noise_seed))
    for split in ("train", "test"):
        key = f"{split}_margin"
        for a, b in [("np1", "np2"), ("dp1", "dp1b")]:
            assert np.array_equal(runs[a][f"{split}_correct"], runs[b][f"{split}_correct"])
            assert np.array_equal(runs[a][key], runs[b][key])
        assert not np.array_equal(runs["dp1"][key], runs["dp2"][key])
        assert not np.array_equal(runs["dp1"][key], runs["np1"][key])


def test_private_and_nonprivate_variants_share_init_and_batches():
    req = _request(5)
    a = stack.ModelStack(_spec(), req.x_train, req.y_train, req.masks, seed=0, noise_seed=1)
    b = stack.ModelStack(_spec(dp=DP), req.x_train, req.y_train, req.masks, seed=0, noise_seed=9)
    assert all(torch.equal(s, t) for s, t in zip(a.params, b.params))
    for _ in range(5):
        ba, bb = a.sample_batch(), b.sample_batch()
        assert torch.equal(ba.x, bb.x) and torch.equal(ba.valid, bb.valid)
        a.step_on(ba)
        b.step_on(bb)  # the DP step must not draw from the batch generators
    b.close()


@pytest.mark.parametrize("engine", ["batched", "opacus"])
def test_outputs_shapes_dtypes_and_margin_consistency(engine):
    out = train_models(_spec(), _request(5, n=120), engine=engine, device="cpu")
    assert set(out) == {"train_correct", "train_margin", "test_correct", "test_margin",
                        "train_loss_sum", "train_draws"}   # non-private: no gradient norms recorded
    for split, m in [("train", 120), ("test", 17)]:
        correct, margin = out[f"{split}_correct"], out[f"{split}_margin"]
        assert correct.shape == margin.shape == (5, m)
        assert correct.dtype == np.bool_ and margin.dtype == np.float16
        assert np.all(correct[margin > 0]) and not np.any(correct[margin < 0])
    assert out["train_correct"].mean() > 0.7  # the task is learnable


def test_progress_reports_model_steps():
    seen = []
    train_models(_spec(), _request(5), progress=seen.append, device="cpu")
    assert seen and seen[-1] == 5 * 30 and seen == sorted(seen)


def test_unknown_or_missing_device_is_refused():
    with pytest.raises(ValueError, match="unknown device"):
        runtime.resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            train_models(_spec(), _request(2), device="cuda")
        assert runtime.resolve_device("auto").type == "cpu"


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
    acc_engine = train_models(spec, req, engine="batched", device="cpu")["test_correct"].mean(axis=1)
    acc_opacus = train_models(spec, req, engine="opacus", device="cpu")["test_correct"].mean(axis=1)
    assert acc_engine.mean() > (0.85 if private else 0.92)
    se = np.sqrt(acc_engine.var(ddof=1) / K + acc_opacus.var(ddof=1) / K)
    assert abs(acc_engine.mean() - acc_opacus.mean()) < 4 * se + 0.005, (acc_engine, acc_opacus)


def test_opacus_path_empty_subset_is_noise_only():
    sigma, C, lr = 1.0, 0.5, 1.0
    spec = TrainSpec(arch="mlp", input_shape=(64,), n_classes=10, hidden=(32,), steps=1, sample_rate=0.1,
                     lr=lr, dp=DPParams(noise_multiplier=sigma, max_grad_norm=C))
    init = opacus_engine.initial_models(spec, 1, seed=7)[0]
    before = {k: v.clone() for k, v in init.state_dict().items()}
    empty = torch.zeros(0, 64)
    model, _ = opacus_engine.train_one(spec, init, empty, torch.zeros(0, dtype=torch.long), batch_seed=0, noise_seed=0)
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
    assert batched.supports(model, shape) is None


@pytest.mark.parametrize("engine", ["batched", "opacus"])
def test_cnn_trains_with_an_empty_subset(digits, engine):
    x_train, y_train, x_test, y_test = digits
    n = 300
    spec = TrainSpec(arch="cnn", input_shape=(1, 8, 8), n_classes=10, hidden=(8, 16), steps=40,
                     sample_rate=0.1, lr=0.1, dp=DPParams(noise_multiplier=0.5, max_grad_norm=1.0))
    masks = np.ones((2, n), dtype=bool)
    masks[1] = False  # an empty subset must not break either path
    req = TrainRequest(x_train=x_train[:n].reshape(-1, 1, 8, 8), y_train=y_train[:n], masks=masks, seed=0,
                       noise_seed=1, evals={"test": (x_test.reshape(-1, 1, 8, 8), y_test)})
    out = train_models(spec, req, engine=engine, device="cpu")
    assert out["test_correct"].shape == (2, len(y_test)) and out["test_margin"].dtype == np.float16
    assert out["test_correct"][0].mean() > 0.25  # learns something in 40 noisy steps (chance is 0.1)


# -- dispatch -----------------------------------------------------------------------------------

def test_train_models_dispatch(monkeypatch):
    calls = []
    monkeypatch.setattr(batched, "train", lambda spec, req, **kw: calls.append("batched") or {})
    monkeypatch.setattr(opacus_engine, "train", lambda spec, req, **kw: calls.append("opacus") or {})
    req = _request(3)
    for arch, shape, engine, expected in [("logreg", (16,), "auto", "batched"), ("mlp", (16,), "auto", "batched"),
                                          ("mlp", (16,), "opacus", "opacus"), ("cnn", (1, 4, 4), "auto", "batched"),
                                          ("cnn1d", (1, 16), "auto", "batched"), ("cnn", (1, 4, 4), "opacus", "opacus")]:
        spec = TrainSpec(arch=arch, input_shape=shape, n_classes=4, steps=1, sample_rate=0.1, lr=0.1)
        calls.clear()
        train_models(spec, req, engine=engine)
        assert calls == [expected], (arch, engine)
    with pytest.raises(ValueError, match="unknown engine"):
        train_models(_spec(), req, engine="gpu")
    bad = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(8, 4))
    monkeypatch.setattr("dpmem.models.nets.build_model", lambda spec: bad)
    cnn = TrainSpec(arch="cnn", input_shape=(1, 4, 4), n_classes=4, steps=1, sample_rate=0.1, lr=0.1)
    assert models.resolve_engine(cnn) == "opacus"
    with pytest.raises(ValueError, match="batched engine cannot train"):
        train_models(cnn, req, engine="batched")


# -- the hand-written MLP path -------------------------------------------------------------------

@pytest.mark.parametrize("dp", [None, DPParams(noise_multiplier=0.7, max_grad_norm=0.5)], ids=["sgd", "dpsgd"])
@pytest.mark.parametrize("hidden", [(), (16, 8)], ids=["logreg", "mlp2"])
def test_mlp_fast_path_equals_the_general_engine(dp, hidden):
    """Same init, coins, noise and canaries; the fused hand-written step gives the general step's weights."""
    from dpmem.models.batched_mlp import MLPStack, is_mlp
    spec = TrainSpec(arch="mlp" if hidden else "logreg", input_shape=(20,), n_classes=5, hidden=hidden, steps=1,
                     sample_rate=0.3, lr=0.2, momentum=0.9, weight_decay=0.01, dp=dp, canaries=4)
    assert is_mlp(build_model(spec)) and batched.stack_class(spec) is MLPStack
    rng = np.random.default_rng(0)
    x, y, masks = rng.normal(size=(50, 20)).astype(np.float32), rng.integers(0, 5, 50), rng.random((6, 50)) < 0.7
    members = rng.random((6, 4)) < 0.5
    fast = MLPStack(spec, x, y, masks, seed=0, noise_seed=1, canary_members=members)
    general = stack.ModelStack(spec, x, y, masks, seed=0, noise_seed=1, canary_members=members)
    for _ in range(5):
        fast.step()
        general.step()
    for a, b in zip(fast.params, general.params, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fast.canaries.theta, general.canaries.theta)
    for a, b in zip(fast.predict(x, y), general.predict(x, y)):
        np.testing.assert_allclose(a.astype(np.float32), b.astype(np.float32), atol=2e-3)
    fast.close()
    general.close()
    assert not is_mlp(nn.Sequential(nn.Linear(3, 2), nn.Tanh(), nn.Linear(2, 2)))

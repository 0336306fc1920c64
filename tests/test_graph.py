"""The batched engine on modules that are graphs, not sequences (models/graph.py): residual nets
and functional forwards against Opacus (per-example norms, clipped sums, full DP steps), refusals
with reasons, and a user's residual factory end to end on the batched engine."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from opacus_reference import assert_two_steps_equal_opacus, opacus_clipped, stacked
from torch import nn

from dpmem import models
from dpmem.bench import cli
from dpmem.models import batched, graph, stack
from dpmem.models.nets import build_model
from dpmem.models.samplers import conv
from dpmem.models.spec import DPParams, TrainSpec

EXAMPLES = Path(__file__).parent / "examples"
if str(EXAMPLES) not in sys.path:
    sys.path.insert(0, str(EXAMPLES))


pytestmark = pytest.mark.usefixtures("one_torch_thread", "quiet_opacus")


class Branchy(nn.Module):
    """Every supported graph function once: concatenation on channels and on features, residual
    add and scaling, functional and method activations, ``padding="same"`` / ``"valid"``, a pooling
    module and function, ``torch.flatten``, ``x.view(x.size(0), -1)``, means with and without keepdim."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(2, 4, 3, padding="same")
        self.b = nn.Conv2d(2, 3, 1, padding="valid")
        self.norm = nn.GroupNorm(7, 7)
        self.c = nn.Conv2d(7, 6, 3, padding="same", dilation=2, bias=False)
        self.pool = nn.MaxPool2d(2)
        self.act = nn.ReLU(inplace=True)
        self.fc = nn.Linear(6 * 3 * 3 + 6, 8)
        self.fc2 = nn.Linear(8 + 6 + 6, 5)

    def forward(self, x):
        h = torch.cat([F.relu(self.a(x)), torch.sigmoid(self.b(x))], dim=1)
        h = F.relu(self.norm(h) * 0.5 + h - 0.1, inplace=True)  # (Opacus refuses in-place ops on hooked outputs)
        h = self.act(self.pool(self.c(h)))                      # [6, 3, 3]
        u = torch.cat([torch.flatten(h, 1), h.mean((2, 3))], dim=1)
        z = self.fc(u).tanh()
        s = F.adaptive_avg_pool2d(h, 1).view(h.size(0), -1)
        t = h.mean(3, keepdim=True).mean(2).flatten(1)
        return self.fc2(torch.cat([z, s, t * s], dim=1))


def _resnet(arch, hidden, shape):
    return lambda: build_model(TrainSpec(arch=arch, input_shape=shape, n_classes=5, hidden=hidden, steps=1,
                                         sample_rate=0.1, lr=0.1))


GRAPHS = {
    "branchy": (Branchy, (2, 6, 6)),
    "resnet20": (_resnet("resnet20", (4, 8), (1, 8, 8)), (1, 8, 8)),
    "wrn16": (_resnet("wrn16", (8, 16), (2, 8, 8)), (2, 8, 8)),
}


@pytest.mark.parametrize("rule", ["mixed", "per_example", "ghost"])
@pytest.mark.parametrize("name", list(GRAPHS))
def test_graph_norms_and_clipped_sums_equal_opacus(name, rule, monkeypatch):
    monkeypatch.setattr(conv.ConvSampler, "rule", rule)
    factory, shape = GRAPHS[name]
    K, B = 3, 7
    mods, params = stacked(factory, K)
    assert batched.supports(mods[0], shape) is None
    net = graph.wide_network(mods[0], K)
    assert isinstance(net, graph.GraphNet)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(K, B, *shape, generator=g) * 2
    y = torch.randint(0, 5, (K, B), generator=g)
    valid = torch.rand(K, B, generator=g) < 0.8
    _, norms = stack.dp_gradients(net, params, x, y, valid, 1e9)
    assert torch.all(norms[~valid] == 0)
    max_grad_norm = float(norms[valid].median())
    sums, _ = stack.dp_gradients(net, params, x, y, valid, max_grad_norm)
    for k in range(K):
        ref_norms, ref_grads = opacus_clipped(mods[k], x[k][valid[k]], y[k][valid[k]], max_grad_norm)
        torch.testing.assert_close(norms[k][valid[k]], ref_norms, rtol=1e-4, atol=1e-6)
        for mine, ref in zip(sums, ref_grads, strict=True):
            # rtol 1e-4; atol 1e-5 for the few near-zero coordinates of a 20-layer float32 backward
            torch.testing.assert_close(mine[k], ref, rtol=1e-4, atol=1e-5)
    # the forward equals the K modules'
    with torch.no_grad():
        logits = net.forward(params, x)
        for k in range(K):
            torch.testing.assert_close(logits[k], mods[k](x[k]), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch, shape, hidden", [("resnet20", (1, 8, 8), (4, 8)), ("resnet8", (1, 8, 8), (4, 8, 8)),
                                                 ("wrn16", (1, 8, 8), (8, 16))],
                         ids=["resnet20", "resnet8", "wrn16"])
@pytest.mark.parametrize("private", [False, True], ids=["sgd", "dpsgd"])
def test_residual_training_steps_equal_opacus_steps(arch, shape, hidden, private):
    """Two steps with momentum and weight decay (DP noise off) equal DPOptimizer / plain SGD."""
    dp = DPParams(noise_multiplier=0.0, max_grad_norm=0.5) if private else None
    spec = TrainSpec(arch=arch, input_shape=shape, n_classes=5, hidden=hidden, steps=2, sample_rate=0.25,
                     lr=0.3, momentum=0.9, weight_decay=0.01, dp=dp)
    assert_two_steps_equal_opacus(spec)


def test_a_residual_model_does_not_depend_on_its_neighbours():
    """Models [0, 4) in one call equal [0, 2) and [2, 4) apart, to rounding (convolutions; see models/README.md)."""
    spec = TrainSpec(arch="resnet20", input_shape=(1, 8, 8), n_classes=4, hidden=(4,), steps=4, sample_rate=0.2,
                     lr=0.3, momentum=0.5, dp=DPParams(noise_multiplier=1.0, max_grad_norm=1.0))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 1, 8, 8)).astype(np.float32)
    y = rng.integers(0, 4, 40)
    masks = rng.random((4, 40)) < 0.7

    def trained(rows):
        t = stack.ModelStack(spec, x, y, masks[rows], seed=0, noise_seed=1, stream_ids=np.arange(4)[rows])
        t.train(spec.steps)
        t.close()
        return t.params
    whole = trained(slice(0, 4))
    parts = [trained(slice(0, 2)), trained(slice(2, 4))]
    for p, a, b in zip(whole, *parts, strict=True):
        torch.testing.assert_close(p, torch.cat([a, b]), rtol=1e-5, atol=1e-6)


# -- refusals ------------------------------------------------------------------------------------

class Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1)
        self.fc = nn.Linear(2, 3)

    def forward(self, x):
        return self.fc(self.conv(self.conv(x)).mean((2, 3)))


class ReadsWeight(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.scale = nn.Parameter(torch.ones(3))

    def forward(self, x):
        return self.fc(x) * self.scale


class Custom(nn.Module):
    def __init__(self, forward, *layers):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self._forward = forward

    def forward(self, x):
        return self._forward(self.layers, x)


@pytest.mark.parametrize("module, shape, fragment", [
    (Twice(), (2, 4, 4), "called 2 times"),
    (ReadsWeight(), (4,), "reads scale directly"),
    (Custom(lambda m, x: m[1](m[0](x).flatten(1)), nn.Conv2d(1, 2, 3), nn.BatchNorm1d(8)), (1, 4, 4), "BatchNorm1d"),
    (Custom(lambda m, x: m[0](x[:, :2]), nn.Linear(2, 3)), (4,), "getitem"),
    (Custom(lambda m, x: m[0](x.mean(1)), nn.Linear(3, 3)), (2, 3), "not over examples or channels"),
    (Custom(lambda m, x: m[0](torch.matmul(x, x)).flatten(1), nn.Linear(3, 3)), (3, 3), "matmul"),
    (Custom(lambda m, x: m[0](x.transpose(1, 2)).flatten(1), nn.Linear(3, 3)), (3, 3), ".transpose()"),
    (Custom(lambda m, x: m[1](m[0](x).flatten(1) + m[0](x).mean((2,))), nn.Conv1d(1, 2, 1), nn.Linear(6, 2)),
     (1, 3), "called 2 times"),
    (Custom(lambda m, x: m[1](m[0](x).flatten(1) + x.mean((2,))), nn.Conv1d(1, 1, 1), nn.Linear(3, 2)),
     (1, 3), "equal shapes per example and one layout"),
    (Custom(lambda m, x: m[0](x), nn.Conv2d(1, 2, 3)), (1, 5, 5), "vector of logits"),
    (nn.Sequential(nn.Conv1d(1, 2, 2, padding="same")), (1, 5), "padding='same'"),
])
def test_graph_refusals_name_the_reason(module, shape, fragment):
    problem = batched.supports(module, shape)
    assert problem is not None and fragment in problem, problem


def test_auto_falls_back_to_opacus_for_a_refused_graph(monkeypatch):
    monkeypatch.setattr("dpmem.models.nets.build_model", lambda spec: Twice())
    spec = TrainSpec(arch="cnn", input_shape=(2, 4, 4), n_classes=3, steps=1, sample_rate=0.1, lr=0.1)
    assert models.resolve_engine(spec) == "opacus"
    spec = TrainSpec(arch="cnn", input_shape=(1, 8, 8), n_classes=3, steps=1, sample_rate=0.1, lr=0.1)
    monkeypatch.setattr("dpmem.models.nets.build_model", lambda spec: build_model(
        TrainSpec(arch="resnet20", input_shape=(1, 8, 8), n_classes=3, hidden=(4,), steps=1, sample_rate=0.1, lr=0.1)))
    assert models.resolve_engine(spec) == "batched"


def test_a_user_residual_factory_trains_on_the_batched_engine(tmp_path):
    import my_data
    data = tmp_path / "digits.npz"
    my_data.write_npz(data)
    out = tmp_path / "run"
    assert cli.main(["run", "--out", str(out), "--quiet", "dataset=file", "zipf_a=0", "models=4", "unit_size=4",
                     "epochs=2", "epsilons=8", "lr=0.2", f"data_path={data}", "model=my_residual:tiny_resnet"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert {v["engine"] for v in summary["variants"].values()} == {"batched"}
    assert summary["variants"]["nonprivate"]["test_accuracy"] > 0.15   # it learned something (chance 0.1)

"""Leave-one-out on a convex problem, checked against a direct computation.

L2-regularised multinomial logistic regression, trained full-batch (sample rate 1) to convergence,
has one optimum: every repeat of the model on S is the same model, so mem_loo(i) is exactly
1[h_S(x_i) = y_i] - 1[h_{S minus i}(x_i) = y_i], which scipy's L-BFGS computes directly.
"""
import numpy as np
import pytest
import torch
from scipy import optimize
from scipy.special import logsumexp

from dpmem.bench.studies import loo
from dpmem.models import train_models
from dpmem.models.spec import TrainRequest, TrainSpec
from dpmem.models.stack import ModelStack

WD = 0.05


def _problem(seed=0, n=40, d=30, c=3):
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 1, (c, d))
    y = rng.integers(0, c, n)
    x = (centres[y] + rng.normal(0, 1.0, (n, d))).astype(np.float32)
    y[:4] = (y[:4] + 1) % c                  # four mislabeled examples: memorized or not, LOO decides
    return x, y.astype(np.int64)


def _direct_fit(x, y, c):
    """argmin (1/n) sum CE(W x + b, y) + WD/2 (|W|^2 + |b|^2), the engine's objective at sample rate 1."""
    n, d = x.shape
    onehot = np.eye(c)[y]

    def f(theta):
        w, b = theta[: c * d].reshape(c, d), theta[c * d:]
        z = x @ w.T + b
        p = np.exp(z - logsumexp(z, axis=1, keepdims=True))
        loss = -(onehot * (z - logsumexp(z, axis=1, keepdims=True))).sum() / n + WD / 2 * (theta @ theta)
        g = (p - onehot) / n
        return loss, np.concatenate([(g.T @ x).ravel(), g.sum(0)]) + WD * theta

    res = optimize.minimize(f, np.zeros(c * d + c), jac=True, method="L-BFGS-B", options={"gtol": 1e-10, "maxiter": 5000})
    return res.x[: c * d].reshape(c, d), res.x[c * d:]


def test_loo_of_converged_logreg_equals_the_direct_computation():
    torch.set_num_threads(1)
    x, y = _problem()
    c = 3
    examples = np.arange(8)                   # the four mislabeled ones and four clean ones
    masks, streams = loo.loo_masks(len(y), examples, repeats=3)
    spec = TrainSpec(arch="logreg", input_shape=(x.shape[1],), n_classes=c, steps=3000, sample_rate=1.0,
                     lr=1.0, momentum=0.9, weight_decay=WD)
    req = TrainRequest(x_train=x, y_train=y, masks=masks, seed=1, noise_seed=2, stream_ids=streams,
                       evals={"chosen": (x[examples], y[examples])})
    out = train_models(spec, req, device="cpu")
    correct = out["chosen_correct"].reshape(3, 1 + len(examples), len(examples))
    cols = np.arange(len(examples))
    table = loo.paired_mem(correct[:, 0, :], correct[:, 1 + cols, cols])

    w, b = _direct_fit(x, y, c)
    direct_in = (np.argmax(x[examples] @ w.T + b, axis=1) == y[examples]).astype(int)
    direct_out = []
    for i in examples:
        keep = np.arange(len(y)) != i
        wi, bi = _direct_fit(x[keep], y[keep], c)
        direct_out.append(int(np.argmax(x[i] @ wi.T + bi) == y[i]))
    expected = direct_in - np.array(direct_out)
    np.testing.assert_array_equal(table.mem_loo.to_numpy(), expected)
    assert (table.mem_loo_hi - table.mem_loo_lo).max() == pytest.approx(0.0)    # converged: no spread
    assert (expected == 1).any() and (expected == 0).any()                      # the check has teeth


def test_weight_decay_matches_torch_sgd():
    from dpmem.models.nets import build_model
    rng = np.random.default_rng(1)
    x = rng.normal(size=(20, 5)).astype(np.float32)
    y = rng.integers(0, 3, 20)
    spec = TrainSpec(arch="mlp", input_shape=(5,), n_classes=3, hidden=(6,), steps=3, sample_rate=1.0,
                     lr=0.3, momentum=0.5, weight_decay=0.1)
    tr = ModelStack(spec, x, y, np.ones((1, 20), bool), seed=0, noise_seed=0)
    model = build_model(spec)
    model.load_state_dict(tr.model_state(0))
    opt = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.5, weight_decay=0.1)
    for _ in range(3):
        tr.step()
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(torch.from_numpy(x)), torch.from_numpy(y), reduction="sum") / 20
        loss.backward()
        opt.step()
    for name, value in tr.model_state(0).items():
        torch.testing.assert_close(value, model.state_dict()[name], rtol=1e-5, atol=1e-6)
    tr.close()

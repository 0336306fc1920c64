"""The Opacus reference the engine's equality tests compare against, shared by the test files."""
import numpy as np
import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer
from torch import nn

from dpmem.models import stack
from dpmem.models.nets import build_model
from dpmem.models.spec import TrainSpec, expected_batch_sizes


def assert_two_steps_equal_opacus(spec: TrainSpec, *, device: str = "cpu", rtol: float = 1e-4,
                                  atol: float = 1e-5) -> None:
    """Two steps with momentum and weight decay from the same weights on the same batches (DP noise
    off): the engine's update equals Opacus's DPOptimizer (or plain SGD on summed loss / expected batch)."""
    private = spec.dp is not None
    K, n = 3, 40
    rng = np.random.default_rng(0)
    x_train = rng.normal(size=(n, *spec.input_shape)).astype(np.float32) * 2
    y_train = rng.integers(0, spec.n_classes, n)
    masks = rng.random((K, n)) < 0.6
    trainer = stack.ModelStack(spec, x_train, y_train, masks, seed=3, noise_seed=4, device=device)
    start = [trainer.model_state(k) for k in range(K)]
    draws = [trainer.sample_batch() for _ in range(2)]
    for batch in draws:
        trainer.step_on(batch)
    draws = [stack.PoissonBatch(x=b.x.cpu(), y=b.y.cpu(), valid=b.valid.cpu()) for b in draws]
    ebs = expected_batch_sizes(masks, spec.sample_rate)
    for k in range(K):
        model = build_model(spec)
        model.load_state_dict(start[k])
        if private:
            module = GradSampleModule(model, batch_first=True, loss_reduction="sum")
            optimizer = DPOptimizer(torch.optim.SGD(module.parameters(), lr=spec.lr, momentum=spec.momentum,
                                                    weight_decay=spec.weight_decay),
                                    noise_multiplier=0.0, max_grad_norm=spec.dp.max_grad_norm,
                                    expected_batch_size=ebs[k], loss_reduction="mean")
        else:
            module = model
            optimizer = torch.optim.SGD(model.parameters(), lr=spec.lr, momentum=spec.momentum,
                                        weight_decay=spec.weight_decay)
        for batch in draws:
            xb, yb = batch.x[k][batch.valid[k]], batch.y[k][batch.valid[k]]
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(module(xb), yb, reduction="sum")
            (loss if private else loss / ebs[k]).backward()
            optimizer.step()
        mine = trainer.model_state(k)
        for name, ref in model.state_dict().items():
            torch.testing.assert_close(mine[name], ref, rtol=rtol, atol=atol)
    trainer.close()


def stacked(factory, K: int, seed: int = 0) -> tuple[list[nn.Module], list[torch.Tensor]]:
    """K modules from ``factory`` (torch seed ``seed``) and their parameters stacked [K, *shape]."""
    torch.manual_seed(seed)
    mods = [factory() for _ in range(K)]
    params = [torch.stack([p.detach() for p in ps]) for ps in zip(*(m.parameters() for m in mods))]
    return mods, params


def opacus_clipped(module, x, y, max_grad_norm):
    """Opacus's per-example norms and clipped gradient sum (hooks mode) for one model."""
    gsm = GradSampleModule(module, batch_first=True, loss_reduction="sum")
    optimizer = DPOptimizer(torch.optim.SGD(gsm.parameters(), lr=1.0), noise_multiplier=0.0,
                            max_grad_norm=max_grad_norm, expected_batch_size=1, loss_reduction="sum")
    nn.functional.cross_entropy(gsm(x), y, reduction="sum").backward()
    norms = torch.stack([g.reshape(len(g), -1).norm(2, dim=-1) for g in optimizer.grad_samples], dim=1).norm(2, dim=1)
    optimizer.pre_step()  # clip, accumulate, zero noise, no scaling
    grads = [p.grad.clone() for p in gsm.parameters()]
    gsm.remove_hooks()
    return norms, grads

"""Gradient canaries in the user's own Opacus loop (models/canaries.py) and through the trainer protocol.

Opacus itself clips, noises and normalises the canaries: one step without noise moves a member
canary's theta_c by exactly lr * min(s, C) / ebs and leaves the network's update as without
canaries, in hooks and ghost mode; with noise, non-member scores have Opacus's noise scale."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from opacus import PrivacyEngine
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dpmem import canaries as dpmem_canaries
from dpmem.bench import cli
from dpmem.bench.store.run_store import RunStore
from dpmem.models.user_engine import TrainerCanaries, TrainerParams
from dpmem.privacy.errors import UsageError

EXAMPLES = Path(__file__).parent / "examples"
if str(EXAMPLES) not in sys.path:
    sys.path.insert(0, str(EXAMPLES))

N_REAL, DIM, CLASSES, M = 24, 5, 3, 8
MEMBERS = np.array([0, 3, 4, 7])
LR, CLIP = 0.5, 1.0


def _params(private: bool, noise: float = 0.0) -> TrainerParams:
    return TrainerParams(noise_multiplier=noise if private else None, max_grad_norm=CLIP if private else None,
                         sample_rate=1.0, steps=1, expected_batch_size=N_REAL, lr=LR, momentum=0.0, weight_decay=0.0)


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N_REAL, DIM, generator=g) * 3      # large inputs: real examples get clipped too
    y = torch.randint(0, CLASSES, (N_REAL,), generator=g)
    return x, y


def _net(seed=1):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(DIM, 6), nn.ReLU(), nn.Linear(6, CLASSES))


def _one_step(mode: str, *, with_canaries: bool, grad_norm: float = 2.0, noise: float = 0.0, members=MEMBERS,
              count=M, private=True):
    """One full-batch step of a plain Opacus loop; returns (network state after, theta_c or None)."""
    x, y = _data()
    params = _params(private, noise)
    kit = dpmem_canaries.Canaries(TrainerCanaries(ids=members, count=count, grad_norm=grad_norm, seed=0)
                                  if with_canaries else None, params)
    net = _net()
    model = kit.model(net)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    data = kit.dataset(TensorDataset(x, y))
    loader = DataLoader(data, batch_size=len(data))
    criterion = kit.loss(nn.CrossEntropyLoss())
    if private:
        made = PrivacyEngine().make_private(module=model, optimizer=optimizer, data_loader=loader,
                                            noise_multiplier=noise, max_grad_norm=CLIP, poisson_sampling=False,
                                            grad_sample_mode=mode, criterion=criterion,
                                            noise_generator=torch.Generator().manual_seed(5))
        if mode == "ghost":
            model, optimizer, criterion, loader = made
        else:
            model, optimizer, loader = made
        kit.attach(optimizer)
    for xb, yb, ids in loader:
        optimizer.zero_grad()
        criterion(model(xb, ids), yb).backward()
        optimizer.step()
    state = {k: v.detach().clone() for k, v in net.state_dict().items()}
    return state, (kit.scores() if with_canaries else None)


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_opacus_clips_and_normalises_the_canaries_and_leaves_real_gradients_alone(mode):
    plain, _ = _one_step(mode, with_canaries=False)
    state, theta = _one_step(mode, with_canaries=True, grad_norm=2.0 * CLIP)
    # a member's gradient -2C e_j is clipped to norm C, summed once and divided by the real ebs
    expected = np.zeros(M)
    expected[MEMBERS] = LR * 2.0 * CLIP * (CLIP / (2.0 * CLIP + 1e-6)) / N_REAL
    np.testing.assert_allclose(theta, expected, rtol=1e-6, atol=0)
    assert np.all(theta[np.setdiff1d(np.arange(M), MEMBERS)] == 0)
    for name in plain:    # the network's step equals the step without canaries
        torch.testing.assert_close(state[name], plain[name], rtol=0, atol=1e-6)
    # a canary below the clipping norm passes unclipped
    _, small = _one_step(mode, with_canaries=True, grad_norm=0.5 * CLIP)
    np.testing.assert_allclose(small[MEMBERS], LR * 0.5 * CLIP / N_REAL, rtol=1e-6)


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_opacus_noises_every_canary_coordinate(mode):
    count, sigma = 4000, 1.5
    _, theta = _one_step(mode, with_canaries=True, noise=sigma, members=np.arange(0, count, 2), count=count)
    out = theta[1::2]                                         # non-members: noise alone
    sd = LR * sigma * CLIP / N_REAL
    assert abs(out.mean()) < 4 * sd / np.sqrt(out.size)
    assert abs(out.std() / sd - 1) < 0.06                    # 2000 draws: sd of the ratio about 0.016
    shift = theta[0::2].mean() - out.mean()                  # members: + lr * C / ebs on average
    assert abs(shift / (LR * CLIP / N_REAL) - 1) < 0.25


def test_without_dp_real_rows_average_over_real_rows_and_canaries_over_the_expected_batch():
    x, y = _data()
    net = _net()
    opt = torch.optim.SGD(net.parameters(), lr=LR)
    nn.functional.cross_entropy(net(x), y).backward()
    opt.step()
    state, theta = _one_step("hooks", with_canaries=True, grad_norm=2.0, private=False)
    for name, value in net.state_dict().items():
        torch.testing.assert_close(state[name], value, rtol=0, atol=1e-6)
    expected = np.zeros(M)
    expected[MEMBERS] = LR * 2.0 / N_REAL
    np.testing.assert_allclose(theta, expected, rtol=1e-6)


def test_no_canaries_leave_the_model_and_data_as_they_were():
    kit = dpmem_canaries.Canaries(None, _params(True))
    net = _net()
    model = kit.model(net)
    assert [p for p in model.parameters()] == [p for p in net.parameters()]
    x, y = _data()
    data = kit.dataset(TensorDataset(x, y))
    assert len(data) == N_REAL and torch.all(data.tensors[2] == -1)
    torch.testing.assert_close(model(x, data.tensors[2]), net(x))
    assert kit.scores().shape == (0,)


# -- the trainer protocol ----------------------------------------------------------------------------

CANARY_RUN = ["dataset=synthetic", "n_train=60", "n_test=100", "n_subgroups=10", "dim=8", "models=20",
              "unit_size=4", "epochs=2", "batch_size=16", "epsilons=4", "lr=0.2", "gradient_canaries=40",
              "canary_norm=2", "threads=1"]


def test_the_opacus_canary_example_runs_end_to_end_and_check_audits_it(tmp_path, monkeypatch, capsys):
    import opacus_canary_trainer
    seen = []

    def recording_fit(**kw):
        seen.append(kw)
        return opacus_canary_trainer.fit(**kw)

    monkeypatch.setattr(opacus_canary_trainer, "recording_fit", recording_fit, raising=False)
    out = tmp_path / "run"
    assert cli.main(["run", "--out", str(out), "--quiet", *CANARY_RUN,
                     "trainer=opacus_canary_trainer:recording_fit"]) == 0
    store = RunStore.open(out)
    canary_masks = store.canary_masks()
    assert canary_masks.shape == (20, 40)
    for kw in seen:
        c = kw["canaries"]
        np.testing.assert_array_equal(c.ids, np.flatnonzero(canary_masks[kw["index"]]))
        assert c.count == 40
        assert c.grad_norm == pytest.approx(2.0 * (kw["params"].max_grad_norm or 1.0))
        assert len(kw["x_train"]) == 60          # real rows only: the canaries come as ids
    scores = store.variant_arrays("dp-eps4")["canary_score"]
    assert scores.shape == (20, 40) and scores.dtype == np.float32 and np.all(scores != 0)
    capsys.readouterr()
    assert cli.main(["check", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    audit = report["canary_audits"]["dp-eps4"]
    assert audit["epsilon_claimed"] == 4.0 and audit["eps_lb"] is not None and audit["consistent"]
    # the audit tests ebs_k * score: each model's 1/(expected batch size) divided out
    from dpmem.models.spec import expected_batch_sizes
    from dpmem.privacy.canary_audit import canary_audit
    plan = json.loads((out / "variants" / "dp-eps4" / "plan.json").read_text())
    ebs = np.asarray(expected_batch_sizes(store.masks(), plan["sample_rate"]), dtype=float)
    assert len(set(ebs)) > 1
    share = json.loads((out / "summary.json").read_text())["run"]["alpha_per_test"]
    direct = canary_audit(variant="dp-eps4", scores=scores * ebs[:, None], masks=canary_masks, epsilon=4.0,
                          delta=plan["delta"], alpha=share)
    assert audit["threshold"] == pytest.approx(direct.threshold) and audit["tpr_lo"] == pytest.approx(direct.tpr_lo)
    # the kit recorded SGD's settings and counted the steps: the parametric bound runs on the trainer too
    update = store.variant_arrays("dp-eps4")["canary_update"]
    assert update.shape == (20, 5)
    np.testing.assert_array_equal(update, np.tile([1, 0.2, 0.0, 0.0, plan["steps"]], (20, 1)))
    par = report["parametric_bounds"]["dp-eps4"]
    assert par["steps"] == plan["steps"] and "torch.optim.SGD(lr=0.2" in par["assumption"]
    assert par["consistent"] and par["eps_lb"] is not None and par["eps_lb"] < 4.0
    assert "parametric" in report["audit_family"]["dp-eps4"] and report["audit_tests"] == 5


def test_the_canary_example_without_canaries_is_the_readme_trainer(tmp_path):
    import my_trainer
    import opacus_canary_trainer
    rng = np.random.default_rng(0)
    x = rng.normal(size=(30, 4)).astype(np.float32)
    y = rng.integers(0, 3, 30)
    kw = dict(index=0, train_indices=np.arange(0, 30, 2), x_train=x, y_train=y, evals={"test": (x, y)}, seed=3,
              noise_seed=4, params=TrainerParams(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.5, steps=4,
                                                 expected_batch_size=7, lr=0.3, momentum=0.0, weight_decay=0.0))
    a, b = my_trainer.fit(**kw), opacus_canary_trainer.fit(**kw)
    assert set(b) == {"test_correct", "test_margin"}
    assert set(a) == set(b) | {"train_loss_sum", "train_draws", "train_grad_norm_sum", "train_clips"}
    # the README trainer's Opacus divides by int(15 * 1/len(loader)) = 7 as well: the same model
    np.testing.assert_allclose(a["test_margin"], b["test_margin"], atol=1e-5)


def _returning(canary_score):
    def fit(*, index, evals, canaries, **kw):
        good = {f"{s}_{k}": (np.ones(len(y), bool) if k == "correct" else np.zeros(len(y), np.float32))
                for s, (_, y) in evals.items() for k in ("correct", "margin")}
        score = canary_score(index, canaries)
        return good if score is None else {**good, "canary_score": score}
    return fit


@pytest.mark.parametrize("score, fragment", [
    (lambda i, c: None, "missing ['canary_score']"),
    (lambda i, c: np.zeros(c.count - 1, np.float32), "canary_score has shape (4,), expected (5,)"),
    (lambda i, c: np.zeros(c.count, np.int64), "canary_score has dtype int64"),
    (lambda i, c: np.full(c.count, np.nan if i == 4 else 0.0), "canary_score holds NaN or inf"),
])
def test_a_bad_canary_score_names_the_model(monkeypatch, score, fragment):
    from dpmem.models import user_engine as trainer_mod
    from dpmem.models.spec import TrainRequest, TrainSpec
    monkeypatch.setattr(trainer_mod, "load_callable", lambda path, field: _returning(score))
    spec = TrainSpec(arch="mlp", input_shape=(2,), n_classes=2, steps=1, sample_rate=0.5, lr=0.1, trainer="x.y:fit",
                     canaries=5)
    x = np.zeros((65, 2), np.float32)
    y = np.zeros(65, np.int64)
    req = TrainRequest(x_train=x, y_train=y, masks=np.ones((2, 65), bool), seed=0, noise_seed=1,
                       evals={"test": (x[:10], y[:10])}, stream_ids=np.array([4, 5]),
                       canary=np.concatenate([-np.ones(60, np.int64), np.arange(5)]))
    with pytest.raises(UsageError, match="model 4") as e:
        trainer_mod.train(spec, req)
    assert fragment in str(e.value)


def scoreless_from_fit(**kw):
    """The canary example, but models from DPMEM_TEST_SCORELESS_FROM on forget canary_score."""
    import os

    import opacus_canary_trainer
    out = opacus_canary_trainer.fit(**kw)
    if kw["index"] >= int(os.environ.get("DPMEM_TEST_SCORELESS_FROM", "1000000")):
        del out["canary_score"]
    return out


def test_a_trainer_without_canary_scores_stops_with_one_line_and_keeps_the_stored_units(tmp_path, capsys,
                                                                                         monkeypatch):
    out = tmp_path / "run"
    argv = ["run", "--out", str(out), "--quiet", *CANARY_RUN, "trainer=test_user_canaries:scoreless_from_fit"]
    monkeypatch.setenv("DPMEM_TEST_SCORELESS_FROM", "5")
    capsys.readouterr()
    assert cli.main(argv) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1 and "model 5" in errors[0] and "missing ['canary_score']" in errors[0], errors
    units = out / "variants" / "nonprivate" / "units"
    assert sorted(p.name for p in units.glob("*.json")) == ["000000-000004.json"]    # models 0-3 kept
    monkeypatch.delenv("DPMEM_TEST_SCORELESS_FROM")
    assert cli.main(argv) == 0                                                         # fixed: it resumes
    assert RunStore.open(out).variant_arrays("dp-eps4")["canary_score"].shape == (20, 40)


# -- planted bugs in the user's code (bench/tools/planted_trainer.py) ----------------------------------------

@pytest.mark.parametrize("bug, sigma, clip, loader", [
    ("honest", 1.5, 1.0, "DPDataLoader"), ("half_noise", 0.75, 1.0, "DPDataLoader"),
    ("no_clipping", 1.5e-12, 1e12, "DPDataLoader"), ("fixed_batches", 1.5, 1.0, "DataLoader"),
])
def test_each_planted_bug_is_what_it_says(monkeypatch, bug, sigma, clip, loader):
    from opacus import PrivacyEngine

    from dpmem.bench.tools import planted_trainer
    seen = {}
    real_make_private = PrivacyEngine.make_private

    def recording(self, **kw):
        seen.update(sigma=kw["noise_multiplier"], clip=kw["max_grad_norm"], loader=type(kw["data_loader"]).__name__,
                    batch=getattr(kw["data_loader"], "batch_size", None))
        return real_make_private(self, **kw)

    monkeypatch.setattr(PrivacyEngine, "make_private", recording)
    x, y = (t.numpy() for t in _data())
    params = TrainerParams(noise_multiplier=1.5, max_grad_norm=1.0, sample_rate=0.25, steps=2, expected_batch_size=5,
                           lr=0.1, momentum=0.0, weight_decay=0.0)
    out = getattr(planted_trainer, bug)(
        index=0, train_indices=np.arange(20), x_train=x, y_train=y, evals={"test": (x, y)}, seed=0, noise_seed=1,
        params=params, canaries=TrainerCanaries(ids=np.arange(0, 8, 2), count=8, grad_norm=2.0, seed=0))
    assert seen["sigma"] == pytest.approx(sigma) and seen["clip"] == pytest.approx(clip)
    assert seen["loader"] == loader
    if bug == "fixed_batches":
        assert seen["batch"] == 6                        # round(0.25 * (20 real + 4 canary rows)), every batch
    assert out["canary_score"].shape == (8,)


def test_the_docs_show_exactly_the_example_the_tests_run():
    fragment = (Path(__file__).parent.parent / "models" / "README.md").read_text()
    assert (EXAMPLES / "opacus_canary_trainer.py").read_text().rstrip() in fragment


def test_the_power_table_counts_seeds_not_rows():
    import pandas as pd

    from dpmem.bench.tools.trainer_audit_power import tables
    rows = []
    for seed in range(4):
        for bug, refuted in (("honest", False), ("half_noise", seed != 0)):
            for variant, eps in (("nonprivate", None), ("dp-eps1", 1.0), ("dp-eps4", 4.0)):
                rows.append({"bug": bug, "seed": seed, "variant": variant, "epsilon": eps,
                             "gate_failed": bug == "honest" and seed == 3, "canary_refuted": refuted and eps is not None,
                             "canary_eps_lb": 0.5, "blackbox_refuted": False, "n_in": 10, "n_out": 10, "models": 8,
                             "canaries": 5, "steps": 1, "run_wall_s": 1.0, "run_cpu_s": 0.5})
    t = tables(pd.DataFrame(rows))
    half = t["refuted"][t["refuted"].bug.str.startswith("half")]
    assert list(half.refuted) == [3, 3] and list(half.seeds) == [4, 4]
    assert half.rate_lo.iloc[0] == pytest.approx(0.194, abs=1e-3)          # exact interval of 3 of 4
    validity = t["validity"].iloc[0]
    assert validity.seeds == 4 and validity.refuted == 1                    # one honest seed failed the gate
    assert t["cost"].set_index("bug").loc["honest", "total_cpu_s"] == pytest.approx(2.0)


def test_every_planted_bug_of_the_power_table_has_a_valid_config():
    """The campaign's overrides load for every bug (a bug's own epochs replaces the common one)."""
    from dpmem.bench.tools.trainer_audit_power import BUG_RUNS, bug_config, common_overrides
    common = common_overrides(300, 1000, 2)
    for bug in BUG_RUNS:
        cfg = bug_config(bug, 3, common)
        assert cfg.seed == 3 and cfg.models == 300 and cfg.trainer.endswith(f":{bug}")
    assert bug_config("fixed_batches", 0, common).epochs == 1 and bug_config("honest", 0, common).epochs == 2


# -- the update form, for the parametric bound -------------------------------------------------------

def _private_loop(make_optimizer, *, steps=3, schedule=False):
    """A plain Opacus loop over the kit; returns kit.update()."""
    x, y = _data()
    params = TrainerParams(noise_multiplier=1.0, max_grad_norm=CLIP, sample_rate=1.0, steps=steps,
                           expected_batch_size=N_REAL, lr=LR, momentum=0.5, weight_decay=0.01)
    kit = dpmem_canaries.Canaries(TrainerCanaries(ids=MEMBERS, count=M, grad_norm=2.0, seed=0), params)
    model = kit.model(_net())
    optimizer = make_optimizer(model.parameters())
    data = kit.dataset(TensorDataset(x, y))
    model, optimizer, loader = PrivacyEngine().make_private(
        module=model, optimizer=optimizer, data_loader=DataLoader(data, batch_size=len(data)), noise_multiplier=1.0,
        max_grad_norm=CLIP, poisson_sampling=False)
    kit.attach(optimizer)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer.original_optimizer, step_size=1, gamma=0.5) if schedule else None
    criterion = kit.loss(nn.CrossEntropyLoss())
    assert kit.update()[4] == 0
    for _ in range(steps):
        for xb, yb, ids in loader:
            optimizer.zero_grad()
            criterion(model(xb, ids), yb).backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
    return kit.update()


def test_attach_records_sgds_settings_and_counts_the_steps_taken():
    update = _private_loop(lambda p: torch.optim.SGD(p, lr=0.3, momentum=0.5, weight_decay=0.01), steps=3)
    np.testing.assert_allclose(update, [1, 0.3, 0.5, 0.01, 3])
    # the settings of the optimizer, not of params: a loop that uses other values is described as it ran
    update = _private_loop(lambda p: torch.optim.SGD(p, lr=0.1), steps=2)
    np.testing.assert_allclose(update, [1, 0.1, 0.0, 0.0, 2])


@pytest.mark.parametrize("make,schedule", [
    (lambda p: torch.optim.Adam(p, lr=0.01), False),                       # no linear response
    (lambda p: torch.optim.SGD(p, lr=0.3, momentum=0.5, nesterov=True), False),
    (lambda p: torch.optim.SGD(p, lr=0.3), True),                          # lr changes under a scheduler
])
def test_any_other_update_is_recorded_as_other(make, schedule):
    assert _private_loop(make, steps=2, schedule=schedule)[0] == 2


def test_check_names_why_a_trainer_has_no_parametric_bound(tmp_path, monkeypatch, capsys):
    """A trainer that trains with Adam keeps the rigorous audits; check says in one line why the
    parametric bound is missing, and leaves it out of the alpha split."""
    import opacus_canary_trainer

    def adam_like(**kw):
        out = opacus_canary_trainer.fit(**kw)
        if "canary_update" in out:
            out["canary_update"] = np.array([2.0, 0, 0, 0, 0])
        return out

    monkeypatch.setattr(opacus_canary_trainer, "adam_like", adam_like, raising=False)
    for name, why in (("adam_like", "optimizer other than"),):
        out = tmp_path / name
        small = [a for a in CANARY_RUN if not a.startswith("unit_size=")] + ["unit_size=20"]
        assert cli.main(["run", "--out", str(out), "--quiet", *small, f"trainer=opacus_canary_trainer:{name}"]) == 0
        capsys.readouterr()
        assert cli.main(["check", str(out)]) == 0
        text = capsys.readouterr().out
        lines = [line for line in text.splitlines() if line.startswith("note: dp-eps4 has no parametric bound")]
        assert len(lines) == 1 and why in lines[0]
        assert "parametric*" not in text


def test_the_update_forms_that_give_no_parametric_bound_each_name_their_reason():
    from dpmem.privacy.parametric import trainer_update
    sgd = np.tile([1, 0.2, 0.9, 0.0, 10], (3, 1))
    form, why = trainer_update(sgd)
    assert why is None and form["lr"] == 0.2 and form["momentum"] == 0.9 and form["steps"] == 10
    assert "momentum=0.9" in form["assumption"]
    assert trainer_update(None) == (None, trainer_update(None)[1]) and "kit.update()" in trainer_update(None)[1]
    unreported = sgd.copy()
    unreported[1] = 0
    assert trainer_update(unreported)[1] == "model 1 returned no update form"
    other = sgd.copy()
    other[2, 0] = 2
    assert trainer_update(other)[1].startswith("model 2 trained with an optimizer other than")
    differ = sgd.copy()
    differ[2, 4] = 11
    assert trainer_update(differ)[1].startswith("models 0 and 2 report different update forms")

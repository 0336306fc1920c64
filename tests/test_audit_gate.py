"""`dpmem run` with gradient canaries and the `dpmem check` gate: stored arrays, one alpha per verdict."""
import json

import numpy as np
import pytest

from dpmem.bench import cli
from dpmem.bench.store.run_store import RunStore
from dpmem.bench.tools.audit_power import AUDIT_CONFIG

SMALL = ["dataset=synthetic", "n_train=120", "n_test=300", "n_subgroups=30", "dim=16", "models=24",
         "unit_size=8", "epochs=4", "epsilons=2,8", "hidden=16"]


@pytest.fixture(scope="module")
def paired_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("gate")
    assert cli.main(["run", "--out", str(root / "plain"), "--quiet", *SMALL]) == 0
    assert cli.main(["run", "--out", str(root / "canaries"), "--quiet", *SMALL, "gradient_canaries=50"]) == 0
    return RunStore.open(root / "plain"), RunStore.open(root / "canaries")


def test_canaries_are_stored_and_leave_the_real_arrays_unchanged(paired_runs):
    plain, canaries = paired_runs
    cm = np.load(canaries.root / "canary_masks.npy", allow_pickle=False)
    assert cm.shape == (24, 50) and cm.dtype == np.bool_ and 0.5 < cm.mean() < 0.9
    assert not (plain.root / "canary_masks.npy").exists()
    np.testing.assert_array_equal(plain.masks(), canaries.masks())
    for name in ("nonprivate", "dp-eps2", "dp-eps8"):
        a, b = plain.variant_arrays(name), canaries.variant_arrays(name)
        assert set(b) == set(a) | {"canary_score"}
        assert b["canary_score"].shape == (24, 50) and b["canary_score"].dtype == np.float32
        for key in a:   # stored across three units of 8 models each
            np.testing.assert_array_equal(a[key], b[key])
    scores = canaries.variant_arrays("nonprivate")["canary_score"]
    assert np.all(scores[~cm] == 0) and np.all(scores[cm] >= 0) and scores[cm].mean() > 0


def test_check_splits_one_alpha_over_every_variant_and_audit(paired_runs, capsys):
    plain, canaries = paired_runs
    assert cli.main(["check", str(canaries.root), "--json", "--alpha", "0.06"]) == 0
    verdict = json.loads(capsys.readouterr().out)
    # 3 variants x (black-box + canary) + the parametric bound of the 2 DP variants
    assert verdict["alpha"] == 0.06 and verdict["audit_tests"] == 8
    assert verdict["alpha_per_test"] == pytest.approx(0.0075)
    assert set(verdict["parametric_bounds"]) == {"dp-eps2", "dp-eps8"}
    for p in verdict["parametric_bounds"].values():
        assert p["level"] == pytest.approx(0.0075) and p["kind"].startswith("parametric")
        assert p["eps_lb"] is None or p["eps_lb"] <= p["epsilon_claimed"]
    assert set(verdict["canary_audits"]) == {"nonprivate", "dp-eps2", "dp-eps8"}
    for name, c in verdict["canary_audits"].items():
        assert c["alpha"] == pytest.approx(0.0075) and c["models"] == 24 and c["canaries"] == 50
        assert verdict["variants"][name]["alpha"] == pytest.approx(0.0075)
    # without the parametric bound the family is 3 variants x 2 audits
    assert cli.main(["check", str(canaries.root), "--json", "--alpha", "0.06", "--no-parametric"]) == 0
    verdict = json.loads(capsys.readouterr().out)
    assert verdict["audit_tests"] == 6 and verdict["parametric_bounds"] == {}
    assert verdict["margin_audits"] == {}
    # --margin-audit adds the margin audit of every variant to the family, at the same share
    assert cli.main(["check", str(canaries.root), "--json", "--alpha", "0.06", "--margin-audit"]) == 0
    verdict = json.loads(capsys.readouterr().out)
    assert verdict["audit_tests"] == 11 and set(verdict["margin_audits"]) == {"nonprivate", "dp-eps2", "dp-eps8"}
    assert all(m["alpha"] == pytest.approx(0.06 / 11) and m["kind"] == "rigorous"
               for m in verdict["margin_audits"].values())
    # the non-private variant's canaries separate perfectly: refuted once it claims a budget
    assert cli.main(["check", str(canaries.root), "--claim", "nonprivate=1"]) == 1
    assert "gradient canaries refute" in capsys.readouterr().out
    # without canaries the family is the three black-box audits
    assert cli.main(["check", str(plain.root), "--json"]) == 0
    verdict = json.loads(capsys.readouterr().out)
    assert verdict["audit_tests"] == 3 and verdict["canary_audits"] == {}


def test_damaged_canary_masks_are_refused_then_repaired(paired_runs, tmp_path, capsys):
    """canary_masks.npy has its checksum in arrays.json: `check` refuses a damaged copy in one
    line (exit 2), `dpmem run` on the directory makes it again, identical."""
    import shutil
    _, canaries = paired_runs
    root = tmp_path / "copy"
    shutil.copytree(canaries.root, root)
    path = root / "canary_masks.npy"
    original = path.read_bytes()
    assert "canary_masks.npy" in json.loads((root / "arrays.json").read_text())["sha256"]
    damaged = bytearray(original)
    damaged[-1] ^= 1                       # one membership flipped: still a valid .npy
    path.write_bytes(bytes(damaged))
    capsys.readouterr()
    assert cli.main(["check", str(root)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "canary_masks.npy" in err[0] and "damaged" in err[0]
    assert cli.main(["run", "--out", str(root), "--quiet", *SMALL, "gradient_canaries=50"]) == 0
    assert path.read_bytes() == original
    assert cli.main(["check", str(root)]) == 0


@pytest.mark.slow
def test_half_noise_is_refuted_by_the_audit_config(tmp_path):
    # the documented audit: one run of bench/configs/audit.toml, then check (claimed eps 4 only, to be quick)
    out = tmp_path / "half"
    assert cli.main(["run", "--out", str(out), "--quiet", str(AUDIT_CONFIG), "epsilons=4", "fault=half_noise"]) == 0
    assert cli.main(["check", str(out)]) == 1
    summary = json.loads((out / "summary.json").read_text())
    c = summary["variants"]["dp-eps4"]["canary_audit"]
    assert c["eps_lb"] > 4.0 and c["models"] == 1000 and c["canaries"] == 1000
    assert summary["variants"]["dp-eps4"]["noise_multiplier"] == pytest.approx(3.4277, abs=1e-3)  # as calibrated


def test_canaries_are_sized_by_the_claimed_clipping_bound():
    # under the no_clipping fault the engine clips at 1e12; the canary keeps the claimed norm 2 C
    from dpmem.bench import config
    from dpmem.bench.data import load_dataset
    from dpmem.bench.run import plan
    for fault in ("none", "no_clipping", "half_noise"):
        cfg = config.load(None, SMALL + ["gradient_canaries=5", "canary_norm=2", "max_grad_norm=0.5",
                                         f"fault={fault}"])
        ds = load_dataset(cfg)
        sched = plan.schedule(cfg, ds.n_train)
        variant_plan = plan.plan_variant(cfg, 2.0, sched)
        spec = plan.train_spec(cfg, ds, variant_plan)
        assert spec.canaries == 5
        assert spec.canary_norm * spec.dp.max_grad_norm == pytest.approx(2 * 0.5)
        sigma = spec.dp.noise_multiplier * spec.dp.max_grad_norm
        assert sigma == pytest.approx(variant_plan["noise_multiplier"] * 0.5 / (2 if fault == "half_noise" else 1))
    nonprivate = plan.train_spec(cfg, ds, plan.plan_variant(cfg, None, sched))
    assert nonprivate.dp is None and nonprivate.canary_norm == 2.0


def test_canary_config_errors_name_their_field():
    from dpmem.bench import config
    from dpmem.privacy.errors import ConfigError
    for overrides, field in ((["gradient_canaries=-1"], "gradient_canaries"), (["canary_norm=0"], "canary_norm"),
                             (["gradient_canaries=10", "models=3"], "gradient_canaries"),   # one-run needs q = 0.5
                             (["fault=quarter_noise"], "fault")):
        with pytest.raises(ConfigError) as info:
            config.load(None, overrides)
        assert field in str(info.value)
    assert config.load(None, ["fault=half_noise", "gradient_canaries=10"]).gradient_canaries == 10


@pytest.mark.slow
def test_noise_x075_is_refuted_by_the_parametric_bound_on_the_audit_config(tmp_path, capsys):
    # the subtler planted bug: 0.75 of the calibrated noise multiplier (true eps 5.58 at claim 4);
    # no single-threshold test can refute it at these counts, the parametric bound does
    out = tmp_path / "x075"
    assert cli.main(["run", "--out", str(out), "--quiet", str(AUDIT_CONFIG), "epsilons=4", "fault=noise_x0.75"]) == 0
    capsys.readouterr()
    assert cli.main(["check", str(out), "--json"]) == 1
    verdict = json.loads(capsys.readouterr().out)
    p = verdict["parametric_bounds"]["dp-eps4"]
    assert p["eps_lb"] > 4.0 and p["noise_multiplier"] == pytest.approx(0.75 * 3.4277, rel=0.01)
    assert verdict["oracle_eps_lb"]["dp-eps4"] < 4.0
    assert any("parametric bound refutes" in f for f in verdict["failures"])
    # without the parametric bound the verdict rests on the rigorous audits alone
    assert cli.main(["check", str(out), "--json", "--no-parametric"]) in (0, 1)
    assert json.loads(capsys.readouterr().out)["parametric_bounds"] == {}

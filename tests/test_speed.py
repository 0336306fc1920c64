"""The speed benchmark's aggregation of repeated measurements (the timings themselves are not tested)."""
import pandas as pd
import pytest

from dpmem.bench.tools.speed import ARCHS, interleaved_median_seconds, median_of_runs, training_flops, with_peak


def _run(ms: float, ratio: float, gflops: float):
    times = pd.DataFrame([dict(arch="cnn", method="engine DP (K=16)", models_per_step=16, batch=64, threads=1,
                               step_ms=ms * 16, per_model_step_ms=ms, reps=5, model_step_gflop=0.4)])
    ratios = pd.DataFrame([dict(arch="cnn", ratio="engine DP time / engine non-private time", value=ratio,
                                target="<= 1.3")])
    return times, ratios, {"matmul 2048x2048": gflops}


def test_repeated_runs_give_medians_and_each_ratios_range():
    times, ratios, flops = median_of_runs([_run(10.0, 1.2, 90.0), _run(30.0, 1.5, 80.0), _run(12.0, 1.1, 100.0)])
    assert times["per_model_step_ms"].item() == 12.0 and times["step_ms"].item() == 192.0
    row = ratios.iloc[0]
    assert (row["value"], row["min"], row["max"], row["target"]) == (1.2, 1.1, 1.5, "<= 1.3")
    assert flops["matmul 2048x2048"] == 90.0


def test_one_run_is_returned_as_is():
    run = _run(10.0, 1.2, 90.0)
    assert median_of_runs([run]) is run


def test_interleaved_timing_takes_one_step_of_each_method_per_round():
    calls = []
    seconds = interleaved_median_seconds({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                                         warmup=1, reps=3)
    assert calls == ["a", "b"] + ["a", "b"] * 3      # warm-up of each, then rounds of one step each
    assert set(seconds) == {"a", "b"} and all(v >= 0 for v in seconds.values())


def test_training_flops_count_six_multiply_adds_per_example_from_the_layer_shapes():
    name, shape, hidden, classes, _ = ARCHS["784-256-10"]
    assert training_flops((name, shape, hidden, classes), 64) == 6 * 64 * (784 * 256 + 256 * 10)
    # the built-in CNN: 3x3 same-padded convolutions 1->16 on 28x28 and 16->32 on 14x14, then a Linear head
    name, shape, hidden, classes, _ = ARCHS["cnn 1x28x28 16-32"]
    per_example = training_flops((name, shape, hidden, classes), 1)
    assert per_example >= 6 * (28 * 28 * 16 * 9 + 14 * 14 * 32 * 16 * 9)
    assert per_example == pytest.approx(6.1e6, rel=0.05)


def test_each_row_gets_its_rate_and_its_share_of_the_matmul_peak():
    times, _, _ = _run(10.0, 1.2, 90.0)
    row = with_peak(times, 80.0).iloc[0]
    assert row["gflops"] == pytest.approx(0.4 / 0.010) and row["pct_of_peak"] == pytest.approx(100 * 40 / 80)


def test_stats_cost_times_each_engine_step_with_and_without_the_statistics(monkeypatch):
    from dpmem.bench.tools import speed
    made = []
    real = speed.engine_trainer

    def spy(arch, K, batch, private, record=True):
        trainer, step = real(arch, K, batch, private, record)
        made.append((arch[0], private, record, trainer.stats is not None))
        return trainer, step
    monkeypatch.setattr(speed, "engine_trainer", spy)
    table = speed.stats_cost(1, {"mlp": (2, 8)}, reps=2, only=("mlp",), repeat=2)
    assert list(table["variant"]) == ["non-private", "DP"] * 2 and (table["repeats"] == 2).all()
    assert (table[["ms_recording", "ms_not_recording"]] > 0).all().all()
    assert table["overhead_min"].le(table["overhead_pct"]).all() and table["overhead_pct"].le(table["overhead_max"]).all()
    # each pair: one stack recording, one not, and only the recording one holds the statistics
    assert all(record == has_stats for _, _, record, has_stats in made) and len(made) == 8


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_the_profile_divides_each_step_into_the_engines_phases(kind):
    """The phase table comes from the engine's own spans: a DP step has norms, clipped sums and noise, a
    non-private step none of them, and the phases with "other" add up to the step's wall time."""
    from dpmem.bench.tools import speed
    phases, ops = speed.profile_steps(1, {"mlp": (2, 8), "cnn": (2, 8)}, reps=2, only=(kind,))
    for (_arch, variant), rows in phases.groupby(["arch", "variant"]):
        found = set(rows["phase"])
        assert {"forward", "backward", "update", "example_stats", "other"} <= found
        assert found <= set(speed.PHASES) | {"other"}
        dp_only = {"norms", "clipped_sums", "noise"}
        assert dp_only <= found if variant == "DP" else not dp_only & found
        assert rows["share_pct"].sum() == pytest.approx(100.0)
        assert (rows.loc[rows["phase"] != "other", "ms_per_step"] > 0).all()
    assert not ops["op"].str.startswith("step.").any() and (ops["share_pct"] > 0).all()

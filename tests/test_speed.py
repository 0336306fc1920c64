"""The speed benchmark's aggregation of repeated measurements (the timings themselves are not tested)."""
import pandas as pd

from dpmem.bench.tools.speed import interleaved_median_seconds, median_of_runs


def _run(ms: float, ratio: float, gflops: float):
    times = pd.DataFrame([dict(arch="cnn", method="engine DP (K=16)", models_per_step=16, batch=64, threads=1,
                               step_ms=ms * 16, per_model_step_ms=ms, reps=5)])
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

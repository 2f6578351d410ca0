"""The benchmark scripts run end to end (tiny sizes, one repeat) and print their ratio and verdict lines.

They are what the measured targets are reported from; this only keeps them working. Their figures are
never asserted here (the machines are shared and noisy): run the scripts themselves for those.
"""

import os
import subprocess
import sys

import pytest

from tester import ROOT, SCRIPT_ENV, run_script

RUNS = {
    "bench_train_step.py": (
        ["--quick", "--lengths", "32", "--tokens", "64", "--repeats", "1"],
        ["attention: worst ratio", "lstm: worst ratio"],
    ),
    "bench_chunked_scan.py": (
        ["--ref-length", "64", "--ref-runs", "1", "--lengths", "64", "128", "--runs", "1", "--batch", "1", "--heads", "2",
         "--dim", "8", "--state", "8", "--chunk", "16", "--rounds", "2"],
        ["linear attention", "mamba2 (SSD)", "worst time growth", ">= 20x", " strong      exact"],
    ),
    "bench_linear_time.py": (
        ["--throughput-lengths", "64", "--tokens", "64", "--repeats", "1", "--warmup", "1", "--scaling-lengths", "64",
         "128", "--scaling-repeats", "1", "--scaling-rounds", "2", "--mixers", "mamba2"],
        ["worst speed-up", "mamba2: worst time growth", "the anchor's: PyTorch path"],
    ),
    "bench_decode.py": (
        ["--contexts", "16", "32", "--new-tokens", "4", "--repeats", "1", "--skip-streaming", "--mixers", "lstm",
         "attention", "mamba2"],
        ["attention / Llama:", "attention / Llama static:", "mamba2 / HF Mamba2:", "lstm: ms/token"],
    ),
}


@pytest.mark.parametrize("script", sorted(RUNS))
def test_benchmark_runs_and_reports(script):
    arguments, expected_lines = RUNS[script]
    stdout = run_script([sys.executable, os.path.join(ROOT, "benchmarks", script), *arguments])
    for line in expected_lines:
        assert line in stdout, f"{script} did not print {line!r}:\n{stdout[-3000:]}"


@pytest.mark.parametrize("script", sorted(RUNS))
def test_cpu_clock_refused_with_several_threads(script):
    """--clock cpu sums every thread's CPU time, idle spinning included: only a single-threaded run is measured so."""
    arguments = [*RUNS[script][0], "--clock", "cpu", "--threads", "2"]  # (tiny sizes: a regression fails quickly)
    result = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", script), *arguments],
                            capture_output=True, text=True, env=SCRIPT_ENV, cwd=ROOT, timeout=240)
    assert result.returncode == 2 and "use it with --threads 1" in result.stderr, result.stderr[-2000:]


def test_the_decode_benchmarks_static_anchor_gets_a_cache_sized_to_each_call():
    """generate(cache_implementation="static") sizes its cache to the longest of the model's earlier calls: from the
    second repeat on, every context of the "Llama static" anchor attended over the longest context's slots (its
    times overstated ~1.5x at 128, in our favour). Each call now gets a StaticCache of its own length."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import bench_decode
    finally:
        sys.path.remove(os.path.join(ROOT, "benchmarks"))
    model = bench_decode.anchor("attention")
    _, long_footprint = bench_decode.generate_cost(model, 28, 4, static_cache=True)
    _, short_footprint = bench_decode.generate_cost(model, 8, 4, static_cache=True)  # after the longer call
    config = model.config  # keys and values of every layer, float32, per slot
    slot_bytes = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * 4
    assert long_footprint - short_footprint == (32 - 12) * slot_bytes  # slots: 28 + 4 against 8 + 4

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

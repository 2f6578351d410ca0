"""The benchmark scripts run end to end (tiny sizes, one repeat) and print their ratio and verdict lines.

They are what the measured targets are reported from; this only keeps them working. Their figures are
never asserted here (the machines are shared and noisy): run the scripts themselves for those.
"""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")

RUNS = {
    "bench_train_step.py": (
        ["--quick", "--lengths", "32", "--tokens", "64", "--repeats", "1"],
        ["attention: worst ratio", "lstm: worst ratio"],
    ),
    "bench_chunked_scan.py": (
        ["--ref-length", "64", "--ref-runs", "1", "--lengths", "64", "128", "--runs", "1", "--batch", "1", "--heads", "2",
         "--dim", "8", "--state", "8", "--chunk", "16"],
        ["linear attention", "mamba2 (SSD)", "target: time x prev"],
    ),
    "bench_linear_time.py": (
        ["--throughput-lengths", "64", "--tokens", "64", "--repeats", "1", "--warmup", "1", "--scaling-lengths", "64",
         "128", "--scaling-repeats", "1", "--mixers", "mamba2"],
        ["worst speed-up", "mamba2: worst time growth"],
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
    command = [sys.executable, os.path.join(ROOT, "benchmarks", script), *arguments]
    result = subprocess.run(command, capture_output=True, text=True, timeout=240, env=ENV, cwd=ROOT)
    assert result.returncode == 0, f"{' '.join(command)}\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    for line in expected_lines:
        assert line in result.stdout, f"{script} did not print {line!r}:\n{result.stdout[-3000:]}"

#!/usr/bin/env bash
# GPU checks: every `cuda`-marked test, then the benchmarks that take --device cuda. Installs nothing
# (mamba_ssm / causal_conv1d are used if already installed, and the output says whether they were).
# Sized to finish in under 8 minutes on one H100 (2026-11-27: 160 s on an H100 with --quick training steps, 173 s
# on an H200 with tests/test_cuda.py and full ones; steps 35 / 53 / 28 / 36 s): each step has a time limit, together
# 7.3 minutes, so a hang fails loudly instead of eating the GPU's time. The growth per doubling is measured in one
# round (--scaling-rounds / --rounds 1), as in those runs: three, the CPU default, would not fit.
# With mamba_ssm installed the tests take longer: its Triton kernels compile and autotune on first use, for each
# (chunk, head dim, state size) and dtype. 2026-11-28, H200, mamba_ssm 2.3.2's Triton scan without causal_conv1d:
# 59 s with Triton's cache warm, over 215 s cold (stopped there, 30 tests of 38 done). Their limit is 420 s then,
# and on a fresh machine the whole check may take more than 8 minutes.
#
#     bash benchmarks/gpu_check.sh            # from the repository root, in the environment to check
#     PYTHON=/path/to/python bash benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$(command -v python || command -v python3)}
export HF_HUB_OFFLINE=1  # nothing from the network: no Hub kernels, no downloads
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's hf_seqarch, installed or not

if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check.sh: FAILED before starting: no CUDA GPU visible to torch (torch.cuda.is_available() is False)." >&2
    echo "  torch: $("$PYTHON" -c 'import torch; print(torch.__version__, "CUDA build:", torch.version.cuda)' 2>&1)" >&2
    exit 2
fi

"$PYTHON" - <<'EOF'
import importlib.util, torch
from hf_seqarch.kernels_mamba2 import conv1d_backend, mamba2_backend
print(f"GPU: {torch.cuda.get_device_name()}  torch {torch.__version__} (CUDA {torch.version.cuda})")
for package in ("mamba_ssm", "causal_conv1d", "flash_attn"):
    print(f"  {package:<14} {'installed' if importlib.util.find_spec(package) else 'not installed'}")
print(f"  mamba2 scan backend on cuda: {mamba2_backend('cuda')}, conv backend: {conv1d_backend('cuda')}")
EOF

step() {  # step <seconds> <title> <command...>
    local limit=$1 title=$2
    shift 2
    echo
    echo "=== $title (limit ${limit}s)"
    local start=$SECONDS status=0
    timeout -k 10 "$limit" "$@" || status=$?
    if [ "$status" -ne 0 ]; then
        [ "$status" -eq 124 ] && echo "gpu_check.sh: '$title' ran past ${limit}s" >&2
        echo "gpu_check.sh: FAILED at '$title' (exit $status)" >&2
        exit "$status"
    fi
    echo "--- $title: $((SECONDS - start))s"
}

# -rs lists the skipped tests with their reasons (e.g. a kernel package that is not installed).
tests_limit=120
if "$PYTHON" -c "import importlib.util, sys; sys.exit(0 if importlib.util.find_spec('mamba_ssm') else 1)"; then
    tests_limit=420  # Triton's compiling and autotuning of mamba_ssm's kernels (above)
fi
step "$tests_limit" "cuda-marked tests" "$PYTHON" -m pytest -q -rs -m cuda tests/
step 120 "bench_linear_time: mamba2 vs transformers Mamba2, growth per doubling" \
    "$PYTHON" benchmarks/bench_linear_time.py --device cuda --max-eager-gb 16 --scaling-rounds 1
step 80 "bench_chunked_scan: chunked vs sequential reference, growth per doubling" \
    "$PYTHON" benchmarks/bench_chunked_scan.py --device cuda --rounds 1
# The full 11 repeats (~50 s on an H100): --quick's 3 read 1.089 for an LSTM ratio that full runs put at 1.00-1.03.
step 120 "bench_train_step: attention and lstm vs their anchors" \
    "$PYTHON" benchmarks/bench_train_step.py --device cuda
echo
echo "gpu_check.sh: all GPU checks passed in ${SECONDS}s (cuda tests skipped for want of a kernel package are listed"
echo "  under 'short test summary info' above: those kernels were not checked)"

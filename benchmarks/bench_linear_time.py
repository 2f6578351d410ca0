"""Linear-time mixers: our mamba2 against transformers' Mamba2, and how each mixer scales with length.

1. Training-step throughput (forward + loss + backward, tokens/s) of SeqArchForCausalLM with 4 mamba2
   layers vs transformers' Mamba2ForCausalLM (the anchor, its pure-PyTorch path unless mamba_ssm is
   installed), same sizes: vocab 256, hidden 256, 4 layers, 8 heads x 64, expand 2, state 64, chunk 64,
   1 group, no MLP, untied head (the anchor's default). batch x length = 8192 tokens at T = 1024, 4096,
   8192. Both in this process, runs interleaved (AB BA ...: each first in turn) so both see the same machine
   load; the speed-up is the median of the back-to-back pairs' ratios.
   Target: ours >= 1.5x the anchor's throughput. Measured at initialisation: on CPU our scan takes its faster
   factorised path for heads with gentle decays (most of them at init, see ops_chunked_scan); heads whose decays
   grow strong in training take the exact path, slower by up to ~1.5x in the scan alone. The anchor's speed does
   not depend on the weights. Where mamba_ssm is installed, the anchor runs its fused kernels instead (which also
   need causal_conv1d): the line "the anchor's" below says which.
2. Time and peak memory of one training step at batch 1 for T = 1024 ... 16384, for mamba2,
   linear_attention, attention (sdpa and eager) and lstm stacks (4 layers, hidden 256, no MLP), and the
   growth per doubling of T. Target for the linear-time mixers: time x <= 2.2 per doubling. Each length is
   measured in 3 rounds (--scaling-rounds), the lengths in turn within each, and the medians are compared: on a
   shared machine one slow spell would otherwise show as a step in the growth.
   Peak memory: torch.cuda.max_memory_allocated on CUDA; on CPU (where torch keeps no count) the peak of the
   tensors' bytes held at once during the step (TensorMemoryTracker, as `hf-seqarch compare` counts them), each
   (mixer, T) in a fresh subprocess. Not the process's resident set: that adds one-time costs (libraries' pages,
   thread pools, the allocator's first arenas: 17-37 MiB) that do not grow with T and flatten the growth.

    python benchmarks/bench_linear_time.py                     # CPU, full sizes (tens of minutes on 2 cores)
    python benchmarks/bench_linear_time.py --quick             # short lengths, fewer repeats (~3 minutes)
    python benchmarks/bench_linear_time.py --device cuda
    python benchmarks/bench_linear_time.py --threads 1 --clock cpu   # on a CPU shared with other jobs
    python benchmarks/bench_linear_time.py --skip throughput --keep-freed-memory   # growth without page faults

On CPU, glibc returns every freed block over 32 MiB to the OS, so a step whose tensors cross that size
pays page faults on every step: kernel time that the cpu clock counts. mamba2 keeps its activations under
it by running long sequences in blocks of tokens (hf_seqarch/mixer_token_blocks.py); the other stacks' tensors
cross it at longer lengths or wider layers. --keep-freed-memory sets GLIBC_TUNABLES in the scaling children so
that malloc keeps such blocks.
"""

import argparse
import importlib
import json
import os
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from transformers import Mamba2Config, Mamba2ForCausalLM  # noqa: E402
from transformers.models.mamba2 import modeling_mamba2  # noqa: E402
from transformers.utils import logging  # noqa: E402

from hf_seqarch import SeqArchConfig, SeqArchForCausalLM  # noqa: E402
from hf_seqarch.kernels_mamba2 import conv1d_backend, mamba2_backend  # noqa: E402
from hf_seqarch.tools.compare.measure import TensorMemoryTracker  # noqa: E402
from malloc_settings import env_keeping_freed_memory  # noqa: E402
from step_timing import (  # noqa: E402
    count, lm_loss, medians_over_rounds, paired_step_times, per_doubling, refuse_cpu_clock_with_threads, step_seconds,
    sync,
)

VOCAB, HIDDEN, LAYERS = 256, 256, 4
MAMBA = dict(heads=8, head_dim=64, expand=2, state=64, chunk=64, groups=1)
THROUGHPUT_TARGET, GROWTH_TARGET = 1.5, 2.2
# name -> (mixer type, attention implementation)
SCALING_MIXERS = {
    "mamba2": ("mamba2", None),
    "linear_attention": ("linear_attention", None),
    "attention_sdpa": ("attention", "sdpa"),
    "attention_eager": ("attention", "eager"),
    "lstm": ("lstm", None),
}
LINEAR_TIME = ("mamba2", "linear_attention")


def ours_mamba2():
    return SeqArchForCausalLM(SeqArchConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, mixer_types=["mamba2"] * LAYERS, intermediate_size=0,
        mamba_head_dim=MAMBA["head_dim"], mamba_expand=MAMBA["expand"], mamba_state_size=MAMBA["state"],
        mamba_chunk_size=MAMBA["chunk"], mamba_n_groups=MAMBA["groups"], tie_word_embeddings=False,
    ))


def anchor_mamba2():
    return Mamba2ForCausalLM(Mamba2Config(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_heads=MAMBA["heads"],
        head_dim=MAMBA["head_dim"], expand=MAMBA["expand"], state_size=MAMBA["state"], chunk_size=MAMBA["chunk"],
        n_groups=MAMBA["groups"], tie_word_embeddings=False,
    ))


def scaling_model(name):
    """A 4-layer stack of one mixer, no MLP, so that the mixer is what scales."""
    mixer, implementation = SCALING_MIXERS[name]
    config = SeqArchConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, mixer_types=[mixer] * LAYERS, intermediate_size=0,
        num_attention_heads=4, max_position_embeddings=65536, mamba_head_dim=MAMBA["head_dim"],
        mamba_state_size=MAMBA["state"], mamba_chunk_size=MAMBA["chunk"], linear_attention_chunk_size=64,
    )
    if implementation is not None:
        return SeqArchForCausalLM._from_config(config, attn_implementation=implementation)
    return SeqArchForCausalLM(config)


def eager_attention_bytes(length):
    """Scores and probabilities of 4 heads x 4 layers, kept for the backward: what eager attention must hold."""
    return 2 * LAYERS * 4 * length * length * 4


def anchor_backend(device) -> str:
    """The path transformers' Mamba2 takes: mamba_ssm's CUDA kernels where they are importable (transformers 4.x also
    needs causal_conv1d: its is_fast_path_available) and the model is on CUDA, else its PyTorch path."""
    importable = getattr(modeling_mamba2, "is_fast_path_available", None)
    if importable is None:  # transformers 5: each function falls back to PyTorch on its own, mamba_ssm's if it imports
        try:
            importlib.import_module("mamba_ssm")
            importable = True
        except Exception:  # (not installed, or failing to import: transformers then falls back too)
            importable = False
    return "mamba_ssm kernels" if importable and device.type == "cuda" else "PyTorch path"


def train_step(model, ids, device, clock):
    return step_seconds(model, lm_loss, ids, device, clock)


# -- 1. throughput against transformers' Mamba2 -------------------------------------------------------
def throughput(args, device, clock):
    torch.manual_seed(0)
    ours, anchor = ours_mamba2().to(device).train(), anchor_mamba2().to(device).train()
    print(f"\n1. training-step throughput: ours mamba2 ({count(ours):,} parameters) vs transformers "
          f"Mamba2ForCausalLM ({count(anchor):,} parameters), {args.tokens} tokens per step")
    print(f"   our backends: scan {mamba2_backend(device)!r}, conv {conv1d_backend(device)!r}; the anchor's: "
          f"{anchor_backend(device)}")
    print(f"{'T':>6} {'B':>3} {'ours ms':>9} {'anchor ms':>10} {'ours tok/s':>11} {'anchor tok/s':>13} {'speed-up':>9}")
    speedups = {}
    for length in args.throughput_lengths:
        batch = max(1, args.tokens // length)
        ids = torch.randint(0, VOCAB, (batch, length), device=device)
        ours_s, anchor_s, ratio = paired_step_times(ours, anchor, lm_loss, ids, device, clock, args.warmup, args.repeats)
        speedups[length] = 1 / ratio  # anchor / ours
        print(f"{length:>6} {batch:>3} {ours_s * 1e3:>9.1f} {anchor_s * 1e3:>10.1f} {batch * length / ours_s:>11,.0f} "
              f"{batch * length / anchor_s:>13,.0f} {speedups[length]:>8.2f}x", flush=True)
    worst = min(speedups.values())
    verdict = "meets" if worst >= THROUGHPUT_TARGET else "MISSES"
    print(f"   worst speed-up {worst:.2f}x: {verdict} the target >= {THROUGHPUT_TARGET}x")
    return speedups


# -- 2. growth per doubling of length -------------------------------------------------------------------
def measure(args, name, length, device, clock):
    """(seconds, peak bytes) of a batch-1 training step of the `name` stack at `length`."""
    torch.manual_seed(0)
    model = scaling_model(name).to(device).train()
    ids = torch.randint(0, VOCAB, (1, length), device=device)
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        train_step(model, ids, device, clock)  # the warm-up step gives the peak
        peak = torch.cuda.max_memory_allocated(device) - base
    else:
        with TensorMemoryTracker() as tracker:
            train_step(model, ids, device, clock)  # the warm-up step gives the peak
        peak = tracker.peak
    for _ in range(args.warmup - 1):
        train_step(model, ids, device, clock)
    seconds = statistics.median(train_step(model, ids, device, clock) for _ in range(args.scaling_repeats))
    return seconds, peak


def measure_in_subprocess(args, name, length):
    """CPU: a fresh interpreter per (mixer, length), so that no length runs in memory an earlier one left (and with
    --keep-freed-memory, under that malloc setting)."""
    command = [sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--_child", name, str(length)]
    env = env_keeping_freed_memory() if args.keep_freed_memory else None
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"{name} at T={length} failed:\n{result.stderr[-2000:]}")
    return tuple(json.loads(result.stdout.strip().splitlines()[-1]))


def measure_in_rounds(args, name, device, clock):
    """{length: (seconds, peak bytes)} of the `name` stack, medians over --scaling-rounds rounds."""
    lengths = [length for length in args.scaling_lengths
               if name != "attention_eager" or eager_attention_bytes(length) <= args.max_eager_gb * 2**30]

    def measure_length(length):
        if device.type != "cuda":
            return measure_in_subprocess(args, name, length)
        figures = measure(args, name, length, device, clock)
        torch.cuda.empty_cache()
        return figures

    return medians_over_rounds(lengths, args.scaling_rounds, measure_length)


def scaling(args, device, clock):
    note = "cuda max_memory_allocated" if device.type == "cuda" else "tensor bytes, TensorMemoryTracker"
    if device.type == "cpu":
        note += ", malloc keeps freed memory" if args.keep_freed_memory else ", default malloc"
    print(f"\n2. one training step at batch 1 vs T (peak memory: {note}); 'x' = growth per doubling")
    print(f"{'mixer':>17} {'T':>6} {'time ms':>9} {'x':>6} {'peak MiB':>9} {'x':>6}")
    worst = {}
    for name in args.mixers:
        previous = None
        results = measure_in_rounds(args, name, device, clock)
        for length in args.scaling_lengths:
            if length not in results:
                print(f"{name:>17} {length:>6}   skipped: eager attention would hold "
                      f"{eager_attention_bytes(length) / 2**30:.0f} GiB of scores (--max-eager-gb {args.max_eager_gb})")
                previous = None
                continue
            seconds, peak = results[length]
            time_x = per_doubling(seconds, previous[0], length, previous[2]) if previous else None
            memory_x = per_doubling(peak, previous[1], length, previous[2]) if previous else None
            if time_x is not None:
                worst[name] = max(worst.get(name, 0.0), time_x)
            time_growth = f"{time_x:5.2f}x" if time_x is not None else ""
            memory_growth = f"{memory_x:5.2f}x" if memory_x is not None else ""
            print(f"{name:>17} {length:>6} {seconds * 1e3:>9.1f} {time_growth:>6} {peak / 2**20:>9.1f} {memory_growth:>6}",
                  flush=True)
            previous = (seconds, peak, length)
    for name in LINEAR_TIME:
        if name in worst:
            verdict = "meets" if worst[name] <= GROWTH_TARGET else "MISSES"
            print(f"   {name}: worst time growth {worst[name]:.2f}x per doubling: {verdict} the target <= {GROWTH_TARGET}x")
    return worst


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="throughput at T=1024 only, scaling from 256 to 2048, 1 warm-up, 3 (throughput) or 2 repeats")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--tokens", type=int, default=8192, help="batch x length per throughput step")
    parser.add_argument("--throughput-lengths", type=int, nargs="+", default=None)
    parser.add_argument("--scaling-lengths", type=int, nargs="+", default=None)
    parser.add_argument("--mixers", nargs="+", choices=SCALING_MIXERS, default=list(SCALING_MIXERS))
    parser.add_argument("--skip", choices=["throughput", "scaling"], default=None)
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None, help="throughput repeats (median)")
    parser.add_argument("--scaling-repeats", type=int, default=None, help="timed steps per measurement (median)")
    parser.add_argument("--scaling-rounds", type=int, default=None,
                        help="measurements of each length, taken in turn with the other lengths (median; default 3, "
                             "1 with --quick)")
    parser.add_argument("--max-eager-gb", type=float, default=6.0, help="skip eager attention above this much scores")
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="CPU scaling: run each child with GLIBC_TUNABLES set so that malloc keeps freed blocks "
                             "over 32 MiB instead of returning them to the OS (otherwise re-faulting them in at every "
                             "step adds kernel time that grows with T, for every mixer)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="cpu: this process's CPU time, steadier than wall time on a machine shared with other "
                             "jobs; only meaningful with --threads 1 (idle threads spin) and on CPU")
    parser.add_argument("--_child", nargs=2, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available (torch.cuda.is_available() is False)")
    if args.clock == "cpu" and device.type != "cpu":
        parser.error("--clock cpu measures CPU work; time a GPU with the wall clock")
    if args.threads:
        torch.set_num_threads(args.threads)
    refuse_cpu_clock_with_threads(parser, args.clock, torch.get_num_threads())
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    quick = args.quick
    args.throughput_lengths = args.throughput_lengths or ([1024] if quick else [1024, 4096, 8192])
    args.scaling_lengths = args.scaling_lengths or ([256, 512, 1024, 2048] if quick else [1024, 2048, 4096, 8192, 16384])
    args.warmup = args.warmup or (1 if quick else 2)
    args.repeats = args.repeats or (3 if quick else 5)
    args.scaling_repeats = args.scaling_repeats or (2 if quick else 5)
    args.scaling_rounds = args.scaling_rounds or (1 if quick else 3)
    if min(args.warmup, args.repeats, args.scaling_repeats, args.scaling_rounds) < 1:  # (0 reads as the default)
        parser.error("--warmup, --repeats, --scaling-repeats and --scaling-rounds must be >= 1")
    logging.set_verbosity_error()  # the anchor warns at every call that it runs without mamba_ssm

    if args._child is not None:  # one (mixer, length) in a fresh process: CPU peak memory
        name, length = args._child
        print(json.dumps(measure(args, name, int(length), device, clock)))
        return

    print(f"torch {torch.__version__}, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
          + f", threads {torch.get_num_threads()}, {args.clock} clock, {args.warmup} warm-up + median of repeats")
    if args.skip != "throughput":
        throughput(args, device, clock)
    if args.skip != "scaling":
        scaling(args, device, clock)


if __name__ == "__main__":
    main()

"""Benchmark the chunked scans against their sequential references.

    python benchmarks/bench_chunked_scan.py                  # CPU, default sizes (~1-3 minutes)
    python benchmarks/bench_chunked_scan.py --device cuda

1. forward+backward at T=2048 (B=2, H=8, P=N=64, chunk 64) of each mixer's core against its plain loop
   over time, runs alternating so that both see the same machine load: times and the median of the
   paired ratios (target: chunked >= 20x faster).
   - linear attention: ops_chunked_scan.chunked_scan vs scan_reference (q, k, v per head, gentle decays);
   - mamba2: ops_ssd.ssd_chunked vs ssd_reference with Mamba-2's inputs at initialisation (B and C shared
     by the 8 heads, each head's dt about a level log-uniform in [0.001, 0.1], A in [-16, -1]).
   The printed path says which heads take the factorised scan: with these gentle gates all of them. On CPU each
   core is measured again with strong gates (steps' log decays up to 8, resp. dt levels in [0.1, 1]), which at these
   sizes take the exact path, the only one on GPUs.
2. chunked_scan (the core both mixers run) forward+backward at T = 1024 ... 16384: time, peak memory,
   and the growth per doubling of T (target <= 2.2x, i.e. linear). Peak memory: torch.cuda.max_memory_allocated
   on CUDA; on CPU (where torch keeps no count) the peak of the tensors' bytes held at once during one
   forward+backward (TensorMemoryTracker, as `hf-seqarch compare` counts them), each length in a fresh subprocess.
   Not the process's resident set, which adds one-time costs (about 13 MiB here) that do not grow with T.

Times (2.) are the median of --runs runs after a warm-up, taken --rounds times (each length in turn) and the
median of those kept; the upstream gradients are random dense tensors
(as the layers above give; y.sum()'s stride-0 gradient is a special case for autograd's bmm). On a shared,
busy machine wall times of multi-threaded runs are meaningless (OpenMP threads wait on descheduled
peers); use `--threads 1 --clock cpu` (process CPU time of a single-threaded run) there.
On Linux/glibc, malloc hands large freed blocks back to the OS and page-faults them in again on the
next call, which can cost a third of the op's CPU time, and always does once the (B, T, H, 64) float32
tensors pass 32 MiB (T=8192 at the defaults: expect a step above 2x there). That is the allocator, not
the op: `--keep-freed-memory` re-runs the whole benchmark (reference included) with malloc keeping
freed memory (benchmarks/malloc_settings.py), as jemalloc or tcmalloc would.
"""

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from hf_seqarch.ops_chunked_scan import _factorised_path_heads, chunked_scan, scan_reference  # noqa: E402
from hf_seqarch.ops_ssd import ssd_chunked, ssd_reference  # noqa: E402
from hf_seqarch.tools.compare.measure import TensorMemoryTracker  # noqa: E402
from malloc_settings import keeps_freed_memory, restart_keeping_freed_memory  # noqa: E402
from step_timing import medians_over_rounds, per_doubling, refuse_cpu_clock_with_threads  # noqa: E402


def make_inputs(args, T, device, strong_gates=False):
    """Linear attention's inputs: decays e^-0.5 to 1 per step (gentle), or e^-8 to 1 (strong: the exact path)."""
    dtype = getattr(torch, args.dtype)
    g = torch.Generator().manual_seed(0)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype).requires_grad_()

    B, H, N, P = args.batch, args.heads, args.state, args.dim
    q, k, v = randn(B, T, H, N, scale=N**-0.5), randn(B, T, H, N, scale=N**-0.5), randn(B, T, H, P)
    log_decay = -torch.rand(B, T, H, generator=g) * (8.0 if strong_gates else 0.5)
    log_decay = log_decay.to(device=device, dtype=dtype).requires_grad_()
    dy, dstate = torch.randn(B, T, H, P, generator=g), torch.randn(B, H, P, N, generator=g)
    grads = (dy.to(device, dtype), dstate.to(device, dtype))  # random upstream gradients
    return (q, k, v, log_decay), grads


def make_mamba2_inputs(args, T, device, strong_gates=False):
    """Mamba-2's SSD inputs as its mixer makes them at initialisation (mixer_mamba2's init ranges), or (strong) with
    dt levels in [0.1, 1] instead of [0.001, 0.1], as trained heads can reach (steps' log decays up to 24: the exact
    path)."""
    dtype = getattr(torch, args.dtype)
    g = torch.Generator().manual_seed(0)
    B, H, N, P = args.batch, args.heads, args.state, args.dim

    def leaf(t):
        return t.to(device=device, dtype=dtype).requires_grad_()

    # dt = softplus(dt_raw + dt_bias): a per-head level set by dt_bias, varied per token by dt_raw
    low, high = (0.1, 1.0) if strong_gates else (1e-3, 0.1)
    dt_level = torch.exp(torch.empty(H).uniform_(math.log(low), math.log(high), generator=g))
    dt = dt_level * torch.empty(B, T, H).uniform_(0.5, 1.5, generator=g)
    A = -torch.empty(H).uniform_(1, 16, generator=g)
    x = torch.randn(B, T, H, P, generator=g)
    B_, C = (torch.randn(B, T, 1, N, generator=g) * N**-0.5 for _ in range(2))
    dy, dstate = torch.randn(B, T, H, P, generator=g), torch.randn(B, H, P, N, generator=g)
    return tuple(leaf(t) for t in (x, dt, A, B_, C)), (dy.to(device, dtype), dstate.to(device, dtype))


def fwd_bwd(fn, inputs, grads, **kw):
    for x in inputs:
        x.grad = None
    y, state = fn(*inputs, **kw)
    torch.autograd.backward((y, state), grads)


def seconds(fn, inputs, grads, args, **kw):
    """Seconds of one forward+backward."""
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    if args.device == "cuda":
        torch.cuda.synchronize()
    t0 = clock()
    fwd_bwd(fn, inputs, grads, **kw)
    if args.device == "cuda":
        torch.cuda.synchronize()
    return clock() - t0


def timeit(fn, inputs, grads, args, runs, **kw):
    """Median seconds of forward+backward over `runs` runs, after one warm-up."""
    fwd_bwd(fn, inputs, grads, **kw)
    return statistics.median(seconds(fn, inputs, grads, args, **kw) for _ in range(runs))


def paired_ratio(chunked_fn, reference_fn, inputs, grads, args):
    """reference / chunked: runs alternate (reference, chunked, chunked, reference, ...: each goes first in turn) so
    that both see the same machine load; the median of each pair's ratio, and the median times. Every run follows
    one warm-up of each."""
    chunked = dict(chunk_size=args.chunk)
    fwd_bwd(reference_fn, inputs, grads)
    fwd_bwd(chunked_fn, inputs, grads, **chunked)
    pairs = []
    for i in range(args.ref_runs):
        if i % 2 == 0:
            t_ref = seconds(reference_fn, inputs, grads, args)
            t_chunk = seconds(chunked_fn, inputs, grads, args, **chunked)
        else:
            t_chunk = seconds(chunked_fn, inputs, grads, args, **chunked)
            t_ref = seconds(reference_fn, inputs, grads, args)
        pairs.append((t_ref, t_chunk))
    ratio = statistics.median(ref / chunk for ref, chunk in pairs)
    return ratio, statistics.median(p[0] for p in pairs), statistics.median(p[1] for p in pairs)


def cpu_peak_memory(fn):
    """Peak bytes of the tensors fn() holds at once (TensorMemoryTracker, as `hf-seqarch compare` counts them): CPU
    torch keeps no count, and the process's resident set would add one-time costs (libraries' pages, thread pools)
    that do not grow with T."""
    with TensorMemoryTracker() as tracker:
        fn()
    return tracker.peak


def measure_length(args, T):
    """Peak memory (bytes) of one forward+backward, then the median time, of chunked_scan at length T."""
    inputs, grads = make_inputs(args, T, args.device)
    if args.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fwd_bwd(chunked_scan, inputs, grads, chunk_size=args.chunk)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = cpu_peak_memory(lambda: fwd_bwd(chunked_scan, inputs, grads, chunk_size=args.chunk))
    return peak, timeit(chunked_scan, inputs, grads, args, args.runs, chunk_size=args.chunk)


def measure_in_subprocess(T):
    """CPU: run measure_length in a fresh interpreter, so that no length runs in memory an earlier one left."""
    cmd = [sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--_child", str(T)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    peak, seconds = json.loads(out.strip().splitlines()[-1])
    return peak, seconds


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--dim", type=int, default=64, help="P, value size (Mamba-2 head dim)")
    p.add_argument("--state", type=int, default=64, help="N, key/query size (Mamba-2 state size)")
    p.add_argument("--chunk", type=int, default=64)
    p.add_argument("--runs", type=int, default=None,
                   help="timed runs per length (default: 5 on CPU; 25 on CUDA, where a run takes milliseconds and one "
                        "slow launch would move a median of 5)")
    p.add_argument("--rounds", type=int, default=3,
                   help="measurements of each length (2.), taken in turn with the other lengths; the median")
    p.add_argument("--ref-length", type=int, default=2048)
    p.add_argument("--ref-runs", type=int, default=7, help="runs of the reference (each paired with one chunked run)")
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's default)")
    p.add_argument("--clock", default="wall", choices=["wall", "cpu"], help="cpu: process CPU time (CPU only)")
    p.add_argument("--keep-freed-memory", action="store_true",
                   help="CPU: run with glibc malloc keeping freed memory (no page faults on reused blocks)")
    p.add_argument("--_child", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    args.runs = args.runs or (25 if args.device == "cuda" else 5)
    if args.runs < 1 or args.rounds < 1 or args.ref_runs < 1:
        p.error("--runs, --rounds and --ref-runs must be >= 1")
    if args.keep_freed_memory:
        restart_keeping_freed_memory()
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available")
    if args.device == "cuda" and args.clock == "cpu":
        p.error("--clock cpu is for --device cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    refuse_cpu_clock_with_threads(p, args.clock, torch.get_num_threads())

    if args._child is not None:  # one length, in a fresh process (CPU)
        print(json.dumps(measure_length(args, args._child)))
        return

    print(
        f"device={args.device} ({torch.get_num_threads()} threads, {args.clock} clock)  dtype={args.dtype}  "
        f"B={args.batch} H={args.heads} P={args.dim} N={args.state} chunk={args.chunk}  torch {torch.__version__}  "
        f"malloc: {'keeps freed memory' if keeps_freed_memory() else 'default'}"
    )

    # 1. chunked vs reference, each mixer's core
    T = args.ref_length
    print(f"\nforward+backward at T={T} ({args.ref_runs} runs of each, alternating; medians; target >= 20x; path: the"
          " chunked scan's per head, factorised where every chunk's log decays span <= 60 and every step's is <= 4"
          " in size, else exact):")
    print(f"  {'core':<17} {'gates':>6} {'path':>10} {'chunked ms':>10} {'reference ms':>13} {'ratio':>7}  verdict")
    cores = {  # name: chunked, reference, inputs, the log decays (B, T, H) of those inputs
        "linear attention": (chunked_scan, scan_reference, make_inputs, lambda inputs: inputs[3]),
        "mamba2 (SSD)": (ssd_chunked, ssd_reference, make_mamba2_inputs, lambda inputs: inputs[1] * inputs[2]),
    }
    # Strong gates take the exact path, the only one on GPUs: on CPU measured too, so that both paths show.
    gates = ("gentle", "strong") if args.device == "cpu" else ("gentle",)
    for name, (chunked_fn, reference_fn, make, log_decay_of) in cores.items():
        for gate in gates:
            inputs, grads = make(args, T, args.device, strong_gates=gate == "strong")
            log_decay = log_decay_of(inputs).detach().float()  # (B, T, H), padded as chunked_scan pads it:
            log_decay = torch.nn.functional.pad(log_decay, (0, 0, 0, -T % args.chunk))
            factorised = _factorised_path_heads(log_decay, args.chunk)
            factorised = 0 if factorised is None else int(factorised.sum())
            path = {0: "exact", args.heads: "factorised"}.get(factorised, f"{factorised}/{args.heads} fact.")
            ratio, t_ref, t_chunk = paired_ratio(chunked_fn, reference_fn, inputs, grads, args)
            verdict = "meets" if ratio >= 20 else "MISSES"
            print(f"  {name:<17} {gate:>6} {path:>10} {t_chunk * 1e3:10.1f} {t_ref * 1e3:13.1f} {ratio:6.1f}x  "
                  f"{verdict} >= 20x", flush=True)
            del inputs, grads
    print("  (ratio: the median of the paired ratios)")

    # 2. scaling with T
    mem_note = "cuda max_memory_allocated" if args.device == "cuda" else "tensor bytes, TensorMemoryTracker"
    print(f"\nchunked_scan forward+backward vs T (peak memory: {mem_note}); 'x' = growth per doubling of T:")
    print(f"  {'T':>6} {'time ms':>9} {'x':>7} {'peak MiB':>9} {'x':>7}")
    prev, growths = None, []
    measure = (lambda T: measure_length(args, T)) if args.device == "cuda" else measure_in_subprocess
    results = medians_over_rounds(args.lengths, args.rounds, measure)  # {T: (peak bytes, seconds)}
    for T in args.lengths:
        peak, seconds = results[T]
        time_x = per_doubling(seconds, prev[1], T, prev[2]) if prev else None
        t_growth = f"{time_x:6.2f}x" if prev else ""
        m_growth = f"{per_doubling(peak, prev[0], T, prev[2]):6.2f}x" if prev else ""
        print(f"  {T:>6} {seconds * 1e3:9.1f} {t_growth:>7} {peak / 2**20:9.1f} {m_growth:>7}")
        if prev and not math.isnan(time_x):  # (nan: a length repeated, no growth to tell)
            growths.append(time_x)
        prev = (peak, seconds, T)
    if growths:
        worst = max(growths)
        verdict = "meets" if worst <= 2.2 else "MISSES"
        print(f"  worst time growth {worst:.2f}x per doubling of T: {verdict} the target <= 2.2x")
        if worst > 2.2 and args.device == "cpu" and not keeps_freed_memory():
            print("  (the scan alone; the target is the mixers', in bench_linear_time.py. Under default malloc its "
                  "tensors are page-faulted at every call once they pass 32 MiB: --keep-freed-memory separates that.)")


if __name__ == "__main__":
    main()

"""Timing shared by the benchmarks: one training step (forward, loss, backward), and measurements in rounds."""

import math
import statistics

import torch


def refuse_cpu_clock_with_threads(parser, clock: str, threads: int):
    """--clock cpu sums the CPU time of every thread, OpenMP's idle ones spinning while they wait: refused (through
    the script's parser) unless the run has one thread."""
    if clock == "cpu" and threads > 1:
        parser.error(f"--clock cpu adds up the CPU time of all {threads} threads (OpenMP's idle threads spin while they "
                     "wait): use it with --threads 1, or the wall clock")


def count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def lm_loss(model, ids):
    """The causal-LM loss of a transformers-style model on `ids` (labels = ids), without a cache: a training step
    (Llama would fill a KV cache, our mamba2 keep its states; Mamba2ForCausalLM keeps none while training)."""
    return model(input_ids=ids, labels=ids, use_cache=False).loss


def step_seconds(model, loss_of, ids, device, clock) -> float:
    """Seconds (by `clock`) of zero_grad + loss_of(model, ids).backward()."""
    model.zero_grad(set_to_none=True)
    sync(device)
    start = clock()
    loss_of(model, ids).backward()
    sync(device)  # CUDA runs asynchronously: wait for the backward before reading the clock
    return clock() - start


def paired_step_times(ours, anchor, loss_of, ids, device, clock, warmup, repeats):
    """Step seconds of both models, run back to back (AB BA AB ...: each goes first in turn, so both see the same
    machine load), after `warmup` untimed pairs. Returns (ours' median, anchor's median, the median of the
    per-pair ratios ours / anchor: it cancels the machine's slow drifts)."""
    times = {"ours": [], "anchor": []}
    for i in range(warmup + repeats):
        order = (("ours", ours), ("anchor", anchor))
        for label, model in order if i % 2 == 0 else order[::-1]:
            seconds = step_seconds(model, loss_of, ids, device, clock)
            if i >= warmup:
                times[label].append(seconds)
    ratio = statistics.median(o / a for o, a in zip(times["ours"], times["anchor"]))
    return statistics.median(times["ours"]), statistics.median(times["anchor"]), ratio


def medians_over_rounds(keys, rounds, measure):
    """{key: tuple of medians} of measure(key) (a tuple of figures) over `rounds` rounds that each measure every key
    once, in turn (the order reversed every other round): a machine whose speed drifts (shared, or throttling) then
    slows every key alike, rather than those measured while it was slow, which would show as a step in a growth."""
    samples = {key: [] for key in keys}
    for round_index in range(rounds):
        for key in keys if round_index % 2 == 0 else keys[::-1]:
            samples[key].append(measure(key))
    return {key: tuple(statistics.median(values) for values in zip(*runs)) for key, runs in samples.items()}


def per_doubling(value, previous_value, length, previous_length) -> float:
    """The growth of a time or memory per doubling of length, from two lengths any ratio apart: the ratio itself for
    lengths twice apart (nan where it cannot be told: equal lengths, or nothing before)."""
    if length == previous_length or previous_value <= 0:
        return float("nan")
    return (value / previous_value) ** (1 / math.log2(length / previous_length))

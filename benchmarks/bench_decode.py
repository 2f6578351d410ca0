"""Decode cost per generated token against context length, with the cache footprint, for each mixer; side by side
with transformers' LlamaForCausalLM (attention; with its default DynamicCache and with a StaticCache) and
Mamba2ForCausalLM (mamba2); then our streaming step path against generate() for small recurrent models.

Part 1, generate(): for each mixer a SeqArchForCausalLM of 4 layers of it (vocab 256, hidden 256, MLP 1024, the
anchors' sizes; the mamba2 stack has no MLP, like Mamba2ForCausalLM: 8 heads x 64, expand 2, state 64, chunk 64).
For each context length a greedy generate() continues a random prompt of that length; a logits processor reads
the clock at every step, and the cost per token is the median interval (one full step of generate's loop). The
clock is this process's CPU time (--clock cpu, the default): the machine may be shared, and wall time would count
the slices other processes take from a preempted step; with one thread CPU time is the work done. The prompt is
prefilled in chunks of 1024 where the model supports it (ours, Llama), in one piece for HF Mamba2 (its generate()
refuses chunked prefill) and for Llama with a StaticCache.
Footprint: bytes of memory the returned cache holds, counted the same way for ours and the anchors (each tensor
storage once and whole: ours includes the spare room of its full-attention buffers); n/a where generate() returns
no cache (transformers 4.x's Mamba2). The whole sweep runs
`repeats` times, models interleaved at each length; medians over repeats.

Part 2, streaming: per-token time of StreamingSession.greedy (the single-token step path) against generate()
for the same model, and a plain forward loop (model(...) per token under no_grad) to show where the time goes.

Targets: recurrent stacks' per-token time at 8192 within 1.15x of that at 128; ours / anchor <= 1.0
(attention vs Llama, mamba2 vs Mamba2); generate() / streaming step >= 3 for a small recurrent model.

    python benchmarks/bench_decode.py [--quick] [--contexts 128 1024] [--mixers lstm attention] [--threads 1]
"""

import argparse
import os
import statistics
import sys
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM, LogitsProcessor, LogitsProcessorList, Mamba2Config
from transformers import Mamba2ForCausalLM, StaticCache
from transformers.utils import logging as hf_logging

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # this checkout
from hf_seqarch import SeqArchCache, SeqArchConfig, SeqArchForCausalLM, StreamingSession  # noqa: E402
from hf_seqarch.configuration_seqarch import RECURRENT_MIXERS  # noqa: E402
from hf_seqarch.modeling_seqarch import CACHE_FIELD, MIXER_CLASSES  # noqa: E402  (CACHE_FIELD: "cache" in transformers 5.24+)
from step_timing import refuse_cpu_clock_with_threads  # noqa: E402

VOCAB, HIDDEN, LAYERS, INTERMEDIATE, HEADS = 256, 256, 4, 1024, 4
MAMBA = dict(heads=8, head_dim=64, expand=2, state=64, chunk=64, conv=4)
PREFILL_CHUNK = 1024
# Our mixer -> its anchors: (name, generate_cost options). Llama runs with its default DynamicCache (which grows
# by concatenation) and with a StaticCache (preallocated, the fair match for our buffers; prefilled in one piece).
ANCHORS_OF = {
    "attention": [("Llama", {}), ("Llama static", {"static_cache": True})],
    "mamba2": [("HF Mamba2", {})],
}
CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}
clock = CLOCKS["cpu"]  # main() sets it from --clock


class StepClock(LogitsProcessor):
    """generate() calls its logits processors once per step: the intervals between calls are the per-token cost."""

    def __init__(self):
        self.stamps = []

    def __call__(self, input_ids, scores):
        self.stamps.append(clock())
        return scores

    def per_token(self) -> float:
        return median_interval(self.stamps)


def held_bytes(cache) -> int:
    """Bytes of memory the tensors reachable from a cache object hold (transformers' caches and ours alike): each
    storage once and whole, as a view keeps all of its storage alive (our full-attention layers' spare room too)."""
    storages, seen = {}, set()

    def walk(obj):
        if id(obj) in seen:
            return
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            storages[obj.untyped_storage().data_ptr()] = obj.untyped_storage().nbytes()
        elif isinstance(obj, dict):
            for value in obj.values():
                walk(value)
        elif isinstance(obj, (list, tuple)):
            for value in obj:
                walk(value)
        elif hasattr(obj, "__dict__"):
            for value in vars(obj).values():
                walk(value)

    walk(cache)
    return sum(storages.values())


def ours(mixer, hidden=HIDDEN, layers=LAYERS, intermediate=INTERMEDIATE):
    return SeqArchForCausalLM(SeqArchConfig(
        vocab_size=VOCAB, hidden_size=hidden, mixer_types=[mixer] * layers, num_attention_heads=HEADS,
        intermediate_size=0 if mixer == "mamba2" else intermediate, sliding_window=128, max_position_embeddings=16384,
        mamba_head_dim=MAMBA["head_dim"], mamba_expand=MAMBA["expand"], mamba_state_size=MAMBA["state"],
        mamba_chunk_size=MAMBA["chunk"], mamba_conv_kernel=MAMBA["conv"], mamba_n_groups=1,
        tie_word_embeddings=True, attn_implementation="sdpa",
    )).eval()


def anchor(mixer):
    if mixer == "attention":
        return LlamaForCausalLM(LlamaConfig(
            vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
            num_key_value_heads=HEADS, intermediate_size=INTERMEDIATE, tie_word_embeddings=True, rms_norm_eps=1e-5,
            max_position_embeddings=16384, attn_implementation="sdpa",
        )).eval()
    return Mamba2ForCausalLM(Mamba2Config(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_heads=MAMBA["heads"],
        head_dim=MAMBA["head_dim"], expand=MAMBA["expand"], state_size=MAMBA["state"], chunk_size=MAMBA["chunk"],
        conv_kernel=MAMBA["conv"], n_groups=1, tie_word_embeddings=True,
    )).eval()


def generate_cost(model, context, new_tokens, seed=0, static_cache=False):
    """(seconds per generated token, cache bytes at the end) of a greedy generate() after a prompt of `context` tokens.
    static_cache: Llama with a StaticCache of context + new_tokens slots, fresh for the call. (Not
    cache_implementation="static": generate() then sizes the cache to the longest of the model's earlier calls, and
    every context after the longest would attend over all its slots.)"""
    ids = torch.randint(1, VOCAB, (1, context), generator=torch.Generator().manual_seed(seed))  # no pad id (0)
    step_clock = StepClock()
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                  logits_processor=LogitsProcessorList([step_clock]), return_dict_in_generate=True)
    if isinstance(model, SeqArchForCausalLM):  # chunked prefill needs a cache before the first forward
        kwargs.update({CACHE_FIELD: SeqArchCache(model.config)}, prefill_chunk_size=PREFILL_CHUNK)
    elif static_cache:
        kwargs.update({CACHE_FIELD: StaticCache(config=model.config, max_cache_len=context + new_tokens)})
    elif isinstance(model, LlamaForCausalLM):
        kwargs.update(prefill_chunk_size=PREFILL_CHUNK)
    output = model.generate(ids, **kwargs)
    # The returned cache's name depends on the transformers release; transformers 4.x's Mamba2 returns none.
    cache = next((output[name] for name in ("cache", "past_key_values") if name in output), None)
    # The same count for both (get_memory_footprint() leaves out our spare room); None where no cache came back.
    footprint = held_bytes(cache) if cache is not None else None
    return step_clock.per_token(), footprint


def part_one(mixers, contexts, new_tokens, repeats):
    models = {}  # name -> (model, extra generate() arguments)
    for mixer in mixers:
        torch.manual_seed(0)
        models[mixer] = ours(mixer), {}
        if mixer in ANCHORS_OF:
            anchor_model = anchor(mixer)
            for name, options in ANCHORS_OF[mixer]:
                models[name] = anchor_model, options
    for name, (model, _) in models.items():
        print(f"  {name:<18} {sum(p.numel() for p in model.parameters()):>10,} parameters")
    for model, options in models.values():  # warm-up: first calls pay one-time setup (kernels, allocations)
        generate_cost(model, 32, 4, **options)
    times = {(name, c): [] for name in models for c in contexts}
    footprint = {}
    names = list(models)
    for repeat in range(repeats):
        # interleaved at each length, each model first in turn: the same load (and warmth) for all
        order = names[repeat % len(names):] + names[:repeat % len(names)]
        for context in contexts:
            for name in order:
                model, options = models[name]
                seconds, footprint[name, context] = generate_cost(model, context, new_tokens, seed=repeat,
                                                                  **options)
                times[name, context].append(seconds)
            print(f"  repeat {repeat + 1}/{repeats}: context {context} done", flush=True)
    ms = {key: statistics.median(values) * 1e3 for key, values in times.items()}

    print(f"\ngenerate() ms per token (median step, median of repeats) and cache footprint, by context length")
    head = "".join(f"{c:>10}" for c in contexts)
    print(f"{'model':<18}{head}  {'last/first':>10}   footprint bytes: " + " / ".join(str(c) for c in contexts))
    for name in models:
        row = "".join(f"{ms[name, c]:>10.2f}" for c in contexts)
        growth = ms[name, contexts[-1]] / ms[name, contexts[0]]
        print(f"{name:<18}{row}  {growth:>10.2f}   " + " / ".join("n/a" if footprint[name, c] is None else f"{footprint[name, c]:,}" for c in contexts))

    print(f"\nratios")
    for mixer in mixers:
        if mixer in RECURRENT_MIXERS:
            growth = ms[mixer, contexts[-1]] / ms[mixer, contexts[0]]
            verdict = "meets" if growth <= 1.15 else "MISSES"
            print(f"  {mixer}: ms/token at {contexts[-1]} / at {contexts[0]} = {growth:.3f} ({verdict} <= 1.15); "
                  f"footprint constant: {len({footprint[mixer, c] for c in contexts}) == 1}")
        for anchor_name, _ in ANCHORS_OF.get(mixer, []):
            ratios = [ms[mixer, c] / ms[anchor_name, c] for c in contexts]
            verdict = "meets" if max(ratios) <= 1.0 else "MISSES"
            print(f"  {mixer} / {anchor_name}: " + ", ".join(f"{c}: {r:.4f}" for c, r in zip(contexts, ratios))
                  + f" (worst {max(ratios):.4f}, {verdict} <= 1.0)")


def median_interval(stamps) -> float:
    return statistics.median(b - a for a, b in zip(stamps, stamps[1:]))


def forward_loop_cost(model, prompt, new_tokens):
    """A hand-written greedy loop over model(...) with the cache: the model's own per-step cost, without generate()."""
    with torch.no_grad():
        cache = SeqArchCache(model.config)
        logits = model(input_ids=prompt, cache=cache, use_cache=True).logits[:, -1]
        stamps = [clock()]
        for _ in range(new_tokens):
            token = logits.argmax(-1, keepdim=True)
            logits = model(input_ids=token, cache=cache, use_cache=True).logits[:, -1]
            stamps.append(clock())
    return median_interval(stamps)


def step_cost(model, prompt, new_tokens):
    """StreamingSession.greedy one token per call, so that each step is timed (a few us more than one long call)."""
    session = StreamingSession(model)
    session.feed(prompt)
    stamps = [clock()]
    for _ in range(new_tokens):
        session.greedy(None, max_new_tokens=1)
        stamps.append(clock())
    return median_interval(stamps)


def part_two(sizes, new_tokens, repeats):
    print(f"\nstreaming step path vs generate(), ms per token (median step, median of {repeats} runs), prompt 64, {new_tokens} new tokens")
    print(f"{'model':<26}{'generate':>10}{'forward loop':>14}{'step':>8}{'generate/step':>15}{'generate/loop':>15}")
    prompt = torch.randint(1, VOCAB, (1, 64), generator=torch.Generator().manual_seed(0))
    results = {}
    for mixer, hidden, layers in sizes:
        torch.manual_seed(0)
        model = ours(mixer, hidden=hidden, layers=layers, intermediate=4 * hidden)
        costs = {"generate": [], "loop": [], "step": []}
        generate_cost(model, 16, 4)  # warm-up
        for _ in range(repeats):  # interleaved
            costs["generate"].append(generate_cost(model, 64, new_tokens)[0])
            costs["loop"].append(forward_loop_cost(model, prompt, new_tokens))
            costs["step"].append(step_cost(model, prompt, new_tokens))
        g, loop, s = (statistics.median(costs[k]) * 1e3 for k in ("generate", "loop", "step"))
        name = f"{mixer} {layers}x{hidden}"
        results[name] = g / s
        print(f"{name:<26}{g:>10.3f}{loop:>14.3f}{s:>8.3f}{g / s:>15.2f}{g / loop:>15.2f}")
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="contexts 128 and 1024, fewer tokens and repeats")
    parser.add_argument("--contexts", type=int, nargs="+", default=None)
    parser.add_argument("--mixers", nargs="+", default=None, help="default: every registered mixer")
    parser.add_argument("--new-tokens", type=int, default=None,
                        help="tokens decoded per measurement (the streaming part decodes at least 64)")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1,
                        help="one-token steps are too small to split across threads; 1 keeps all models comparable")
    parser.add_argument("--clock", choices=list(CLOCKS), default="cpu",
                        help="cpu: this process's CPU time (robust on a shared machine, use with --threads 1); wall")
    parser.add_argument("--skip-streaming", action="store_true")
    args = parser.parse_args()
    global clock
    clock = CLOCKS[args.clock]
    hf_logging.set_verbosity_error()  # HF Mamba2 warns at every call that its CUDA kernels are missing
    refuse_cpu_clock_with_threads(parser, args.clock, args.threads)
    if args.new_tokens is not None and args.new_tokens < 2:
        parser.error(f"--new-tokens must be >= 2 (the time per token is the median interval between steps), got "
                     f"{args.new_tokens}")
    torch.set_num_threads(args.threads)
    contexts = args.contexts or ([128, 1024] if args.quick else [128, 1024, 4096, 8192])
    new_tokens = args.new_tokens or (16 if args.quick else 64)
    repeats = args.repeats or (1 if args.quick else 2)
    order = ["lstm", "gru", "attention", "sliding_attention", "mamba2", "linear_attention"]
    mixers = args.mixers or [m for m in order if m in MIXER_CLASSES]
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {args.clock} clock, contexts {contexts}, "
          f"{new_tokens} new tokens, {repeats} repeat(s)")
    part_one(mixers, contexts, new_tokens, repeats)
    if not args.skip_streaming:
        # Small models (2 layers of 64 or 128) and the anchor size (4 x 256): the smaller the model, the larger the
        # share of generate()'s per-step machinery that the step path saves.
        recurrent = [m for m in ("gru", "lstm", "mamba2", "linear_attention") if m in MIXER_CLASSES]
        sizes = [(m, 64, 2) for m in recurrent] + [(m, 128, 2) for m in recurrent]
        sizes += [("gru", HIDDEN, LAYERS), ("lstm", HIDDEN, LAYERS)]
        ratios = part_two(sizes, max(64, new_tokens), 3 if args.quick else 5)
        for width in (64, 128):
            small = {k: v for k, v in ratios.items() if k.endswith(f"2x{width}")}
            print(f"2 x {width} recurrent models, generate / step (target >= 3): "
                  + ", ".join(f"{k.split()[0]} {v:.2f} ({'meets' if v >= 3 else 'MISSES'})" for k, v in small.items()))


if __name__ == "__main__":
    main()

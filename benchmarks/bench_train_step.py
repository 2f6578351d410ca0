"""Training-step time (forward + loss + backward) of our stacks against their anchors: the
implementations users would otherwise reach for.

- attention: SeqArchForCausalLM with 4 attention layers vs transformers' LlamaForCausalLM, same widths,
  heads, depth, vocab, tied embeddings and sdpa kernel, so both have the same parameter count.
- lstm: SeqArchForCausalLM with 4 LSTM layers and no MLP vs a bare nn.Embedding + nn.LSTM(num_layers=4)
  + nn.Linear (tied) language model; ours also has its pre-norms and residuals, which cost parameters
  (5 x hidden) and a little time: that overhead is what the ratio measures.

Each length keeps batch x length fixed (8192 tokens). Runs alternate ours/anchor (AB BA AB ...: each goes
first in turn) so that both see the same machine load; the printed ratio is the median over the repeats of
ours / anchor of each back-to-back pair: below 1 means ours is faster.
Targets: attention <= 1.0, lstm <= 1.05.

    python benchmarks/bench_train_step.py [--quick] [--device cuda] [--lengths 256 1024] [--only lstm]
    python benchmarks/bench_train_step.py --threads 1 --clock cpu   # on a CPU shared with other jobs
"""

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # this checkout
from hf_seqarch import SeqArchConfig, SeqArchForCausalLM  # noqa: E402
from malloc_settings import keeps_freed_memory, restart_keeping_freed_memory  # noqa: E402
from step_timing import count, lm_loss, paired_step_times, refuse_cpu_clock_with_threads  # noqa: E402

VOCAB, HIDDEN, LAYERS, INTERMEDIATE, HEADS = 256, 256, 4, 1024, 4
TARGETS = {"attention": 1.0, "lstm": 1.05}


class BareLSTMLM(nn.Module):
    """The LSTM baseline users would write by hand: what wrapping nn.LSTM in our blocks is measured against."""

    def __init__(self, vocab, width, layers):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.lstm = nn.LSTM(width, width, num_layers=layers, batch_first=True)
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.embed.weight  # tied, as in our model

    def forward(self, input_ids, labels):
        logits = self.head(self.lstm(self.embed(input_ids))[0])  # (B, T, vocab)
        # Next-token loss as transformers' ForCausalLMLoss computes ours: the labels shifted (the last position
        # ignored), the logits flattened as they are (slicing them instead would copy them).
        shifted = F.pad(labels[:, 1:], (0, 1), value=-100)
        return F.cross_entropy(logits.flatten(0, 1).float(), shifted.flatten(), ignore_index=-100)


def attention_pair():
    ours = SeqArchForCausalLM(SeqArchConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, mixer_types=["attention"] * LAYERS, num_attention_heads=HEADS,
        intermediate_size=INTERMEDIATE, tie_word_embeddings=True, attn_implementation="sdpa",
    ))
    anchor = LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        num_key_value_heads=HEADS, intermediate_size=INTERMEDIATE, tie_word_embeddings=True, rms_norm_eps=1e-5,
        max_position_embeddings=8192, attn_implementation="sdpa",
    ))
    return ours, anchor, lm_loss


def lstm_pair():
    ours = SeqArchForCausalLM(SeqArchConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, mixer_types=["lstm"] * LAYERS, intermediate_size=0,
        tie_word_embeddings=True,
    ))
    anchor = BareLSTMLM(VOCAB, HIDDEN, LAYERS)

    def loss_of(model, ids):
        return lm_loss(model, ids) if model is ours else model(ids, ids)

    return ours, anchor, loss_of


def compare(name, pair, lengths, tokens, warmup, repeats, device, dtype, clock):
    torch.manual_seed(0)
    ours, anchor, loss_of = pair()
    ours, anchor = ours.to(device, dtype).train(), anchor.to(device, dtype).train()
    print(f"\n{name}: ours {count(ours):,} parameters, anchor {type(anchor).__name__} {count(anchor):,} parameters")
    print(f"{'T':>6} {'B':>4} {'ours ms':>9} {'anchor ms':>10} {'ours tok/s':>11} {'anchor tok/s':>13} {'ratio':>7}")
    ratios = {}
    for length in lengths:
        batch = max(1, tokens // length)
        ids = torch.randint(0, VOCAB, (batch, length), device=device)
        ours_s, anchor_s, ratios[length] = paired_step_times(ours, anchor, loss_of, ids, device, clock, warmup, repeats)
        print(f"{length:>6} {batch:>4} {ours_s * 1e3:>9.1f} {anchor_s * 1e3:>10.1f} {batch * length / ours_s:>11,.0f} "
              f"{batch * length / anchor_s:>13,.0f} {ratios[length]:>7.3f}", flush=True)
    verdict = "meets" if max(ratios.values()) <= TARGETS[name] else "MISSES"
    print(f"{name}: worst ratio {max(ratios.values()):.3f}, {verdict} the target <= {TARGETS[name]}")
    return ratios


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 warm-up and 3 repeats instead of 2 and 11")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--tokens", type=int, default=8192, help="batch x length per step")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--only", choices=["attention", "lstm"], default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="cpu: this process's CPU time, steadier than wall time on a machine shared with other "
                             "jobs; only meaningful with --threads 1 (idle threads spin) and on CPU")
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="CPU: run with glibc malloc keeping freed memory (benchmarks/malloc_settings.py), as "
                             "jemalloc or tcmalloc would; both models are measured in that same process")
    args = parser.parse_args()
    if args.keep_freed_memory:
        restart_keeping_freed_memory()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if args.clock == "cpu" and device.type != "cpu":
        parser.error("--clock cpu measures CPU work; time a GPU with the wall clock")
    if args.threads:
        torch.set_num_threads(args.threads)
    refuse_cpu_clock_with_threads(parser, args.clock, torch.get_num_threads())
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    warmup, repeats = (1, 3) if args.quick else (2, 11)
    repeats = args.repeats or repeats
    print(f"torch {torch.__version__}, device {device}, dtype {args.dtype}, threads {torch.get_num_threads()}, "
          f"{args.clock} clock, malloc {'keeps freed memory' if keeps_freed_memory() else 'default'}, "
          f"{args.tokens} tokens per step, {warmup} warm-up + {repeats} interleaved repeats (median)")
    pairs = {"attention": attention_pair, "lstm": lstm_pair}
    for name, pair in pairs.items():
        if args.only in (None, name):
            compare(name, pair, args.lengths, args.tokens, warmup, repeats, device, dtype, clock)


if __name__ == "__main__":
    main()

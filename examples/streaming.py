"""Stream a long text through a recurrent SeqArch model chunk by chunk, with constant memory; save the stream's
state half way, resume it in a fresh session, and continue the text. Offline, byte-level, under a minute on CPU.

    python examples/streaming.py [--mixers mamba2,gru] [--steps 60] [--stream-bytes 100000] [--chunk 4096] [--output-dir outputs/streaming]

The model is trained for a few steps on the Python reference docs that every install carries
(`pydoc_data.topics`), then reads a long stretch of them as one stream and reports, per chunk, the bits per byte
it predicts the stream with and the bytes its state holds. A full-attention model would hold its keys and
values for every byte read; this one holds the same ~36 KiB from the first chunk to the last.
"""

import argparse
import math
import os
import time

import torch
import torch.nn.functional as F

from hf_seqarch import SeqArchConfig, SeqArchForCausalLM, StreamingSession
from hf_seqarch.tools.text_data import corpus_text


def train_briefly(model, data, steps, block=128, batch=16):
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for step in range(steps):
        starts = torch.randint(0, len(data) - block - 1, (batch,))
        ids = torch.stack([data[s : s + block] for s in starts])
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 20 == 0 or step == steps - 1:
            print(f"  train step {step:3d}  loss {loss.item():.3f}")
    return model.eval()


def bits_per_byte(logits, ids, previous_logit):
    """Next-byte loss of a chunk in bits, the first byte predicted from the previous chunk's last logits."""
    predictions = logits[0, :-1] if previous_logit is None else torch.cat([previous_logit, logits[0, :-1]])
    targets = ids[0, 1:] if previous_logit is None else ids[0]
    return F.cross_entropy(predictions.float(), targets).item() / math.log(2)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mixers", default="mamba2,gru", help="comma-separated mixer_types (recurrent ones stream in constant memory)")
    parser.add_argument("--steps", type=int, default=60, help="training steps before streaming")
    parser.add_argument("--stream-bytes", type=int, default=100_000)
    parser.add_argument("--chunk", type=int, default=4096)
    parser.add_argument("--output-dir", default="outputs/streaming")
    parser.add_argument("--threads", type=int, default=1, help="a model this small gains nothing from more threads")
    args = parser.parse_args()
    if args.threads < 1 or args.steps < 0:
        parser.error(f"--threads must be >= 1 and --steps >= 0, got {args.threads} and {args.steps}")
    text = corpus_text().encode("utf-8")
    if args.chunk < 1 or min(args.stream_bytes, len(text)) < 2 * args.chunk:
        # the state is saved after the first half of the chunks and resumed for the second: two chunks at least
        parser.error(f"--stream-bytes ({args.stream_bytes}; the corpus has {len(text):,}) must be at least twice "
                     f"--chunk ({args.chunk}), and --chunk >= 1")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    os.makedirs(args.output_dir, exist_ok=True)

    data = torch.tensor(list(text), dtype=torch.long)
    mixers = [name.strip() for name in args.mixers.split(",") if name.strip()]  # "mamba2, gru" as "mamba2,gru"
    try:
        config = SeqArchConfig(vocab_size=256, hidden_size=128, mixer_types=mixers, intermediate_size=256,
                               mamba_head_dim=32, mamba_state_size=32, mamba_chunk_size=64, num_attention_heads=4,
                               sliding_window=256)
    except ValueError as error:  # an unknown mixer name
        parser.error(f"--mixers {args.mixers!r}: {error}")
    model = SeqArchForCausalLM(config)
    print(f"model {config.mixer_types}, {model.num_parameters():,} parameters; training {args.steps} steps")
    train_briefly(model, data, args.steps)

    stream = data[-args.stream_bytes :][None]  # (1, T): the end of the corpus, read as one long stream
    chunks = list(stream.split(args.chunk, dim=1))
    half = len(chunks) // 2
    state_path = os.path.join(args.output_dir, "stream_state.safetensors")
    print(f"\nstreaming {stream.shape[1]:,} bytes in {len(chunks)} chunks of {args.chunk}")
    session, previous, start = StreamingSession(model), None, time.perf_counter()
    reference = []  # the last logits of every chunk after the save point, to check the resumed stream against
    for index, chunk in enumerate(chunks):
        logits = session.feed(chunk)  # (1, chunk, 256): the outputs of this chunk, given everything before it
        bits = bits_per_byte(logits, chunk, previous)
        previous = logits[0, -1:]
        if index >= half:
            reference.append(previous.clone())
        if index < 3 or (index + 1) % 10 == 0 or index + 1 == len(chunks):
            print(f"  chunk {index + 1:3d}  seen {session.seen_tokens:>8,} bytes  {bits:.2f} bits/byte  "
                  f"state {session.get_memory_footprint():,} bytes")
        if index + 1 == half:
            session.save(state_path)
            print(f"  (saved the state after {session.seen_tokens:,} bytes to {state_path})")
    elapsed = time.perf_counter() - start
    attention_bytes = 2 * config.num_hidden_layers * session.seen_tokens * config.hidden_size * 4
    print(f"{session.seen_tokens / elapsed:,.0f} bytes/s; a full-attention model of this width would now hold "
          f"{attention_bytes / 2**20:,.1f} MiB of keys and values")

    # Resume from the file, as another process would, and check that it reads the rest of the stream identically.
    resumed = StreamingSession.load(model, state_path)
    print(f"\nresumed from {state_path} at {resumed.seen_tokens:,} bytes")
    difference = max(
        (resumed.feed(chunk)[0, -1:] - expected).abs().max().item() for chunk, expected in zip(chunks[half:], reference)
    )
    print(f"resumed stream vs uninterrupted stream over the second half: max |logit difference| = {difference}")
    assert resumed.seen_tokens == session.seen_tokens and difference == 0.0

    # Go on writing after the stream with the single-token decode path (a few training steps: expect babble).
    prompt = torch.tensor([list(b"\n\nThe ")])
    continuation = resumed.greedy(prompt, max_new_tokens=100)
    print(f"\ncontinuation: {(b'The ' + bytes(continuation[0].tolist())).decode('utf-8', errors='replace')!r}")


if __name__ == "__main__":
    main()

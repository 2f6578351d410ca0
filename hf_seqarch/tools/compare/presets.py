"""Run presets of `hf-seqarch compare`: model size, lengths and the one training budget all architectures share.

A preset fixes everything that could favour one architecture: every architecture gets the same width, depth,
vocabulary, data, optimiser, learning rate and number of steps. Only the MLP width differs, to match the
parameter budget (see architectures.py).
"""

from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    # Model: the transformer at `target_width` sets the parameter budget the others are matched to.
    target_width: int = 64
    num_layers: int = 2
    mlp_ratio: int = 2  # intermediate_size = mlp_ratio * width (SwiGLU)
    num_heads: int = 4
    width_step: int = 8  # candidate widths are multiples of this (divisible by the heads, even head dims)
    vocab_size: int = 256  # bytes for the text; the MQAR and copying tokens are ids inside it
    # Shorter than the recall tasks' longest sequences (the verdicts read those): what the window cannot reach shows.
    sliding_window: int = 32
    mamba: dict = field(default_factory=lambda: dict(mamba_head_dim=16, mamba_state_size=16, mamba_chunk_size=32))
    linear_attention: dict = field(default_factory=lambda: dict(linear_attention_chunk_size=32))
    # Speed and memory: a training step at a fixed number of tokens, batch = tokens // length.
    train_lengths: tuple = (256, 1024, 4096)
    tokens_per_step: int = 4096
    warmup: int = 1  # untimed runs first (allocator, oneDNN/cuDNN plans, lazy init)
    repeats: int = 3  # the median of these is reported
    # Decoding: one token at a time after a prompt of each context length (batch 1).
    decode_contexts: tuple = (256, 1024, 4096)
    decode_repeats: int = 16
    # Training through the Trainer: per task, the same steps, batches and optimiser for every architecture.
    learning_rate: float = 3e-3
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    seed: int = 0
    # torch CPU threads (None: torch's default, one per core); --threads overrides. The quick models are so small
    # that a second thread gains little, while on a busy machine OpenMP threads waiting for each other made
    # every step many times slower (measured: 13 minutes instead of 34 s for one training run).
    cpu_threads: int | None = 1
    # MQAR (Zoology): (sequence length, key-value pairs); one model per architecture trained on the mix,
    # the batches split evenly between the lengths (one length per batch), in the Trainer's seeded order.
    # Keys and values come from the first `mqar_vocab` ids.
    mqar: tuple = ((64, 4), (128, 8))
    mqar_vocab: int = 64
    mqar_steps: int = 300
    mqar_batch_size: int = 32
    mqar_eval_examples: int = 256
    # Selective copying (Mamba paper): total length, tokens to copy, alphabet (noise 0 and marker included).
    copy_length: int = 64
    copy_tokens: int = 4
    copy_alphabet: int = 16
    copy_steps: int = 200
    copy_batch_size: int = 32
    copy_eval_examples: int = 256
    # Held-out text: bytes of pydoc_data.topics, windows of `text_length`.
    text_length: int = 128
    text_steps: int = 200
    text_batch_size: int = 16
    text_eval_windows: int = 64

    def as_dict(self) -> dict:
        return asdict(self)


PRESETS = {
    # For CI: every stage runs, on models and lengths so small that the whole run takes seconds.
    "test": Preset(
        name="test",
        description="miniature end-to-end run for the test suite (numbers are meaningless)",
        target_width=16, num_layers=2, num_heads=2, width_step=4, sliding_window=8,
        mamba=dict(mamba_head_dim=8, mamba_state_size=8, mamba_chunk_size=8),
        linear_attention=dict(linear_attention_chunk_size=8),
        train_lengths=(16, 32), tokens_per_step=64, warmup=1, repeats=2,
        decode_contexts=(8, 32), decode_repeats=2,
        mqar=((16, 2), (32, 4)), mqar_vocab=32, mqar_steps=3, mqar_batch_size=4, mqar_eval_examples=8,
        copy_length=24, copy_tokens=4, copy_alphabet=8, copy_steps=3, copy_batch_size=4, copy_eval_examples=8,
        text_length=32, text_steps=3, text_batch_size=4, text_eval_windows=4,
    ),
    # The default: a 2-core CPU finishes it in under 10 minutes.
    "quick": Preset(name="quick", description="small models and short runs for a laptop CPU (<= 10 minutes on 2 cores)"),
    # For a GPU: wider, deeper models, longer sequences, Zoology's three MQAR lengths, a longer budget.
    "full": Preset(
        name="full",
        description="GPU-sized run: width 256, 4 layers, lengths up to 8K, thousands of training steps per task",
        cpu_threads=None,
        target_width=256, num_layers=4, num_heads=4, width_step=16, sliding_window=128,
        mamba=dict(mamba_head_dim=64, mamba_state_size=64, mamba_chunk_size=64),
        linear_attention=dict(linear_attention_chunk_size=64),
        train_lengths=(512, 2048, 8192), tokens_per_step=32768, warmup=2, repeats=5,
        decode_contexts=(512, 2048, 8192), decode_repeats=20,
        learning_rate=1e-3,
        mqar=((64, 4), (128, 8), (256, 16)), mqar_vocab=256, mqar_steps=3000, mqar_batch_size=64,
        mqar_eval_examples=1000,
        copy_length=512, copy_tokens=16, copy_alphabet=16, copy_steps=2000, copy_batch_size=64, copy_eval_examples=1000,
        text_length=512, text_steps=2000, text_batch_size=32, text_eval_windows=256,
    ),
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"Unknown preset {name!r}; choose one of {sorted(PRESETS)}.")
    return PRESETS[name]

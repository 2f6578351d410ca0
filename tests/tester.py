"""The shared tester's ingredients: tiny configs, the mixer stacks and the heads every test runs over, and how
the tests run the repository's scripts."""

import os
import signal
import subprocess

import torch

from hf_seqarch import (
    SeqArchConfig,
    SeqArchForCausalLM,
    SeqArchForSequenceClassification,
    SeqArchForTokenClassification,
    SeqArchModel,
)

VOCAB = 32

# Each single mixer, and hybrids. Issue-specific mixers join this list when they land.
STACKS = {
    "lstm": ["lstm"],
    "gru": ["gru"],
    "attention": ["attention"],
    "sliding": ["sliding_attention"],
    "lstm+attention": ["lstm", "attention"],
    "gru+sliding+attention": ["gru", "sliding_attention", "attention"],
    "mamba2": ["mamba2"],
    "linear_attention": ["linear_attention"],
    "mamba2+attention": ["mamba2", "attention"],
    "lstm+linear+sliding": ["lstm", "linear_attention", "sliding_attention"],
}

HEADS = {
    "base": SeqArchModel,
    "causal_lm": SeqArchForCausalLM,
    "seq_cls": SeqArchForSequenceClassification,
    "token_cls": SeqArchForTokenClassification,
}


def tiny_config(mixer_types, **overrides) -> SeqArchConfig:
    settings = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        mixer_types=list(mixer_types),
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=48,
        sliding_window=3,
        num_labels=3,
        pad_token_id=0,
        mamba_state_size=8,
        mamba_head_dim=8,
        mamba_chunk_size=4,
        mamba_n_groups=1,
        linear_attention_num_heads=4,
        linear_attention_chunk_size=4,
    )
    settings.update(overrides)
    return SeqArchConfig(**settings)


def tiny_model(model_class, mixer_types, seed=0, **overrides):
    torch.manual_seed(seed)
    return model_class(tiny_config(mixer_types, **overrides)).eval()


def random_ids(batch, length, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(1, VOCAB, (batch, length), generator=generator)


def main_output(model, **inputs):
    """The tensor each head is judged by: hidden states (base) or logits (heads)."""
    output = model(**inputs)
    return output.last_hidden_state if hasattr(output, "last_hidden_state") else output.logits


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the checkout
SCRIPT_ENV = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")


def run_script(command, timeout=240, with_stderr=False):
    """Run a command from the checkout's root, offline, as a user runs the scripts; fail with its output, or return
    its stdout (with_stderr: stdout and stderr). Past `timeout`, the command's whole process group is killed:
    `accelerate launch`'s worker processes would otherwise outlive it (a hung rank stayed for hours, holding its port
    and CPU)."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=SCRIPT_ENV,
                               cwd=ROOT, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # torch's launcher starts each worker in a session of its own: the launcher's group alone would leave them
        # running, holding the output pipes open (the communicate() below would then wait for ever).
        for pid in [process.pid, *_descendants(process.pid)]:
            try:
                os.killpg(pid, signal.SIGKILL) if pid == process.pid else os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        stdout, stderr = process.communicate()
        raise AssertionError(f"{' '.join(command)}: still running after {timeout} s, killed with its processes\n"
                             f"{stdout[-2000:]}\n{stderr[-4000:]}") from None
    assert process.returncode == 0, f"{' '.join(command)}\n{stdout[-2000:]}\n{stderr[-4000:]}"
    return (stdout, stderr) if with_stderr else stdout


def _descendants(pid: int) -> list[int]:
    """The processes below `pid` (Linux: read from /proc), whatever their session."""
    children: dict[int, list[int]] = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])  # (the command name may hold spaces)
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(parent, []).append(int(entry))
    found, pending = [], [pid]
    while pending:
        for child in children.get(pending.pop(), []):
            found.append(child)
            pending.append(child)
    return found

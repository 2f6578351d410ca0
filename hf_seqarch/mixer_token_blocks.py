"""Running a recurrent mixer over a long sequence in blocks of tokens, each from the state the last one left.

Why: glibc's malloc hands every freed block over 32 MiB back to the OS, and the next allocation of that
size is page-faulted in again, zeroed, page by page. A mamba2 layer's widest activation (its in-projection)
holds about 4.5 floats per token and unit of hidden size, so at hidden 256 and batch 1 it passes that size
beyond ~7,000 tokens; at 16,384 tokens a training step on CPU took 4.2 s, 1.1 s of it in the kernel, and
3.1 s in blocks (benchmarks/bench_linear_time.py). Blocks whose widest activation stays near
`CPU_BLOCK_BYTES` live on malloc's heap, which reuses them at every step. (The residual stream and the
logits are not blocked: at hidden 256 they pass 32 MiB beyond 32K tokens.)

Each block is the mixer's chunked-prefill path from the state of the block before (a last block of one
token, its decode path): the paths every mixer already has, which the tests hold to the full forward.
Gradients flow back through those states as through any other op. Half-precision models run whole: each
block's parameter gradients would be rounded to 16 bits and added in 16 bits, once per block.
"""

import dataclasses

import torch

from .graph_capture import capturing_graph

CPU_BLOCK_BYTES = 16 << 20  # the largest activation of a block: half glibc's 32 MiB cap, malloc's heap reuses it


def cpu_token_block(hidden_states: torch.Tensor, bytes_per_token: int, multiple: int) -> int | None:
    """Tokens per block on CPU for a mixer whose largest activation takes `bytes_per_token` per batch row and
    token, a multiple of `multiple` (the scan's chunk size, so blocks split no chunk). None where one block
    would hold the whole sequence, off the CPU (CUDA's caching allocator keeps what it frees), while
    torch.compile traces (it plans its own buffers) or another graph is recorded (graph_capture), for an empty
    batch, and in half precision (see above)."""
    batch = hidden_states.shape[0]
    if (
        hidden_states.device.type != "cpu"
        or capturing_graph()
        or batch == 0
        or hidden_states.dtype in (torch.float16, torch.bfloat16)
    ):
        return None
    tokens = CPU_BLOCK_BYTES // (batch * bytes_per_token)
    block = max(multiple, tokens // multiple * multiple)
    return block if hidden_states.shape[1] > block else None


class _LayerStates:
    """The two cache methods a mixer calls, where the caller passed no cache: the state goes from block to block."""

    def __init__(self):
        self.states = {}

    def get_state(self, layer_idx):
        return self.states.get(layer_idx)

    def set_state(self, layer_idx, state):
        self.states[layer_idx] = state


def forward_in_cpu_token_blocks(forward, hidden_states: torch.Tensor, context, bytes_per_token: int, multiple: int):
    """forward(hidden_states, context), in blocks of tokens where `cpu_token_block` gives some and the mixer is causal
    (an encoder's backward scan starts from the end: it runs whole)."""
    block = cpu_token_block(hidden_states, bytes_per_token, multiple) if context.causal else None
    if block is None:
        return forward(hidden_states, context)
    return run_in_token_blocks(forward, hidden_states, context, block)


def run_in_token_blocks(forward, hidden_states: torch.Tensor, context, block: int) -> torch.Tensor:
    """forward(hidden_states, context) over (B, T, width) in blocks of `block` tokens; returns (B, T, width).

    Each block runs from the state the one before left: in the caller's cache (which ends holding the
    final state, as after one forward), or, without one, in a holder dropped at the end. The mixer must
    be causal and keep its whole state through `cache.get_state` / `cache.set_state`.
    """
    mask = context.token_mask  # (B, T) or None
    states = context.cache if context.cache is not None else _LayerStates()
    outputs = []
    for start in range(0, hidden_states.shape[1], block):
        end = start + block
        block_context = dataclasses.replace(
            context,
            padding_mask=None if mask is None else mask[:, start:end],
            position_ids=context.position_ids[:, start:end],
            past_length=0,  # the padding mask above covers this block's tokens only
            cache=states,
            position_embeddings=None,
            memo={},
        )
        outputs.append(forward(hidden_states[:, start:end], block_context))
    return torch.cat(outputs, dim=1)

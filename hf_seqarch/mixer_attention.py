"""Attention mixers: multi-head (grouped-query) attention with rotary positions, full or sliding window.

The kernel comes from transformers' attention registry (`attn_implementation`: eager, sdpa,
flash_attention_2, flex_attention); the eager kernel below is the readable reference. Sliding-window
layers under sdpa run long unpadded sequences in blocks (ops_sliding_attention), O(T * window).

Pads are masked out as keys, and positions count real tokens only (the model numbers them from the mask, as
generate() does, unless position_ids are given). Left and right padding give each row what it gives alone; so do pads
between real tokens (holes) in full attention, while a sliding window counts them in its span (it counts slots), as
transformers' sliding-window models do.
"""

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .graph_capture import recording_one_graph
from .ops_sliding_attention import sliding_window_attention


def rotary_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """Rotary tables for the given positions: cos, sin each (B, T, head_dim). Computed in float32 (as Llama's) or, for
    a float64 model, in float64: float32 angles would put ~1e-7 between a row and the same row shifted by pads."""
    table_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, device=position_ids.device, dtype=table_dtype) / head_dim)
    freqs = position_ids[..., None].to(table_dtype) * inv_freq  # (B, T, head_dim/2)
    angles = torch.cat([freqs, freqs], dim=-1)  # (B, T, head_dim)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, T, hd): broadcast over heads
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Reference kernel. query (B, nh, T, hd), key/value (B, nkv, K, hd), additive mask (B|1, 1, T, K) or None."""
    if module.num_key_value_groups > 1:
        key = key.repeat_interleave(module.num_key_value_groups, dim=1)  # (B, nh, K, hd)
        value = value.repeat_interleave(module.num_key_value_groups, dim=1)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling  # (B, nh, T, K)
    if attention_mask is not None:
        scores = scores + attention_mask
    # At least float32 (bf16/fp16 scores would lose the small probabilities); float64 stays float64, where the
    # mask's finfo(float64).min would be -inf in float32 and a row of only masked keys NaN.
    probs = torch.softmax(scores, dim=-1, dtype=torch.promote_types(query.dtype, torch.float32)).to(query.dtype)
    if attention_mask is not None:
        # A query that may attend to nothing (a left pad) outputs 0, as sdpa and the flash kernels give.
        attends_to_nothing = (attention_mask == torch.finfo(attention_mask.dtype).min).all(-1, keepdim=True)
        probs = probs.masked_fill(attends_to_nothing, 0.0)  # (B, nh, T, K)
    probs = nn.functional.dropout(probs, p=dropout, training=module.training)
    output = torch.matmul(probs, value).transpose(1, 2).contiguous()  # (B, T, nh, hd)
    return output, probs


# Kernels that apply the causal pattern themselves when they get no mask (they read `module.is_causal`).
_KERNELS_WITH_IMPLICIT_CAUSAL = ("sdpa",)


def build_attention_mask(context, query_length, kv_length, window, attn_implementation, dtype, device):
    """The mask for `query_length` new queries against the last `kv_length` keys, or None when not needed.

    Flash kernels take the 2-D padding mask (causality and window are their own arguments), flex a
    BlockMask, sdpa a boolean mask (B|1, 1, T, K), True where a query may attend, as transformers gives it;
    the others an additive float mask of that shape. Built once per forward and shared by layers.

    Why sdpa gets booleans: a left-padded causal batch has pad queries that may attend to nothing. With a
    boolean mask torch's sdpa outputs 0 there, with 0 gradient; with an additive finfo.min mask its CPU
    backward returns gradients unrelated to its forward on such rows, and the causal LM loss does reach the
    last pad (it predicts the first real token): left-padded training got gradients up to 50x too large.
    """
    if torch.compiler.is_compiling():  # no memo: hashing a key of the (symbolic) lengths would specialize the graph
        return _attention_mask(context, query_length, kv_length, window, attn_implementation, dtype, device)
    memo_key = ("attention_mask", query_length, kv_length, window, attn_implementation, dtype)
    if memo_key not in context.memo:
        context.memo[memo_key] = _attention_mask(
            context, query_length, kv_length, window, attn_implementation, dtype, device
        )
    return context.memo[memo_key]


def _is_flash(attn_implementation) -> bool:
    """A flash kernel, which takes a 2-D padding mask and is_causal: "flash_attention_2/3", and hub kernels such as
    "kernels-community/flash-attn2" (transformers' own test, `"flash" in` the name; it also renames
    flash_attention_2 so where only the `kernels` package is installed)."""
    return "flash" in attn_implementation


def _attention_mask(context, query_length, kv_length, window, attn_implementation, dtype, device):
    """`build_attention_mask`'s mask, built."""
    padding = context.padding_mask
    if _is_flash(attn_implementation):
        return None if padding is None else padding[:, -kv_length:]
    # Not while a graph is recorded: the choice, made from the example's lengths, would be replayed for every input
    # (an example that fits the window, replayed on a longer input, attended past it); nor are the lengths compared
    # then (under torch.export the comparison bounds the exported lengths).
    if recording_one_graph():
        implicit_ok = False
    else:
        fits_window = window is None or kv_length <= window
        implicit_ok = fits_window and (not context.causal or context.past_length == 0 or query_length == 1)
    if attn_implementation in _KERNELS_WITH_IMPLICIT_CAUSAL and padding is None and implicit_ok:
        return None

    past = context.past_length
    query_pos = torch.arange(past, past + query_length, device=device)[:, None]  # (T, 1)
    key_pos = torch.arange(past + query_length - kv_length, past + query_length, device=device)[None, :]  # (1, K)
    allowed = torch.ones(query_length, kv_length, dtype=torch.bool, device=device)
    # (Out of place: the legacy ONNX exporter, which works from a jit trace, has no in-place and.)
    if context.causal:
        allowed = allowed & (key_pos <= query_pos)
        if window is not None:
            allowed = allowed & (key_pos > query_pos - window)
    elif window is not None:
        allowed = allowed & ((key_pos - query_pos).abs() < window)
    allowed = allowed[None, None]  # (1, 1, T, K)
    if padding is not None:
        allowed = allowed & padding[:, None, None, -kv_length:]  # (B, 1, T, K)
    if attn_implementation == "flex_attention":
        return _flex_block_mask(allowed)
    if attn_implementation == "sdpa":
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)


FLEX_BLOCK = 128  # flex_attention's default block size


def _flex_block_mask(allowed):
    """A BlockMask for flex_attention from `allowed` (B or 1, 1, T, K), as transformers builds its own: flex skips
    the blocks it masks whole. flex also evaluates the mask at the indices of whole blocks of queries and keys, so
    it reads a copy padded to whole blocks (False there); a mask shared by the batch (no padding) is read at row 0
    whatever the batch index, as flex broadcasts it."""
    from torch.nn.attention.flex_attention import create_block_mask

    B, _, T, K = allowed.shape
    padded = allowed.new_zeros(B, -(-T // FLEX_BLOCK) * FLEX_BLOCK, -(-K // FLEX_BLOCK) * FLEX_BLOCK)
    padded[:, :T, :K] = allowed[:, 0]

    def mask_mod(batch, head, query, key):
        return padded[batch if B > 1 else 0, query, key]

    return create_block_mask(mask_mod, B if B > 1 else None, None, T, K, device=allowed.device)


class AttentionMixer(nn.Module):
    """Grouped-query attention with RoPE; `sliding_window` bounds both the mask and the cache."""

    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.attention_head_dim
        self.num_heads = config.num_attention_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.num_key_value_groups = self.num_heads // self.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.is_causal = not config.bidirectional
        self.sliding_window = config.sliding_window if config.mixer_types[layer_idx] == "sliding_attention" else None
        width = config.hidden_size
        self.q_proj = nn.Linear(width, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(width, self.num_key_value_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(width, self.num_key_value_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, width, bias=False)

    def forward(self, hidden_states: torch.Tensor, context) -> torch.Tensor:
        batch, length, _ = hidden_states.shape
        # Sizes spelled out (no -1): an empty batch has none to infer them from.
        heads, kv_heads, head_dim = self.num_heads, self.num_key_value_heads, self.head_dim
        query = self.q_proj(hidden_states).view(batch, length, heads, head_dim).transpose(1, 2)  # (B, nh, T, hd)
        key = self.k_proj(hidden_states).view(batch, length, kv_heads, head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        value = self.v_proj(hidden_states).view(batch, length, kv_heads, head_dim).transpose(1, 2)
        query, key = apply_rotary(query, key, *context.position_embeddings)
        if context.cache is not None:
            key, value = context.cache.update_key_value(self.layer_idx, key, value, self.sliding_window)

        implementation = self.config._attn_implementation or "eager"
        if query.numel() == 0:  # an empty batch: transformers' sdpa cannot reshape an empty output; eager can
            implementation = "eager"
        dropout = self.config.attention_dropout if self.training else 0.0
        if self._banded_applies(context, length, key.shape[2], implementation):
            output = sliding_window_attention(query, key, value, self.sliding_window, self.scaling, dropout)
            return self.o_proj(output.reshape(batch, length, self.num_heads * self.head_dim))  # (B, T, width)
        mask = build_attention_mask(
            context, length, key.shape[2], self.sliding_window, implementation, query.dtype, query.device
        )
        attention = eager_attention_forward if implementation == "eager" else ALL_ATTENTION_FUNCTIONS[implementation]
        if _is_flash(implementation):
            is_causal = context.causal  # the flash kernels' own argument, beside the 2-D padding mask
        else:
            # sdpa reads it where it gets no mask (else self.is_causal). torch aligns that implicit mask with the first
            # key, and transformers 4.x passes an explicit value on as it is: causal only with no cached keys before
            # the queries (without a mask, a causal call has either none or one query; see build_attention_mask).
            # An `if`, not the value of the `and`: compiled, the comparison is a SymBool, which sdpa refuses.
            is_causal = False
            if context.causal and mask is None and context.past_length == 0:
                is_causal = True
        output, weights = attention(
            self,
            query,
            key,
            value,
            mask,
            dropout=dropout,
            scaling=self.scaling,
            sliding_window=self.sliding_window,
            is_causal=is_causal,
        )
        if context.attentions is not None:  # output_attentions (eager only: the model checked)
            context.attentions.append(weights)
        return self.o_proj(output.reshape(batch, length, self.num_heads * self.head_dim))  # (B, T, width)

    def _banded_applies(self, context, length, kv_length, implementation) -> bool:
        """Sliding-window sdpa over a whole unpadded sequence from its start (training, a first prefill) runs
        in blocks (ops_sliding_attention) once the sequence is long enough for a full mask to waste work. Not while
        torch.export or torch.jit.trace records: their one graph serves every length, and the blocks are cut by it
        (torch.compile guards on the length and compiles again where the choice changes)."""
        return (
            not recording_one_graph()
            and implementation == "sdpa"
            and self.sliding_window is not None
            and context.causal
            and context.padding_mask is None
            and kv_length == length  # no cached keys before these
            and length > 2 * self.sliding_window
        )

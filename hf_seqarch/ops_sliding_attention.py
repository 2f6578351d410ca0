"""Causal sliding-window attention in blocks: O(T * window) time and memory instead of O(T^2).

With a mask, an attention kernel still computes every query against every key: at T = 4,096 and a
window of 128, 32 times the scores the window allows, and a T x T mask besides. Here the queries are cut
into blocks of `window`; block b attends to the keys of blocks b - 1 and b, which hold every key any of
its queries may see. One scaled_dot_product_attention call runs all blocks as a batch, with one small
mask shared by all but the first block (whose previous block does not exist):

    query i of a block (position b*W + i) sees key j of the 2W (position b*W - W + j) iff i < j <= i + W

The reference is the full-mask path of mixer_attention (build_attention_mask + any kernel); tests hold
the two to the same outputs and gradients. Pure PyTorch (this file is copied flat to the Hub).
Shapes: B batch, nh query heads, nkv key/value heads, T time, hd head dim, W window, nb blocks.
"""

import numbers

import torch
import torch.nn.functional as F


def sliding_window_attention(query, key, value, window: int, scaling: float, dropout: float = 0.0):
    """query (B, nh, T, hd), key/value (B, nkv, T, hd), nkv dividing nh -> output (B, T, nh, hd)."""
    _check_inputs(query, key, value, window, dropout)
    batch, heads, length, head_dim = query.shape
    window = min(int(window), length)  # (a window past the sequence sees all of it: blocks of its length suffice)
    nb = -(-length // window)
    pad = nb * window - length  # queries and keys past the end: never seen by a real query (they are later)

    def blocks_of(x, extra_front):  # (B, n, T, hd) -> (B * nb, n, W or 2W, hd)
        x = F.pad(x, (0, 0, extra_front, pad))  # zeros before the first block stand for keys that do not exist
        if extra_front == 0:
            x = x.view(x.shape[0], x.shape[1], nb, window, head_dim).transpose(1, 2)
        else:
            x = x.unfold(2, 2 * window, window).permute(0, 2, 1, 4, 3)  # overlapping windows of 2W keys
        return x.reshape(-1, *x.shape[2:])

    q = blocks_of(query, 0)  # (B * nb, nh, W, hd)
    k, v = blocks_of(key, window), blocks_of(value, window)  # (B * nb, nkv, 2W, hd)

    i = torch.arange(window, device=query.device)[:, None]
    j = torch.arange(2 * window, device=query.device)[None, :]
    allowed = ((j > i) & (j <= i + window)).repeat(batch * nb, 1, 1)  # (B * nb, W, 2W)
    allowed.view(batch, nb, window, 2 * window)[:, 0, :, :window] = False  # block 0 has no previous block
    # (a boolean mask, not an additive finfo.min: in float16 that is -65504, which scores past it outweighed, and a
    # query attended to keys outside its window. Every row allows its own key, so none is fully masked.)

    grouped = bool(heads != key.shape[1])  # (bool: under jit.trace sizes are traced values, which sdpa refuses)
    if grouped and not sdpa_groups_heads_under_a_mask(query.device):
        k, v = (x.repeat_interleave(heads // key.shape[1], dim=1) for x in (k, v))  # (B * nb, nh, 2W, hd)
        grouped = False
    output = F.scaled_dot_product_attention(
        q, k, v, attn_mask=allowed[:, None], dropout_p=dropout, scale=scaling, enable_gqa=grouped
    )  # (B * nb, nh, W, hd)
    output = output.view(batch, nb, heads, window, head_dim).transpose(2, 3)  # (B, nb, W, nh, hd)
    return output.reshape(batch, nb * window, heads, head_dim)[:, :length]  # (B, T, nh, hd)


def sdpa_groups_heads_under_a_mask(device: torch.device) -> bool:
    """Whether sdpa takes grouped key/value heads (enable_gqa) with a mask on `device` in a fused kernel. On CUDA it
    drops to its math kernel (O(T^2) memory, slow), as transformers' `use_gqa_in_sdpa` notes, so there the keys and
    values are repeated per query head instead; CPU's fused kernel takes both."""
    return device.type == "cpu"


def _check_inputs(query, key, value, window, dropout):
    """A clear error rather than one from the block arithmetic (a window of 0 divided by zero) or inside sdpa."""
    if isinstance(window, bool) or not isinstance(window, numbers.Integral) or window < 1:
        raise ValueError(f"window must be an integer >= 1 (the keys a query sees, itself included), got {window!r}.")
    ranks_ok = query.dim() == key.dim() == value.dim() == 4
    if not (
        ranks_ok and key.shape == value.shape and key.shape[0] == query.shape[0] and key.shape[2:] == query.shape[2:]
        and key.shape[1] >= 1 and query.shape[1] % key.shape[1] == 0 and query.shape[2] >= 1
    ):
        raise ValueError(
            "Expected query (B, nh, T, hd) and key, value (B, nkv, T, hd) with nkv dividing nh and T >= 1; got query "
            f"{tuple(query.shape)}, key {tuple(key.shape)}, value {tuple(value.shape)}."
        )
    floating = query.is_floating_point() and key.is_floating_point() and value.is_floating_point()
    # Under autocast sdpa casts them itself (RoPE gives float32 q and k beside a bf16 v, as in transformers' models).
    one_dtype = query.dtype == key.dtype == value.dtype or torch.is_autocast_enabled(query.device.type)
    if not (floating and one_dtype):
        raise ValueError(f"query, key and value must be floating point of one dtype (outside autocast), got "
                         f"{query.dtype}, {key.dtype}, {value.dtype}.")
    if not 0 <= dropout < 1:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}.")

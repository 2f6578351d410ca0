"""SeqArchModel.forward (+ lm_head) for one unpadded token per row, as plain function calls: the streaming step.

Per token, a small model's time goes to Python and dispatch, not arithmetic: every nn.Module call, every
MixerContext and every check costs microseconds, and a 2 x 64 LSTM has dozens of them per token. Here a
block becomes a few torch functions on (B, width) rows, reading the modules' own parameters at every call
(so training or loading new weights is seen at once):

    x = x + cell(rms_norm(x))          LSTM / GRU: torch.lstm_cell / torch.gru_cell on the cached state
    x = x + mlp(rms_norm(x))           SwiGLU as three F.linear calls

Attention, mamba2 and linear attention mixers keep their own module call (with a MixerContext). A module is
only bypassed when it is exactly the plain class mirrored here, without hooks and with its weights in
memory: a PEFT adapter, a quantized linear, a hook or an accelerate offload keeps the module's own call.
The module path (`block(x, context)`, as in SeqArchModel.forward) is the reference; tests hold the two to
the same logits.
"""

import torch
import torch.nn.functional as F
from torch import nn

from ..mixer_attention import rotary_cos_sin
from ..mixer_context import MixerContext
from ..mixer_rnn import RecurrentMixer
from ..modeling_seqarch import SeqArchBlock, SeqArchMLP
from ..ops_rms_norm import RMSNorm


def _is_plain(module: nn.Module, expected: type) -> bool:
    """Exactly `expected` (not a subclass such as an adapter layer), without hooks, weights in memory."""
    return (
        type(module) is expected
        and not module._forward_hooks
        and not module._forward_pre_hooks
        and not hasattr(module, "_hf_hook")  # accelerate wraps forward itself (offload, device maps)
        and not any(p.is_meta for p in module.parameters(recurse=False))
    )


def _rms_norm(norm: nn.Module):
    if not _is_plain(norm, RMSNorm):
        return norm
    shape = tuple(norm.normalized_shape)
    return lambda x: F.rms_norm(x, shape, norm.weight, norm.eps)


def _embedding(embed: nn.Module):
    if not _is_plain(embed, nn.Embedding):
        return embed
    # nn.Embedding.forward's call, with its options (max_norm renormalises the rows it looks up) read at each call
    return lambda ids: F.embedding(
        ids, embed.weight, embed.padding_idx, embed.max_norm, embed.norm_type, embed.scale_grad_by_freq, embed.sparse
    )


def _linear(linear: nn.Module):
    if not _is_plain(linear, nn.Linear):
        return linear
    return lambda x: F.linear(x, linear.weight, linear.bias)


def _lstm_cell(rnn: nn.LSTM, layer_idx: int):
    def step(x, cache, context_of):  # x (B, width) -> h (B, hidden); the cache keeps h, c as (B, 1, hidden)
        state = cache.layers[layer_idx]
        if state is None:
            h = c = x.new_zeros(x.shape[0], rnn.hidden_size)
        else:
            h, c = state["h"][:, 0].to(x.dtype), state["c"][:, 0].to(x.dtype)  # the model's dtype (it may have changed)
        h, c = torch.lstm_cell(x, (h, c), rnn.weight_ih_l0, rnn.weight_hh_l0, rnn.bias_ih_l0, rnn.bias_hh_l0)
        cache.layers[layer_idx] = {"h": h[:, None], "c": c[:, None]}
        return h

    return step


def _gru_cell(rnn: nn.GRU, layer_idx: int):
    def step(x, cache, context_of):  # x (B, width) -> h (B, hidden); the cache keeps h as (B, 1, hidden)
        state = cache.layers[layer_idx]
        h = x.new_zeros(x.shape[0], rnn.hidden_size) if state is None else state["h"][:, 0].to(x.dtype)
        h = torch.gru_cell(x, h, rnn.weight_ih_l0, rnn.weight_hh_l0, rnn.bias_ih_l0, rnn.bias_hh_l0)
        cache.layers[layer_idx] = {"h": h[:, None]}
        return h

    return step


def _mixer(block, config, layer_idx: int):
    mixer, mixer_type = block.mixer, config.mixer_types[layer_idx]
    rnn = getattr(mixer, "rnn", None)
    if mixer_type == "lstm" and _is_plain(mixer, RecurrentMixer) and _is_plain(rnn, nn.LSTM):
        return _lstm_cell(rnn, layer_idx)
    if mixer_type == "gru" and _is_plain(mixer, RecurrentMixer) and _is_plain(rnn, nn.GRU):
        return _gru_cell(rnn, layer_idx)
    return lambda x, cache, context_of: mixer(x[:, None], context_of())[:, 0]  # the module takes (B, 1, width)


def _feed_forward(mlp: nn.Module, config):
    if not _is_plain(mlp, SeqArchMLP):
        return mlp
    gate, up, down = _linear(mlp.gate_proj), _linear(mlp.up_proj), _linear(mlp.down_proj)
    activation = F.silu if config.hidden_act == "silu" else mlp.act_fn
    return lambda x: down(activation(gate(x)) * up(x))


def _block(block, config, layer_idx: int):
    """x (B, width) -> x (B, width), equal to block(x[:, None], context)[:, 0]."""
    if not _is_plain(block, SeqArchBlock):
        return lambda x, cache, context_of: block(x[:, None], context_of())[:, 0]
    mixer, mixer_norm = _mixer(block, config, layer_idx), _rms_norm(block.mixer_norm)
    if block.mlp is None:
        return lambda x, cache, context_of: x + mixer(mixer_norm(x), cache, context_of)
    feed_forward, mlp_norm = _feed_forward(block.mlp, config), _rms_norm(block.mlp_norm)

    def step(x, cache, context_of):
        x = x + mixer(mixer_norm(x), cache, context_of)
        return x + feed_forward(mlp_norm(x))

    return step


class SingleTokenDecoder:
    """decoder(token_ids (B,), cache) -> next-token logits (B, vocab) with an lm_head, else hidden (B, width).

    The cache (a SeqArchCache) is read, updated and advanced by one token. No checks: the caller's job.
    """

    def __init__(self, base, lm_head, config):
        embed = base.embed_tokens
        self.embed = _embedding(embed)
        self.blocks = [_block(block, config, i) for i, block in enumerate(base.layers)]
        self.norm = _rms_norm(base.norm)
        self.lm_head = None if lm_head is None else _linear(lm_head)
        # Read once: a transformers config attribute costs microseconds.
        self.rotary = (config.attention_head_dim, config.rope_theta) if config.has_attention else None

    def __call__(self, token_ids: torch.Tensor, cache) -> torch.Tensor:
        hidden = self.embed(token_ids)  # (B, width)
        context = None

        def context_of():  # built only for mixers that keep their module call, once per token
            nonlocal context
            if context is None:
                past = cache.seen_tokens
                position_ids = torch.full((1, 1), past, device=hidden.device)
                context = MixerContext(padding_mask=None, position_ids=position_ids, past_length=past, cache=cache, causal=True)
                if self.rotary is not None:
                    context.position_embeddings = rotary_cos_sin(position_ids, *self.rotary, hidden.dtype)
            return context

        cache.begin_update()
        for block in self.blocks:
            hidden = block(hidden, cache, context_of)
        cache.advance(1)
        hidden = self.norm(hidden)
        return hidden if self.lm_head is None else self.lm_head(hidden)

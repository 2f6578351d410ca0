"""LSTM and GRU mixers: torch's fused nn.LSTM / nn.GRU (cuDNN on GPU, oneDNN on CPU), one per layer.

Padding never enters the state: with a mask, each row's real tokens are packed to the front in order,
run as a packed sequence, and scattered back (pads output zeros), so left, right or holed padding all
give, at the real positions, what each sequence gives alone.
"""

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from .mixer_context import real_tokens_first


class RecurrentMixer(nn.Module):
    """One nn.LSTM or nn.GRU layer; in encoder mode a bidirectional one with half the width per direction."""

    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.is_lstm = config.mixer_types[layer_idx] == "lstm"
        self.bidirectional = config.bidirectional
        hidden = config.hidden_size // 2 if self.bidirectional else config.hidden_size
        rnn_class = nn.LSTM if self.is_lstm else nn.GRU
        self.rnn = rnn_class(config.hidden_size, hidden, batch_first=True, bidirectional=self.bidirectional)

    def forward(self, hidden_states: torch.Tensor, context) -> torch.Tensor:
        cache = context.cache
        initial = self._unpack_state(cache.get_state(self.layer_idx), hidden_states.dtype) if cache is not None else None
        mask = context.token_mask
        if hidden_states.shape[1] == 1 and not self.bidirectional and self._cell_applies():
            output, final = self._decode_step(hidden_states, mask, initial)
        elif mask is None:
            output, final = self.rnn(hidden_states, initial)
        else:
            output, final = self._forward_masked(hidden_states, mask, initial)
        if cache is not None:
            cache.set_state(self.layer_idx, self._pack_state(final))
        return output  # (B, T, width)

    def _cell_applies(self) -> bool:
        """Whether the one-token cell path can read the layer's weights itself. Not for a layer replaced by another
        kind (torch's dynamically quantized LSTM / GRU keep packed int8 weights, no weight_ih_l0), nor for weights on
        the meta device (offloaded by accelerate: only the module's own call loads them)."""
        weight = getattr(self.rnn, "weight_ih_l0", None)
        return isinstance(weight, torch.Tensor) and not weight.is_meta

    def _decode_step(self, hidden_states, mask, initial):
        """One token through the cell function: the fused nn.LSTM/nn.GRU call has a fixed cost (about 2 ms in
        oneDNN on CPU) that dominates single-token decoding. Same weights, same result (tests hold it to the
        sequence path). Masked rows keep their state."""
        rnn, x = self.rnn, hidden_states[:, 0]  # (B, width)
        zeros = x.new_zeros(x.shape[0], rnn.hidden_size)
        if self.is_lstm:
            h, c = (zeros, zeros) if initial is None else (initial[0][0], initial[1][0])
            new_h, new_c = torch.lstm_cell(x, (h, c), rnn.weight_ih_l0, rnn.weight_hh_l0, rnn.bias_ih_l0, rnn.bias_hh_l0)
        else:
            h = zeros if initial is None else initial[0]
            new_h = torch.gru_cell(x, h, rnn.weight_ih_l0, rnn.weight_hh_l0, rnn.bias_ih_l0, rnn.bias_hh_l0)
        output = new_h[:, None]  # (B, 1, hidden)
        if mask is not None:
            keep = mask[:, :1]  # (B, 1)
            new_h = torch.where(keep, new_h, h)
            output = output * keep[..., None].to(output.dtype)
            if self.is_lstm:
                new_c = torch.where(keep, new_c, c)
        final = (new_h[None], new_c[None]) if self.is_lstm else new_h[None]
        return output, final

    def _forward_masked(self, hidden_states, mask, initial):
        batch, length, width = hidden_states.shape
        lengths = mask.sum(dim=1)  # (B,)
        order = real_tokens_first(mask)  # (B, T)
        gather_index = order[..., None].expand(-1, -1, width)
        packed_rows = hidden_states.gather(1, gather_index)  # (B, T, width), real tokens first
        # pack_padded_sequence refuses empty rows: run one dummy step for them and restore their state below.
        packed = pack_padded_sequence(packed_rows, lengths.clamp(min=1).cpu(), batch_first=True, enforce_sorted=False)
        packed_output, final = self.rnn(packed, initial)
        output_rows, _ = pad_packed_sequence(packed_output, batch_first=True, total_length=length)
        output = torch.zeros_like(output_rows).scatter(1, order[..., None].expand_as(output_rows), output_rows)
        output = output * mask[..., None].to(output.dtype)

        empty = lengths == 0
        if bool(empty.any()):
            final = tuple(final) if self.is_lstm else (final,)
            if initial is None:
                start = tuple(torch.zeros_like(f) for f in final)
            else:
                start = tuple(initial) if self.is_lstm else (initial,)
            final = tuple(torch.where(empty[None, :, None], s, f) for s, f in zip(start, final))
            final = final if self.is_lstm else final[0]
        return output, final

    # nn.LSTM keeps states as (directions, B, hidden); the cache keeps everything batch first.
    def _pack_state(self, final):
        if self.is_lstm:
            return {"h": final[0].transpose(0, 1), "c": final[1].transpose(0, 1)}
        return {"h": final.transpose(0, 1)}

    def _unpack_state(self, state, dtype):
        """The cached state as nn.LSTM / nn.GRU take it, in the model's dtype (it may have been cast since)."""
        if state is None:
            return None
        if self.is_lstm:
            return state["h"].transpose(0, 1).to(dtype).contiguous(), state["c"].transpose(0, 1).to(dtype).contiguous()
        return state["h"].transpose(0, 1).to(dtype).contiguous()

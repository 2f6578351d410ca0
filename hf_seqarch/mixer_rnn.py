"""LSTM and GRU mixers: torch's fused nn.LSTM / nn.GRU (cuDNN on GPU, oneDNN on CPU), one per layer.

Padding never enters the state: with a mask, each row's real tokens are packed to the front in order,
run as a packed sequence, and scattered back (pads output zeros), so left, right or holed padding all
give, at the real positions, what each sequence gives alone. One token (decoding), a padded batch while
torch.export records, and everything under torch.func (whose vmap has no rule for the fused layers or cells) run as a
loop of cell steps instead (`_forward_by_cells`; under torch.func the cells written out, `lstm_cell` / `gru_cell`),
held to the fused call by tests.
"""

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from .graph_capture import capturing_graph, transforming
from .mixer_context import real_tokens_first


# The weights of a layer's cell, per direction, as nn.LSTM / nn.GRU name them.
_CELL_WEIGHTS = [
    ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0"),
    ("weight_ih_l0_reverse", "weight_hh_l0_reverse", "bias_ih_l0_reverse", "bias_hh_l0_reverse"),
]


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
        if hidden_states.shape[1] == 1 and not self.bidirectional and self._cell_applies():  # (decoding is causal)
            output, final = self._forward_by_cells(hidden_states, mask, initial)  # one token: see there
        elif (transforming() or mask is not None and torch.compiler.is_exporting()) and self._cell_applies():
            # (torch.func has no rule for the fused layers; export cannot record packing)
            output, final = self._forward_by_cells(hidden_states, mask, initial)
        elif mask is None:
            output, final = self._fused(hidden_states, initial)
        else:
            output, final = self._forward_masked(hidden_states, mask, initial)
        if cache is not None:
            cache.set_state(self.layer_idx, self._pack_state(final))
        return output  # (B, T, width)

    def _fused(self, inputs, initial):
        """The fused nn.LSTM / nn.GRU call on a (B, T, width) tensor or a packed sequence. Under CPU float16 autocast,
        which sends nn.LSTM to a float16 oneDNN LSTM that does not exist (it fails creating its primitive; a packed
        sequence goes there too where all its rows have the same length), the LSTM runs in its weights' dtype."""
        values = inputs.data if isinstance(inputs, PackedSequence) else inputs  # (B, T, width) or (tokens, width)
        cpu_float16 = torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.float16
        if not (self.is_lstm and cpu_float16 and values.device.type == "cpu"):
            return self.rnn(inputs, initial)
        weight = getattr(self.rnn, "weight_ih_l0", None)  # (a quantized layer has none: its input's dtype, then)
        dtype = weight.dtype if isinstance(weight, torch.Tensor) else values.dtype
        with torch.autocast("cpu", enabled=False):
            initial = tuple(part.to(dtype) for part in initial) if initial is not None else None
            return self.rnn(inputs.to(dtype), initial)

    def _cell_applies(self) -> bool:
        """Whether the cell path can read the layer's weights itself. Not for a layer replaced by another kind
        (torch's dynamically quantized LSTM / GRU keep packed int8 weights, no weight_ih_l0), nor for weights on the
        meta device (offloaded by accelerate: only the module's own call loads them), nor where the layer's call runs
        hooks (pruning's and the old weight_norm's recompute the weights in a pre-hook: read directly, they were the
        previous step's; a forward hook would never see decoding)."""
        weight = getattr(self.rnn, "weight_ih_l0", None)
        return isinstance(weight, torch.Tensor) and not weight.is_meta and not has_forward_hooks(self.rnn)

    def _forward_by_cells(self, hidden_states, mask, initial):
        """The layer as a loop of cell steps (torch.lstm_cell / gru_cell on its own weights), one direction after the
        other; at a pad a row keeps its state and outputs zeros. Same weights, same result as the fused call (tests
        hold them together). For one token, where the fused nn.LSTM / nn.GRU call has a fixed cost (about 2 ms in
        oneDNN on CPU) that dominates decoding; for a padded batch while torch.export records (it cannot record the
        packed sequences of `_forward_masked`); and under torch.func, with the cells written out (its vmap has no rule
        for the fused cells)."""
        batch, length, _ = hidden_states.shape
        lstm_step, gru_step = (lstm_cell, gru_cell) if transforming() else (torch.lstm_cell, torch.gru_cell)
        if initial is not None:
            initial = initial if self.is_lstm else (initial,)  # (h, c) or (h,), each (directions, B, hidden)
        outputs, finals = [], []
        for direction in range(2 if self.bidirectional else 1):
            weights = [getattr(self.rnn, name) for name in _CELL_WEIGHTS[direction]]
            if initial is None:
                zeros = hidden_states.new_zeros(batch, self.rnn.hidden_size)
                state = (zeros, zeros) if self.is_lstm else (zeros,)
            else:
                state = tuple(part[direction] for part in initial)  # each (B, hidden)
            steps = [None] * length
            for t in reversed(range(length)) if direction else range(length):
                x = hidden_states[:, t]  # (B, width)
                if self.is_lstm:
                    new_state = lstm_step(x, state, *weights)
                else:
                    new_state = (gru_step(x, state[0], *weights),)
                if mask is None:
                    state, steps[t] = new_state, new_state[0]
                else:
                    keep = mask[:, t, None]  # (B, 1)
                    state = tuple(torch.where(keep, new, old) for new, old in zip(new_state, state))
                    steps[t] = new_state[0] * keep.to(new_state[0].dtype)
            outputs.append(_stack(steps, dim=1))  # (B, T, hidden)
            finals.append(state)
        output = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=-1)  # (B, T, directions * hidden)
        final = tuple(_stack(parts, dim=0) for parts in zip(*finals))  # each (directions, B, hidden)
        return output, final if self.is_lstm else final[0]

    def _forward_masked(self, hidden_states, mask, initial):
        batch, length, width = hidden_states.shape
        lengths = mask.sum(dim=1)  # (B,)
        order = real_tokens_first(mask)  # (B, T)
        gather_index = order[..., None].expand(-1, -1, width)
        packed_rows = hidden_states.gather(1, gather_index)  # (B, T, width), real tokens first
        # pack_padded_sequence refuses empty rows: run one dummy step for them and restore their state below.
        packed = pack_padded_sequence(packed_rows, lengths.clamp(min=1).cpu(), batch_first=True, enforce_sorted=False)
        packed_output, final = self._fused(packed, initial)
        output_rows, _ = pad_packed_sequence(packed_output, batch_first=True, total_length=length)
        output = torch.zeros_like(output_rows).scatter(1, order[..., None].expand_as(output_rows), output_rows)
        output = output * mask[..., None].to(output.dtype)

        empty = lengths == 0
        if capturing_graph() or bool(empty.any()):  # (recorded into a graph: the general path)
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


def has_forward_hooks(module: nn.Module) -> bool:
    """Whether calling `module` runs forward (pre-)hooks: its own, or global ones (nn.modules.module's)."""
    hooks = nn.modules.module
    return bool(module._forward_pre_hooks or module._forward_hooks or hooks._global_forward_pre_hooks
                or hooks._global_forward_hooks)


def lstm_cell(x, state, w_ih, w_hh, b_ih, b_hh):
    """torch.lstm_cell written out: x (B, width), state (h, c) each (B, hidden) -> the new (h, c)."""
    h, c = state
    gates = F.linear(x, w_ih, b_ih) + F.linear(h, w_hh, b_hh)  # (B, 4 * hidden): input, forget, cell, output
    input_gate, forget_gate, cell_gate, output_gate = gates.chunk(4, dim=-1)
    c = torch.sigmoid(forget_gate) * c + torch.sigmoid(input_gate) * torch.tanh(cell_gate)
    return torch.sigmoid(output_gate) * torch.tanh(c), c


def gru_cell(x, h, w_ih, w_hh, b_ih, b_hh):
    """torch.gru_cell written out: x (B, width), h (B, hidden) -> the new h."""
    reset_x, update_x, new_x = F.linear(x, w_ih, b_ih).chunk(3, dim=-1)  # each (B, hidden)
    reset_h, update_h, new_h = F.linear(h, w_hh, b_hh).chunk(3, dim=-1)
    reset, update = torch.sigmoid(reset_x + reset_h), torch.sigmoid(update_x + update_h)
    candidate = torch.tanh(new_x + reset * new_h)
    return (1 - update) * candidate + update * h


def _stack(tensors, dim):
    """torch.stack, as a view where there is one tensor (a decoding step: its copies showed in the time per token)."""
    return tensors[0].unsqueeze(dim) if len(tensors) == 1 else torch.stack(tensors, dim=dim)

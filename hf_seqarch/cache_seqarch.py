"""SeqArchCache: the one cache of a SeqArch model, whatever its mixers.

Per layer it holds a small dict of tensors, batch first, that only that layer's mixer reads and writes:
keys/values for attention (at most `sliding_window` positions for sliding attention), h (and c) for
LSTM/GRU, the conv and SSM state for mamba2, the state matrix for linear attention. The cache also
counts the tokens it has seen, which gives positions (RoPE) and the mask offsets.
"""

import torch


class SeqArchCache:
    """Cache returned by a forward with `use_cache=True`; pass it back as `cache=` (or `past_key_values=`)."""

    is_compileable = False
    # A recurrent state cannot be rolled back to an earlier token. generate() (5.24, on mps) reads this before
    # deciding whether it may run one step ahead and undo it.
    is_croppable = False

    def __init__(self, config=None, num_layers=None):
        if num_layers is None:
            num_layers = config.num_hidden_layers
        self.layers: list[dict[str, torch.Tensor] | None] = [None] * num_layers
        self.seen_tokens = 0

    def __len__(self):
        return len(self.layers)

    # -- what transformers' generate() asks of a cache -------------------------------------------
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    @property
    def is_linear(self) -> list[bool]:
        # generate() only slices the prompt against get_seq_length() for layers reported as non-linear.
        # Every layer here counts its tokens, so slicing is always right.
        return [False] * len(self.layers)

    def reorder_cache(self, beam_idx: torch.LongTensor):
        """Beam search: pick the batch rows `beam_idx` in every state."""
        self._map_states(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int):
        self._map_states(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor):
        self._map_states(lambda t: t[indices])

    # -- what the mixers use -----------------------------------------------------------------------
    def get_state(self, layer_idx: int) -> dict[str, torch.Tensor] | None:
        return self.layers[layer_idx]

    def set_state(self, layer_idx: int, state: dict[str, torch.Tensor]):
        self.layers[layer_idx] = state

    def update_key_value(self, layer_idx: int, key: torch.Tensor, value: torch.Tensor, window: int | None = None):
        """Append this step's keys/values (B, nkv, T, hd); return all of them for this step's attention.

        With a window only the last `window - 1` positions are kept: with the next query itself they
        make exactly the `window` keys it may see.
        """
        state = self.layers[layer_idx]
        if state is not None:
            key = torch.cat([state["key"], key], dim=2)
            value = torch.cat([state["value"], value], dim=2)
        kept_key, kept_value = key, value
        if window is not None and key.shape[2] > window - 1:
            start = key.shape[2] - (window - 1)
            kept_key, kept_value = key[:, :, start:].contiguous(), value[:, :, start:].contiguous()
        self.layers[layer_idx] = {"key": kept_key, "value": kept_value}
        return key, value

    def advance(self, num_tokens: int):
        """Called by the model once all layers have consumed `num_tokens` new positions."""
        self.seen_tokens += num_tokens

    # -- inspection, save and restore --------------------------------------------------------------
    def get_memory_footprint(self) -> int:
        """Bytes held by all cached tensors."""
        return sum(t.numel() * t.element_size() for state in self.layers if state for t in state.values())

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Flat dict of tensors (safetensors-friendly) from which `from_state_dict` rebuilds the cache."""
        tensors = {"seen_tokens": torch.tensor(self.seen_tokens)}
        for i, state in enumerate(self.layers):
            for name, tensor in (state or {}).items():
                tensors[f"layers.{i}.{name}"] = tensor
        return tensors

    @classmethod
    def from_state_dict(cls, tensors: dict[str, torch.Tensor], num_layers: int) -> "SeqArchCache":
        cache = cls(num_layers=num_layers)
        cache.seen_tokens = int(tensors["seen_tokens"])
        for key, tensor in tensors.items():
            if key.startswith("layers."):
                _, index, name = key.split(".", 2)
                if int(index) >= num_layers:
                    raise ValueError(f"Cache state has layer {index} but the model has {num_layers} layers.")
                cache.layers[int(index)] = {**(cache.layers[int(index)] or {}), name: tensor}
        return cache

    def _map_states(self, fn):
        self.layers = [None if s is None else {k: fn(t) for k, t in s.items()} for s in self.layers]

    def __repr__(self):
        return f"SeqArchCache(layers={len(self.layers)}, seen_tokens={self.seen_tokens}, bytes={self.get_memory_footprint()})"

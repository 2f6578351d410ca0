"""SeqArchCache: the one cache of a SeqArch model, whatever its mixers.

Per layer it holds a small dict of tensors, batch first, that only that layer's mixer reads and writes:
keys/values for attention (at most `sliding_window - 1` positions for sliding attention), h (and c) for
LSTM/GRU, the conv and SSM state for mamba2, the state matrix for linear attention. The cache also
counts the tokens it has seen, which gives positions (RoPE) and the mask offsets.
"""

import copy
import json
import operator
import threading

import torch

from .checks_loading_seqarch import is_unaligned
from .graph_capture import capturing_graph

_CLAIMING = threading.Lock()  # held while a forward checks and claims a cache (SeqArchCache.begin_update)

# The tensors each mixer keeps in its layer's state (the names of `state_dict`'s "layers.<i>.<name>").
STATE_NAMES = {
    "attention": {"key", "value"}, "sliding_attention": {"key", "value"}, "lstm": {"h", "c"}, "gru": {"h"},
    "mamba2": {"conv", "ssm"}, "linear_attention": {"state"},
}

# The config fields that shape a mixer's cached state: a cache is valid only for a model that agrees on those of
# its mixers (and on the layers themselves).
STATE_FIELDS = {
    "attention": ("num_key_value_heads", "attention_head_dim"),
    "sliding_attention": ("num_key_value_heads", "attention_head_dim", "sliding_window"),
    "mamba2": ("mamba_state_size", "mamba_head_dim", "mamba_expand", "mamba_conv_kernel", "mamba_n_groups"),
    "linear_attention": ("linear_attention_heads_in_use", "linear_attention_head_dim_in_use"),
}


def state_layout(config) -> dict[str, str]:
    """What shapes the cached states of a model with `config`, each value as a string (safetensors metadata)."""
    names = ["mixer_types", "hidden_size"]
    for mixer in dict.fromkeys(config.mixer_types):
        names += [name for name in STATE_FIELDS.get(mixer, ()) if name not in names]
    # mixer_types as JSON, as stream states saved before these checks hold it
    return {name: json.dumps(list(value)) if name == "mixer_types" else str(value)
            for name, value in ((name, getattr(config, name)) for name in names)}


# The config fields, as set, that state_layout's values follow from (its derived head counts and sizes included).
_LAYOUT_SOURCES = (
    "mixer_types", "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim", "sliding_window",
    "mamba_state_size", "mamba_head_dim", "mamba_expand", "mamba_conv_kernel", "mamba_n_groups",
    "linear_attention_num_heads", "linear_attention_head_dim",
)


def _layout_sources(config) -> tuple:
    """The values of _LAYOUT_SOURCES: equal ones give equal layouts. Read from the instance's dict (a config attribute
    costs microseconds, and this runs at every decode step); a list copied, so that an edit in place shows."""
    values = vars(config)
    return tuple(tuple(value) if isinstance(value := values.get(name), list) else value for name in _LAYOUT_SOURCES)


def _state_shapes(mixer, layout: dict[str, str]) -> dict[str, tuple]:
    """The shape after the batch of each state a `mixer` layer of `layout` (state_layout's) keeps, None for attention's
    positions; {} where the layout does not say (a state saved without one)."""
    size = {name: int(value) for name, value in layout.items() if str(value).isdigit()}  # (mixer_types is JSON)
    try:
        if mixer in ("attention", "sliding_attention"):
            keys = (size["num_key_value_heads"], None, size["attention_head_dim"])
            return {"key": keys, "value": keys}
        if mixer in ("lstm", "gru"):
            return dict.fromkeys(STATE_NAMES[mixer], (1, size["hidden_size"]))  # (one direction: causal)
        if mixer == "mamba2":
            inner = size["mamba_expand"] * size["hidden_size"]
            state, head_dim = size["mamba_state_size"], size["mamba_head_dim"]
            return {"conv": (inner + 2 * size["mamba_n_groups"] * state, size["mamba_conv_kernel"] - 1),
                    "ssm": (inner // head_dim, head_dim, state)}
        if mixer == "linear_attention":
            dim = size["linear_attention_head_dim_in_use"]
            return {"state": (size["linear_attention_heads_in_use"], dim, dim)}
    except KeyError:
        pass
    return {}


def _used_part(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor, or a contiguous copy where it is a view of more (a growing key/value buffer: saved or pickled as it
    is, the buffer's spare room would be written too, and kept alive once loaded)."""
    whole = tensor.is_contiguous() and tensor.untyped_storage().nbytes() == tensor.nbytes
    return tensor if whole else tensor.clone(memory_format=torch.contiguous_format)


def _refuse_other_layout(layout: dict[str, str], config):
    for name, value in state_layout(config).items():
        if layout.get(name) != value:
            raise ValueError(f"This cache was made for a model with {name}={layout.get(name)}; this model has "
                             f"{name}={value}. A cache is only valid for the model that filled it.")


class SeqArchCache:
    """Cache returned by a forward with `use_cache=True`; pass it back as `cache=` (or `past_key_values=`)."""

    is_compileable = False
    # A recurrent state cannot be rolled back to an earlier token. generate() (5.24, on mps) reads this before
    # deciding whether it may run one step ahead and undo it.
    is_croppable = False
    # Reordered by beam search (SeqArchForCausalLM._reorder_cache): its rows are the beams of beam search's last step,
    # not the sequences generate() returns, in their order, so generate() refuses to continue it. (A class default,
    # so that caches pickled before it existed read it unset too.)
    holds_beams = False
    # The layout-shaping config fields of the model checked last (_layout_sources), or None: the next model is checked.
    # (A class default, as holds_beams: a cache pickled before it existed has none.)
    _checked_sources = None
    # Each row's count of the tokens it read as real, (B,) int64, or None while every position of every row was real
    # (no padding read yet). A later mask of the past must agree with it (the model checks). Unknown for a padded
    # cache saved or pickled before the counts existed: not checked then. (Class defaults, as holds_beams.)
    real_tokens = None
    real_tokens_unknown = False

    def __init__(self, config=None, num_layers=None):
        if num_layers is None:
            if config is None:
                raise ValueError("SeqArchCache needs its model's config (or num_layers): SeqArchCache(model.config).")
            num_layers = config.num_hidden_layers
        # The model layout it was made for (None if unknown, or made inside torch.compile, which would break its graph
        # on this Python): a model checks it before reading the cache, unless its config's fields that shape the
        # layout are those checked last. A cache made without one takes the layout of the first model that uses it.
        self.layout = state_layout(config) if config is not None and not torch.compiler.is_compiling() else None
        self._checked_sources = _layout_sources(config) if self.layout is not None else None
        self.layers: list[dict[str, torch.Tensor] | None] = [None] * num_layers
        self.seen_tokens = 0
        # A forward wrote a padded batch into it: attention layers keep the pads' keys, so continuing needs the mask
        # of the past tokens (generate() passes it; a forward without one, and a StreamingSession, are refused).
        self.holds_padding = False  # (holds_beams: a class default, see there)
        # Set while a forward reads its length and its layers read new tokens into it, cleared by advance() (or by
        # cancel_update() for a call refused before its layers ran): still set, a forward raised midway
        # (an interrupt, out of memory) and left some layers past the others, or another forward is updating it now
        # (the same cache in two concurrent or nested calls). Such a cache is refused.
        self.mid_update = False
        # Full-attention layers: (key, value) buffers with spare positions; layers[i] holds views of their used part.
        self._kv_room: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        # Counts the updates (tokens read, rows reordered or selected): what a StreamingSession compares to know
        # whether its last logits still belong to this cache.
        self.changes = 0

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
        """Pick the batch rows `beam_idx` (in that order, repeats allowed) in every state: what beam search does at each
        step, through the model's `_reorder_cache`, which also marks the cache `holds_beams`."""
        beam_idx = self._checked_rows(beam_idx, "reorder_cache")
        self._map_states(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def to(self, device=None, non_blocking: bool = False) -> "SeqArchCache":
        """Move every cached state to `device` (in place; returns the cache), as a model moved with .to(device).
        States already there are left as they are (full attention keeps its spare room). None leaves them where they
        are, as a tensor's .to(None) does (accelerate's model-level offload hook sends None). Only a device: the states
        keep their dtypes (a model reads them in its own; mamba2's and linear attention's stay float32)."""
        if device is None:
            return self
        if isinstance(device, torch.dtype):
            raise TypeError(f"SeqArchCache.to takes a device, got the dtype {device}: the states keep their dtypes (a "
                            "model reads them in its own dtype).")
        device = torch.device(device)
        states = [t for state in self.layers if state for t in state.values()]
        if any(t.device != device for t in states):
            self._map_states(lambda t: t.to(device, non_blocking=non_blocking))
        return self

    def __copy__(self):
        raise TypeError("copy.copy(cache) would share the states that a forward updates in place (attention buffers "
                        "grow in place), so using the copy would change the original: use copy.deepcopy(cache).")

    def batch_repeat_interleave(self, repeats: int):
        try:
            copies = operator.index(repeats)  # (an int, numpy int or 0-d integer tensor)
        except TypeError:
            copies = None
        if copies is None or isinstance(repeats, bool) or copies < 1:
            raise ValueError(f"batch_repeat_interleave takes a number of copies of each row >= 1, got {repeats!r}.")
        self._map_states(lambda t: t.repeat_interleave(copies, dim=0))

    def batch_select_indices(self, indices: torch.Tensor):
        indices = self._checked_rows(indices, "batch_select_indices")
        self._map_states(lambda t: t[indices.to(t.device)])
        # Rows that read every past position as real, picked from a padded batch, hold no pads: a mask of all ones
        # (or none) continues them, which the padded batch's flag would refuse. (Not where their counts are unknown,
        # nor while a graph is recorded: no values are read there.)
        counts = self.real_tokens
        if self.holds_padding and counts is not None and not self.real_tokens_unknown and not capturing_graph():
            if bool((counts == self.seen_tokens).all()):
                self.holds_padding, self.real_tokens = False, None

    def _checked_rows(self, rows, method) -> torch.Tensor:
        """rows (a tensor or list of row indices, 1-D, or a bool mask of the rows) as int64 indices, each in
        [0, batch size) where the cache holds rows (the values read on CPU only: elsewhere that would wait for the
        device at every beam step)."""
        rows = rows if isinstance(rows, torch.Tensor) else torch.as_tensor(rows, dtype=None if len(rows) else torch.long)
        first = self._first_state()
        batch = None if first is None else first.shape[0]
        if rows.dtype == torch.bool and rows.dim() == 1 and batch in (None, len(rows)):
            rows = rows.nonzero()[:, 0]  # (a mask of the rows, as DynamicCache's indexing takes one)
        if rows.dim() != 1 or rows.is_floating_point() or rows.is_complex() or rows.dtype == torch.bool:
            raise ValueError(f"{method} takes a 1-D list of row indices (or a bool mask of the {batch} rows), got "
                             f"{rows.dtype} of shape {tuple(rows.shape)}.")
        readable = rows.device.type == "cpu" and rows.numel()
        if batch is not None and readable and not bool(((rows >= 0) & (rows < batch)).all()):
            raise ValueError(f"{method}: row indices must be in [0, {batch}) (this cache holds {batch} rows), got "
                             f"{rows.tolist()}.")
        return rows.long()

    def __deepcopy__(self, memo):
        """A copy of every state (as the default deepcopy), refused with a clear message where torch's deepcopy would
        fail deep inside: a state that is part of an autograd graph (filled with gradients on)."""
        if any(t.grad_fn is not None for state in self.layers if state for t in state.values()):
            raise RuntimeError(
                "This cache was filled with gradients on: its states are part of an autograd graph, which "
                "copy.deepcopy cannot copy. Fill it under torch.no_grad() (as generate() does) to copy it, or save it "
                "with state_dict() / torch.save."
            )
        copied = self.__class__.__new__(self.__class__)
        memo[id(self)] = copied
        copied.__dict__.update(copy.deepcopy(self.__getstate__(), memo))
        return copied

    def __getstate__(self):
        """Picklable (torch.save, a generate() output holding it), with each state's used part only (full attention's
        spare room was pickled too: a 9 KB cache took 274 KB); the next model to use the unpickled cache is checked
        against its layout again."""
        layers = [None if state is None else {name: _used_part(t) for name, t in state.items()} for state in self.layers]
        return {**self.__dict__, "layers": layers, "_kv_room": {}, "_checked_sources": None}

    def __setstate__(self, state):
        """A cache pickled before the counts of real tokens existed, which read padding: its counts are unknown."""
        self.__dict__.update(state)
        if "real_tokens" not in state and state.get("holds_padding"):
            self.real_tokens_unknown = True

    # -- checks before use --------------------------------------------------------------------------
    def check_usable_by(self, config, batch_size: int | None = None, device: torch.device | None = None):
        """Raise ValueError if this cache was made for a model of another layout, or holds another batch size, or
        (given `device`, the input's) is on another device. Not while torch.compile traces (the checks are Python on
        config values; they ran in eager mode before)."""
        if torch.compiler.is_compiling():
            return
        self.refuse_if_half_updated()
        sources = _layout_sources(config)
        if len(self.layers) != config.num_hidden_layers:
            raise ValueError(f"This cache has {len(self.layers)} layers; the model has {config.num_hidden_layers}. "
                             "A cache is only valid for the model (configuration) that filled it.")
        if self.layout is None:  # made without a config: it takes the layout of the first model that uses it
            self.layout = state_layout(config)
            try:  # (restored without a layout: its states are checked against this one, as from_state_dict does)
                self._refuse_missing_states()
                self._refuse_damaged_states()
            except ValueError:
                self.layout = None  # (not taken: the next call is checked again)
                raise
        elif sources != self._checked_sources:  # (not for each decode step of one model)
            _refuse_other_layout(self.layout, config)
        self._checked_sources = sources  # the next call with the same fields skips the comparison
        first = self._first_state()
        if first is not None and device is not None and first.device != device:
            raise ValueError(f"This cache is on {first.device}; the input is on {device}. Move the cache with the "
                             f"model: cache.to({str(device)!r}).")
        cached = None if first is None else first.shape[0]
        if cached is not None and batch_size is not None and cached != batch_size:
            raise ValueError(f"This cache holds {cached} sequence(s); the input has {batch_size}. Continue each "
                             "cached sequence with one row, or reshape the cache first: batch_repeat_interleave(n) "
                             "for n continuations of each (beam search, num_return_sequences), batch_select_indices "
                             "or reorder_cache to pick rows.")

    # -- what the mixers use -----------------------------------------------------------------------
    def _first_state(self) -> torch.Tensor | None:
        """Any one cached tensor (batch first), or None before any layer has a state."""
        return next((t for state in self.layers if state for t in state.values()), None)

    def get_state(self, layer_idx: int) -> dict[str, torch.Tensor] | None:
        state = self.layers[layer_idx]
        if state is not None and torch.is_grad_enabled() and any(t.is_inference() for t in state.values()):
            # Filled under inference_mode (a StreamingSession, or the caller's): autograd cannot save such tensors
            # for a backward, and the recurrent mixers' ops would. Copies made here are ordinary tensors.
            state = {name: t.clone() for name, t in state.items()}
        return state

    def set_state(self, layer_idx: int, state: dict[str, torch.Tensor]):
        self.layers[layer_idx] = state
        self._kv_room.pop(layer_idx, None)

    def update_key_value(self, layer_idx: int, key: torch.Tensor, value: torch.Tensor, window: int | None = None):
        """Append this step's keys/values (B, nkv, T, hd); return all of them for this step's attention.

        With a window only the last `window - 1` positions are kept: with the next query itself they
        make exactly the `window` keys it may see. Without one, appending goes in place (see _append_in_room)
        unless autograd is on: a graph may hold views of the buffer (the last step's attention saved its keys and
        values), even where these keys need no gradient (a frozen k_proj under LoRA on q and v). Nor while a graph is
        recorded (torch.compile): the buffer's bookkeeping (data pointers, inference-mode flags) would break the
        graph at every layer and step; a compiled step concatenates, as transformers' DynamicCache does.
        """
        state = self.layers[layer_idx]
        if window is None and state is not None and not torch.is_grad_enabled() and not capturing_graph():
            key, value = self._append_in_room(layer_idx, state, key, value)
            self.layers[layer_idx] = {"key": key, "value": value}
            return key, value
        if state is not None:  # (in the model's dtype: the cached keys may be from before a cast)
            key = torch.cat([state["key"].to(key.dtype), key], dim=2)
            value = torch.cat([state["value"].to(value.dtype), value], dim=2)
        self._kv_room.pop(layer_idx, None)  # (a buffer from an earlier step in room: the state is no longer in it)
        kept_key, kept_value = key, value
        if window is not None and key.shape[2] > window - 1:
            start = key.shape[2] - (window - 1)
            kept_key, kept_value = key[:, :, start:].contiguous(), value[:, :, start:].contiguous()
        self.layers[layer_idx] = {"key": kept_key, "value": kept_value}
        return key, value

    def _append_in_room(self, layer_idx, state, key, value):
        """The past keys/values followed by the new ones, as views of buffers with spare positions.

        torch.cat would copy the whole past at every decode step: at 8K tokens that copy was half the cost of
        a step. A buffer instead grows by a quarter (at least 256 positions) when full, so a step copies only
        its own keys and values. Not under autograd (the caller checks): in-place writes would break a graph.
        """
        past, total = state["key"].shape[2], state["key"].shape[2] + key.shape[2]
        room = self._kv_room.get(layer_idx)
        reusable = (
            room is not None
            and room[0].data_ptr() == state["key"].data_ptr()  # the state is still a view of this buffer
            and room[0].shape[2] >= total
            and room[0].dtype == key.dtype
            # made under inference_mode, a buffer can only be written in place under inference_mode
            and (torch.is_inference_mode_enabled() or not room[0].is_inference())
        )
        if not reusable:
            shape = (*key.shape[:2], total + max(256, total // 4), key.shape[3])  # (B, nkv, capacity, hd)
            room = (key.new_empty(shape), value.new_empty(shape))
            room[0][:, :, :past], room[1][:, :, :past] = state["key"], state["value"]
            self._kv_room[layer_idx] = room
        room[0][:, :, past:total], room[1][:, :, past:total] = key, value
        return room[0][:, :, :total], room[1][:, :, :total]

    def refuse_if_half_updated(self):
        if self.mid_update:
            raise ValueError(
                "This cache is mid-update: either a forward using it raised midway (some layers read its last input "
                "and others did not, so it holds no one sequence: start from a fresh cache, or one saved before), or "
                "another forward is updating it right now (the same cache in two concurrent or nested calls: give "
                "each its own, e.g. a copy.deepcopy, which takes a cache filled without gradients: under "
                "torch.no_grad(), as generate() fills it)."
            )

    def begin_update(self):
        """Called by the model before it reads the cache's length (see mid_update); advance() ends the update,
        cancel_update() ends it unused. Refuses a cache that another forward is updating (two threads on one cache)."""
        if not torch.compiler.is_compiling():
            with _CLAIMING:  # the check and the claim as one step: two threads cannot both claim the cache
                self.refuse_if_half_updated()
                self.mid_update = True

    def cancel_update(self):
        """Ends an update begun by begin_update() before any layer read the cache (the call was refused)."""
        if not torch.compiler.is_compiling():
            self.mid_update = False

    def advance(self, num_tokens: int, real: torch.Tensor | None = None):
        """Called by the model once all layers have consumed `num_tokens` new positions, of which `real` (B,) in each
        row were real tokens (None: all of them)."""
        if not isinstance(num_tokens, int) or num_tokens < 0:  # (a recurrent state cannot go back)
            raise ValueError(f"advance takes the number of tokens the layers have read, >= 0, got {num_tokens!r}.")
        if (real is not None or self.real_tokens is not None) and not self.real_tokens_unknown:
            before = self.real_tokens if self.real_tokens is not None else self.seen_tokens
            self.real_tokens = before + (real if real is not None else num_tokens)  # (B,)
        self.seen_tokens += num_tokens
        self.mid_update = False
        self.changes += 1

    # -- inspection, save and restore --------------------------------------------------------------
    def get_memory_footprint(self) -> int:
        """Bytes held by all cached tensors (the used positions: not the spare room of full-attention buffers,
        which grow by a quarter, at least 256 positions, when full)."""
        return sum(t.numel() * t.element_size() for state in self.layers if state for t in state.values())

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Flat dict of tensors (safetensors-friendly) from which `from_state_dict(tensors, num_layers, config)`
        rebuilds the cache."""
        self.refuse_if_half_updated()
        tensors = {"seen_tokens": torch.tensor(self.seen_tokens), "holds_padding": torch.tensor(self.holds_padding)}
        if self.holds_beams:  # (only then: states without it load in earlier versions too)
            tensors["holds_beams"] = torch.tensor(True)
        if self.real_tokens is not None:  # (the same)
            tensors["real_tokens"] = self.real_tokens
        if self.layout is not None:  # its model's layout, as JSON bytes (a dict of tensors holds no strings)
            tensors["layout"] = torch.tensor(list(json.dumps(self.layout).encode()), dtype=torch.uint8)
        for i, state in enumerate(self.layers):
            for name, tensor in (state or {}).items():
                tensors[f"layers.{i}.{name}"] = _used_part(tensor)  # (safetensors takes contiguous tensors only)
        return tensors

    @classmethod
    def from_state_dict(cls, tensors: dict[str, torch.Tensor], num_layers: int | None = None,
                        config=None) -> "SeqArchCache":
        """The cache `state_dict` wrote. Its layout (saved with it) is checked against `config` now if given, else
        against each model that uses it. num_layers: the config's, else the saved layout's, if not given."""
        saved_layout = None
        if "layout" in tensors:
            try:
                saved_layout = json.loads(bytes(tensors["layout"].to(torch.uint8).tolist()).decode())  # (even if cast)
            except ValueError as error:
                raise ValueError(f"This cache state's layout is damaged ({error}): save it again.") from None
        if num_layers is None and config is not None:
            num_layers = config.num_hidden_layers
        elif num_layers is None:
            saved_mixers = (saved_layout or {}).get("mixer_types")
            if saved_mixers is None:
                raise ValueError("This cache state holds no layout: give from_state_dict its model's number of layers "
                                 "(num_layers) or its config.")
            num_layers = len(json.loads(saved_mixers))
        cache = cls(config, num_layers=num_layers)
        seen = tensors.get("seen_tokens")  # (any dtype: a state_dict may have been cast whole)
        if not isinstance(seen, torch.Tensor) or seen.numel() != 1 or not float(seen) >= 0 or float(seen) % 1:
            raise ValueError(f"Not a SeqArchCache state_dict: 'seen_tokens' must hold one integer >= 0, got {seen!r}.")
        exact_below = int(2 / torch.finfo(seen.dtype).eps) if seen.is_floating_point() else None  # 2^(mantissa + 1)
        if exact_below is not None and float(seen) >= exact_below:
            # from there on, the cast may have rounded the count (2049 reads 2048 in float16): attention would number
            # the next token wrongly
            raise ValueError(f"This cache state was cast to {seen.dtype}, which holds token counts exactly only below "
                             f"{exact_below}; 'seen_tokens' reads {float(seen):g}. Save the cache's state_dict without "
                             "casting it.")
        if saved_layout is not None:
            if config is not None:
                _refuse_other_layout(saved_layout, config)
            else:
                cache.layout = saved_layout  # no model yet: nothing checked, so the first user is
        cache.seen_tokens = int(seen)
        cache.holds_padding = bool(tensors.get("holds_padding", False))  # (absent from states saved before it)
        cache.holds_beams = bool(tensors.get("holds_beams", False))  # (written only when set)
        real = tensors.get("real_tokens")  # (the same)
        if real is not None:
            if real.dim() != 1 or real.is_complex() or not bool(((real >= 0) & (real <= cache.seen_tokens)).all()):
                raise ValueError(f"This cache state's 'real_tokens' must be one count in [0, seen_tokens="
                                 f"{cache.seen_tokens}] per row; got {real!r}. Save it again from the cache.")
            cache.real_tokens = real.long()
        elif cache.holds_padding:  # (saved before the counts existed)
            cache.real_tokens_unknown = True
        for key, tensor in tensors.items():
            if key in ("seen_tokens", "holds_padding", "holds_beams", "real_tokens", "layout"):
                continue
            parts = key.split(".", 2)
            if len(parts) != 3 or parts[0] != "layers" or not parts[1].isdigit() or int(parts[1]) >= num_layers:
                raise ValueError(f"Not an entry of a {num_layers}-layer SeqArchCache state_dict: {key!r} (layers are "
                                 f"'layers.<0 to {num_layers - 1}>.<name>').")
            index, name = int(parts[1]), parts[2]
            tensor = tensor.clone() if is_unaligned(tensor) else tensor  # (see there: read from a file, as streams are)
            cache.layers[index] = {**(cache.layers[index] or {}), name: tensor}
        cache._refuse_missing_states()
        cache._refuse_damaged_states()
        return cache

    def _saved_mixers(self) -> list:
        """Each layer's mixer as the saved layout names it (JSON there; another number of layers: check_usable_by),
        None where unknown."""
        saved_mixers = (self.layout or {}).get("mixer_types")
        return json.loads(saved_mixers) if saved_mixers else [None] * len(self.layers)

    def _refuse_missing_states(self):
        """A restored cache holds a state for every layer once it has seen tokens (none before), each with its mixer's
        tensors where the layout is known: a missing one would restart that layer from zeros, silently."""
        for index, (state, mixer) in enumerate(zip(self.layers, self._saved_mixers())):
            expected = STATE_NAMES.get(mixer) if self.seen_tokens else set()
            names = set(state or ())
            if (expected is None and self.seen_tokens and not names) or (expected is not None and names != expected):
                raise ValueError(
                    f"This cache state has {sorted(names) or 'no tensors'} for layer {index}"
                    + (f" ({mixer})" if mixer else "") + f" after {self.seen_tokens} tokens; it needs "
                    + (f"{sorted(expected) or 'none'}" if expected is not None else "its layer's state")
                    + ". Save it again from the cache (state_dict), whole."
                )

    def _refuse_damaged_states(self):
        """A restored state whose tensors cannot be what a forward wrote, where that would give wrong outputs silently:
        cast to integers (truncated), of several batch sizes, or (full attention) keys for another number of positions
        than the tokens seen (sliding attention: the last sliding_window - 1 of them)."""
        window = int(self.layout["sliding_window"]) if "sliding_window" in (self.layout or {}) else None
        batch_sizes = {len(self.real_tokens)} if self.real_tokens is not None else set()
        for index, (state, mixer) in enumerate(zip(self.layers, self._saved_mixers())):
            shapes = _state_shapes(mixer, self.layout or {})  # after the batch; None: attention's positions
            for name, tensor in (state or {}).items():
                where = f"This cache state's layers.{index}.{name}"
                if not tensor.is_floating_point() or tensor.dim() < 2:
                    raise ValueError(f"{where} is a {tensor.dtype} tensor of shape {tuple(tensor.shape)}: a state is "
                                     "floating point, batch first (a cast to integers truncates it). Save it again.")
                batch_sizes.add(tensor.shape[0])
                positions = {"attention": self.seen_tokens, "sliding_attention":
                             min(self.seen_tokens, window - 1) if window else None}.get(mixer)
                wrong_positions = tensor.dim() != 4 or tensor.shape[2] != positions
                if name in ("key", "value") and positions is not None and wrong_positions:
                    raise ValueError(f"{where} has shape {tuple(tensor.shape)}: after {self.seen_tokens} tokens its "
                                     f"{mixer} layer keeps {positions} positions (batch, heads, {positions}, head "
                                     "dim). Save it again from the cache, whole.")
                expected = shapes.get(name)
                actual = tuple(tensor.shape[1:])
                if expected is not None and (len(actual) != len(expected) or any(
                        size is not None and size != got for size, got in zip(expected, actual))):
                    # (another head count once broadcast over the model's heads as the keys were copied: wrong logits)
                    shown = ", ".join("positions" if size is None else str(size) for size in expected)
                    raise ValueError(f"{where} has shape {tuple(tensor.shape)}: {mixer} layers of this cache's layout "
                                     f"keep (batch, {shown}). Save it again from the cache, whole.")
        if len(batch_sizes) > 1:
            raise ValueError(f"This cache state holds rows of several batch sizes {sorted(batch_sizes)}: a cache holds "
                             "one batch. Save it again from the cache, whole.")

    def _map_states(self, fn):
        """fn, on each state tensor's rows (dim 0: the batch) and each row's count of real tokens."""
        self.layers = [None if s is None else {k: fn(t) for k, t in s.items()} for s in self.layers]
        if self.real_tokens is not None:
            self.real_tokens = fn(self.real_tokens)
        self._kv_room.clear()  # the states are new tensors now
        self.changes += 1

    def __repr__(self):
        return f"SeqArchCache(layers={len(self.layers)}, seen_tokens={self.seen_tokens}, bytes={self.get_memory_footprint()})"

"""Streaming: feed an unbounded token stream through a SeqArch model chunk by chunk, one cache throughout.

    session = StreamingSession(model)          # SeqArchForCausalLM -> logits, SeqArchModel -> hidden states
    for chunk in chunks:                       # (B, T_i) token ids, any T_i >= 1
        logits = session.feed(chunk)           # (B, T_i, vocab), as if the whole stream had been one forward
    session.save("stream.safetensors")         # the state, to resume later or in another process
    session = StreamingSession.load(model, "stream.safetensors")
    new_tokens = session.greedy(prompt, max_new_tokens=32)   # fast single-token decode loop

Memory: a recurrent stack (lstm, gru, mamba2, linear_attention) holds the same bytes after 64 or 64M
tokens; sliding attention stops growing at the window; full attention grows by its keys and values
per token. `get_memory_footprint()` reports it.

`step` / `greedy` decode one token at a time without generate()'s per-step machinery (input
preparation, logits processors, stopping criteria, output objects), under `torch.inference_mode`, through
`SingleTokenDecoder`: the model's blocks as plain function calls (LSTM/GRU cells, F.rms_norm, F.linear).
The tests hold it to the model's forward. This is tooling, not model code: it is not exported to the Hub.
"""

import numbers

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..cache_seqarch import SeqArchCache, state_layout
from ..checks_arguments_seqarch import is_integer
from ..checks_generation_seqarch import BEAM_SEARCH_CACHE
from ..checks_loading_seqarch import refuse_head_of_another_vocabulary
from .single_token_decoder import SingleTokenDecoder

_FORMAT = "hf_seqarch.stream/1"


class StreamingSession:
    """A SeqArch model and the one SeqArchCache it carries across the chunks of a stream.

    Args:
        model: a causal `SeqArchForCausalLM` (outputs are logits) or `SeqArchModel` (outputs are the
            final hidden states). Put it in eval mode yourself, as for generate().
        cache: a `SeqArchCache` to continue from (e.g. one returned by a forward or generate() of unpadded rows; one
            that holds padding is refused where attention layers would read it), or None.

    To continue a stream with transformers' generate(), pass it `session.cache` and the ids of the whole stream
    plus the new prompt: generate() feeds only the ids past the cache's length (given just the stream, it would
    feed it all again on top of the cache). `greedy()` needs only the new prompt.

    The session decides which modules its single-token path may call as plain functions (see
    single_token_decoder) when it is built, and again whenever a module of the model was replaced (new embeddings,
    an adapter): hooks added to modules already there are not seen, so add them before. New weights (training,
    loading) are seen at once.
    """

    def __init__(self, model, cache: SeqArchCache | None = None):
        self.base = getattr(model, "model", model)  # the SeqArchModel inside a head, or the model itself
        self.lm_head = getattr(model, "lm_head", None)
        if not hasattr(self.base, "layers") or not hasattr(self.base, "embed_tokens") or (
            self.lm_head is None and hasattr(model, "model")
        ):
            raise ValueError(
                f"StreamingSession needs a SeqArchForCausalLM or a SeqArchModel, got {type(model).__name__}."
            )
        self.model = model
        self.config = model.config
        if self.config.bidirectional:
            raise ValueError("A bidirectional (encoder) model sees the whole sequence at once: it cannot stream.")
        self.cache = cache if cache is not None else SeqArchCache(self.config)
        self._build_decoder()

    @property
    def cache(self) -> SeqArchCache:
        return self._cache

    @cache.setter
    def cache(self, cache: SeqArchCache):
        """The stream's state; set it to continue another (as load() does)."""
        if not isinstance(cache, SeqArchCache):
            raise ValueError(f"cache must be a SeqArchCache, got {type(cache).__name__}.")
        cache.check_usable_by(self.config, device=self.base.input_device)
        self._refuse_uncontinuable_cache(cache)
        # The next-token logits where greedy(None) continues belong to the state that gave them: a new cache starts
        # without any, rather than continuing another stream's.
        self._cache, self._last_logits, self._last_logits_at = cache, None, None

    # -- feeding a stream ---------------------------------------------------------------------------
    @property
    def seen_tokens(self) -> int:
        return self.cache.seen_tokens

    def get_memory_footprint(self) -> int:
        """Bytes held by the stream's state (the cache)."""
        return self.cache.get_memory_footprint()

    def feed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Run the next chunk (B, T) of the stream. Returns logits (B, T, vocab) or hidden states (B, T, width)."""
        input_ids = self._check_ids(input_ids, "input_ids")
        with torch.inference_mode():
            output = self.model(input_ids=input_ids, cache=self.cache, use_cache=True)
        if self.lm_head is None:
            return output.last_hidden_state
        self._remember_logits(output.logits[:, -1].clone())  # (a view would keep all (B, T, vocab) logits alive)
        return output.logits

    def step(self, token_ids: torch.Tensor) -> torch.Tensor:
        """One token per row, (B,) or (B, 1). Returns the next-token logits (B, vocab) or hidden state (B, width)."""
        if isinstance(token_ids, torch.Tensor) and token_ids.dim() == 1:
            token_ids = token_ids[:, None]
        token_ids = self._check_ids(token_ids, "token_ids")
        if token_ids.shape[1] != 1:
            raise ValueError(f"step takes one token per row, got shape {tuple(token_ids.shape)}; use feed for chunks.")
        return self._step(token_ids)

    def greedy(self, input_ids: torch.Tensor | None, max_new_tokens: int) -> torch.LongTensor:
        """Feed `input_ids` (B, T) (None: continue from the last `step`/`greedy`), then pick the argmax token
        `max_new_tokens` times. Returns the new tokens (B, max_new_tokens); the state has consumed all of them."""
        if self.lm_head is None:
            raise ValueError("greedy decoding needs logits: build the session from a SeqArchForCausalLM.")
        if isinstance(max_new_tokens, torch.Tensor) and max_new_tokens.numel() == 1 and is_integer(max_new_tokens):
            max_new_tokens = max_new_tokens.item()  # (a 0-d integer tensor)
        if not isinstance(max_new_tokens, numbers.Integral) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}.")
        max_new_tokens = int(max_new_tokens)
        self._refuse_uncontinuable_cache()
        if input_ids is not None:
            logits = self.feed(input_ids)[:, -1]
        elif self._last_logits is None:
            raise ValueError("Nothing to continue from: pass input_ids (the prompt) to the first greedy call.")
        elif self._last_logits_at != self.cache.changes:
            # A forward, generate() or a reorder of the rows outside the session changed the cache: these logits are
            # of an earlier token, or of other rows.
            raise ValueError(
                "The stream's cache changed since the session's last logits (a forward, generate(), or a reorder or "
                "selection of its rows, outside the session). Pass greedy() the ids that come next (it feeds them "
                "first), or feed through the session only."
            )
        else:
            logits = self._last_logits
        tokens = []
        with torch.inference_mode():
            for _ in range(max_new_tokens):
                token = logits.argmax(-1, keepdim=True)  # (B, 1): ids from the vocab, no range check needed
                tokens.append(token)
                logits = self._step(token)
        return torch.cat(tokens, dim=1)

    def _step(self, token_ids: torch.Tensor) -> torch.Tensor:
        """One unpadded token per row (B, 1) through the single-token decoder; checks only that no step raised midway
        and that the model's config is the one it was built from (the decoder reads it)."""
        self.cache.refuse_if_half_updated()
        self.base.refuse_config_changed_since_built()
        with torch.inference_mode():
            output = self._current_decoder()(token_ids[:, 0], self.cache)  # (B, vocab) or (B, width)
        if self.lm_head is not None:
            self._remember_logits(output)
        return output

    def _current_decoder(self) -> SingleTokenDecoder:
        """The single-token decoder, built again when a module of the model was replaced since (set_input_embeddings,
        resize_token_embeddings with an untied head, an adapter): it calls the module objects it was built from."""
        if tuple(self.model.modules()) != self._decoder_modules:  # (modules compare by identity)
            self._build_decoder()
        return self._decoder

    def _build_decoder(self):
        """The single-token decoder over the model's current modules, and the modules it was built from."""
        self.base, self.lm_head = getattr(self.model, "model", self.model), getattr(self.model, "lm_head", None)
        if self.lm_head is not None:  # (as the forward checks it: the decoder's logits would be of another width)
            refuse_head_of_another_vocabulary(self.model)
        self._decoder = SingleTokenDecoder(self.base, self.lm_head, self.config)
        self._decoder_modules = tuple(self.model.modules())

    def __getstate__(self):
        """Copied (copy.deepcopy) or pickled without the single-token decoder, whose functions call the modules it was
        built from (a deep copy decoded with the original model): the copy builds its own over its own model."""
        return {name: value for name, value in self.__dict__.items() if name not in ("_decoder", "_decoder_modules")}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._build_decoder()

    def _remember_logits(self, logits: torch.Tensor):
        """The next-token logits (B, vocab) where greedy(None) continues, and the cache's change count then."""
        self._last_logits, self._last_logits_at = logits, self.cache.changes

    def _refuse_uncontinuable_cache(self, cache=None):
        """When a cache is set, and at every call (a forward or generate() elsewhere may have filled it since): one
        that holds beam search's beams, or padded positions that attention layers would read."""
        cache = cache if cache is not None else self.cache
        if cache.holds_beams:
            raise ValueError(f"{BEAM_SEARCH_CACHE} Start a session without it and feed it the sequences generate() "
                             "returned.")
        if cache.holds_padding and self.config.has_attention:
            raise ValueError(
                "This cache holds padded positions (it was filled from a padded batch), and its attention layers "
                "keep their keys: the session decodes without a mask and would attend to them. Continue it with "
                "generate() or a forward given the attention_mask of the past tokens too."
            )

    def _check_ids(self, ids, name):
        self._refuse_uncontinuable_cache()
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.shape[1] < 1 or not is_integer(ids):
            shape = f"{tuple(ids.shape)} of {ids.dtype}" if isinstance(ids, torch.Tensor) else type(ids).__name__
            raise ValueError(f"{name} must be an integer tensor (batch, tokens) with at least one token, got {shape}.")
        batch = self._state_batch_size()
        if batch is not None and ids.shape[0] != batch:
            raise ValueError(f"{name} has batch size {ids.shape[0]}, but the stream's state holds {batch} rows.")
        return self.base._checked_token_ids(ids).to(self.base.input_device)  # in range, int32 or int64

    def _state_batch_size(self):
        for state in self.cache.layers:
            for tensor in (state or {}).values():
                return tensor.shape[0]
        return None

    # -- save and restore ---------------------------------------------------------------------------
    def save(self, path: str):
        """Write the stream's state to a safetensors file (with the model's mixer_types, checked on load)."""
        tensors = {name: t.detach().contiguous() for name, t in self.cache.state_dict().items()}
        save_file(tensors, path, metadata=self._fingerprint())

    @classmethod
    def load(cls, model, path: str) -> "StreamingSession":
        """A session of `model` that continues the stream saved at `path`."""
        session = cls(model)  # (checks the model first)
        device = session.base.input_device
        with safe_open(path, framework="pt", device=str(device)) as file:
            metadata = file.metadata() or {}
            tensors = {name: file.get_tensor(name) for name in file.keys()}
        expected = session._fingerprint()
        if metadata.get("format") != _FORMAT:
            raise ValueError(f"{path} is not a saved stream state (format {metadata.get('format')!r}).")
        for key in [key for key in expected if key in metadata]:  # each field that shapes a state (older files: fewer)
            if metadata[key] != expected[key]:
                raise ValueError(
                    f"The stream state in {path} was saved from a model with {key}={metadata[key]}, "
                    f"this model has {key}={expected[key]}."
                )
        session.cache = SeqArchCache.from_state_dict(tensors, model.config.num_hidden_layers, model.config)
        return session

    def _fingerprint(self) -> dict[str, str]:
        return {"format": _FORMAT, "vocab_size": str(self.config.vocab_size), **state_layout(self.config)}

    def __repr__(self):
        return (f"StreamingSession(mixer_types={list(self.config.mixer_types)}, seen_tokens={self.seen_tokens}, "
                f"bytes={self.get_memory_footprint()})")

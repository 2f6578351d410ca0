"""What generate() would get silently wrong with these models, refused before it starts: special ids outside the
vocabulary, assisted decoding (a recurrent state cannot drop rejected draft tokens), and a cache passed in a way
transformers would read twice or not continue."""

import inspect
import numbers

import torch
from transformers import GenerationConfig, GenerationMixin

from .cache_seqarch import SeqArchCache
from .configuration_seqarch import TRANSFORMERS_MAJOR


ASSISTED_DECODING_OPTIONS = ("assistant_model", "prompt_lookup_num_tokens", "assistant_early_exit", "use_mtp")


def generate_arguments(model, args, kwargs):
    """generate(*args, **kwargs)'s arguments by name, its **kwargs options flat among them."""
    arguments = inspect.signature(GenerationMixin.generate).bind_partial(model, *args, **kwargs).arguments
    return {**arguments.pop("kwargs", {}), **arguments}


def generation_option(model, arguments, name):
    """The value of a generation option generate() will use: the argument (None too: generate() sets what its keyword
    arguments name), else the generation config passed, unless it leaves the option at its default (transformers then
    takes the model's generation config's, but with use_model_defaults=False), else the model's."""
    if name in arguments:
        return arguments[name]
    default = getattr(GenerationConfig(), name, None)
    passed_config = arguments.get("generation_config")
    passed = getattr(passed_config, name, None)
    own_defaults_off = passed_config is not None and arguments.get("use_model_defaults") is False
    if (passed is not None and passed != default) or own_defaults_off:
        return passed
    own = getattr(model.generation_config, name, None)
    return own if own is not None else default


def refuse_special_ids_out_of_range(model, arguments):
    """generate()'s pad, eos and bos ids (its arguments, else the generation config's) are token ids the model has:
    an eos it cannot produce never stops generation, and a pad it cannot read, fed back for a finished row, failed
    with the forward's message about the caller's token ids; bos starts generation without a prompt. (The config
    refuses them; these may differ from it.)"""
    vocab_size = model.config.vocab_size
    prompted = any(arguments.get(name) is not None for name in ("inputs", "input_ids", "inputs_embeds"))
    for name in ("pad_token_id", "eos_token_id") + (() if prompted else ("bos_token_id",)):
        value = generation_option(model, arguments, name)
        if value is None:
            continue
        ids = value.flatten().tolist() if isinstance(value, torch.Tensor) else value
        ids = ids if isinstance(ids, (list, tuple)) else [ids]
        if not all(isinstance(i, numbers.Integral) and not isinstance(i, bool) and 0 <= i < vocab_size for i in ids):
            raise ValueError(f"generate(): {name} must be token id(s) in [0, vocab_size={vocab_size}), got {value!r}.")


def refuse_assisted_decoding(model, arguments):
    """Assisted decoding (a draft model, prompt lookup, early exit, multi-token prediction) drafts tokens and then
    drops the rejected ones from the main model's cache and the draft model's. A recurrent state cannot drop tokens
    once read, so SeqArchCache cannot, on either side; transformers would fail later with an error about a missing
    cache or method. Options are read as generate() will (generation_option): one set in the model's generation
    config counts too, when the config passed leaves it at its default."""
    asked = [name for name in ASSISTED_DECODING_OPTIONS
             if (value := generation_option(model, arguments, name)) is not None and value is not False]  # (0 asks)
    if asked:
        raise ValueError(
            f"Assisted decoding ({', '.join(asked)}) is not supported by hf_seqarch models: it drops rejected draft "
            "tokens from the cache, and recurrent states (LSTM, GRU, Mamba-2, linear attention) cannot be rolled "
            "back. Use greedy search, sampling or beam search."
        )
    if generation_option(model, arguments, "is_assistant"):
        raise ValueError(
            "hf_seqarch models cannot be the assistant (draft) model of assisted decoding: after each round the "
            "draft tokens the main model rejects are dropped from the assistant's cache, and recurrent states (LSTM, "
            "GRU, Mamba-2, linear attention) cannot be rolled back. Generate without assistant_model, or draft with a "
            "model whose cache can be cropped."
        )


BEAM_SEARCH_CACHE = ("This cache comes from beam search: it holds the beams of its last step, not the sequences "
                     "generate() returned, in their order, so continuing it would continue other sequences.")


def refuse_cache_misuse(model, arguments, cache, use_cache, chunked_prefill):
    """What transformers' generate() would get silently wrong (or fail on deep inside) with these models."""
    ids = arguments.get("inputs") if arguments.get("inputs") is not None else arguments.get("input_ids")
    embeds = arguments.get("inputs_embeds") is not None  # (transformers then always decodes with a cache)
    if isinstance(cache, SeqArchCache) and cache.holds_beams:
        raise ValueError(f"{BEAM_SEARCH_CACHE} Pass the returned sequences without a cache (or generate without beams "
                         "to continue a cache).")
    if cache is not None and use_cache is False and not embeds:
        raise ValueError("generate() was given a cache, and use_cache is False (passed, or in the model's "
                         "generation_config): without a cache, generate() feeds the whole sequence at every step, "
                         "which the cache would read again on top of what it holds. Pass use_cache=True, or no cache.")
    for name, prompt, rank in (("input_ids", ids, 2), ("inputs_embeds", arguments.get("inputs_embeds"), 3)):
        if not (isinstance(cache, SeqArchCache) and isinstance(prompt, torch.Tensor) and prompt.dim() == rank):
            continue
        if 0 < prompt.shape[1] <= cache.get_seq_length():
            raise ValueError(f"The cache holds {cache.get_seq_length()} tokens and {name} has {prompt.shape[1]} "
                             "positions: generate() feeds only the positions past the cache's length, so pass the "
                             "whole sequence so far (what the cache has read, then at least one new position).")
    if chunked_prefill and embeds:
        raise ValueError("prefill_chunk_size does not work with inputs_embeds (transformers splits the prompt's "
                         "input_ids into chunks): pass input_ids, or drop prefill_chunk_size.")
    if chunked_prefill and TRANSFORMERS_MAJOR < 5 and isinstance(cache, SeqArchCache) and cache.get_seq_length() > 0:
        # transformers 4.x's chunked prefill feeds the prompt from position 0: the cache would read its tokens again.
        raise ValueError(f"On transformers 4.x, prefill_chunk_size restarts the prompt at position 0, so it cannot "
                         f"continue a cache that holds tokens ({cache.get_seq_length()} here): its states would read "
                         "them again. Continue without prefill_chunk_size, or upgrade to transformers 5.")
    if chunked_prefill and TRANSFORMERS_MAJOR < 5 and model.config.has_attention and _padded(model, arguments, ids):
        # transformers 4.x's chunked prefill numbers the positions without the mask: padded rows get shifted RoPE.
        raise ValueError("On transformers 4.x, prefill_chunk_size with a padded batch gives attention layers wrong "
                         "positions; upgrade to transformers 5, or generate without prefill_chunk_size.")


def _padded(model, arguments, ids) -> bool:
    """Whether generate() will see padding: zeros in the mask passed, or without one, as transformers makes it, the
    pad token (when it is not also the end-of-sequence token) among the ids."""
    mask = arguments.get("attention_mask")
    if mask is not None:
        return not bool(mask.all())
    pad, eos = (generation_option(model, arguments, name) for name in ("pad_token_id", "eos_token_id"))
    if pad is None or not isinstance(ids, torch.Tensor) or pad in (eos if isinstance(eos, list) else [eos]):
        return False
    return bool((ids == pad).any())

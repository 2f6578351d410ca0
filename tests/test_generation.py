"""generate() and the cache, for every stack in STACKS (each mixer alone and the hybrids).

Models are built with initializer_range=0.3 instead of 0.02: that spreads the logits, so greedy and beam
picks are far from ties and the generated tokens vary, which makes token equality a real check.
"""

import pickle

import pytest
import torch
import transformers
from transformers import GenerationConfig

from hf_seqarch import SeqArchCache, SeqArchForCausalLM, StreamingSession
from hf_seqarch.configuration_seqarch import ATTENTION_MIXERS, RECURRENT_MIXERS
from hf_seqarch.modeling_seqarch import CACHE_FIELD
from tester import STACKS, VOCAB, random_ids, tiny_model

stack_params = pytest.mark.parametrize("stack", list(STACKS), ids=list(STACKS))
TRANSFORMERS_MAJOR = int(transformers.__version__.split(".")[0])
NEW = dict(max_new_tokens=6, min_new_tokens=6, pad_token_id=0)


def causal_lm(stack):
    return tiny_model(SeqArchForCausalLM, STACKS[stack], initializer_range=0.3)


def output_cache(output):
    """The cache of a model output or generate() result: `cache` on transformers >= 5.24, else `past_key_values`."""
    return output.cache if "cache" in output else output.past_key_values


@stack_params
def test_greedy_with_cache_equals_without(stack):
    model = causal_lm(stack)
    ids = random_ids(2, 5)
    cached = model.generate(ids, do_sample=False, use_cache=True, return_dict_in_generate=True, **NEW)
    uncached = model.generate(ids, do_sample=False, use_cache=False, **NEW)
    torch.testing.assert_close(cached.sequences, uncached, rtol=0, atol=0)
    cache = output_cache(cached)
    assert isinstance(cache, SeqArchCache)
    assert cache.get_seq_length() == 5 + NEW["max_new_tokens"] - 1  # the last token is returned, not yet fed


@stack_params
def test_seeded_sampling_runs_and_matches_without_cache(stack):
    model = causal_lm(stack)
    ids = random_ids(2, 4)
    runs = []
    for use_cache in (True, True, False):
        torch.manual_seed(123)
        runs.append(model.generate(ids, do_sample=True, top_k=0, temperature=1.5, use_cache=use_cache, **NEW))
    assert runs[0].shape == (2, 4 + NEW["max_new_tokens"])
    assert int(runs[0].min()) >= 0 and int(runs[0].max()) < VOCAB
    torch.testing.assert_close(runs[0], runs[1], rtol=0, atol=0)  # the seed fixes the sample
    torch.testing.assert_close(runs[0], runs[2], rtol=0, atol=0)


@stack_params
def test_beam_search_with_cache_equals_without(stack):
    model = causal_lm(stack)
    ids = random_ids(2, 4)
    beams = dict(num_beams=3, num_return_sequences=3, do_sample=False, **NEW)
    cached = model.generate(ids, use_cache=True, **beams)
    uncached = model.generate(ids, use_cache=False, **beams)
    assert cached.shape == (2 * 3, 4 + NEW["max_new_tokens"])
    torch.testing.assert_close(cached, uncached, rtol=0, atol=0)
    torch.testing.assert_close(cached[:, :4], ids.repeat_interleave(3, dim=0), rtol=0, atol=0)


@stack_params
def test_chunks_of_varying_sizes_equal_one_forward(stack):
    # Chunks shorter and longer than the sliding window (3) and the scan chunk size (4), single tokens between.
    model = causal_lm(stack)
    ids = random_ids(2, 30)
    full = model(input_ids=ids).logits
    cache, pieces, start = SeqArchCache(model.config), [], 0
    for size in (1, 6, 2, 11, 1, 9):
        pieces.append(model(input_ids=ids[:, start : start + size], cache=cache, use_cache=True).logits)
        start += size
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-5, atol=1e-5)
    assert cache.get_seq_length() == 30


@stack_params
def test_left_padded_batch_generates_like_each_prompt_alone(stack):
    model = causal_lm(stack)
    prompts = [random_ids(1, n, seed=10 + i)[0] for i, n in enumerate((6, 3, 4))]
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :], mask[row, width - len(prompt) :] = prompt, 1
    batched = model.generate(ids, attention_mask=mask, do_sample=False, **NEW)
    # Prefilled in chunks of 2: the shorter prompts' first chunk is all padding (a row with no token yet).
    # transformers 4.x's chunked prefill numbers positions without the mask (LlamaForCausalLM's too): refused there
    # for stacks with attention, whose RoPE positions it would shift.
    if TRANSFORMERS_MAJOR < 5 and model.config.has_attention:
        with pytest.raises(ValueError, match="On transformers 4.x, prefill_chunk_size with a padded batch"):
            model.generate(ids, attention_mask=mask, do_sample=False, prefill_chunk_size=2, **NEW)
    else:
        chunked = model.generate(ids, attention_mask=mask, do_sample=False, prefill_chunk_size=2,
                                 **{CACHE_FIELD: SeqArchCache(model.config)}, **NEW)
        torch.testing.assert_close(chunked, batched, rtol=0, atol=0)
        # without a cache passed: the model gives chunked prefill one (transformers makes none for it)
        chunked = model.generate(ids, attention_mask=mask, do_sample=False, prefill_chunk_size=2, **NEW)
        torch.testing.assert_close(chunked, batched, rtol=0, atol=0)
    for row, prompt in enumerate(prompts):
        alone = model.generate(prompt[None], do_sample=False, **NEW)
        torch.testing.assert_close(batched[row, width:], alone[0, len(prompt) :], rtol=0, atol=0)


@pytest.mark.parametrize("stack", ["attention", "gru+sliding+attention", "mamba2+attention"])
def test_a_padded_cache_continues_between_forward_and_generate(stack):
    """forward() numbered a padded row's tokens by slot (pads counted), generate() from the mask: a cache filled by one
    and continued by the other shifted the padded row's rotary distances by its pads (other tokens, silently; so does
    LlamaForCausalLM). forward now numbers them from the mask as well."""
    model = causal_lm(stack)
    ids = random_ids(2, 8)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # three left pads
    cache = SeqArchCache(model.config)
    model(ids[:, :-1], attention_mask=mask[:, :-1], **{CACHE_FIELD: cache}, use_cache=True)
    continued = model.generate(ids, attention_mask=mask, do_sample=False, **{CACHE_FIELD: cache}, **NEW)
    torch.testing.assert_close(continued[1, 8:], model.generate(ids[1:, 3:], do_sample=False, **NEW)[0, 5:], rtol=0,
                               atol=0)

    cache = SeqArchCache(model.config)
    generated = model.generate(ids, attention_mask=mask, do_sample=False, **{CACHE_FIELD: cache}, **NEW)
    whole_mask = torch.cat([mask, torch.ones_like(generated[:, 8:])], 1)
    stepped = model(generated[:, -1:], attention_mask=whole_mask, **{CACHE_FIELD: cache}).logits[:, -1]
    torch.testing.assert_close(stepped[1], model(generated[1:, 3:]).logits[0, -1])


def test_attention_skips_holes_in_the_rotary_positions():
    """A row with pads between its tokens (holes) gives, at its real tokens, what those tokens give alone: without
    position_ids, forward numbers the real tokens only."""
    model = causal_lm("attention")
    ids = random_ids(1, 8)
    mask = torch.tensor([[1, 1, 0, 0, 1, 1, 0, 1]])
    got = model(ids, attention_mask=mask).logits[mask.bool()]
    torch.testing.assert_close(got, model(ids[mask.bool()][None]).logits[0])


def _footprints(model, lengths, chunk=1024):
    """Footprint of the stream's state after each length in `lengths` (increasing), fed in chunks."""
    session, ids, result = StreamingSession(model), random_ids(1, max(lengths)), {}
    # One thread: oneDNN's LSTM synchronises its threads at every time step, and on a busy 2-core machine
    # 8192 steps took 40 s with two threads against 0.05 s with one. What is measured does not change.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for length in lengths:
            while session.seen_tokens < length:
                session.feed(ids[:, session.seen_tokens : min(length, session.seen_tokens + chunk)])
            result[length] = session.get_memory_footprint()
    finally:
        torch.set_num_threads(threads)
    return result


@stack_params
def test_memory_footprint_follows_the_mixers(stack):
    mixers = STACKS[stack]
    # Scan chunks of 64 instead of the tester's 4: the state's size does not depend on them, the time to 8192 does.
    model = tiny_model(SeqArchForCausalLM, mixers, mamba_chunk_size=64, linear_attention_chunk_size=64)
    if "attention" in mixers:  # full attention keeps the keys and values of every token
        size = _footprints(model, [16, 32, 48])
        assert size[32] - size[16] == size[48] - size[32] > 0
        return
    size = _footprints(model, [1, 64, 8192])  # window 3: the sliding layers fill up after 2 tokens
    assert size[64] == size[8192] > 0
    if all(m in RECURRENT_MIXERS for m in mixers):
        assert size[1] == size[64]  # a recurrent state has its full size from the first token
    else:
        assert any(m in ATTENTION_MIXERS for m in mixers) and size[1] < size[64]


def test_attention_decode_appends_in_place_and_autograd_still_works():
    model = causal_lm("attention")
    ids = random_ids(2, 12)
    with torch.no_grad():
        cache = SeqArchCache(model.config)
        model(input_ids=ids[:, :8], cache=cache, use_cache=True)
        model(input_ids=ids[:, 8:9], cache=cache, use_cache=True)  # the first append moves the keys to a roomy buffer
        where = cache.get_state(0)["key"].data_ptr()
        stepped = [model(input_ids=ids[:, i : i + 1], cache=cache, use_cache=True).logits for i in range(9, 12)]
        assert cache.get_state(0)["key"].data_ptr() == where  # later steps wrote in place: the past was not copied
        torch.testing.assert_close(torch.cat(stepped, 1), model(input_ids=ids).logits[:, 9:], rtol=1e-5, atol=1e-5)
    key_heads, head_dim = model.config.num_key_value_heads, model.config.attention_head_dim
    assert cache.get_memory_footprint() == 2 * (2 * key_heads * 12 * head_dim * 4)  # keys + values of 12 tokens
    # With autograd the cache appends by copy (in-place writes would corrupt the graph): same gradients as one forward.
    grads = []
    for chunks in ([(0, 12)], [(0, 5), (5, 6), (6, 12)]):
        model.zero_grad()
        cache = SeqArchCache(model.config)
        logits = torch.cat([model(input_ids=ids[:, a:b], cache=cache, use_cache=True).logits for a, b in chunks], 1)
        logits.pow(2).mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for full, chunked in zip(*grads):
        torch.testing.assert_close(chunked, full, rtol=1e-4, atol=1e-6)


def test_a_step_that_concatenates_lets_go_of_the_spare_room():
    """A step with autograd on (or compiled) concatenates the keys instead of writing them in the spare room that an
    earlier no-grad step made: the room stayed referenced by the cache, uncounted by its footprint (2.25x at 2,000
    tokens), until a later no-grad step replaced it."""
    model = causal_lm("attention")
    ids = random_ids(1, 12)
    cache = SeqArchCache(model.config)
    with torch.no_grad():
        model(input_ids=ids[:, :8], cache=cache, use_cache=True)
        model(input_ids=ids[:, 8:9], cache=cache, use_cache=True)  # into a roomy buffer
    model(input_ids=ids[:, 9:10], cache=cache, use_cache=True)  # autograd on: concatenated
    held = {id(t.untyped_storage()): t.untyped_storage().nbytes() for t in cache.get_state(0).values()}
    room = cache._kv_room.get(0, ())
    assert all(t.data_ptr() in {s.data_ptr() for s in cache.get_state(0).values()} for t in room)
    assert sum(held.values()) == cache.get_memory_footprint()


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_chunks_through_a_cache_train_with_frozen_keys(attn_implementation):
    """Only q_proj and v_proj trainable (LoRA's default targets): the keys need no gradient, yet the last chunk's
    attention saved views of the cached keys and values, which an in-place append would break."""
    model = tiny_model(SeqArchForCausalLM, ["attention"], initializer_range=0.3, attn_implementation=attn_implementation,
                       num_key_value_heads=4)  # no grouped-query repeat: eager attention saves the cached keys themselves
    trained = [p for name, p in model.named_parameters() if name.endswith(("q_proj.weight", "v_proj.weight"))]
    for p in model.parameters():
        p.requires_grad_(any(p is t for t in trained))
    ids = random_ids(2, 12)
    grads = []
    for chunks in ([(0, 12)], [(0, 5), (5, 6), (6, 12)]):
        cache = SeqArchCache(model.config)
        logits = torch.cat([model(input_ids=ids[:, a:b], cache=cache, use_cache=True).logits for a, b in chunks], 1)
        grads.append(torch.autograd.grad(logits.pow(2).mean(), trained))
    for full, chunked in zip(*grads):
        torch.testing.assert_close(chunked, full, rtol=1e-4, atol=1e-6)


@stack_params
def test_reorder_cache_serves_beam_search(stack):
    model = causal_lm(stack)
    ids, next_ids = random_ids(3, 7), random_ids(3, 1, seed=4)
    beam_idx = torch.tensor([2, 0, 0])
    cache = output_cache(model(input_ids=ids, use_cache=True))
    cache.reorder_cache(beam_idx)
    stepped = model(input_ids=next_ids, cache=cache, use_cache=True).logits[:, -1]
    expected = model(input_ids=torch.cat([ids[beam_idx], next_ids], dim=1)).logits[:, -1]
    torch.testing.assert_close(stepped, expected, rtol=1e-5, atol=1e-5)


@stack_params
@pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")
def test_cache_passed_as_past_key_values_works_as_cache(stack):
    model = causal_lm(stack)
    ids = random_ids(2, 9)
    cache = SeqArchCache(model.config)
    first = model(input_ids=ids[:, :5], past_key_values=cache, use_cache=True)
    assert output_cache(first) is cache and cache.get_seq_length() == 5
    second = model(input_ids=ids[:, 5:], cache=cache, use_cache=True)
    torch.testing.assert_close(torch.cat([first.logits, second.logits], 1), model(input_ids=ids).logits,
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="not both"):
        model(input_ids=ids[:, :1], cache=cache, past_key_values=SeqArchCache(model.config))
    # generate() too: transformers 5.24 takes cache= and maps past_key_values= to it; earlier releases
    # know only past_key_values= (cache= is theirs from 5.24 on).
    expected = model.generate(ids, do_sample=False, **NEW)
    for name in {"past_key_values", CACHE_FIELD}:
        prefilled = SeqArchCache(model.config)
        model(input_ids=ids[:, :-1], cache=prefilled, use_cache=True)
        torch.testing.assert_close(model.generate(ids, do_sample=False, **{name: prefilled}, **NEW), expected, rtol=0, atol=0)
        assert prefilled.get_seq_length() == 9 + NEW["max_new_tokens"] - 1


@stack_params
def test_generate_continues_a_user_cache(stack):
    model = causal_lm(stack)
    cache = SeqArchCache(model.config)
    first = model.generate(random_ids(1, 6, seed=5), do_sample=False, **{CACHE_FIELD: cache}, **NEW)
    assert cache.get_seq_length() == first.shape[1] - 1
    follow_up = torch.cat([first, random_ids(1, 3, seed=9)], dim=1)  # the conversation goes on
    # An explicit mask: without one, generate() would take a generated pad_token_id (0) for padding.
    mask = torch.ones_like(follow_up)
    continued = model.generate(follow_up, attention_mask=mask, do_sample=False, **{CACHE_FIELD: cache}, **NEW)
    from_scratch = model.generate(follow_up, attention_mask=mask, do_sample=False, **NEW)
    torch.testing.assert_close(continued, from_scratch, rtol=0, atol=0)
    assert cache.get_seq_length() == from_scratch.shape[1] - 1


def test_generate_refuses_what_it_would_get_silently_wrong_with_a_cache():
    model = causal_lm("mamba2+attention")
    ids = random_ids(2, 6)
    cache = SeqArchCache(model.config)
    # Without a cache generate() feeds the whole sequence at each step: the cache read it again every time.
    with pytest.raises(ValueError, match="a cache, and use_cache is False"):
        model.generate(ids, use_cache=False, do_sample=False, **{CACHE_FIELD: cache}, **NEW)
    # A cache holding all of ids: generate() would feed them again (transformers 4.x failed inside itself).
    model(input_ids=ids, cache=cache, use_cache=True)
    with pytest.raises(ValueError, match="The cache holds 6 tokens and input_ids has 6"):
        model.generate(ids, do_sample=False, **{CACHE_FIELD: cache}, **NEW)
    # ... or given as embeddings of the new positions only: transformers fed them at wrong positions, or dropped some
    with pytest.raises(ValueError, match="The cache holds 6 tokens and inputs_embeds has 2 positions"):
        model.generate(inputs_embeds=model.get_input_embeddings()(ids[:, :2]), do_sample=False,
                       **{CACHE_FIELD: cache}, **NEW)
    # transformers splits input_ids into prefill chunks, which are empty for a prompt given as embeddings
    with pytest.raises(ValueError, match="prefill_chunk_size does not work with inputs_embeds"):
        model.generate(inputs_embeds=model.get_input_embeddings()(ids), prefill_chunk_size=2, do_sample=False, **NEW)
    # use_cache=False from the model's generation config, with a generation config passed that leaves it unset:
    # transformers fills it from the model's, and the refusal once read only the config passed.
    model.generation_config.use_cache = False
    with pytest.raises(ValueError, match="a cache, and use_cache is False"):
        model.generate(ids, generation_config=GenerationConfig(do_sample=False, **NEW),
                       **{CACHE_FIELD: SeqArchCache(model.config)})
    # ... and the valid calls still pass: use_cache=True given, and a prompt as embeddings (always decoded cached)
    model.generate(ids, use_cache=True, do_sample=False, **{CACHE_FIELD: SeqArchCache(model.config)}, **NEW)
    model.generate(inputs_embeds=model.get_input_embeddings()(ids), do_sample=False,
                   **{CACHE_FIELD: SeqArchCache(model.config)}, **NEW)


@pytest.mark.parametrize("stack", ["lstm", "lstm+attention"])
def test_chunked_prefill_continuing_a_cache(stack):
    """transformers 5 continues a cache that holds tokens in chunks, as without them. 4.x's chunked prefill (greedy
    search and sampling only) restarts at position 0: the states read the cached tokens again, and the call then failed
    on a mask of the wrong shape, the cache left damaged. Refused there before the cache is touched; beam search, which
    4.x does not chunk, continues it."""
    model = causal_lm(stack)
    ids = random_ids(1, 9)

    def cache_of_4():
        return getattr(model(input_ids=ids[:, :4], use_cache=True), CACHE_FIELD)

    beams = dict(num_beams=2, do_sample=False, **NEW)
    beam_cache = cache_of_4()
    beam_cache.batch_repeat_interleave(2)  # a row per beam
    assert torch.equal(model.generate(ids, cache=beam_cache, prefill_chunk_size=2, **beams),
                       model.generate(ids, **beams))
    cache = cache_of_4()
    if TRANSFORMERS_MAJOR < 5:
        with pytest.raises(ValueError, match="On transformers 4.x, prefill_chunk_size restarts the prompt"):
            model.generate(ids, cache=cache, prefill_chunk_size=2, do_sample=False, **NEW)
        assert cache.get_seq_length() == 4
        return
    chunked = model.generate(ids, cache=cache, prefill_chunk_size=2, do_sample=False, **NEW)
    assert torch.equal(chunked, model.generate(ids, do_sample=False, **NEW))


@pytest.mark.skipif(TRANSFORMERS_MAJOR >= 5, reason="transformers 5 numbers chunked prefill's positions with the mask")
def test_padded_chunked_prefill_through_attention_is_refused_on_transformers_4_without_a_mask_too():
    """transformers 4.x makes the mask from the pad ids when none is passed: the padding was then not seen."""
    model = causal_lm("lstm+attention")
    ids = random_ids(2, 6)
    ids[1, :2] = 0  # left padding with pad_token_id=0 (NEW)
    with pytest.raises(ValueError, match="On transformers 4.x, prefill_chunk_size with a padded batch"):
        model.generate(ids, do_sample=False, prefill_chunk_size=2, **NEW)


def test_a_cache_from_beam_search_is_not_continued():
    """Beam search leaves the cache holding its last step's beams, not the returned sequences in their order: with as
    many sequences returned as beams, continuing it generated from other sequences (0 of 8 seeds matched a fresh run;
    Llama's DynamicCache the same), silently."""
    model = causal_lm("lstm+attention")
    ids = random_ids(1, 4)
    out = model.generate(ids, num_beams=2, num_return_sequences=2, do_sample=False, max_new_tokens=3, pad_token_id=0,
                         return_dict_in_generate=True)
    cache = getattr(out, CACHE_FIELD)
    assert cache.holds_beams
    restored = SeqArchCache.from_state_dict(cache.state_dict(), num_layers=2)
    for held in (cache, restored):
        with pytest.raises(ValueError, match="This cache comes from beam search"):
            model.generate(out.sequences, cache=held, max_new_tokens=2, do_sample=False, pad_token_id=0)
    greedy = getattr(model.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=0,
                                    return_dict_in_generate=True), CACHE_FIELD)
    assert not greedy.holds_beams
    assert "holds_beams" not in greedy.state_dict()  # (written only when set: earlier versions load the rest)


def test_rows_picked_with_reorder_cache_continue_in_generate():
    """reorder_cache picking rows (as the batch-size error suggests) is not beam search: generate() continues such a
    cache (it was refused as beam search's), as a fresh run of those rows. A cache pickled before holds_beams existed
    reads it as unset."""
    model = causal_lm("lstm+attention")
    ids, pick = random_ids(3, 5), torch.tensor([2, 0])
    cache = getattr(model(input_ids=ids[:, :-1], use_cache=True), CACHE_FIELD)
    cache.reorder_cache(pick)
    assert not cache.holds_beams
    continued = model.generate(ids[pick], cache=cache, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert torch.equal(continued, model.generate(ids[pick], max_new_tokens=3, do_sample=False, pad_token_id=0))
    old = getattr(model(input_ids=ids[:, :-1], use_cache=True), CACHE_FIELD)
    vars(old).pop("holds_beams", None)  # as unpickled from an earlier version (none set on the instance)
    old = pickle.loads(pickle.dumps(old))
    assert not old.holds_beams and "holds_beams" not in old.state_dict()
    assert torch.equal(model.generate(ids, cache=old, max_new_tokens=3, do_sample=False, pad_token_id=0),
                       model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0))

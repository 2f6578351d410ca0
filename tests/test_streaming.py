"""StreamingSession: chunked feeding, the single-token decode path, save and restore, for every stack."""

import copy
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from hf_seqarch import (
    SeqArchCache,
    SeqArchForCausalLM,
    SeqArchForSequenceClassification,
    SeqArchModel,
    StreamingSession,
)
from hf_seqarch.modeling_seqarch import CACHE_FIELD
from tester import STACKS, VOCAB, random_ids, tiny_model

stack_params = pytest.mark.parametrize("stack", list(STACKS), ids=list(STACKS))


def causal_lm(stack):
    return tiny_model(SeqArchForCausalLM, STACKS[stack], initializer_range=0.3)


@stack_params
@pytest.mark.parametrize("head", [SeqArchForCausalLM, SeqArchModel], ids=["logits", "hidden"])
def test_feeding_chunks_equals_one_forward(stack, head):
    model = tiny_model(head, STACKS[stack], initializer_range=0.3)
    ids = random_ids(2, 21)
    full = model(input_ids=ids)
    full = full.logits if head is SeqArchForCausalLM else full.last_hidden_state
    session, outputs, start = StreamingSession(model), [], 0
    for size in (5, 1, 8, 7):
        outputs.append(session.feed(ids[:, start : start + size]))
        start += size
    torch.testing.assert_close(torch.cat(outputs, dim=1), full, rtol=1e-5, atol=1e-5)
    assert session.seen_tokens == 21


@stack_params
def test_step_path_equals_forward_and_greedy_equals_generate(stack):
    model = causal_lm(stack)
    prompt = random_ids(2, 5)
    expected = model.generate(prompt, do_sample=False, max_new_tokens=7, min_new_tokens=7, pad_token_id=0)
    session = StreamingSession(model)
    tokens = session.greedy(prompt, max_new_tokens=4)
    tokens = torch.cat([tokens, session.greedy(None, max_new_tokens=3)], dim=1)  # continues where it stopped
    torch.testing.assert_close(tokens, expected[:, 5:], rtol=0, atol=0)
    assert session.seen_tokens == 5 + 7  # the state has consumed every token it returned

    # step() logits are the forward's logits at the same positions; for a SeqArchModel, its hidden states
    for module, full in ((model, model(input_ids=expected[:, :9]).logits),
                         (model.model, model.model(input_ids=expected[:, :9]).last_hidden_state)):
        session = StreamingSession(module)
        session.feed(expected[:, :5])
        stepped = torch.stack([session.step(expected[:, i]) for i in range(5, 9)], dim=1)
        torch.testing.assert_close(stepped, full[:, 5:9], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("overrides", [dict(intermediate_size=0), dict(hidden_act="gelu")], ids=["no_mlp", "gelu"])
@pytest.mark.parametrize("mixers", [["lstm", "gru"], ["attention", "mamba2"]], ids=["cells", "modules"])
def test_step_path_equals_forward_for_other_blocks(mixers, overrides):
    """The single-token decoder writes each block out (its own residual, MLP and activation): held to the forward
    for blocks without an MLP and with another activation too, which the tiny config (a SiLU MLP) never has."""
    model = tiny_model(SeqArchForCausalLM, mixers, initializer_range=0.3, **overrides)
    ids = random_ids(2, 9)
    session = StreamingSession(model)
    session.feed(ids[:, :5])
    stepped = torch.stack([session.step(ids[:, t]) for t in range(5, 9)], dim=1)  # (B, 4, vocab)
    torch.testing.assert_close(stepped, model(input_ids=ids).logits[:, 5:], rtol=1e-5, atol=1e-5)


def test_greedy_after_the_cache_read_more_elsewhere_needs_a_prompt():
    """A forward outside the session (as the README's generate() continuation does) moves the cache past the logits
    greedy(None) would continue from: refused (it once picked the next token from an earlier position)."""
    model = causal_lm("lstm")
    session = StreamingSession(model)
    session.feed(random_ids(1, 6))
    with torch.no_grad():
        model(input_ids=random_ids(1, 4, seed=2), cache=session.cache, use_cache=True)
    with pytest.raises(ValueError, match="cache changed since the session's last logits"):
        session.greedy(None, max_new_tokens=2)
    assert session.greedy(random_ids(1, 1, seed=3), max_new_tokens=2).shape == (1, 2)  # feeds what comes next
    assert session.greedy(None, max_new_tokens=1).shape == (1, 1)  # its own steps keep the logits current


def test_greedy_after_the_rows_were_reordered_needs_a_prompt():
    """Reordering the cache's rows leaves its length: greedy(None) once continued each row from another's logits."""
    session = StreamingSession(causal_lm("lstm"))
    session.feed(torch.cat([random_ids(1, 4), random_ids(1, 4, seed=2)]))
    session.cache.reorder_cache(torch.tensor([1, 0]))
    with pytest.raises(ValueError, match="a reorder or selection of its rows"):
        session.greedy(None, max_new_tokens=1)


@pytest.mark.parametrize("replace", ["input_embeddings", "untied_resize"])
def test_a_module_replaced_after_the_session_was_built_is_used(replace):
    """The single-token path called the modules it was built with: after set_input_embeddings its steps differed
    from a forward by 0.22, and after an untied resize_token_embeddings greedy could never pick a new id."""
    model = tiny_model(SeqArchForCausalLM, ["gru", "attention"], initializer_range=0.3, tie_word_embeddings=False)
    session, ids = StreamingSession(model), random_ids(1, 4)
    session.feed(ids[:, :3])
    if replace == "input_embeddings":
        model.set_input_embeddings(torch.nn.Embedding(VOCAB, model.config.hidden_size))
    else:
        model.resize_token_embeddings(VOCAB + 10, mean_resizing=False)
    same_past = SeqArchCache.from_state_dict(session.cache.state_dict(), len(session.cache))
    expected = StreamingSession(model, same_past).feed(ids[:, 3:])[:, 0]  # a forward, with the model's modules now
    torch.testing.assert_close(session.step(ids[:, 3]), expected, rtol=1e-5, atol=1e-5)

def test_greedy_after_the_cache_is_replaced_needs_a_prompt():
    """The next-token logits greedy(None) continues from belong to the replaced stream: they once picked the new
    stream's first token."""
    model = causal_lm("lstm")
    session = StreamingSession(model)
    session.greedy(random_ids(1, 5), max_new_tokens=2)
    session.cache = SeqArchCache(model.config)
    with pytest.raises(ValueError, match="Nothing to continue from"):
        session.greedy(None, max_new_tokens=2)
    # a cache set is checked as one given at construction
    with pytest.raises(ValueError, match="cache must be a SeqArchCache"):
        session.cache = {}
    with pytest.raises(ValueError, match="cache has 2 layers; the model has 1"):
        session.cache = SeqArchCache(causal_lm("lstm+attention").config)


@stack_params
def test_step_follows_weight_updates_and_keeps_hooked_modules(stack):
    # The decoder reads the parameters at every call (no stale copies) and bypasses only plain modules:
    # a hook (as PEFT, quantization or accelerate offload would add) keeps the module's own call.
    model = causal_lm(stack)
    ids = random_ids(2, 7)
    session = StreamingSession(model)  # built before the update below
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(0.9)
        expected = model(input_ids=ids).logits[:, -2:]
    session.feed(ids[:, :5])
    torch.testing.assert_close(session.step(ids[:, 5]), expected[:, 0], rtol=1e-5, atol=1e-5)

    calls = []
    for block in model.model.layers:
        target = block.mlp.down_proj if block.mlp is not None else block.mixer_norm
        target.register_forward_hook(lambda module, args, output: calls.append(module))
    hooked = StreamingSession(model, cache=session.cache)
    torch.testing.assert_close(hooked.step(ids[:, 6]), expected[:, 1], rtol=1e-5, atol=1e-5)
    assert len(calls) == len(model.model.layers)

    # A subclass of a block (its forward may differ) keeps its own call too.
    block, plain = model.model.layers[0], type(model.model.layers[0])
    block.__class__ = type("CountingBlock", (plain,), {"forward": lambda self, *a: calls.append(self) or plain.forward(self, *a)})
    calls.clear()
    StreamingSession(model).step(ids[:, 0])
    assert block in calls


@stack_params
@pytest.mark.parametrize("name", ["cache", "release"], ids=["cache=", "release's name"])
def test_generate_continues_a_streamed_cache(stack, name):
    # The session's state (made under inference_mode) is an ordinary SeqArchCache for generate(), passed as the
    # README does (`cache=`, which transformers 4.x does not know: the model passes it on as past_key_values) or as
    # this transformers release names the cache (`cache`, or `past_key_values` before 5.24).
    model = causal_lm(stack)
    ids = random_ids(1, 12)
    session = StreamingSession(model)
    session.feed(ids[:, :7])
    session.feed(ids[:, 7:11])
    new = dict(do_sample=False, max_new_tokens=5, min_new_tokens=5, pad_token_id=0)
    # ids: the stream so far plus the prompt (here its last token); generate() feeds what the cache has not seen
    continued = model.generate(ids, **{"cache" if name == "cache" else CACHE_FIELD: session.cache}, **new)
    torch.testing.assert_close(continued, model.generate(ids, **new), rtol=0, atol=0)


@stack_params
def test_saved_state_resumes_in_a_fresh_session(stack, tmp_path):
    model = causal_lm(stack)
    ids = random_ids(2, 17)
    uninterrupted = StreamingSession(model)
    uninterrupted.feed(ids[:, :10])
    expected = uninterrupted.feed(ids[:, 10:])

    first = StreamingSession(model)
    first.feed(ids[:, :10])
    path = str(tmp_path / "stream.safetensors")
    first.save(path)
    first.feed(random_ids(2, 3, seed=8))  # what happens to the old session afterwards does not matter
    resumed = StreamingSession.load(model, path)
    assert resumed.seen_tokens == 10
    torch.testing.assert_close(resumed.feed(ids[:, 10:]), expected, rtol=0, atol=0)


def test_saved_state_resumes_in_another_process(tmp_path):
    stack = "lstm+linear+sliding"
    model = causal_lm(stack)
    model.save_pretrained(tmp_path / "model")
    ids = random_ids(1, 40)
    session = StreamingSession(model)
    session.feed(ids[:, :25])
    session.save(str(tmp_path / "stream.safetensors"))
    expected = session.feed(ids[:, 25:])
    torch.save(ids[:, 25:], tmp_path / "rest.pt")

    script = textwrap.dedent(
        f"""
        import torch
        from hf_seqarch import SeqArchForCausalLM, StreamingSession
        torch.set_num_threads({torch.get_num_threads()})  # (as here: another split of the work rounds differently)
        model = SeqArchForCausalLM.from_pretrained({str(tmp_path / "model")!r}).eval()
        session = StreamingSession.load(model, {str(tmp_path / "stream.safetensors")!r})
        torch.save(session.feed(torch.load({str(tmp_path / "rest.pt")!r})), {str(tmp_path / "out.pt")!r})
        """
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    subprocess.run([sys.executable, "-c", script], check=True, env=env, timeout=120)
    torch.testing.assert_close(torch.load(tmp_path / "out.pt"), expected, rtol=0, atol=0)


def test_recurrent_footprint_is_constant_while_streaming():
    model = causal_lm("lstm")
    session = StreamingSession(model)
    sizes = []
    for chunk in range(6):
        session.feed(random_ids(1, 50, seed=chunk))
        sizes.append(session.get_memory_footprint())
    hidden = model.config.hidden_size
    assert sizes == [2 * hidden * 4] * 6  # h and c, float32, batch 1


def test_bad_input_is_a_clear_error(tmp_path):
    model = causal_lm("lstm")
    session = StreamingSession(model)
    with pytest.raises(ValueError, match="integer tensor"):
        session.feed(torch.ones(1, 3))
    with pytest.raises(ValueError, match="at least one token"):
        session.feed(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="Token ids must be in"):
        session.feed(torch.tensor([[1, VOCAB]]))
    session.feed(random_ids(2, 3))
    with pytest.raises(ValueError, match="batch size 3"):
        session.feed(random_ids(3, 3))
    with pytest.raises(ValueError, match="one token per row"):
        session.step(random_ids(2, 2))
    with pytest.raises(ValueError, match="prompt"):
        StreamingSession(model).greedy(None, max_new_tokens=2)
    with pytest.raises(ValueError, match="SeqArchForCausalLM or a SeqArchModel"):
        StreamingSession(tiny_model(SeqArchForSequenceClassification, ["lstm"]))
    with pytest.raises(ValueError, match="bidirectional"):
        StreamingSession(tiny_model(SeqArchModel, ["lstm"], bidirectional=True))
    path = str(tmp_path / "stream.safetensors")
    session.save(path)
    with pytest.raises(ValueError, match="mixer_types"):
        StreamingSession.load(causal_lm("gru"), path)


@pytest.mark.parametrize("other", [dict(sliding_window=5), dict(num_key_value_heads=4), dict(mamba_conv_kernel=2),
                                   dict(hidden_size=64)])  # also shapes attention_head_dim: the first field is named
def test_a_state_loads_only_into_a_model_of_the_same_layout(other, tmp_path):
    """Every config field that shapes a state is checked on load (a different window or conv kernel once loaded
    and gave wrong logits; other head counts failed inside torch)."""
    stack = ["sliding_attention", "mamba2"]
    session = StreamingSession(tiny_model(SeqArchForCausalLM, stack))
    session.feed(random_ids(1, 6))
    session.save(tmp_path / "state.safetensors")
    with pytest.raises(ValueError, match=f"with {next(iter(other))}="):
        StreamingSession.load(tiny_model(SeqArchForCausalLM, stack, **other), tmp_path / "state.safetensors")


@pytest.mark.parametrize("stack", ["lstm", "gru", "sliding", "attention", "mamba2", "linear_attention"])
@pytest.mark.parametrize("tokens_per_call", [1, 3], ids=["decode", "chunk"])
def test_a_cache_follows_the_model_to_another_dtype(stack, tokens_per_call):
    """A cache filled in float32 continues in a model cast afterwards: its states are read in the model's dtype, so
    it continues exactly as the same cache cast to float64 by hand (mamba2's and linear attention's states once
    stayed float32 for good, rounding every later update to float32)."""
    model, ids = causal_lm(stack), random_ids(2, 9)
    cache = getattr(model(input_ids=ids[:, :6], use_cache=True), CACHE_FIELD)
    cast_by_hand = SeqArchCache.from_state_dict(
        {name: t.double() if t.is_floating_point() else t for name, t in cache.state_dict().items()}, len(cache)
    )
    model = model.double()

    def continued(from_cache):
        calls = range(6, 9, tokens_per_call)
        return torch.cat([model(input_ids=ids[:, t : t + tokens_per_call], cache=from_cache).logits for t in calls], 1)

    logits = continued(cache)
    torch.testing.assert_close(logits, continued(cast_by_hand), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(logits, model(input_ids=ids).logits[:, 6:], rtol=1e-5, atol=1e-5)
    assert {t.dtype for state in cache.layers for t in state.values()} == {torch.float64}


@pytest.mark.parametrize("stack", ["lstm", "gru", "mamba2", "linear_attention", "attention", "lstm+linear+sliding"])
def test_a_session_cache_continues_under_autograd(stack):
    """session.cache, filled under inference_mode, continued by a forward with autograd on (fine-tuning from a
    streamed context): the logits of one forward over everything, and a backward runs (the recurrent mixers once
    raised: inference tensors cannot be saved for a backward)."""
    model, ids = causal_lm(stack), random_ids(1, 9)
    session = StreamingSession(model)
    session.feed(ids[:, :6])
    # a decode step, then a chunk (which continues the step's graph: one backward through both)
    logits = torch.cat([model(input_ids=ids[:, start:stop], cache=session.cache).logits for start, stop in ((6, 7), (7, 9))], 1)
    torch.testing.assert_close(logits, model(input_ids=ids).logits[:, 6:], rtol=1e-5, atol=1e-5)
    logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("stack", ["attention", "lstm+linear+sliding", "lstm"])
def test_a_session_refuses_a_cache_of_padded_rows_where_attention_would_read_the_pads(stack):
    """A cache from a padded generate() holds the pads' keys in its attention layers; the session decodes without a
    mask (and with positions that count the pads), so it once attended to them silently. Recurrent layers never
    take pads into their state: a cache of those alone continues, as each row alone would."""
    model = causal_lm(stack)
    ids, mask = random_ids(2, 6), torch.ones(2, 6, dtype=torch.long)
    ids[1, :4], mask[1, :4] = 0, 0  # row 1: two tokens, left-padded
    cache = getattr(model(input_ids=ids, attention_mask=mask, use_cache=True), CACHE_FIELD)
    if model.config.has_attention:
        with pytest.raises(ValueError, match="This cache holds padded positions"):
            StreamingSession(model, cache=cache)
        session = StreamingSession(model)
        with pytest.raises(ValueError, match="This cache holds padded positions"):
            session.cache = cache  # set directly, as load() does
        session.feed(torch.tensor([[5], [7]]))  # filled from a padded batch after it was set: refused at the next call
        model(input_ids=ids, attention_mask=torch.cat([torch.ones(2, 1, dtype=torch.long), mask], 1), cache=session.cache)
        with pytest.raises(ValueError, match="This cache holds padded positions"):
            session.step(torch.tensor([5, 7]))
        restored = SeqArchCache.from_state_dict(cache.state_dict(), len(cache))  # (saved and loaded: still known)
        assert restored.holds_padding
        # a forward that does not say where the past's pads are (no mask, or all ones) would attend to them
        for no_pads in (None, torch.ones(2, 7, dtype=torch.long)):
            with pytest.raises(ValueError, match=r"pass the attention_mask of the past and new tokens, \(2, 7\)"):
                model(input_ids=torch.tensor([[5], [7]]), attention_mask=no_pads, cache=cache)
        return
    step = StreamingSession(model, cache=cache).step(torch.tensor([5, 7]))
    alone = model(input_ids=torch.cat([ids[1, 4:], torch.tensor([7])])[None]).logits[0, -1]
    torch.testing.assert_close(step[1], alone, rtol=1e-5, atol=1e-5)


def test_a_session_refuses_a_beam_search_cache():
    """generate() refuses to continue a beam-search cache (it holds the last step's beams, not the returned sequences,
    in their order); a session took it, and continued other sequences than those returned without a word."""
    model = tiny_model(SeqArchForCausalLM, ["lstm", "attention"], initializer_range=0.3)
    out = model.generate(random_ids(1, 4), num_beams=2, num_return_sequences=2, do_sample=False, max_new_tokens=3,
                         pad_token_id=0, return_dict_in_generate=True)
    cache = getattr(out, CACHE_FIELD)
    with pytest.raises(ValueError, match="comes from beam search"):
        StreamingSession(model, cache=cache)
    session = StreamingSession(model)
    with pytest.raises(ValueError, match="comes from beam search"):
        session.cache = cache  # set directly, as load() does
    session.feed(out.sequences)  # what to do instead: a fresh session fed the returned sequences


def test_step_refuses_a_head_of_another_vocabulary():
    """forward() and feed() refuse an lm_head wider than the vocabulary; step() returned its logits, and greedy went
    on to look up an id past the embeddings (an IndexError inside torch)."""
    model = causal_lm("gru")
    session = StreamingSession(model)
    session.feed(random_ids(1, 3))
    model.set_output_embeddings(torch.nn.Linear(model.config.hidden_size, VOCAB + 10, bias=False))
    for call in (lambda: session.step(torch.tensor([1])), lambda: session.greedy(None, max_new_tokens=2)):
        with pytest.raises(ValueError, match=f"lm_head has {VOCAB + 10} outputs"):
            call()


def test_step_looks_up_embeddings_with_their_options():
    """An embedding with max_norm renormalises the rows it looks up; the single-token path looked them up plainly and
    its logits differed from the forward's."""
    model = causal_lm("gru")
    model.set_input_embeddings(torch.nn.Embedding(VOCAB, model.config.hidden_size, max_norm=0.1))
    ids = torch.tensor([[1, 2, 3, 4]])
    session = StreamingSession(model)
    session.feed(ids[:, :3])
    step = session.step(ids[:, 3])[0]  # token 4 first looked up here (a lookup renormalises its row in place)
    torch.testing.assert_close(step, model(input_ids=ids).logits[0, -1], rtol=1e-5, atol=1e-5)


def test_greedy_takes_numpy_and_tensor_token_counts():
    """max_new_tokens=np.int64(2) or torch.tensor(2) (a count computed with numpy or torch) was refused."""
    import numpy as np

    model, prompt = causal_lm("lstm"), random_ids(1, 4)
    expected = StreamingSession(model).greedy(prompt, max_new_tokens=2)
    for count in (np.int64(2), torch.tensor(2)):
        torch.testing.assert_close(StreamingSession(model).greedy(prompt, max_new_tokens=count), expected)
    for bad in (torch.tensor(2.0), torch.tensor(True), np.float64(2)):
        with pytest.raises(ValueError, match="max_new_tokens must be an integer >= 1"):
            StreamingSession(model).greedy(prompt, max_new_tokens=bad)


def test_feed_keeps_only_the_next_token_logits():
    """feed() kept its last position's logits as a view of all of them: (B, T, vocab) stayed alive through the session
    after the caller dropped them (64 MiB for 4,096 tokens of a 4,096-token vocabulary)."""
    model, ids = causal_lm("lstm"), random_ids(1, 20)
    session = StreamingSession(model)
    session.feed(ids)
    kept = session._last_logits  # (1, vocab)
    assert kept.untyped_storage().nbytes() == kept.numel() * kept.element_size()
    torch.testing.assert_close(session.greedy(None, 3), StreamingSession(model).greedy(ids, 3), rtol=0, atol=0)


@pytest.mark.parametrize("stack", ["lstm", "mamba2+attention"])
def test_a_stream_holding_the_pad_id_continues_only_with_the_mask_it_was_read_with(stack):
    """generate() makes its mask from pad_token_id: a stream that holds the pad id (read as a token) got 0 there, and
    the layers continued from one sequence while the mask (and attention's positions) described another: wrong
    tokens, silently. Refused; with the mask of what the cache read, it continues as the session does."""
    model = causal_lm(stack)
    stream, prompt = random_ids(1, 12, seed=2), random_ids(1, 3, seed=3)
    stream[0, 4] = 0  # the pad id, read as a token
    ids = torch.cat([stream, prompt], 1)
    new = dict(do_sample=False, max_new_tokens=4, min_new_tokens=4, pad_token_id=0)
    session = StreamingSession(model)
    session.feed(stream)
    with pytest.raises(ValueError, match="mark 11 real tokens in row 0, but the cache read 12 there"):
        model.generate(ids, cache=session.cache, **new)
    assert session.cache.seen_tokens == 12  # (refused before any layer read the prompt)
    continued = model.generate(ids, attention_mask=torch.ones_like(ids), cache=session.cache, **new)
    expected = model.generate(ids, attention_mask=torch.ones_like(ids), **new)
    torch.testing.assert_close(continued, expected, rtol=0, atol=0)


@pytest.mark.parametrize("stack", ["lstm", "mamba2+attention"])
def test_a_cache_continues_with_the_mask_it_was_filled_with(stack):
    """A cache counts each row's real tokens: a later mask of the past must agree (as generate() makes one from
    pad_token_id: 0 at pad ids the cache read as tokens, such as those after a row's eos). The counts follow the rows
    (reordered, selected, repeated, copied, saved and loaded)."""
    model = causal_lm(stack)
    ids, mask = random_ids(2, 8), torch.ones(2, 8, dtype=torch.long)
    ids[1, :2], mask[1, :2] = 0, 0  # row 1 left-padded
    ids[0, 6:] = 0  # row 0 ends in pad ids read as tokens, as generate() feeds them after an eos
    with torch.no_grad():
        cache = getattr(model(input_ids=ids[:, :6], attention_mask=mask[:, :6], use_cache=True), CACHE_FIELD)
        model(input_ids=ids[:, 6:], attention_mask=mask, cache=cache)
    assert cache.real_tokens.tolist() == [8, 6]
    new = random_ids(2, 2, seed=4)
    full, full_mask = torch.cat([ids, new], 1), torch.cat([mask, torch.ones(2, 2, dtype=torch.long)], 1)
    as_generate_masks = full_mask.clone()
    as_generate_masks[0, 6:8] = 0  # the pad ids, masked
    with pytest.raises(ValueError, match="mark 6 real tokens in row 0, but the cache read 8 there"):
        model(input_ids=new, attention_mask=as_generate_masks, cache=cache)
    assert cache.seen_tokens == 8  # (refused before any layer read the tokens)
    restored = SeqArchCache.from_state_dict(cache.state_dict())
    assert restored.real_tokens.tolist() == [8, 6]
    with torch.no_grad():
        continued = model(input_ids=new, attention_mask=full_mask, cache=restored).logits
    torch.testing.assert_close(continued, model(input_ids=full, attention_mask=full_mask).logits[:, 8:],
                               rtol=1e-5, atol=1e-5)
    for rows, counts in ((lambda c: c.reorder_cache(torch.tensor([1, 0])), [6, 8]),
                         (lambda c: c.batch_select_indices(torch.tensor([1])), [6]),
                         (lambda c: c.batch_repeat_interleave(2), [8, 8, 6, 6])):
        reshaped = copy.deepcopy(cache)
        rows(reshaped)
        assert reshaped.real_tokens.tolist() == counts


def test_a_padded_cache_saved_before_the_counts_continues_unchecked(tmp_path):
    """A padded cache's state or pickle from before the counts of real tokens existed: its counts are unknown, so its
    mask is taken as before (once refused, as if every past position had been real)."""
    model = causal_lm("mamba2+attention")
    ids, mask = random_ids(2, 6), torch.ones(2, 6, dtype=torch.long)
    ids[1, :2], mask[1, :2] = 0, 0
    with torch.no_grad():
        cache = getattr(model(input_ids=ids, attention_mask=mask, use_cache=True), CACHE_FIELD)
    state = {key: value for key, value in cache.state_dict().items() if key != "real_tokens"}  # as saved before
    pickled = copy.deepcopy(cache)
    del pickled.__dict__["real_tokens"]
    torch.save(pickled, tmp_path / "old.pt")
    old_pickle = torch.load(tmp_path / "old.pt", weights_only=False)
    new, full_mask = random_ids(2, 1, seed=4), torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)
    with torch.no_grad():
        expected = model(input_ids=new, attention_mask=full_mask, cache=copy.deepcopy(cache)).logits
        for old in (SeqArchCache.from_state_dict(state), old_pickle):
            assert old.real_tokens_unknown
            torch.testing.assert_close(model(input_ids=new, attention_mask=full_mask, cache=old).logits, expected)
            assert old.real_tokens is None  # (still unknown)


def test_a_saved_cache_holds_only_the_used_part_of_growing_buffers():
    """With one row and one key/value head, the used keys and values of a full-attention buffer are a contiguous view
    of it: state_dict returned the view, so torch.save wrote the buffer's spare room too (~30x), and the reloaded
    cache kept it alive while get_memory_footprint() reported the used part."""
    model = tiny_model(SeqArchForCausalLM, ["attention"], num_attention_heads=1, num_key_value_heads=1)
    ids = random_ids(1, 9)
    with torch.no_grad():
        cache = getattr(model(input_ids=ids[:, :8], use_cache=True), CACHE_FIELD)
        model(input_ids=ids[:, 8:], cache=cache, use_cache=True)  # appended into a buffer with room to spare
    saved = {name: t for name, t in cache.state_dict().items() if name.startswith("layers.")}
    assert saved and all(t.untyped_storage().nbytes() == t.nbytes for t in saved.values())
    assert sum(t.nbytes for t in saved.values()) == cache.get_memory_footprint()
    # pickled (torch.save of the cache itself, a generate() output holding it): the same (it wrote the buffers whole)
    import pickle

    unpickled = pickle.loads(pickle.dumps(cache))
    states = [t for state in unpickled.layers if state for t in state.values()]
    assert sum(t.untyped_storage().nbytes() for t in states) == cache.get_memory_footprint()
    with torch.no_grad():  # and it continues as the original does
        torch.testing.assert_close(model(input_ids=ids[:, :1], cache=unpickled).logits,
                                   model(input_ids=ids[:, :1], cache=cache).logits)


def test_a_saved_cache_restores_from_its_own_layout():
    """from_state_dict once needed num_layers (a TypeError without it), which the saved layout holds."""
    model = causal_lm("mamba2+attention")
    cache = getattr(model(input_ids=random_ids(1, 5), use_cache=True), CACHE_FIELD)
    for restored in (SeqArchCache.from_state_dict(cache.state_dict()),
                     SeqArchCache.from_state_dict(cache.state_dict(), config=model.config)):
        assert len(restored) == len(cache) and restored.seen_tokens == 5
    no_layout = {key: value for key, value in cache.state_dict().items() if key != "layout"}
    with pytest.raises(ValueError, match=r"holds no layout: give from_state_dict its model.s number of layers \(num_layers\)"):
        SeqArchCache.from_state_dict(no_layout)
    assert len(SeqArchCache.from_state_dict(no_layout, len(cache))) == len(cache)


def test_a_copied_session_decodes_with_its_own_model():
    """copy.deepcopy of a session copied its model, but its single-token path kept calling the original's modules
    (0.4 off once the copy's weights changed); pickling it failed on that path's local functions."""
    import pickle

    session = StreamingSession(tiny_model(SeqArchForCausalLM, ["gru", "attention"]))
    session.feed(random_ids(1, 6))
    fork = copy.deepcopy(session)
    with torch.no_grad():
        for parameter in fork.model.parameters():
            parameter.mul_(1.5)
        expected = fork.model(input_ids=torch.tensor([[5]]), cache=copy.deepcopy(fork.cache)).logits[:, -1]
    torch.testing.assert_close(fork.step(torch.tensor([5])), expected)
    restored = pickle.loads(pickle.dumps(session))
    torch.testing.assert_close(restored.step(torch.tensor([5])), session.step(torch.tensor([5])))

"""The shared tester: every property below runs over every mixer stack (and head where it applies)."""

import copy
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
)

from hf_seqarch import (
    SeqArchCache,
    SeqArchConfig,
    SeqArchForCausalLM,
    SeqArchForSequenceClassification,
    SeqArchForTokenClassification,
    SeqArchModel,
)
from hf_seqarch import ops_sliding_attention
from hf_seqarch.mixer_attention import rotary_cos_sin
from hf_seqarch.mixer_context import MixerContext
from hf_seqarch.modeling_seqarch import CACHE_FIELD
from tester import HEADS, STACKS, VOCAB, main_output, random_ids, tiny_config, tiny_model

stack_params = pytest.mark.parametrize("stack", list(STACKS), ids=list(STACKS))
head_params = pytest.mark.parametrize("head", list(HEADS), ids=list(HEADS))


@stack_params
@head_params
def test_output_shapes(stack, head):
    model = tiny_model(HEADS[head], STACKS[stack])
    ids = random_ids(2, 7)
    out = model(input_ids=ids, output_hidden_states=True)
    expected = {
        "base": (2, 7, 32),
        "causal_lm": (2, 7, VOCAB),
        "seq_cls": (2, 3),
        "token_cls": (2, 7, 3),
    }[head]
    assert tuple(main_output(model, input_ids=ids).shape) == expected
    assert len(out.hidden_states) == len(STACKS[stack]) + 1


@stack_params
@head_params
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_save_load_roundtrip_is_exact(stack, head, tied, tmp_path):
    model = tiny_model(HEADS[head], STACKS[stack], tie_word_embeddings=tied)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    reloaded = HEADS[head].from_pretrained(tmp_path).eval()
    ids = random_ids(2, 6)
    torch.testing.assert_close(main_output(reloaded, input_ids=ids), main_output(model, input_ids=ids), rtol=0, atol=0)
    for (name, p), (_, q) in zip(model.state_dict().items(), reloaded.state_dict().items()):
        assert torch.equal(p, q), name
    if head == "causal_lm":
        assert (reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()) == tied



@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_loaded_weights_are_aligned_as_built(tied, tmp_path):
    """transformers 5 reads safetensors into tensors 8 bytes past a 64-byte boundary, where torch's GEMMs round
    differently (an nn.GRU's output moved by 1e-7 at a vocabulary of 384): loading copies them to aligned memory, as
    torch's allocator gives a model built in memory, keeping tied weights one tensor."""
    model = tiny_model(SeqArchForCausalLM, ["gru", "lstm", "attention"], vocab_size=384, tie_word_embeddings=tied)
    model.save_pretrained(tmp_path)
    reloaded = SeqArchForCausalLM.from_pretrained(tmp_path).eval()
    unaligned = [name for name, tensor in reloaded.state_dict().items() if tensor.data_ptr() % 64]
    assert not unaligned
    assert (reloaded.lm_head.weight is reloaded.model.embed_tokens.weight) == tied
    ids = torch.randint(0, 384, (1, 12), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_a_state_dict_loads_without_a_source(monkeypatch):
    """from_pretrained(None, config=..., state_dict=...), transformers' way to build a model from a state dict: the
    checks that read the checkpoint's own config.json looked up a Hub repository named "None" (tens of seconds of
    retries offline)."""
    model = tiny_model(SeqArchForCausalLM, ["lstm", "attention"])

    def no_lookup(source, **kwargs):
        raise AssertionError(f"looked up a config for {source!r}")

    monkeypatch.setattr(SeqArchConfig, "get_config_dict", no_lookup)
    for tied in (True, False):
        config = SeqArchConfig(**{**model.config.to_dict(), "tie_word_embeddings": tied})
        loaded = SeqArchForCausalLM.from_pretrained(None, config=config, state_dict=model.state_dict())
        for name, tensor in model.state_dict().items():
            assert torch.equal(loaded.state_dict()[name], tensor), name
    partial = {name: tensor for name, tensor in model.state_dict().items() if ".layers.1." not in name}
    with pytest.raises(ValueError, match=r"The checkpoint state_dict=\.\.\. does not fit"):  # (it said "None")
        SeqArchForCausalLM.from_pretrained(None, config=model.config, state_dict=partial)

def test_a_tied_checkpoint_loads_untied_with_its_head(tmp_path):
    """A tied checkpoint stores no lm_head.weight: loaded with tie_word_embeddings=False, the untied head starts as
    the tied model's head was (the embeddings), not random, and is then a weight of its own."""
    model = tiny_model(SeqArchForCausalLM, ["lstm", "attention"], tie_word_embeddings=True)
    model.save_pretrained(tmp_path)
    untied = SeqArchForCausalLM.from_pretrained(tmp_path, tie_word_embeddings=False).eval()
    ids = random_ids(2, 6)
    torch.testing.assert_close(untied(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)
    assert untied.lm_head.weight.data_ptr() != untied.model.embed_tokens.weight.data_ptr()


def test_an_untied_checkpoint_loaded_tied_is_refused(tmp_path):
    """Its trained lm_head would go: transformers 4.x replaced it by the embeddings silently, and 5.x kept it under a
    config saying tied, whose next save dropped it."""
    model = tiny_model(SeqArchForCausalLM, ["lstm", "attention"], tie_word_embeddings=False)
    model.save_pretrained(tmp_path)
    for load in (lambda: SeqArchForCausalLM.from_pretrained(tmp_path, tie_word_embeddings=True),
                 lambda: AutoModelForCausalLM.from_pretrained(tmp_path, tie_word_embeddings=True)):
        with pytest.raises(ValueError, match="saved with untied embeddings: its lm_head.weight is trained"):
            load()
    SeqArchModel.from_pretrained(tmp_path, tie_word_embeddings=True)  # the body alone has no head to lose


def test_a_tied_checkpoint_loaded_untied_with_its_head_offloaded_is_refused(tmp_path):
    """Offloaded to disk, the untied head has no weight to start from (the checkpoint stores none): it once failed
    at the first forward, with a KeyError inside accelerate."""
    model = tiny_model(SeqArchForCausalLM, ["lstm", "attention"], tie_word_embeddings=True)
    model.save_pretrained(tmp_path / "tied")
    device_map = {"model": "cpu", "lm_head": "disk"}
    with pytest.raises(ValueError, match="untied lm_head must start from the input embeddings, but device_map offloads"):
        SeqArchForCausalLM.from_pretrained(tmp_path / "tied", tie_word_embeddings=False, device_map=device_map,
                                           offload_folder=str(tmp_path / "offload"))


def test_save_checks_a_config_changed_since_it_was_built(tmp_path):
    """Resized below its pad_token_id, a model trained and saved, and then from_pretrained refused its own checkpoint:
    the resize is refused now, and save_pretrained checks a config set by hand."""
    model = tiny_model(SeqArchForCausalLM, ["lstm"], pad_token_id=VOCAB - 1)
    with pytest.raises(ValueError, match=f"resize_token_embeddings takes a vocabulary of at least {VOCAB} token"):
        model.resize_token_embeddings(VOCAB - 2)
    model.config.pad_token_id = VOCAB + 2
    with pytest.raises(ValueError, match="pad_token_id must be None or a token id"):
        model.save_pretrained(tmp_path)


def test_an_untied_checkpoint_that_lost_its_head_is_refused(tmp_path):
    """Saved untied (its config.json says so), a causal LM's lm_head.weight is a trained weight of its own: a file
    without it is incomplete, not a tied checkpoint, and once loaded with the embeddings as its head, silently."""
    model = tiny_model(SeqArchForCausalLM, ["lstm", "attention"], tie_word_embeddings=False)
    model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    del weights["lm_head.weight"]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    for load in (SeqArchForCausalLM.from_pretrained, AutoModelForCausalLM.from_pretrained,  # (Auto passes config=)
                 lambda path: SeqArchForCausalLM.from_pretrained(path, config=SeqArchConfig.from_pretrained(path))):
        with pytest.raises(ValueError, match="saved as a SeqArchForCausalLM with untied embeddings .* no lm_head.weight"):
            load(tmp_path)


def test_auto_classes_build_and_load_our_models(tmp_path):
    config = tiny_config(["lstm", "attention"])
    config.save_pretrained(tmp_path)
    assert type(AutoConfig.from_pretrained(tmp_path)) is SeqArchConfig
    for auto, head in (
        (AutoModel, "base"),
        (AutoModelForCausalLM, "causal_lm"),
        (AutoModelForSequenceClassification, "seq_cls"),
        (AutoModelForTokenClassification, "token_cls"),
    ):
        model = auto.from_config(config)
        assert type(model) is HEADS[head]
        model.save_pretrained(tmp_path / head)
        assert type(auto.from_pretrained(tmp_path / head)) is HEADS[head]


def test_public_config_contract():
    config = SeqArchConfig(
        vocab_size=256,
        hidden_size=256,
        mixer_types=["lstm", "attention", "gru", "sliding_attention"],
        num_attention_heads=4,
        intermediate_size=0,
        sliding_window=128,
    )
    assert config.model_type == "seqarch" and config.num_hidden_layers == 4
    model = SeqArchModel(config)
    assert all(block.mlp is None for block in model.layers)


@stack_params
def test_causal_outputs_ignore_future_tokens(stack):
    model = tiny_model(SeqArchModel, STACKS[stack])
    ids = random_ids(2, 9)
    changed = ids.clone()
    changed[:, 5:] = random_ids(2, 4, seed=7)
    a, b = main_output(model, input_ids=ids), main_output(model, input_ids=changed)
    torch.testing.assert_close(a[:, :5], b[:, :5], rtol=0, atol=1e-6)
    assert not torch.allclose(a[:, 5:], b[:, 5:])


@stack_params
def test_bidirectional_outputs_see_future_tokens(stack):
    model = tiny_model(SeqArchModel, STACKS[stack], bidirectional=True)
    ids = random_ids(2, 9)
    changed = ids.clone()
    changed[:, -1] = (ids[:, -1] % (VOCAB - 1)) + 1
    changed[:, -1] = torch.where(changed[:, -1] == ids[:, -1], 1, changed[:, -1])
    a, b = main_output(model, input_ids=ids), main_output(model, input_ids=changed)
    assert not torch.allclose(a[:, -2], b[:, -2])  # the token before the change sees it


@stack_params
@pytest.mark.parametrize("bidirectional", [False, True], ids=["causal", "bidir"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_matches_each_sequence_alone(stack, bidirectional, side):
    model = tiny_model(SeqArchModel, STACKS[stack], bidirectional=bidirectional)
    lengths = [8, 5, 3, 0]  # and a row that is all padding
    sequences = [random_ids(1, n, seed=i)[0] for i, n in enumerate(lengths)]
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, seq in enumerate(sequences):
        where = slice(width - len(seq), width) if side == "left" else slice(0, len(seq))
        ids[row, where], mask[row, where] = seq, 1
    batched = model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert batched.isfinite().all()
    for row, seq in enumerate(sequences[:-1]):
        alone = model(input_ids=seq[None]).last_hidden_state[0]
        real = mask[row].bool()
        torch.testing.assert_close(batched[row, real], alone, rtol=1e-5, atol=1e-5)


def test_flex_attention_agrees_with_eager():
    """flex_attention (inference only on CPU: torch has no CPU backward for it) gets a BlockMask as transformers'
    models give it: same outputs as eager with padding and a window, and the same greedy generation."""
    ids, mask = random_ids(3, 6), torch.ones(3, 6, dtype=torch.long)
    mask[1, :2] = 0
    mask[2, 4:] = 0
    outputs, generated = {}, {}
    for implementation in ("flex_attention", "eager"):
        model = tiny_model(SeqArchForCausalLM, ["attention", "sliding_attention"], attn_implementation=implementation,
                           initializer_range=0.3)
        with torch.no_grad():
            outputs[implementation] = model(input_ids=ids, attention_mask=mask).logits[mask.bool()]
        generated[implementation] = model.generate(ids[:2], attention_mask=mask[:2], max_new_tokens=3,
                                                   min_new_tokens=3, pad_token_id=0, do_sample=False)
    torch.testing.assert_close(outputs["flex_attention"], outputs["eager"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(generated["flex_attention"], generated["eager"], rtol=0, atol=0)


def _flash_like_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                          **kwargs):
    """A flash kernel's contract, computed by sdpa: a 2-D padding mask (B, K) or None, causality from is_causal
    (aligned with the last key), key/value heads shared by groups of query heads; returns (B, T, heads, head_dim)."""
    assert attention_mask is None or attention_mask.dim() == 2, "a flash kernel takes a 2-D padding mask"
    length, keys = query.shape[2], key.shape[2]
    allowed = torch.ones(query.shape[0], 1, length, keys, dtype=torch.bool)
    if attention_mask is not None:
        allowed = allowed & attention_mask.bool()[:, None, None, :]
    if is_causal:
        allowed = allowed & torch.ones(length, keys, dtype=torch.bool).tril(keys - length)
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    output = torch.nn.functional.scaled_dot_product_attention(query, key, value, allowed, scale=scaling)
    return output.transpose(1, 2), None


def test_a_flash_kernel_of_another_name_gets_a_flash_kernels_arguments():
    """transformers names a flash kernel from the hub "kernels-community/flash-attn2" (and so renames
    flash_attention_2 where only the `kernels` package is installed): the mixer took only names starting with
    "flash_attention" for flash and gave such a kernel a 4-D float mask and is_causal=False (a causal LM attending
    to later tokens). Any name with "flash" in it (transformers' own test) gets the padding mask and is_causal."""
    from transformers import AttentionInterface

    AttentionInterface.register("test-community/flash-attn-like", _flash_like_attention)
    ids, mask = random_ids(2, 7), torch.ones(2, 7, dtype=torch.long)
    mask[0, :3] = 0
    outputs = {}
    for implementation in ("sdpa", "test-community/flash-attn-like"):
        torch.manual_seed(0)
        model = SeqArchForCausalLM(tiny_config(["attention", "lstm"], num_key_value_heads=2)).eval()
        model.config._attn_implementation = implementation  # (set_attn_implementation would fetch it from the Hub)
        outputs[implementation] = [model(input_ids=ids, attention_mask=m).logits[(m if m is not None else
                                   torch.ones_like(ids)).bool()] for m in (mask, None)]
    for got, want in zip(outputs["test-community/flash-attn-like"], outputs["sdpa"]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("stack", ["attention", "sliding", "gru+sliding+attention"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["causal", "bidir"])
def test_eager_and_sdpa_agree(stack, bidirectional):
    ids = random_ids(2, 9)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    outputs = []
    for implementation in ("eager", "sdpa"):
        torch.manual_seed(0)
        config = tiny_config(STACKS[stack], bidirectional=bidirectional)
        model = SeqArchModel._from_config(config, attn_implementation=implementation).eval()
        assert model.config._attn_implementation == implementation
        outputs.append([model(input_ids=ids).last_hidden_state, model(input_ids=ids, attention_mask=mask).last_hidden_state])
    for eager, sdpa in zip(*outputs):
        torch.testing.assert_close(eager, sdpa, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("stack", ["attention", "sliding", "gru+sliding+attention", "mamba2+attention"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_left_padded_training_agrees_across_kernels(stack, dtype):
    """A left-padded causal batch has pad queries that may attend to nothing, and the loss reaches the last pad
    (it predicts the first real token). Loss and every gradient must be the same under eager and sdpa: sdpa once
    got an additive finfo.min mask, whose CPU backward is wrong on such rows (gradients up to 50x too large), and
    eager's float32 softmax of a float64 model turned those rows into NaN that reached the real positions."""
    ids = random_ids(2, 9)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    labels = ids.masked_fill(mask == 0, -100)
    results = []
    for implementation in ("eager", "sdpa"):
        config = tiny_config(STACKS[stack], initializer_range=0.2)
        torch.manual_seed(0)
        model = SeqArchForCausalLM._from_config(config, attn_implementation=implementation).to(dtype).train()
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        assert torch.isfinite(loss)
        results.append([loss.detach()] + [p.grad for p in model.parameters()])
    for name, eager, sdpa in zip(["loss"] + [n for n, _ in model.named_parameters()], *results):
        torch.testing.assert_close(eager, sdpa, rtol=1e-5, atol=1e-6, msg=name)


def attention_formula(mixer, x, bidirectional, window):
    """softmax(q k^T / sqrt(head_dim) + mask) v in float64, with RoPE written out from its formula (Llama's: frequencies
    theta^(-2i/d), rotate-half pairing) and each key/value head repeated for its group of query heads; the window as
    the config documents it: sliding_window - 1 tokens before (in an encoder also as many after)."""
    batch, length, _ = x.shape
    heads, kv_heads, dim = mixer.num_heads, mixer.num_key_value_heads, mixer.head_dim
    q = mixer.q_proj(x).view(batch, length, heads, dim).transpose(1, 2)  # (B, heads, T, dim)
    k, v = (proj(x).view(batch, length, kv_heads, dim).transpose(1, 2) for proj in (mixer.k_proj, mixer.v_proj))
    frequencies = 500.0 ** -(torch.arange(0, dim, 2, dtype=torch.float64) / dim)  # (dim/2,): rope_theta 500
    angle = torch.arange(length, dtype=torch.float64)[:, None] * frequencies  # (T, dim/2)

    def rope(t):
        first, second = t[..., : dim // 2], t[..., dim // 2 :]
        return torch.cat([first * angle.cos() - second * angle.sin(), second * angle.cos() + first * angle.sin()], -1)

    q, k = rope(q), rope(k).repeat_interleave(heads // kv_heads, 1)
    i, j = torch.arange(length)[:, None], torch.arange(length)[None, :]
    allowed = torch.ones(length, length, dtype=torch.bool) if bidirectional else j <= i
    if window is not None:
        allowed &= (i - j < window) & (j - i < window)
    scores = (q @ k.transpose(-1, -2) / dim**0.5).masked_fill(~allowed, float("-inf"))
    attended = scores.softmax(-1) @ v.repeat_interleave(heads // kv_heads, 1)  # (B, heads, T, dim)
    return mixer.o_proj(attended.transpose(1, 2).reshape(batch, length, heads * dim))


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("kind", ["attention", "sliding_attention"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["causal", "encoder"])
def test_attention_computes_its_formula(attn_implementation, kind, bidirectional):
    """Every kernel is handed q and k rotated by the same RoPE code and the same scaling, and the masks come from one
    function, so comparing kernels cannot catch a wrong frequency, scale or window (the encoder's sliding window was
    not tested at all): the mixer against attention written out. Length 11 with window 3: sdpa's blocked path."""
    model = tiny_model(SeqArchModel, [kind], rope_theta=500.0, initializer_range=0.3, bidirectional=bidirectional,
                       sliding_window=3, attn_implementation=attn_implementation).double().eval()
    mixer, seen = model.layers[0].mixer, {}
    mixer.register_forward_hook(lambda module, args, output: seen.update(x=args[0], output=output))
    with torch.no_grad():
        model(input_ids=random_ids(2, 11))
        expected = attention_formula(mixer, seen["x"], bidirectional, 3 if kind == "sliding_attention" else None)
    torch.testing.assert_close(seen["output"], expected, rtol=1e-10, atol=1e-10)


def test_output_attentions_with_eager_and_a_warning_otherwise(caplog):
    """output_attentions=True gives the eager kernel's probabilities, one (B, heads, T, K) per attention layer
    (as transformers' models do); a pad query that may attend to nothing has a row of zeros. Other kernels never
    form them: None, with a warning."""
    config = tiny_config(["attention", "lstm", "sliding_attention"])
    ids, mask = random_ids(2, 6), torch.ones(2, 6, dtype=torch.long)
    mask[0, :2] = 0
    model = SeqArchForCausalLM._from_config(config, attn_implementation="eager").eval()
    attentions = model(input_ids=ids, attention_mask=mask, output_attentions=True).attentions
    assert [tuple(a.shape) for a in attentions] == [(2, 4, 6, 6)] * 2
    row_sums = torch.stack(attentions).sum(-1)  # (layers, B, heads, T)
    torch.testing.assert_close(row_sums[:, 0, :, 2:], torch.ones_like(row_sums[:, 0, :, 2:]))
    assert (row_sums[:, 0, :, :2] == 0).all() and torch.allclose(row_sums[:, 1], torch.ones_like(row_sums[:, 1]))
    assert (attentions[0].triu(1) == 0).all()  # causal
    assert (attentions[1].count_nonzero(-1)[1, 0] == torch.tensor([1, 2, 3, 3, 3, 3])).all()  # window 3
    assert model(input_ids=ids).attentions is None
    generated = model.generate(ids, attention_mask=mask, max_new_tokens=2, output_attentions=True,
                               return_dict_in_generate=True, pad_token_id=0, do_sample=False)
    assert len(generated.attentions) == 2 and len(generated.attentions[1]) == 2

    sdpa = SeqArchForCausalLM._from_config(config, attn_implementation="sdpa").eval()
    with caplog.at_level("WARNING"):
        assert sdpa(input_ids=ids, output_attentions=True).attentions is None
    assert "attn_implementation='eager'" in caplog.text


@pytest.mark.parametrize("length", [7, 12, 31])  # window 3: not / a multiple of it, many blocks
@pytest.mark.parametrize(  # (how grouped heads reach sdpa matters only where there are groups)
    "kv_heads,kernel_groups_heads", [(4, True), (2, True), (2, False)], ids=["mha", "gqa-enable_gqa", "gqa-repeated_kv"]
)
def test_blocked_sliding_window_equals_the_full_mask(length, kv_heads, kernel_groups_heads, monkeypatch):
    # sdpa over a long unpadded sequence runs in blocks (ops_sliding_attention); eager keeps the full mask. Grouped
    # heads go to sdpa as groups on CPU and as repeated keys on CUDA (there enable_gqa with a mask is the math kernel).
    monkeypatch.setattr(ops_sliding_attention, "sdpa_groups_heads_under_a_mask", lambda device: kernel_groups_heads)
    ids = random_ids(2, length)
    results = []
    for implementation in ("eager", "sdpa"):
        torch.manual_seed(0)
        config = tiny_config(["sliding_attention", "sliding_attention"], num_key_value_heads=kv_heads, sliding_window=3)
        model = SeqArchForCausalLM._from_config(config, attn_implementation=implementation).train()
        mixer = model.model.layers[0].mixer
        context = SimpleNamespace(causal=True, padding_mask=None)
        assert mixer._banded_applies(context, length, length, implementation) == (implementation == "sdpa")
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        results.append([loss.detach(), *(p.grad for p in model.parameters())])
    for eager, blocked in zip(*results):
        torch.testing.assert_close(blocked, eager, rtol=1e-5, atol=1e-6)


def test_blocked_sliding_window_is_causal_in_float16_at_large_scores():
    """The blocks masked keys by adding float16's finfo.min, -65504: scores past it (|q|, |k| ~ 200) outweighed it and a
    query attended to keys outside its window, later ones included (4.0 off the boolean-mask sdpa)."""
    generator = torch.Generator().manual_seed(1)
    q, k = (torch.randn(1, 1, 8, 16, generator=generator) * 200 for _ in range(2))
    v = torch.randn(1, 1, 8, 16, generator=generator)
    i, j = torch.arange(8)[:, None], torch.arange(8)[None]
    allowed = (j <= i) & (j > i - 2)  # window 2
    q, k, v = q.half(), k.half(), v.half()
    blocked = ops_sliding_attention.sliding_window_attention(q, k, v, 2, 16**-0.5)  # (B, T, nh, hd)
    reference = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=16**-0.5).transpose(1, 2)
    torch.testing.assert_close(blocked, reference, rtol=0, atol=2e-3)


def test_lstm_runs_under_cpu_float16_autocast():
    """CPU float16 autocast sends nn.LSTM to a float16 oneDNN LSTM that does not exist: an unpadded input failed inside
    oneDNN ("could not create a primitive descriptor"); the LSTM runs in its weights' dtype there, as padded input did."""
    model = tiny_model(SeqArchForCausalLM, ["lstm", "attention"]).train()
    ids = random_ids(2, 6)
    reference = model(input_ids=ids, labels=ids).loss
    with torch.autocast("cpu", dtype=torch.float16):
        loss = model(input_ids=ids, labels=ids).loss
        with torch.no_grad():  # a prefill continued from a cache: the LSTM's initial state in the weights' dtype too
            cache = getattr(model(input_ids=ids[:, :3], use_cache=True), CACHE_FIELD)
            continued = model(input_ids=ids[:, 3:], cache=cache, use_cache=True).logits
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    torch.testing.assert_close(loss.float(), reference, atol=2e-2, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(continued.float(), model(input_ids=ids).logits[:, 3:], atol=2e-2, rtol=0)

def test_one_token_steps_see_weights_that_hooks_recompute():
    """A one-token step reads the LSTM's weights itself (cell steps): under pruning, whose forward pre-hook recomputes
    weight_hh_l0 from weight_hh_l0_orig, it read the previous call's (0.05 off after an optimizer step). And a global
    hook on the embedding saw a time-major (T, B) input."""
    from torch.nn.utils import prune

    model, ids = tiny_model(SeqArchForCausalLM, ["lstm"]), random_ids(1, 6)
    rnn = model.model.layers[0].mixer.rnn
    prune.l1_unstructured(rnn, "weight_hh_l0", amount=0.5)
    with torch.no_grad():
        cache = getattr(model(input_ids=ids[:, :3], use_cache=True), CACHE_FIELD)  # (the pre-hook runs here)
        rnn.weight_hh_l0_orig.mul_(3.0)  # an optimizer step
        step = model(input_ids=ids[:, 3:4], cache=copy.deepcopy(cache)).logits[:, 0]
        fused = model(input_ids=ids[:, 3:5], cache=cache).logits[:, 0]  # (two tokens: the fused call, its hook)
    torch.testing.assert_close(step, fused)
    shapes = []

    def record_embedding_input(module, args, output):
        if isinstance(module, torch.nn.Embedding):
            shapes.append(tuple(args[0].shape))

    handle = torch.nn.modules.module.register_module_forward_hook(record_embedding_input)
    try:
        tiny_model(SeqArchForCausalLM, ["lstm"], intermediate_size=0)(input_ids=random_ids(3, 5))
    finally:
        handle.remove()
    assert shapes == [(3, 5)]


def test_padded_lstm_runs_under_cpu_float16_autocast():
    """A padded batch whose rows all hold the same number of real tokens (or one padded row) is a packed sequence that
    torch also sends to the float16 oneDNN LSTM under CPU float16 autocast: it failed there the same way."""
    model = tiny_model(SeqArchForCausalLM, ["lstm", "attention"]).eval()
    ids = random_ids(2, 6)
    mask = torch.tensor([[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0]])  # one pad per row
    with torch.no_grad():
        reference = model(input_ids=ids, attention_mask=mask).logits
        with torch.autocast("cpu", dtype=torch.float16):
            logits = model(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(logits.float()[real], reference[real], atol=2e-2, rtol=0)


def test_blocked_sliding_window_trains_under_autocast():
    """Under bf16 autocast RoPE gives float32 q and k beside a bf16 v (as in Llama), which sdpa casts itself: the
    blocked path refused them ("one dtype"), failing the Trainer's --bf16 on sliding-window models."""
    ids = random_ids(2, 12)  # past twice the window of 3: the blocked path
    model = tiny_model(SeqArchForCausalLM, ["sliding_attention"], sliding_window=3, attn_implementation="sdpa").train()
    full_precision = model(input_ids=ids, labels=ids).loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    torch.testing.assert_close(loss.float(), full_precision, rtol=2e-2, atol=0)


@stack_params
@head_params
def test_gradients_reach_every_parameter(stack, head):
    model = tiny_model(HEADS[head], STACKS[stack], tie_word_embeddings=False).train()
    ids = random_ids(2, 7)
    output = main_output(model, input_ids=ids)
    output.float().pow(2).mean().backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


@stack_params
def test_gradient_checkpointing_gives_same_gradients(stack):
    ids = random_ids(2, 7)
    grads = []
    for checkpointing in (False, True):
        model = tiny_model(SeqArchForCausalLM, STACKS[stack]).train()
        if checkpointing:
            # transformers 5.24 renamed gradient_checkpointing_enable to activation_checkpointing_enable
            enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
            enable()
            assert model.model.layers[0].gradient_checkpointing
        runs = []  # each block's mixer runs once, and again in the backward where checkpointing recomputes it
        for block in model.model.layers:
            block.mixer.register_forward_hook(lambda module, args, output: runs.append(module))
        model(input_ids=ids, labels=ids).loss.backward()
        assert len(runs) == len(model.model.layers) * (2 if checkpointing else 1)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("mixers", [["lstm", "gru"], ["gru"]], ids=["lstm+gru", "gru"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["causal", "encoder"])
def test_time_major_residual_stream_changes_nothing(mixers, bidirectional):
    """A recurrent-only stack keeps its activations time-major in memory: same outputs and gradients as batch-first,
    and what it returns is batch-first (contiguous) as usual. In float64: in float32 oneDNN's GRU/LSTM kernels alone
    are off by ~5e-4 (relative) from the float64 result, so a change of summation order shows at that size."""
    ids, mask = random_ids(3, 9), torch.ones(3, 9, dtype=torch.long)
    mask[1, :4] = 0  # a left-padded row: the packed path too
    results = []
    for time_major in (True, False):
        model = tiny_model(SeqArchModel, mixers, bidirectional=bidirectional, intermediate_size=0).double().train()
        assert model.time_major
        model.time_major = time_major
        for attention_mask in (None, mask):
            out = model(input_ids=ids, attention_mask=attention_mask, output_hidden_states=True)
            assert all(h.is_contiguous() for h in (out.last_hidden_state, *out.hidden_states))
            out.last_hidden_state.pow(2).sum().backward()
            results.append([out.last_hidden_state.detach(), *out.hidden_states])
        results.append([p.grad for p in model.parameters()])
    half = len(results) // 2
    for got, want in zip(results[:half], results[half:]):
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert not tiny_model(SeqArchModel, ["lstm", "attention"], intermediate_size=0).time_major
    assert not tiny_model(SeqArchModel, mixers, intermediate_size=48).time_major  # the MLP's linears would copy

    if not bidirectional:  # prefill in pieces from a cache (pieces of several tokens run time-major, single ones not)
        model = tiny_model(SeqArchForCausalLM, mixers, intermediate_size=0)
        full, cache, pieces = model(input_ids=ids).logits, SeqArchCache(model.config), []
        for start, stop in ((0, 4), (4, 5), (5, 9)):
            pieces.append(model(input_ids=ids[:, start:stop], cache=cache, use_cache=True).logits)
        torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-5, atol=1e-5)

    # In float32 training on CPU (RMSNorm's own kernels) the mixers do receive time-major activations.
    model = tiny_model(SeqArchModel, mixers, bidirectional=bidirectional, intermediate_size=0).train()
    strides = []  # of what each mixer receives, (B, T, width): time-major in memory if stride(0) < stride(1)
    for block in model.layers:
        block.mixer.register_forward_hook(lambda module, args, output: strides.append(args[0].stride()))
    model(input_ids=ids).last_hidden_state.sum().backward()
    assert strides and all(batch < time for batch, time, _ in strides)


@stack_params
def test_cached_decode_and_chunks_match_full_forward(stack):
    model = tiny_model(SeqArchForCausalLM, STACKS[stack])
    ids = random_ids(2, 11)
    full = model(input_ids=ids).logits
    cache = SeqArchCache(model.config)
    pieces = []
    for start, stop in ((0, 4), (4, 5), (5, 9), (9, 10), (10, 11)):
        out = model(input_ids=ids[:, start:stop], cache=cache, use_cache=True)
        assert out[0] is not None and (out.cache if hasattr(out, "cache") else out.past_key_values) is cache
        pieces.append(out.logits)
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-5, atol=1e-5)
    assert cache.get_seq_length() == 11


def test_loss_ignores_minus_100_and_honours_num_items_in_batch():
    model = tiny_model(SeqArchForCausalLM, ["lstm", "attention"])
    ids = random_ids(2, 8)
    labels = ids.clone()
    labels[:, :4] = -100
    logits = model(input_ids=ids).logits
    manual = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1), reduction="sum")
    counted = (labels[:, 1:] != -100).sum()
    torch.testing.assert_close(model(input_ids=ids, labels=labels).loss, manual / counted)
    torch.testing.assert_close(model(input_ids=ids, labels=labels, num_items_in_batch=torch.tensor(40)).loss, manual / 40)


@pytest.mark.parametrize(
    "problem_type,labels",
    [
        ("single_label_classification", torch.tensor([0, 2])),
        ("regression", torch.tensor([[0.5, -1.0, 2.0], [1.0, 0.0, 0.0]])),
        ("multi_label_classification", torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])),
    ],
)
def test_sequence_classification_problem_types(problem_type, labels):
    model = tiny_model(HEADS["seq_cls"], ["gru", "attention"], problem_type=problem_type)
    out = model(input_ids=random_ids(2, 6), labels=labels)
    logits = out.logits
    expected = {
        "single_label_classification": lambda: torch.nn.functional.cross_entropy(logits, labels),
        "regression": lambda: torch.nn.functional.mse_loss(logits, labels),
        "multi_label_classification": lambda: torch.nn.functional.binary_cross_entropy_with_logits(logits, labels),
    }[problem_type]()
    torch.testing.assert_close(out.loss, expected)


@pytest.mark.parametrize("bidirectional", [False, True], ids=["causal_last_token", "bidir_mean"])
def test_sequence_classification_pooling(bidirectional):
    model = tiny_model(HEADS["seq_cls"], ["lstm", "attention"], bidirectional=bidirectional)
    ids = random_ids(2, 6)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
    if bidirectional:
        pooled = torch.stack([hidden[0, 2:].mean(0), hidden[1, :4].mean(0)])
    else:
        pooled = torch.stack([hidden[0, 5], hidden[1, 3]])
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, model.score(pooled))


@pytest.mark.parametrize("head", ["seq_cls", "token_cls"])
def test_classification_without_a_mask_warns_of_pad_ids(head):
    """Without attention_mask, pads are tokens to the model (an encoder's every output reads them), as in
    transformers, which warns; so do our classification heads."""
    from transformers.testing_utils import CaptureLogger
    from transformers.utils import logging as hf_logging

    model = tiny_model(HEADS[head], ["attention"], bidirectional=True)
    ids = random_ids(2, 6)
    ids[1, -2:] = model.config.pad_token_id
    hf_logging.warning_once.cache_clear()  # (once per process: another test may have shown it)
    with CaptureLogger(hf_logging.get_logger("transformers.modeling_utils")) as captured:
        model(input_ids=ids)
    assert "recommend passing in an `attention_mask`" in captured.out


def test_pad_token_embedding_starts_at_zero():
    """nn.Embedding never trains its padding_idx row: it starts at zero, as in transformers' models (it was a fixed
    random vector that a pad read without a mask passed on)."""
    model = tiny_model(SeqArchForCausalLM, ["gru"])
    pad = model.config.pad_token_id
    assert pad is not None and model.get_input_embeddings().padding_idx == pad
    assert torch.count_nonzero(model.get_input_embeddings().weight[pad]) == 0


def test_encoder_pools_every_token_without_a_mask():
    """Without attention_mask an encoder reads every token, pad ids too: its mean is over all of them, the same as with
    a mask of ones. It once dropped the pad ids from the mean only (pad == eos used as a separator, no padding)."""
    model = tiny_model(SeqArchForSequenceClassification, ["attention"], bidirectional=True).eval()
    ids = random_ids(1, 6)
    ids[0, 2] = ids[0, 5] = model.config.pad_token_id
    with torch.no_grad():
        no_mask = model(input_ids=ids).logits
        all_real = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        mean_of_all = model.score(model.model(input_ids=ids).last_hidden_state.mean(1))
    torch.testing.assert_close(no_mask, all_real)
    torch.testing.assert_close(no_mask, mean_of_all)


@pytest.mark.parametrize("problem_type", ["regression", "multi_label_classification"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_float_targets_give_a_float32_loss(problem_type, dtype):
    """The loss is computed in float32 whatever the float targets' dtype (BCE returned a half-precision loss for
    half-precision targets, its value off in the third digit)."""
    num_labels = 1 if problem_type == "regression" else 3
    model = tiny_model(SeqArchForSequenceClassification, ["gru"], num_labels=num_labels, problem_type=problem_type)
    ids, targets = random_ids(2, 5), torch.rand(2, num_labels)
    loss = model(input_ids=ids, labels=targets.to(dtype)).loss
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, model(input_ids=ids, labels=targets.to(dtype).float()).loss)


@pytest.mark.parametrize("head", ["seq_cls", "token_cls"])
def test_num_labels_changed_after_building_is_refused(head):
    """config.id2label (or num_labels) set to another count after the head was built: the labels were checked against
    the new count and the loss failed inside torch on the layer's old width."""
    model = tiny_model(HEADS[head], ["gru"], num_labels=3)
    model.config.id2label = {0: "neg", 1: "pos"}
    ids = random_ids(3, 4)
    labels = torch.zeros(3, dtype=torch.long) if head == "seq_cls" else torch.zeros(3, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="config.num_labels is 2 .* built with 3 labels"):
        model(input_ids=ids, labels=labels)


def test_token_classification_loss_ignores_minus_100():
    model = tiny_model(HEADS["token_cls"], ["gru"])
    labels = torch.tensor([[0, 1, 2, -100, -100]])
    out = model(input_ids=random_ids(1, 5), labels=labels)
    torch.testing.assert_close(out.loss, torch.nn.functional.cross_entropy(out.logits[0, :3], labels[0, :3]))


def test_grouped_query_attention_shapes():
    model = tiny_model(SeqArchModel, ["attention"], num_attention_heads=4, num_key_value_heads=1)
    mixer = model.layers[0].mixer
    assert mixer.k_proj.out_features == mixer.head_dim and mixer.q_proj.out_features == 4 * mixer.head_dim
    assert model(input_ids=random_ids(1, 5)).last_hidden_state.shape == (1, 5, 32)


@pytest.mark.parametrize("head", list(HEADS))
def test_return_dict_false_gives_tuples(head):
    """As transformers' models: the output's fields that are not None, in order (argument or config)."""
    model = tiny_model(HEADS[head], ["lstm", "attention"])
    ids = random_ids(2, 5)
    labels = {"base": {}, "causal_lm": dict(labels=ids), "seq_cls": dict(labels=torch.tensor([0, 2])),
              "token_cls": dict(labels=ids % 3)}[head]
    as_dict = model(input_ids=ids, **labels)
    as_tuple = model(input_ids=ids, return_dict=False, **labels)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == len(as_dict.to_tuple())
    for got, want in zip(as_tuple, as_dict.to_tuple()):
        if isinstance(want, torch.Tensor):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
    model.config.return_dict = False
    assert isinstance(model(input_ids=ids), tuple)


@pytest.mark.parametrize("stack", ["gru", "attention", "mamba2+attention", "linear_attention"])
def test_a_cache_passed_in_is_used_whatever_use_cache_says(stack):
    from hf_seqarch import SeqArchCache

    model = tiny_model(SeqArchForCausalLM, STACKS[stack])
    model.config.use_cache = False  # as gradient-checkpointed training often leaves it
    ids = random_ids(2, 9)
    cache = SeqArchCache(model.config)
    first = model(input_ids=ids[:, :5], cache=cache).logits
    rest = model(input_ids=ids[:, 5:], cache=cache, use_cache=False).logits
    torch.testing.assert_close(torch.cat([first, rest], dim=1), model(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    assert cache.get_seq_length() == 9


def test_embedding_hooks_see_batch_first_outputs():
    """A recurrent-only stack embeds time-major (no layout copy), except when the embedding has hooks: they see
    (B, T, width) as in any transformers model (NEFTune scales its noise by the output's shape)."""
    model = tiny_model(SeqArchForCausalLM, ["lstm", "gru"], intermediate_size=0)
    ids, seen = random_ids(2, 7), []
    reference = model(input_ids=ids).logits
    handle = model.get_input_embeddings().register_forward_hook(lambda module, args, output: seen.append(output.shape))
    torch.testing.assert_close(model(input_ids=ids).logits, reference)
    handle.remove()
    assert seen == [(2, 7, 32)]


def test_compiled_forward_takes_a_cache():
    """The cache checks are Python on config values: skipped while torch.compile traces (fullgraph holds)."""
    model = tiny_model(SeqArchForCausalLM, ["attention", "mamba2"])
    ids = random_ids(2, 6)
    with torch.no_grad():
        cache = getattr(model(input_ids=ids[:, :5], use_cache=True), CACHE_FIELD)
        expected = model(input_ids=ids).logits[:, 5:]
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
        torch.testing.assert_close(compiled(input_ids=ids[:, 5:], cache=cache).logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("stack", ["linear_attention", "mamba2"])
def test_float64_models_pass_gradcheck(stack):
    """A float64 model computes in float64 throughout (mamba2's dt and A were once float32): gradcheck holds."""
    model = tiny_model(SeqArchModel, STACKS[stack], intermediate_size=0, initializer_range=0.3).double()
    embeds = torch.randn(1, 6, model.config.hidden_size, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda e: model(inputs_embeds=e).last_hidden_state, (embeds,))


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_float64_attention_shifted_by_pads_is_exact(attn_implementation):
    """Left pads without position_ids shift a row's positions, not their differences: in float64 the row gives what
    it gives alone to float64 precision (float32 RoPE tables once put ~8e-7 between them)."""
    model = tiny_model(SeqArchModel, ["attention", "lstm"], attn_implementation=attn_implementation,
                       initializer_range=0.3).double()
    ids = random_ids(1, 5)
    padded = torch.cat([torch.zeros(1, 7, dtype=torch.long), ids], 1)
    mask = torch.cat([torch.zeros(1, 7, dtype=torch.long), torch.ones(1, 5, dtype=torch.long)], 1)
    shifted = model(input_ids=padded, attention_mask=mask).last_hidden_state[:, 7:]
    torch.testing.assert_close(shifted, model(input_ids=ids).last_hidden_state, rtol=1e-12, atol=1e-12)


def test_float16_encoder_pools_more_tokens_than_float16_counts():
    """The masked mean counted the real tokens in float16: past 65,504 tokens the count was inf and every logit 0."""
    model = tiny_model(SeqArchForSequenceClassification, ["mamba2"], bidirectional=True, intermediate_size=0,
                       num_labels=3, initializer_range=0.3).eval()
    ids = random_ids(1, 66_000)
    with torch.no_grad():
        expected = model.double()(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        half = model.half()(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    torch.testing.assert_close(half.double(), expected, rtol=1e-2, atol=1e-2)


def test_bfloat16_sequence_classification_loss_is_computed_in_float32():
    """A bf16 cross-entropy is off in the second digit (0.6875 for 0.6932)."""
    model = tiny_model(SeqArchForSequenceClassification, ["gru"], num_labels=3).to(torch.bfloat16)
    labels = torch.tensor([0, 2])
    output = model(input_ids=random_ids(2, 5), labels=labels)
    assert output.loss.dtype == torch.float32
    torch.testing.assert_close(output.loss, torch.nn.functional.cross_entropy(output.logits.float(), labels))


@pytest.mark.parametrize("stack", ["linear_attention", "mamba2"])
def test_float64_models_keep_float64_states(stack):
    from hf_seqarch import SeqArchCache

    model = tiny_model(SeqArchForCausalLM, STACKS[stack]).double()
    ids = random_ids(2, 9)
    cache = SeqArchCache(model.config)
    parts = [ids[:, :4]] + list(ids[:, 4:].split(1, dim=1))  # a prefill, then decode steps
    pieces = [model(input_ids=part, cache=cache).logits for part in parts]
    torch.testing.assert_close(torch.cat(pieces, dim=1), model(input_ids=ids).logits, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("kind", ["lstm", "gru", "attention", "sliding_attention", "mamba2", "linear_attention"])
def test_empty_batch_gives_empty_outputs(kind, implementation):
    """A batch of 0 rows (the last shard of an uneven split), with a mask, and with a cache then a decode step on it.
    transformers' sdpa integration cannot reshape an empty output: the attention mixer takes eager there."""
    model = tiny_model(SeqArchForCausalLM, [kind], attn_implementation=implementation, sliding_window=2)
    ids = random_ids(2, 5)[:0]
    assert model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.shape == (0, 5, VOCAB)
    cache = SeqArchCache(model.config)
    assert model(input_ids=ids, cache=cache, use_cache=True).logits.shape == (0, 5, VOCAB)
    assert model(input_ids=ids[:, :1], cache=cache, use_cache=True).logits.shape == (0, 1, VOCAB)


@pytest.mark.parametrize("causal", [False, True])
def test_attention_mixer_follows_the_context_causality_on_every_kernel(causal):
    """A mixer obeys its MixerContext (the model code does not know which mixer it drives): sdpa without a mask
    read the causality the mixer was built with instead."""
    model = tiny_model(SeqArchModel, ["attention"], attn_implementation="sdpa", bidirectional=causal)  # the other way
    mixer, config = model.layers[0].mixer, model.config
    hidden = torch.randn(2, 6, config.hidden_size)
    position_ids = torch.arange(6)[None]
    context = MixerContext(padding_mask=None, position_ids=position_ids, past_length=0, cache=None, causal=causal)
    context.position_embeddings = rotary_cos_sin(position_ids, config.attention_head_dim, config.rope_theta, hidden.dtype)
    outputs = {}
    with torch.no_grad():
        for implementation in ("eager", "sdpa"):
            config._attn_implementation = implementation
            outputs[implementation] = mixer(hidden, context)
    torch.testing.assert_close(outputs["sdpa"], outputs["eager"], rtol=1e-5, atol=1e-5)
    # causal: the first position sees only itself, so changing the last token must leave it alone
    changed = hidden.clone()
    changed[:, -1] += 1.0
    with torch.no_grad():
        moved = (mixer(changed, context) - outputs["sdpa"])[:, 0].abs().max()
    assert (moved == 0) if causal else (moved > 0)


def test_cells_written_out_match_torchs():
    """mixer_rnn's lstm_cell / gru_cell (the cells under torch.func, whose vmap has no rule for torch's fused ones)
    against torch.lstm_cell / torch.gru_cell: outputs and gradients, in float64."""
    from hf_seqarch.mixer_rnn import gru_cell, lstm_cell

    generator = torch.Generator().manual_seed(0)

    def leaf(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64).requires_grad_()

    x, h, c = leaf(3, 4), leaf(3, 5), leaf(3, 5)
    for ours, theirs, gates in ((lstm_cell, torch.lstm_cell, 4), (gru_cell, torch.gru_cell, 3)):
        weights = [leaf(gates * 5, 4), leaf(gates * 5, 5), leaf(gates * 5), leaf(gates * 5)]
        state = (h, c) if gates == 4 else h
        got, want = ours(x, state, *weights), theirs(x, state, *weights)
        got, want = (got, want) if gates == 4 else ((got,), (want,))
        inputs = [x, h, *weights] + ([c] if gates == 4 else [])
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
        upstream = [torch.randn(a.shape, generator=generator, dtype=torch.float64) for a in got]
        for a, b in zip(torch.autograd.grad(got, inputs, upstream), torch.autograd.grad(want, inputs, upstream)):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_a_head_against_its_config_is_refused(tmp_path):
    """config.tie_word_embeddings set to True on an untied model: it ran its own head while the folder said tied, and
    loading replaced the head by the embeddings (4.x; 5.x at the next tie_weights()), silently. A head of another
    width than the vocabulary failed inside the loss, and generate() produced ids past it."""
    model = tiny_model(SeqArchForCausalLM, ["lstm"], tie_word_embeddings=False)
    model.config.tie_word_embeddings = True
    with pytest.raises(ValueError, match="tie_word_embeddings is True, but lm_head.weight is a tensor of its own"):
        model.save_pretrained(tmp_path)
    model.tie_weights()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    model.save_pretrained(tmp_path)  # (tied now, as the config says)
    wide = tiny_model(SeqArchForCausalLM, ["lstm"], tie_word_embeddings=False)
    wide.set_output_embeddings(torch.nn.Linear(wide.config.hidden_size, VOCAB + 16, bias=False))
    for call in (lambda: wide(input_ids=random_ids(1, 4)), lambda: wide.generate(random_ids(1, 4), max_new_tokens=2),
                 lambda: wide.save_pretrained(tmp_path / "wide")):
        with pytest.raises(ValueError, match=f"lm_head has {VOCAB + 16} outputs, but config.vocab_size is {VOCAB}"):
            call()


def test_token_classification_follows_its_dropout_config():
    """config.classifier_dropout set after the model was built was ignored (its nn.Dropout kept the first p), while a
    reloaded model used it."""
    model = tiny_model(SeqArchForTokenClassification, ["lstm"], classifier_dropout=0.0).train()
    ids = random_ids(2, 6)
    assert torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)
    model.config.classifier_dropout = 0.5
    assert not torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)

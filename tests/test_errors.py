"""Bad input gets a ValueError that says what was wrong and what is allowed."""

import json
import re

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForTokenClassification

from hf_seqarch import (
    SeqArchCache,
    SeqArchConfig,
    SeqArchForCausalLM,
    SeqArchForSequenceClassification,
    SeqArchForTokenClassification,
    SeqArchModel,
    StreamingSession,
)
from hf_seqarch.modeling_seqarch import CACHE_FIELD
from hf_seqarch.ops_sliding_attention import sliding_window_attention
from tester import VOCAB, random_ids, tiny_config, tiny_model


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(mixer_types=["lstm", "transformer"]), "Unknown mixer type.*allowed"),
        (dict(mixer_types=[]), "at least one layer"),
        (dict(hidden_size=30, num_attention_heads=4), "does not divide hidden_size"),
        (dict(num_attention_heads=4, num_key_value_heads=3), "must divide"),
        (dict(mixer_types=["sliding_attention"], sliding_window=0), "sliding_window must be"),
        (dict(mixer_types=["attention"], num_hidden_layers=3), "does not match"),
        (dict(intermediate_size=-1), "intermediate_size"),
        (dict(intermediate_size=None), "intermediate_size must be an integer"),
        (dict(head_dim=0), "head_dim must be None.*or an integer >= 2"),
        (dict(mixer_types=["mamba2"], mamba_n_groups=0), "mamba_n_groups must be a positive integer"),
        (dict(mixer_types=["mamba2"], mamba_head_dim=0), "mamba_head_dim must be a positive integer"),
        (dict(mixer_types=["mamba2"], mamba_expand=0), "mamba_expand must be a positive integer"),
        (dict(mixer_types=["linear_attention"], linear_attention_chunk_size=4.0), "linear_attention_chunk_size must be"),
        (dict(mixer_types=["linear_attention"], linear_attention_num_heads=0), "linear_attention_num_heads must be"),
        (dict(mixer_types=["linear_attention"], linear_attention_head_dim=8.0), "linear_attention_head_dim must be"),
        (dict(mixer_types=["sliding_attention"], sliding_window=True), "sliding_window must be an integer"),
        (dict(pad_token_id=VOCAB), r"pad_token_id must be None or a token id in \[0, vocab_size"),
        (dict(eos_token_id=[1, VOCAB]), r"eos_token_id must be None or token id\(s\) in \[0, vocab_size"),
        (dict(bos_token_id=-1), r"bos_token_id must be None or token id\(s\) in \[0, vocab_size"),
        (dict(rms_norm_eps=-1e-5), "rms_norm_eps must be a finite number > 0"),
        (dict(rms_norm_eps=0), "rms_norm_eps must be a finite number > 0"),  # a pad's zero output would norm to NaN
        (dict(rms_norm_eps=float("nan")), "rms_norm_eps must be a finite number > 0"),
        (dict(rms_norm_eps=1e-300), "rms_norm_eps must be a finite number > 0"),  # 0 in float32: NaN at pads
        (dict(hidden_act="bogus"), "hidden_act='bogus' is not an activation"),
        (dict(rope_theta=0), "rope_theta must be a finite number > 0"),  # NaN tables: finite, wrong outputs under sdpa
        (dict(rope_theta=float("nan")), "rope_theta must be a finite number > 0"),  # (NaN < 0 is False)
        (dict(rope_theta=float("inf")), "rope_theta must be a finite number > 0"),
        (dict(rope_theta="1e4"), "rope_theta must be a finite number > 0"),
        (dict(rope_scaling={"rope_type": "linear", "factor": 4.0}), "rope_scaling asks for rope_type 'linear'"),
        (dict(rope_parameters={"rope_type": "yarn", "factor": 2.0}), "rope_parameters asks for rope_type 'yarn'"),
        (dict(rope_theta=1e4, rope_parameters={"rope_theta": 500.0}),
         r"rope_theta=10000.0 and rope_parameters\['rope_theta'\]=500.0 disagree"),
        (dict(rope_parameters=500.0), "rope_parameters must be a dict"),
        (dict(rope_parameters={"rope_type": "default", "partial_rotary_factor": 0.5}),
         r"rope_parameters sets \{'partial_rotary_factor': 0.5\}, which hf_seqarch's attention does not implement"),
        (dict(rope_scaling={"factor": 2.0}), r"rope_scaling sets \{'factor': 2.0\}"),
        (dict(partial_rotary_factor=0.25), "rotary embeddings over the whole head"),
        (dict(attention_bias=True), "attention_bias=True: hf_seqarch's attention and MLP projections have no bias"),
        (dict(mlp_bias=True), "mlp_bias=True: .* have no bias"),  # (Llama's switches: a ported config, silently)
        # Mamba2Config's names: a ported config built the default sizes, silently
        (dict(mixer_types=["mamba2"], state_size=16), r"no field 'state_size' \(another model's name\): mamba2 layers "
                                                      "take mamba_state_size"),
        (dict(mixer_types=["mamba2"], num_heads=2), "attention takes num_attention_heads; mamba2's heads are"),
        (dict(mixer_types=["mamba2"], use_conv_bias=False), "mamba2 layers have use_conv_bias=True only"),
        (dict(mixer_types=["mamba2"], time_step_limit=[0.0, 1.0]), r"have time_step_limit=\(0.0, inf\) only"),
        (dict(initializer_range=-0.02), "initializer_range must be a finite number >= 0"),
        (dict(initializer_range=float("inf")), "initializer_range must be a finite number >= 0"),
        (dict(attention_dropout=1.5), r"attention_dropout must be a probability in \[0, 1\)"),
        (dict(classifier_dropout=-0.1), r"classifier_dropout must be a probability in \[0, 1\)"),
        (dict(bidirectional="false"), "bidirectional must be True or False, got 'false'"),  # a string once built an encoder
        (dict(mixer_types=["linear_attention"], linear_attention_use_decay="false"),
         "linear_attention_use_decay must be True or False, got 'false'"),
        (dict(tie_word_embeddings="false"), "tie_word_embeddings must be True or False, got 'false'"),
        (dict(use_cache="no"), "use_cache must be True or False, got 'no'"),
        (dict(num_labels=0), "num_labels must be a positive integer"),
        (dict(num_labels=3.0), "num_labels must be a positive integer"),  # once a TypeError inside transformers
        (dict(problem_type="regresion"), "problem_type must be None .* or one of"),  # transformers 5 accepts it
        (dict(max_position_embeddings=-1), "max_position_embeddings must be None or a positive integer"),
        (dict(attention_dropout=1.0), r"attention_dropout must be a probability in \[0, 1\)"),  # zeroed every output
        (dict(classifier_dropout=1.0), r"classifier_dropout must be a probability in \[0, 1\)"),
        (dict(mixer_type=["lstm"]), "SeqArchConfig has no field 'mixer_type': did you mean 'mixer_types'"),
        (dict(bidirectonal=True), "did you mean 'bidirectional'"),  # once a causal model, silently
        (dict(mixer_types=["mamba2"], mamba_state_sise=16), "did you mean 'mamba_state_size'"),
    ],
)
def test_bad_config(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(overrides.pop("mixer_types", ["attention"]), **overrides)


@pytest.mark.parametrize(
    "fields,message",
    [
        (dict(mixer_types={"lstm": 1}), "mixer_types must be a list .* got dict"),  # once the dict's keys
        (dict(num_hidden_layers=True), "num_hidden_layers must be an integer"),  # once one layer
        (dict(num_hidden_layers=2.5), "num_hidden_layers must be an integer"),  # once a TypeError
    ],
)
def test_layers_of_another_type_are_refused(fields, message):
    with pytest.raises(ValueError, match=message):
        SeqArchConfig(**fields)


def test_layers_from_numpy_and_other_sequences_are_taken():
    """A sweep's numpy numbers and arrays, and any sequence (Hydra's ListConfig), as list(...) took them."""
    import numpy as np

    assert SeqArchConfig(num_hidden_layers=np.int64(2)).num_hidden_layers == 2
    assert SeqArchConfig(mixer_types=np.array(["lstm", "gru"])).mixer_types == ["lstm", "gru"]
    assert SeqArchConfig(mixer_types=("lstm", "gru")).mixer_types == ["lstm", "gru"]


def test_transformers_own_fields_and_far_unknown_keywords_are_kept():
    """transformers' configs keep keywords they do not know: only near misses of our fields are refused (not token
    ids: transformers' own, such as sep_token_id, are as near to ours)."""
    config = tiny_config(["lstm"], sep_token_id=2, my_note="kept", forced_eos_token_id=3)
    assert (config.sep_token_id, config.my_note) == (2, "kept")


def test_fields_set_after_the_config_was_made_are_checked():
    """A model's forward reads these from its config: a bad value set later once ran (use_cache "no" as True) or failed
    inside torch."""
    config = tiny_config(["attention"])
    with pytest.raises(ValueError, match="use_cache must be True or False, got 'no'"):
        config.use_cache = "no"
    with pytest.raises(ValueError, match=r"attention_dropout must be a probability in \[0, 1\), got 5.0"):
        config.attention_dropout = 5.0
    config.use_cache = 0  # (as older configs write it)
    assert config.use_cache is False


@pytest.mark.parametrize("head", [SeqArchModel, SeqArchForCausalLM, SeqArchForSequenceClassification,
                                  SeqArchForTokenClassification])
@pytest.mark.parametrize("config", [None, {"mixer_types": ["lstm"]}, "llama"])
def test_a_config_of_another_kind_is_refused(head, config):
    if config == "llama":
        from transformers import LlamaConfig
        config = LlamaConfig()
    with pytest.raises(TypeError, match=f"{head.__name__} takes a SeqArchConfig, got {type(config).__name__}"):
        head(config)


@pytest.mark.parametrize("head", [SeqArchModel, SeqArchForCausalLM, SeqArchForTokenClassification])
@pytest.mark.parametrize("typo,meant", [("atention_mask", "attention_mask"), ("attn_mask", "attention_mask"),
                                        ("output_attention", "output_attentions"), ("input_id", "input_ids")])
def test_a_misspelt_forward_argument_is_refused(head, typo, meant):
    """It was dropped with the other unknown keywords: a misspelt mask read the padding as tokens."""
    model = tiny_model(head, ["lstm"], bidirectional=head is SeqArchForTokenClassification)
    ids = random_ids(2, 5)
    with pytest.raises(ValueError, match=f"'{typo}' is not an argument .* did you mean '{meant}'"):
        model(input_ids=ids, **{typo: torch.ones_like(ids)})
    with pytest.raises(ValueError, match="head_mask is not supported"):
        model(input_ids=ids, head_mask=torch.ones(1, 4))
    # what callers pass along (a tokenizer's token_type_ids, transformers 4.x generate()'s cache_position), other
    # models' arguments (another word around one of ours), keywords set to None and keywords far from any argument are
    # ignored, as transformers' models ignore them
    expected = model(input_ids=ids)[0]
    taken = model(input_ids=ids, token_type_ids=torch.zeros_like(ids), cache_position=torch.arange(5), note="x",
                  encoder_attention_mask=torch.ones_like(ids), hidden_states=1, atention_mask=None)
    torch.testing.assert_close(taken[0], expected)


@pytest.mark.parametrize("option", [dict(pad_token_id=VOCAB), dict(eos_token_id=[1, VOCAB + 5]),
                                    dict(bos_token_id=-1)])
def test_generate_refuses_special_ids_the_model_cannot_have(option):
    """An out-of-range pad fed back for a finished row once failed blaming the caller's ids; an eos out of range never
    stops generation."""
    model = tiny_model(SeqArchForCausalLM, ["lstm"])
    name = next(iter(option))
    with pytest.raises(ValueError, match=f"generate\\(\\): {name} must be token id\\(s\\) in \\[0, vocab_size={VOCAB}\\)"):
        prompt = {} if name == "bos_token_id" else {"inputs": random_ids(2, 4)}  # (bos starts an unprompted one)
        model.generate(**prompt, max_new_tokens=2, **option)


def test_generate_takes_a_bos_out_of_range_with_a_prompt():
    """bos only starts generation without a prompt."""
    model = tiny_model(SeqArchForCausalLM, ["lstm"])
    assert model.generate(random_ids(1, 4), max_new_tokens=2, bos_token_id=VOCAB + 5).shape == (1, 6)


def test_generate_refuses_ids_of_one_dimension():
    model = tiny_model(SeqArchForCausalLM, ["lstm"])
    with pytest.raises(ValueError, match=r"input_ids must be \(batch, length\), got shape \(4,\): e.g. input_ids\[None\]"):
        model.generate(random_ids(1, 4)[0], max_new_tokens=2)


def test_rope_parameters_set_rope_theta_and_are_not_saved_beside_it(tmp_path):
    """transformers 5 keeps the RoPE base in rope_parameters (4.x: rope_scaling): it was stored, saved beside a
    contradicting rope_theta, and never used. Its rope_theta is now the model's; a scaling is refused, also when set
    after the config is built (as recipes do for Llama)."""
    ids = random_ids(1, 12)
    from_parameters = tiny_config(["attention"], rope_parameters={"rope_type": "default", "rope_theta": 500.0})
    assert from_parameters.rope_theta == 500.0
    torch.manual_seed(0)
    model = SeqArchForCausalLM(from_parameters)
    torch.manual_seed(0)
    same = SeqArchForCausalLM(tiny_config(["attention"], rope_theta=500.0))
    torch.manual_seed(0)
    default = SeqArchForCausalLM(tiny_config(["attention"]))
    assert torch.equal(model(ids).logits, same(ids).logits)
    assert not torch.allclose(model(ids).logits, default(ids).logits)
    model.save_pretrained(tmp_path)
    saved = (tmp_path / "config.json").read_text()
    assert "rope_parameters" not in saved and SeqArchConfig.from_pretrained(tmp_path).rope_theta == 500.0
    config = tiny_config(["attention"])
    config.rope_parameters = {"rope_type": "default", "rope_theta": 250.0}
    assert config.rope_theta == 250.0
    with pytest.raises(ValueError, match="rope_scaling asks for rope_type 'linear'"):
        config.rope_scaling = {"type": "linear", "factor": 2.0}
    whole_head = {"rope_type": "default", "rope_theta": 500.0, "partial_rotary_factor": 1.0}  # what ours does: taken
    assert tiny_config(["attention"], rope_parameters=whole_head).rope_theta == 500.0
    no_op = {"rope_type": "default", "rope_theta": 500.0, "factor": 1.0, "original_max_position_embeddings": 4096}
    assert tiny_config(["attention"], rope_parameters=no_op).rope_theta == 500.0  # (Hub configs carry such entries)


def test_rope_overrides_at_load_time_are_applied_or_refused(tmp_path):
    """from_pretrained(path, rope_parameters=...) was dropped without a word by AutoConfig (transformers applies an
    override only where the config has the attribute, and these are never stored), and reached the model's __init__
    as an unexpected keyword (TypeError); a scaling passed so was not refused."""
    SeqArchForCausalLM(tiny_config(["attention"])).save_pretrained(tmp_path)
    override = dict(rope_parameters={"rope_type": "default", "rope_theta": 500.0})
    config, unused = AutoConfig.from_pretrained(tmp_path, return_unused_kwargs=True, **override)
    assert config.rope_theta == 500.0 and unused == {}
    assert AutoModelForCausalLM.from_pretrained(tmp_path, **override).config.rope_theta == 500.0
    for load in (AutoConfig.from_pretrained, AutoModelForCausalLM.from_pretrained):
        with pytest.raises(ValueError, match="rope_scaling asks for rope_type 'yarn'"):
            load(tmp_path, rope_scaling={"rope_type": "yarn", "factor": 4.0})


def test_other_models_layer_fields_and_a_non_integer_layer_count_are_refused():
    """layer_types (transformers' per-layer field) was kept and never read: four "sliding_attention" built full
    attention. num_hidden_layers set to 2.0 or True was stored, and building the model failed inside range()."""
    for name in ("layer_types", "num_layers", "n_layer"):
        with pytest.raises(ValueError, match=f"takes its layers as mixer_types .* not {name}="):
            SeqArchConfig(**{name: ["sliding_attention"] * 2})
    config = tiny_config(["lstm", "gru"])
    for value in (2.0, True, "2"):
        with pytest.raises(ValueError, match=re.escape(f"num_hidden_layers must be an integer (len(mixer_types), "
                                                       f"here 2), got {value!r}")):
            config.num_hidden_layers = value
    config.num_hidden_layers = 2
    assert config.num_hidden_layers == 2


def test_config_overrides_at_load_time_are_checked(tmp_path, caplog):
    """from_pretrained's keyword overrides: a misspelt one (sliding_windw) was dropped without a word (transformers
    applies an override only where the config has the attribute), and mixer_types with num_hidden_layers loaded in
    one order and was refused in the other."""
    tiny_config(["attention", "gru"]).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="no field 'sliding_windw': did you mean 'sliding_window'"):
        AutoConfig.from_pretrained(tmp_path, sliding_windw=4)
    with pytest.raises(ValueError, match="not layer_types="):
        AutoConfig.from_pretrained(tmp_path, layer_types=["lstm", "lstm"])
    for overrides in (dict(mixer_types=["gru"] * 3, num_hidden_layers=3),
                      dict(num_hidden_layers=3, mixer_types=["gru"] * 3)):
        config = AutoConfig.from_pretrained(tmp_path, **overrides)
        assert (config.mixer_types, config.num_hidden_layers) == (["gru"] * 3, 3)
    with pytest.raises(ValueError, match="does not match len"):
        AutoConfig.from_pretrained(tmp_path, num_hidden_layers=2, mixer_types=["gru"] * 3)
    # a config.json that holds one (earlier versions kept and saved it) loads, built from mixer_types as it was
    saved = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**saved, "layer_types": ["full_attention"] * 2}))
    with caplog.at_level("WARNING"):
        config = AutoConfig.from_pretrained(tmp_path)
    assert config.mixer_types == ["attention", "gru"] and not hasattr(config, "layer_types")
    assert "holds layer_types: other models' fields, which SeqArchConfig never reads" in caplog.text


def test_an_old_config_json_with_layer_types_loads_through_every_reader(tmp_path, caplog):
    """Earlier versions saved layer_types beside mixer_types: SeqArchConfig.from_json_file refused such a file, which
    AutoConfig and from_pretrained load; and one from_pretrained warned twice (each check that read the file)."""
    tiny_model(SeqArchForCausalLM, ["attention", "gru"]).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**saved, "layer_types": ["full_attention"] * 2}))
    assert SeqArchConfig.from_json_file(tmp_path / "config.json").mixer_types == ["attention", "gru"]
    for load in (SeqArchForCausalLM.from_pretrained, AutoModelForCausalLM.from_pretrained):
        caplog.clear()
        with caplog.at_level("WARNING"):
            load(tmp_path)
        assert caplog.text.count("holds layer_types: other models' fields, which SeqArchConfig never reads") == 1
    # one that holds another model's name for a field of ours (a user passed it, and it was kept unread) loads too
    (tmp_path / "config.json").write_text(json.dumps({**saved, "chunk_size": 8, "time_step_min": 0.01,
                                                      "attention_bias": True, "num_heads": None}))
    assert SeqArchForCausalLM.from_pretrained(tmp_path).config.mamba_chunk_size == saved["mamba_chunk_size"]


@pytest.mark.parametrize("mixer,overrides", [
    ("attention", dict(num_attention_heads=8, num_key_value_heads=4)),  # hidden 32: 8 x 4 = 4 x 8, 4 x 4 = 2 x 8
    ("sliding_attention", dict(num_attention_heads=2, num_key_value_heads=1)),  # 2 x 16 = 4 x 8, 1 x 16 = 2 x 8
])
def test_loading_with_another_head_layout_is_refused(mixer, overrides, tmp_path):
    """Overridden at load time, head counts whose products keep every weight's shape loaded without a word, the same
    weights split into other heads (logits ~0.4 off): refused, as the resume check already refused it."""
    tiny_model(SeqArchForCausalLM, [mixer, "lstm"]).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"saved with num_attention_heads=4, num_key_value_heads=2, head_dim=8; with .*"
                                         "would be split into other heads"):
        SeqArchForCausalLM.from_pretrained(tmp_path, **overrides)
    config = AutoConfig.from_pretrained(tmp_path, **overrides)  # a config of its own, passed whole: the same
    with pytest.raises(ValueError, match="would be split into other heads"):
        AutoModelForCausalLM.from_pretrained(tmp_path, config=config)
    SeqArchForCausalLM.from_pretrained(tmp_path, sliding_window=8)  # other overrides still load


def test_loading_mamba2_with_another_group_layout_is_refused(tmp_path):
    """mamba_n_groups x mamba_state_size unchanged (1 x 8 = 2 x 4) keeps every weight's shape: the B and C channels
    were read as other groups of another state size, without a word (logits ~0.03 off)."""
    config = tiny_config(["mamba2"], mamba_n_groups=1, mamba_state_size=8, mamba_head_dim=8)
    SeqArchForCausalLM(config).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="saved with mamba_n_groups=1, mamba_state_size=8; with mamba_n_groups=2, "
                                         "mamba_state_size=4 instead.*split into other heads or groups"):
        SeqArchForCausalLM.from_pretrained(tmp_path, mamba_n_groups=2, mamba_state_size=4)
    SeqArchForCausalLM.from_pretrained(tmp_path, mamba_chunk_size=4)  # other overrides still load


def test_mixer_types_as_a_string_is_refused():
    """list("lstm") would be four unknown mixers named by letters."""
    with pytest.raises(ValueError, match=r"one mixer name per layer, e.g. \['lstm'\]"):
        SeqArchConfig(mixer_types="lstm")
    config = tiny_config(["lstm"])
    with pytest.raises(ValueError, match="one mixer name per layer"):
        config.mixer_types = "gru"


def test_mixer_types_changed_in_place_is_refused():
    """config.mixer_types.append() passes no setter: the model was built with the old number of layers and saved a
    checkpoint that would not load."""
    config = tiny_config(["lstm"])
    config.mixer_types.append("gru")
    with pytest.raises(ValueError, match="mixer_types has 2 entries but num_hidden_layers=1.*Assign a new list"):
        SeqArchForCausalLM(config)
    config.mixer_types = ["lstm", "gru"]
    assert len(SeqArchForCausalLM(config).model.layers) == 2


def test_num_labels_given_to_from_pretrained_is_checked(tmp_path):
    """A float num_labels passed to from_pretrained (set after the config is built) failed inside transformers 4.x."""
    tiny_model(SeqArchForSequenceClassification, ["gru"]).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="num_labels must be a positive integer"):
        SeqArchForSequenceClassification.from_pretrained(tmp_path, num_labels=2.0)
    config = tiny_config(["gru"], max_position_embeddings=None)  # (read by no mixer: may be left unset)
    assert config.max_position_embeddings is None


def test_numpy_numbers_are_taken_as_python_numbers(tmp_path):
    """Values from a numpy sweep: validated fields once refused np.int64(32) as not an integer, and the others
    (sliding_window outside sliding stacks) made save_pretrained fail in JSON."""
    import numpy as np

    config = tiny_config(["lstm"], hidden_size=np.int64(32), sliding_window=np.int64(7), rms_norm_eps=np.float32(1e-5))
    assert type(config.hidden_size) is int and type(config.sliding_window) is int and type(config.rms_norm_eps) is float
    config.vocab_size = np.int32(VOCAB)
    config.eos_token_id = [np.int64(1), 2]  # (a list of ids from a tokenizer's numpy arrays)
    assert type(config.vocab_size) is int and [type(i) for i in config.eos_token_id] == [int, int]
    SeqArchForCausalLM(config).save_pretrained(tmp_path)
    assert SeqArchConfig.from_pretrained(tmp_path).sliding_window == 7
    # a 0-d tensor (a sweep's value kept as one) the same: in a field the stack does not use, save_pretrained failed
    config = tiny_config(["lstm"], mamba_head_dim=torch.tensor(16), hidden_size=torch.tensor(32))
    assert type(config.mamba_head_dim) is int and type(config.hidden_size) is int
    config.save_pretrained(tmp_path / "tensors")


@pytest.mark.parametrize("mixer", ["lstm", "attention", "linear_attention", "mamba2"])
def test_an_input_without_tokens_is_refused(mixer):
    with pytest.raises(ValueError, match=r"no tokens \(shape \(2, 0\)\)"):
        tiny_model(SeqArchForCausalLM, [mixer])(input_ids=torch.zeros(2, 0, dtype=torch.long))


def test_causal_lm_refuses_bidirectional():
    with pytest.raises(ValueError, match="bidirectional"):
        SeqArchForCausalLM(tiny_config(["lstm"], bidirectional=True))


@pytest.mark.parametrize("bad", [VOCAB, -1])
def test_token_ids_out_of_range(bad):
    model = tiny_model(SeqArchModel, ["lstm"])
    ids = random_ids(1, 4)
    ids[0, 2] = bad
    with pytest.raises(ValueError, match="Token ids must be in"):
        model(input_ids=ids)


@pytest.mark.parametrize("shape", [(2, 5), (1, 4), (1, 1, 4, 4), (4,)])
def test_mask_of_wrong_shape(shape):
    model = tiny_model(SeqArchModel, ["attention"])
    with pytest.raises(ValueError, match="attention_mask must be 2-D"):
        model(input_ids=random_ids(2, 4), attention_mask=torch.ones(shape, dtype=torch.long))


@pytest.mark.parametrize("mask", [[[0.0, 0, 0, 0], [-1e9, -1e9, 0, 0]], [[0.0] * 4] * 2, [[1, 1, 1, 1], [0, 0, 2, 1]],
                                  [[1, 0.5, 1, 1]] * 2], ids=["additive", "additive_without_pads", "two", "half"])
def test_mask_of_other_values_than_0_and_1_is_refused(mask):
    """An additive mask (0 keep, -1e9 drop) was read with .bool(): inverted, silently (with no pads, all zeros: every
    token a pad)."""
    model = tiny_model(SeqArchForSequenceClassification, ["lstm", "attention"], pad_token_id=0)
    with pytest.raises(ValueError, match="1 at real tokens and 0 at padding.*Additive masks"):
        model(input_ids=random_ids(2, 4), attention_mask=torch.tensor(mask))
    chunk_of_pads = torch.zeros(2, 4, dtype=torch.long)  # (chunked prefill of a left-padded batch passes such chunks)
    base = tiny_model(SeqArchModel, ["lstm", "attention"], pad_token_id=0)
    assert base(input_ids=random_ids(2, 4), attention_mask=chunk_of_pads).last_hidden_state.isfinite().all()
    bool_mask = torch.tensor([[True] * 4, [False, False, True, True]])
    for same in (bool_mask.float(), bool_mask.to(torch.int8)):  # 0/1 of any dtype is the bool mask
        torch.testing.assert_close(model(input_ids=random_ids(2, 4), attention_mask=same).logits,
                                   model(input_ids=random_ids(2, 4), attention_mask=bool_mask).logits)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.int32])
def test_token_ids_of_any_integer_type(dtype):
    """nn.Embedding takes int32 and int64 only: uint8/int16 ids crashed inside it (forward, generate, session)."""
    from hf_seqarch.tools.streaming import StreamingSession

    model, ids = tiny_model(SeqArchForCausalLM, ["lstm", "attention"]), random_ids(1, 5)
    torch.testing.assert_close(model(input_ids=ids.to(dtype)).logits, model(input_ids=ids).logits)
    generated = model.generate(ids.to(dtype), max_new_tokens=2, do_sample=False, pad_token_id=0)
    assert torch.equal(generated, model.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=0))
    torch.testing.assert_close(StreamingSession(model).feed(ids.to(dtype)), StreamingSession(model).feed(ids))
    with pytest.raises(ValueError, match="must be an integer tensor"):
        StreamingSession(model).feed(ids.to(torch.complex64))


def test_embeddings_of_another_dtype_are_cast_and_integers_refused():
    """float64 embeddings for a float32 model crashed in F.linear (attention) or the RNN; as input_ids give them."""
    model = tiny_model(SeqArchModel, ["attention", "mamba2", "lstm"])
    embeds = torch.randn(2, 4, model.config.hidden_size)
    torch.testing.assert_close(model(inputs_embeds=embeds.double()).last_hidden_state,
                               model(inputs_embeds=embeds).last_hidden_state)
    with pytest.raises(ValueError, match="floating-point values, got shape .* of torch.int64"):
        model(inputs_embeds=embeds.long())


@pytest.mark.parametrize("short_mask", [[[1], [1]], [[1], [0]]], ids=["all_ones", "with_a_pad"])
def test_attention_with_a_cache_needs_the_mask_of_the_past(short_mask):
    """After a left-padded prefill, a decode step's mask of the new token alone would let attention read the cached
    pads: refused whatever its values (an all-ones one was taken as "no padding")."""
    model = tiny_model(SeqArchForCausalLM, ["attention"])
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, :4] = 0
    cache = getattr(model(input_ids=random_ids(2, 6), attention_mask=mask, use_cache=True), CACHE_FIELD)
    with pytest.raises(ValueError, match=r"need the mask of the past tokens too.*\(2, 7\)"):
        model(input_ids=random_ids(2, 1), attention_mask=torch.tensor(short_mask), cache=cache)


def test_packed_sequences_are_refused():
    """Sequences packed into one row (position_ids restarting, as DataCollatorWithFlattening makes them) would run
    into each other in every mixer; positions as generate() gives them, pads included, are fine."""
    from transformers import DataCollatorWithFlattening

    packed = DataCollatorWithFlattening()([{"input_ids": [5, 6, 7]}, {"input_ids": [8, 9]}])
    model = tiny_model(SeqArchForCausalLM, ["lstm", "attention"])
    with pytest.raises(ValueError, match=r"position_ids go back \(or repeat\) within a row.*Pad the sequences"):
        model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], labels=packed["labels"])
    packed = DataCollatorWithFlattening()([{"input_ids": [5]}, {"input_ids": [8, 9]}])  # positions 0, 0, 1: taken once
    with pytest.raises(ValueError, match="position_ids go back"):
        model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], labels=packed["labels"])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 0, 1, 1, 0]])  # left padding; holes and right padding
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)  # generate()'s: [[1, 1, 0, 1, 2], [0, 1, 1, 2, 1]]
    assert model(input_ids=random_ids(2, 5), attention_mask=mask, position_ids=positions).logits.shape == (2, 5, VOCAB)


@pytest.mark.parametrize("marks", ["return_flash_attn_kwargs", "return_seq_idx"])
def test_packed_sequences_marked_without_positions_are_refused(marks):
    """DataCollatorWithFlattening without position_ids marks the packed sequences by their boundaries (cu_seq_lens_*,
    max_length_*; seq_idx): every head took them in **kwargs and dropped them, each sequence reading the one before."""
    from transformers import DataCollatorWithFlattening

    collate = DataCollatorWithFlattening(return_position_ids=False, **{marks: True})
    packed = collate([{"input_ids": [5, 6, 7], "labels": [1, 1, 1]}, {"input_ids": [8, 9], "labels": [1, 1]}])
    boundaries = {name: value for name, value in packed.items() if name not in ("input_ids", "labels")}
    assert boundaries
    for head in (SeqArchModel, SeqArchForCausalLM, SeqArchForSequenceClassification, SeqArchForTokenClassification):
        with pytest.raises(ValueError, match="packed into one row.*Pad the sequences"):
            tiny_model(head, ["lstm", "attention"])(input_ids=packed["input_ids"], **boundaries)


def test_unpadded_rows_picked_from_a_padded_cache_continue_without_a_mask():
    """batch_select_indices of the unpadded row of a padded batch kept the batch's "holds padding" flag: an all-ones
    mask (the right one) was refused as reading pads, and a mask with a pad was refused by the row's counts."""
    model = tiny_model(SeqArchModel, ["attention", "lstm"])
    ids, new = random_ids(2, 6), random_ids(1, 2, seed=3)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1] * 6])  # row 0 left-padded
    with torch.no_grad():
        cache = getattr(model(input_ids=ids, attention_mask=mask, use_cache=True), CACHE_FIELD)
        cache.batch_select_indices(torch.tensor([1]))
        got = model(input_ids=new, attention_mask=torch.ones(1, 8, dtype=torch.long), cache=cache).last_hidden_state
        expected = model(input_ids=torch.cat([ids[1:], new], 1)).last_hidden_state[:, 6:]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_a_refused_call_leaves_the_cache_as_it_was():
    """A cached forward refused for its packed positions once marked the (unpadded) cache as holding padding: every
    later call on it was refused, the stream lost."""
    model = tiny_model(SeqArchForCausalLM, ["attention"]).eval()
    ids = random_ids(2, 8)
    with torch.no_grad():
        cache = getattr(model(input_ids=ids[:, :5], use_cache=True), CACHE_FIELD)
        mask = torch.ones(2, 8, dtype=torch.long)
        mask[1, 5] = 0
        with pytest.raises(ValueError, match="position_ids go back"):
            model(input_ids=ids[:, 5:], attention_mask=mask, position_ids=torch.tensor([[0, 1, 0], [0, 1, 2]]),
                  **{CACHE_FIELD: cache})
        assert not cache.holds_padding and cache.get_seq_length() == 5
        got = model(input_ids=ids[:, 5:], **{CACHE_FIELD: cache}).logits
        torch.testing.assert_close(got, model(input_ids=ids).logits[:, 5:], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("logits_to_keep", [0, 9, torch.arange(4)], ids=["all", "more_than_there_are", "indices"])
def test_labels_with_a_logit_at_every_position(logits_to_keep):
    """logits_to_keep that keeps every position (0, more than the length, all the indices) takes labels as usual."""
    model = tiny_model(SeqArchForCausalLM, ["gru"])
    ids = random_ids(2, 4)
    assert model(input_ids=ids, labels=ids, logits_to_keep=logits_to_keep).loss.isfinite()


@pytest.mark.parametrize("logits_to_keep", [torch.tensor([3, 2, 1, 0]), torch.zeros(4, dtype=torch.long)],
                         ids=["permuted", "repeated"])
def test_labels_with_logits_of_other_positions_are_refused(logits_to_keep):
    """The loss pairs logits and labels by place: a permutation passed the shape check and gave a wrong loss."""
    model = tiny_model(SeqArchForCausalLM, ["gru"])
    ids = random_ids(2, 4)
    with pytest.raises(ValueError, match="must keep the last positions in order"):
        model(input_ids=ids, labels=ids, logits_to_keep=logits_to_keep)
    assert model(input_ids=ids, logits_to_keep=logits_to_keep).logits.shape == (2, 4, VOCAB)  # without labels: fine


@pytest.mark.parametrize("logits_to_keep,message", [(1.5, "must be an int"), (torch.tensor([[0, 1]]), "1-D integer"),
                                                   (torch.tensor([7]), r"positions in \[7, 7\]; the input has 4"),
                                                   (-1, "must be >= 0")])  # -1 dropped the first position
def test_logits_to_keep_of_another_kind_is_refused(logits_to_keep, message):
    with pytest.raises(ValueError, match=message):
        tiny_model(SeqArchForCausalLM, ["gru"])(input_ids=random_ids(2, 4), logits_to_keep=logits_to_keep)


def test_logits_to_keep_as_any_integer_keeps_the_same_positions():
    """numpy and 0-d tensor ints count as ints; a uint8 tensor was indexed as a boolean mask. With labels, a tensor
    naming the last positions is taken as the int that keeps them."""
    import numpy as np

    model, ids = tiny_model(SeqArchForCausalLM, ["gru"]), random_ids(2, 4)
    last_two = model(input_ids=ids, logits_to_keep=2).logits
    for same in (np.int64(2), torch.tensor(2), torch.tensor([2, 3], dtype=torch.uint8), torch.tensor([-2, -1])):
        torch.testing.assert_close(model(input_ids=ids, logits_to_keep=same).logits, last_two)
    with pytest.raises(ValueError, match="must be an int"):
        model(input_ids=ids, logits_to_keep=np.array([2, 3]))
    labels = ids[:, 2:]
    torch.testing.assert_close(model(input_ids=ids, labels=labels, logits_to_keep=torch.tensor([2, 3])).loss,
                               model(input_ids=ids, labels=labels, logits_to_keep=2).loss)


def test_position_ids_of_bools_are_refused():
    model, positions = tiny_model(SeqArchModel, ["attention"]), torch.ones(1, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match="position_ids must be .* of torch.bool"):
        model(input_ids=random_ids(1, 4), position_ids=positions)


@pytest.mark.parametrize("labels_length,logits_to_keep", [(4, 1), (3, 0)])
def test_labels_without_a_logit_at_every_position(labels_length, logits_to_keep):
    """logits_to_keep (or labels of another length) with labels: a clear error, not one from inside cross_entropy."""
    model = tiny_model(SeqArchForCausalLM, ["gru"])
    ids = random_ids(2, 4)
    with pytest.raises(ValueError, match="need a logit at every position"):
        model(input_ids=ids, labels=ids[:, :labels_length], logits_to_keep=logits_to_keep)


@pytest.mark.parametrize("labels,values", [([VOCAB] * 4, f"[{VOCAB}, {VOCAB}]"), ([-100, 5, -3, -100], "[-3, 5]"),
                                           ([-100, 7, VOCAB + 2, 6], f"[6, {VOCAB + 2}]")])
def test_labels_out_of_range(labels, values):
    """Any label outside [0, vocab) other than -100 is refused; the message gives the range of the labels not ignored."""
    model = tiny_model(SeqArchForCausalLM, ["gru"])
    with pytest.raises(ValueError, match=re.escape(f"labels must be in [0, vocab_size={VOCAB}) or -100 (ignored); "
                                                   f"got values in {values}")):
        model(input_ids=random_ids(1, 4), labels=torch.tensor([labels]))


def test_labels_all_ignored_or_in_range_are_accepted():
    model = tiny_model(SeqArchForCausalLM, ["gru"])
    ids = random_ids(1, 4)
    assert model(input_ids=ids, labels=torch.full_like(ids, -100)).loss is not None
    assert model(input_ids=ids, labels=torch.tensor([[-100, 0, VOCAB - 1, -100]])).loss.isfinite()


@pytest.mark.parametrize("label", [3, -1])
def test_sequence_class_labels_out_of_range(label):
    model = tiny_model(SeqArchForSequenceClassification, ["gru"])  # num_labels=3
    with pytest.raises(ValueError, match=r"labels must be in \[0, num_labels=3\)"):
        model(input_ids=random_ids(2, 4), labels=torch.tensor([0, label]))


def test_causal_classifier_without_mask_or_pad_id_refuses_a_batch():
    """Every row would be pooled at position T - 1, a pad for the shorter ones, silently (transformers' own causal
    classifiers refuse it too). One row, a mask, or an encoder's masked mean are fine."""
    model = tiny_model(SeqArchForSequenceClassification, ["gru"], pad_token_id=None)
    ids = random_ids(2, 5)
    with pytest.raises(ValueError, match="needs attention_mask, or config.pad_token_id"):
        model(input_ids=ids)
    assert model(input_ids=ids[:1]).logits.shape == (1, 3)
    assert model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.shape == (2, 3)
    encoder = tiny_model(SeqArchForSequenceClassification, ["gru"], pad_token_id=None, bidirectional=True)
    assert encoder(input_ids=ids).logits.shape == (2, 3)


def test_causal_classifier_warns_that_embeddings_hide_the_padding(caplog):
    model = tiny_model(SeqArchForSequenceClassification, ["gru"])  # pad_token_id=0
    embeds = model.get_input_embeddings()(random_ids(2, 5))
    with caplog.at_level("WARNING"):
        assert model(inputs_embeds=embeds).logits.shape == (2, 3)
    assert "inputs_embeds without attention_mask: padding cannot be told" in caplog.text


def test_classifier_dropout_none_means_none(tmp_path):
    """None, what transformers' configs write for "the model's dropout", once failed inside nn.Dropout; it stays
    None through save and load and as a from_pretrained override. bidirectional=0 (older configs) reads as False."""
    model = tiny_model(SeqArchForTokenClassification, ["gru"], classifier_dropout=None, bidirectional=0)
    assert model.config.bidirectional is False and model.config.classifier_dropout is None
    assert model(input_ids=random_ids(2, 4)).logits.shape == (2, 4, 3)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForTokenClassification.from_pretrained(tmp_path, classifier_dropout=None)
    assert loaded.config.classifier_dropout is None


@pytest.mark.parametrize(
    "head,config,labels,message",
    [
        (SeqArchForCausalLM, {}, torch.rand(2, 4), "labels must be integer ids"),
        (SeqArchForCausalLM, {}, torch.zeros(2, 5, dtype=torch.long), "need a logit at every position"),
        (SeqArchForTokenClassification, {}, torch.tensor([0, 1]), r"one label per token: labels of shape \(2, 4\)"),
        (SeqArchForTokenClassification, {}, torch.zeros(2, 5, dtype=torch.long), r"got \(2, 5\)"),
        (SeqArchForSequenceClassification, {}, torch.zeros(2, 4, dtype=torch.long),
         r"single_label_classification takes one class id per sequence: labels of shape \(2,\), got \(2, 4\)"),
        (SeqArchForSequenceClassification, dict(problem_type="multi_label_classification"), torch.tensor([0, 2]),
         "multi_label_classification with num_labels=3 takes float 0/1 targets"),
        # MSE would broadcast (2,) against (2, 2): a loss, silently wrong
        (SeqArchForSequenceClassification, dict(num_labels=1), torch.rand(2, 2),
         r"regression with num_labels=1 takes one target per label: labels of shape \(2,\), got \(2, 2\)"),
    ],
)
def test_labels_of_the_wrong_shape_or_kind(head, config, labels, message):
    """The heads say what labels they take before their layers run (a GPU is not stalled mid-step by the check's
    device sync, and nothing is computed for nothing), not after, where transformers' losses fail inside torch (or
    broadcast)."""
    model = tiny_model(head, ["gru"], **config)
    ran = []
    model.base_model.layers[0].register_forward_pre_hook(lambda *_: ran.append(True))
    with pytest.raises(ValueError, match=message):
        model(input_ids=random_ids(2, 4), labels=labels)
    assert not ran


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.int16, torch.uint8])
@pytest.mark.parametrize(
    "head,config,shape",
    [(SeqArchForCausalLM, {}, (2, 4)), (SeqArchForTokenClassification, {}, (2, 4)),
     (SeqArchForTokenClassification, {}, (8,)),  # flattened, as transformers' loss reads them
     (SeqArchForSequenceClassification, {}, (2,)), (SeqArchForSequenceClassification, {}, (2, 1))],
)
def test_class_ids_of_any_integer_type_and_accepted_shape(head, config, shape, dtype):
    """Class ids of any integer dtype give the int64 ids' loss (int32 / int16 / uint8 ones failed inside
    cross_entropy, int16 ones were read as multi-label targets); shapes transformers' losses accept stay accepted."""
    model = tiny_model(head, ["gru"], **config)
    ids = random_ids(2, 4)
    labels = torch.randint(0, 3, shape, generator=torch.Generator().manual_seed(0))
    expected = model(input_ids=ids, labels=labels).loss
    torch.testing.assert_close(model(input_ids=ids, labels=labels.to(dtype)).loss, expected, rtol=0, atol=0)


@pytest.mark.parametrize("num_labels,problem_type", [(3, None), (1, None)], ids=["class_id", "regression"])
def test_one_sequence_takes_a_scalar_label(num_labels, problem_type):
    """Batch 1: a 0-d label, as transformers' loss (which flattens) accepts."""
    model = tiny_model(SeqArchForSequenceClassification, ["gru"], num_labels=num_labels, problem_type=problem_type)
    label = torch.tensor(2) if num_labels > 1 else torch.tensor(0.5)
    assert model(input_ids=random_ids(1, 4), labels=label).loss.isfinite()


def test_regression_takes_integer_targets():
    """problem_type='regression' with integer targets is a regression, as for transformers' models (the class-id
    check once refused it, saying they must be in [0, num_labels))."""
    model = tiny_model(SeqArchForSequenceClassification, ["gru"], problem_type="regression")  # num_labels=3
    assert model(input_ids=random_ids(2, 4), labels=torch.tensor([[5, 0, 7], [1, 2, 9]])).loss.isfinite()


@pytest.mark.parametrize(
    "inputs,message",
    [
        (dict(input_ids=random_ids(1, 4)[0]), r"input_ids must be \(batch, length\)"),
        (dict(input_ids=random_ids(1, 4).float()), "input_ids must be integer token ids, got torch.float32"),
        (dict(inputs_embeds=torch.randn(4, 32)), r"inputs_embeds must be \(batch, length, hidden_size=32\)"),
        (dict(inputs_embeds=torch.randn(1, 4, 16)), r"inputs_embeds must be"),
        (dict(input_ids=random_ids(2, 4), position_ids=torch.arange(4)), r"position_ids must be \(2 or 1, 4\)"),
        (dict(input_ids=random_ids(2, 4), position_ids=torch.arange(3)[None]), r"position_ids must be"),
    ],
    ids=["1d_ids", "float_ids", "2d_embeds", "embeds_width", "1d_positions", "short_positions"],
)
def test_inputs_of_wrong_shape(inputs, message):
    model = tiny_model(SeqArchModel, ["attention"])
    with pytest.raises(ValueError, match=message):
        model(**inputs)


@pytest.mark.parametrize("head", [SeqArchForSequenceClassification, SeqArchForTokenClassification])
def test_classification_heads_take_no_cache(head):
    """A cache passed to a classification head was silently ignored."""
    output = tiny_model(SeqArchForCausalLM, ["lstm"])(input_ids=random_ids(2, 5), use_cache=True)
    for name in ("cache", "past_key_values"):
        with pytest.raises(ValueError, match=f"takes no cache \\(got {name}=\\)"):
            tiny_model(head, ["lstm"])(input_ids=random_ids(2, 1), **{name: getattr(output, CACHE_FIELD)})



@pytest.mark.parametrize("built_bidirectional", [False, True])
def test_bidirectional_changed_after_the_model_was_built_is_refused(built_bidirectional):
    """The layers and the heads' pooling are fixed when the model is built: a causal model set bidirectional later gave
    attention that saw future tokens beside LSTMs that did not (and sdpa kept its built causality where no mask was
    passed, so one row's output depended on another row's padding)."""
    model = tiny_model(SeqArchForSequenceClassification, ["attention", "lstm"], bidirectional=built_bidirectional)
    model.config.bidirectional = not built_bidirectional
    with pytest.raises(ValueError, match="after the model was built"):
        model(input_ids=random_ids(2, 5))
    model.config.bidirectional = built_bidirectional  # set back: runs
    assert model(input_ids=random_ids(2, 5)).logits.shape == (2, 3)


@pytest.mark.parametrize("name,value", [
    ("rope_theta", 0.0), ("rope_theta", 500.0), ("sliding_window", 2), ("hidden_act", "gelu"), ("rms_norm_eps", 0.1),
    ("linear_attention_feature_map", "relu"), ("head_dim", 4), ("num_attention_heads", 2),
    ("mixer_types", ["attention", "linear_attention"]),
])
def test_a_config_field_changed_after_the_model_was_built_is_refused(name, value, tmp_path):
    """The layers are built from these fields (and rope_theta, read at each forward, is checked only when a config is
    built or saved): set afterwards, the model ran one thing and saved another (reloaded logits 0.075 to 0.4 off), ran
    an invalid rope_theta (0: finite, wrong logits), or failed inside torch (head sizes); a StreamingSession kept the
    old rope_theta; save_pretrained wrote the new value, and the folder loaded as another model. Refused at every
    forward, session step and save, with the values."""
    model = tiny_model(SeqArchForCausalLM, ["sliding_attention", "linear_attention"], intermediate_size=16,
                       sliding_window=3)
    session = StreamingSession(model)
    session.feed(random_ids(1, 4))
    built = getattr(model.config, name)
    setattr(model.config, name, value)
    message = f"config.{name} was set to {value!r} after the model was built with {built!r}"
    with pytest.raises(ValueError, match=re.escape(message)):
        model(input_ids=random_ids(1, 4))
    with pytest.raises(ValueError, match=re.escape(message)):
        session.step(random_ids(1, 1)[0])
    with pytest.raises(ValueError, match=re.escape(message) if name != "rope_theta" or value else "rope_theta"):
        model.save_pretrained(tmp_path)
    assert not (tmp_path / "config.json").exists()
    setattr(model.config, name, built)  # set back: runs
    assert model(input_ids=random_ids(1, 4)).logits.shape == (1, 4, VOCAB)


def test_a_vocab_size_changed_by_hand_is_refused():
    """Raised by hand past the embeddings, token ids passed the range check and failed inside the embedding."""
    model = tiny_model(SeqArchForCausalLM, ["lstm"])
    model.config.vocab_size = VOCAB + 5
    with pytest.raises(ValueError, match=rf"config.vocab_size is {VOCAB + 5} but the embeddings hold {VOCAB} tokens"):
        model(input_ids=torch.full((1, 2), VOCAB + 1))
    model.resize_token_embeddings(VOCAB + 5)  # the way to change it
    assert model(input_ids=torch.full((1, 2), VOCAB + 1)).logits.shape == (1, 2, VOCAB + 5)


def test_bidirectional_model_takes_no_cache():
    model = tiny_model(SeqArchModel, ["lstm"], bidirectional=True)
    with pytest.raises(ValueError, match="no cache"):
        model(input_ids=random_ids(1, 4), cache=SeqArchCache(model.config))


def test_loading_weights_of_another_stack_raises(tmp_path):
    tiny_model(SeqArchForCausalLM, ["attention", "attention"]).save_pretrained(tmp_path)
    config = tiny_config(["attention", "lstm"])
    with pytest.raises(Exception, match="lstm|mixer|lacks|size"):
        SeqArchForCausalLM.from_pretrained(tmp_path, config=config)


def test_loading_lm_checkpoint_into_classifier_keeps_body(tmp_path):
    lm = tiny_model(SeqArchForCausalLM, ["gru", "attention"])
    lm.save_pretrained(tmp_path)
    classifier = SeqArchForSequenceClassification.from_pretrained(tmp_path, num_labels=2)
    for name, tensor in lm.model.state_dict().items():
        assert torch.equal(classifier.model.state_dict()[name], tensor), name


@pytest.mark.parametrize(
    "made_for,used_by,batch,message",
    [
        (["lstm", "attention"], ["attention", "lstm"], 2, "made for a model with mixer_types"),
        (["gru", "gru"], ["gru"], 2, "cache has 2 layers; the model has 1"),
        (["sliding_attention"], ["attention"], 2, "made for a model with mixer_types"),
        (["mamba2"], ["mamba2"], 1, "holds 2 sequence.*the input has 1"),
    ],
)
def test_a_cache_is_checked_against_the_model_and_batch(made_for, used_by, batch, message):
    """A cache is only valid for the model (layout) that filled it and its batch size: used elsewhere it once gave
    KeyErrors from inside a mixer, or silently wrong logits (a sliding-window cache in a full-attention model)."""
    output = tiny_model(SeqArchForCausalLM, made_for)(input_ids=random_ids(2, 5), use_cache=True)
    cache = getattr(output, CACHE_FIELD)  # `cache`, or `past_key_values` before transformers 5.24
    with pytest.raises(ValueError, match=message):
        tiny_model(SeqArchForCausalLM, used_by)(input_ids=random_ids(batch, 1), cache=cache)


def test_a_cache_is_checked_against_a_model_built_from_its_config_edited():
    """The check was skipped for the config object checked last: edited in place and given to a second model, it let
    the first model's cache through (sliding_window 3 -> 6: logits 0.1 off)."""
    config = tiny_config(["sliding_attention"])
    cache = getattr(SeqArchForCausalLM(config)(input_ids=random_ids(1, 6), use_cache=True), CACHE_FIELD)
    config.sliding_window = 6
    with pytest.raises(ValueError, match="made for a model with sliding_window=3; this model has sliding_window=6"):
        SeqArchForCausalLM(config)(input_ids=random_ids(1, 1), cache=cache)


def test_a_cache_is_checked_on_the_linear_attention_heads_in_use():
    """With linear_attention_num_heads None the head count comes from num_attention_heads: a cache of another count
    failed inside the scan."""
    made_for = tiny_model(SeqArchForCausalLM, ["linear_attention"], linear_attention_num_heads=None, num_attention_heads=4)
    cache = getattr(made_for(input_ids=random_ids(2, 5), use_cache=True), CACHE_FIELD)
    used_by = tiny_model(SeqArchForCausalLM, ["linear_attention"], linear_attention_num_heads=None, num_attention_heads=2,
                         num_key_value_heads=2)
    with pytest.raises(ValueError, match="made for a model with linear_attention_heads_in_use=4"):
        used_by(input_ids=random_ids(2, 1), cache=cache)


def test_assisted_decoding_is_refused_clearly():
    """Assisted decoding drops rejected draft tokens from the cache; recurrent states cannot be rolled back."""
    from transformers import GenerationConfig

    model, ids = tiny_model(SeqArchForCausalLM, ["lstm", "attention"]), random_ids(1, 6)
    for option in (dict(assistant_model=tiny_model(SeqArchForCausalLM, ["gru"])), dict(prompt_lookup_num_tokens=2)):
        with pytest.raises(ValueError, match="Assisted decoding .* not supported"):
            model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0, **option)
    with pytest.raises(ValueError, match="Assisted decoding .* not supported"):  # a positional generation config
        model.generate(ids, GenerationConfig(prompt_lookup_num_tokens=2, max_new_tokens=3, pad_token_id=0))
    with pytest.raises(ValueError, match=r"Assisted decoding \(use_mtp\) is not supported"):  # multi-token prediction
        model.generate(ids, max_new_tokens=3, pad_token_id=0, use_mtp=True)
    # Set in the model's generation config (as a generation_config.json gives it) while another config is passed:
    # transformers takes the model's value for what the passed config leaves at its default.
    model.generation_config.prompt_lookup_num_tokens = 2
    with pytest.raises(ValueError, match=r"Assisted decoding \(prompt_lookup_num_tokens\) is not supported"):
        model.generate(ids, generation_config=GenerationConfig(max_new_tokens=3, do_sample=False, pad_token_id=0))
    # None passed by name sets it, as generate() does: no assisted decoding then
    assert model.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=0,
                          prompt_lookup_num_tokens=None).shape == (1, 8)
    with pytest.raises(ValueError, match=r"Assisted decoding \(prompt_lookup_num_tokens\) is not supported"):
        model.generate(ids, max_new_tokens=2, pad_token_id=0, prompt_lookup_num_tokens=0)  # (0 == False, but asks)


def test_a_seqarch_model_as_the_assistant_of_another_is_refused_clearly():
    """The draft model's cache drops the tokens the main model rejects: an AttributeError ('crop') inside transformers
    it was."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    main = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                        num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)).eval()
    assistant = tiny_model(SeqArchForCausalLM, ["lstm", "attention"])
    with pytest.raises(ValueError, match="cannot be the assistant"):
        main.generate(random_ids(1, 6), assistant_model=assistant, max_new_tokens=4, do_sample=False, pad_token_id=0)


def test_a_cache_is_checked_only_on_what_shapes_its_states():
    """A field no mixer of the stack reads (sliding_window, mamba sizes in an lstm+attention stack) may differ,
    and may be of any int type (a numpy int from a sweep)."""
    import numpy as np

    output = tiny_model(SeqArchForCausalLM, ["lstm", "attention"])(input_ids=random_ids(2, 5), use_cache=True)
    other = tiny_model(SeqArchForCausalLM, ["lstm", "attention"], sliding_window=np.int64(7), mamba_state_size=4)
    assert other(input_ids=random_ids(2, 1), cache=getattr(output, CACHE_FIELD)).logits.shape == (2, 1, VOCAB)


def test_a_cache_of_another_kind_is_refused_with_what_fits():
    """PEFT's prefix tuning passes a DynamicCache of key/value prefixes: the message says what works instead."""
    from transformers import DynamicCache

    model = tiny_model(SeqArchForCausalLM, ["lstm", "attention"])
    with pytest.raises(TypeError, match="got DynamicCache.*prefix tuning.*prompt tuning, p-tuning and LoRA do"):
        model(input_ids=random_ids(2, 4), past_key_values=DynamicCache(), use_cache=True)


def test_a_cache_left_half_updated_by_an_error_is_refused():
    """A forward that raises midway (an interrupt, out of memory) leaves some layers past the others; retrying the
    chunk on that cache once gave logits off by ~0.3, silently."""
    from hf_seqarch.tools.streaming import StreamingSession

    model = tiny_model(SeqArchForCausalLM, ["attention", "lstm"])
    ids = random_ids(1, 6)
    cache = SeqArchCache(model.config)
    model(input_ids=ids, cache=cache, use_cache=True)

    def interrupt(module, inputs):
        raise KeyboardInterrupt

    hook = model.model.layers[1].register_forward_pre_hook(interrupt)  # after layer 0 read the new tokens
    with pytest.raises(KeyboardInterrupt):
        model(input_ids=ids[:, :3], cache=cache, use_cache=True)
    hook.remove()
    for use in (lambda: model(input_ids=ids[:, :3], cache=cache, use_cache=True), cache.state_dict,
                lambda: StreamingSession(model, cache)):
        with pytest.raises(ValueError, match="mid-update: either a forward using it raised midway"):
            use()

    session = StreamingSession(model)  # its single-token path: the same mark, checked at each step
    session.feed(ids)
    session.cache.begin_update()  # as a step that raised midway leaves it
    with pytest.raises(ValueError, match="mid-update"):
        session.step(ids[:, 0])
    assert model(input_ids=ids, cache=SeqArchCache(model.config), use_cache=True).logits.shape == (1, 6, VOCAB)


def test_a_cache_in_use_by_another_forward_is_refused_with_that_reason():
    """One cache in two calls at once: a nested call (here from a hook) was told the cache had been left by a forward
    that raised; and of two threads whose checks both passed before either began, both wrote the layers (a mix of two
    sequences, silently). Each call now claims the cache as it begins, and says why it refuses."""
    model = tiny_model(SeqArchForCausalLM, ["attention", "lstm"])
    ids = random_ids(1, 6)
    cache = SeqArchCache(model.config)
    model(input_ids=ids, cache=cache, use_cache=True)

    def nested_call(module, inputs):
        model(input_ids=ids[:, :1], cache=cache, use_cache=True)

    hook = model.model.layers[1].register_forward_pre_hook(nested_call)
    with pytest.raises(ValueError, match="another forward is updating it right now"):
        model(input_ids=ids[:, :2], cache=cache, use_cache=True)
    hook.remove()

    claimed = SeqArchCache(model.config)
    claimed.begin_update()  # as a forward in another thread leaves it between its checks and its layers
    with pytest.raises(ValueError, match="concurrent or nested"):
        claimed.begin_update()


def test_a_cache_is_claimed_before_its_length_is_read():
    """A forward read the cache's length, then claimed it: another forward (another thread) that ran whole in between
    advanced it, and the first then wrote its tokens at the stale position (positions and masks of the wrong
    offset, silently). A call is now refused while another has read the length and not yet advanced the cache; a
    call refused by a later check (here a mask of the wrong shape) leaves the cache unclaimed."""
    model = tiny_model(SeqArchForCausalLM, ["attention", "lstm"]).eval()
    ids = random_ids(1, 8)
    cache = SeqArchCache(model.config)
    model(input_ids=ids[:, :4], cache=cache, use_cache=True)
    reads_length = cache.get_seq_length

    def another_forward_in_between(*args, **kwargs):
        cache.get_seq_length = reads_length
        with pytest.raises(ValueError, match="another forward is updating it right now"):
            model(input_ids=ids[:, 4:5], cache=cache, use_cache=True)
        return reads_length(*args, **kwargs)

    cache.get_seq_length = another_forward_in_between
    logits = model(input_ids=ids[:, 4:6], cache=cache, use_cache=True).logits
    torch.testing.assert_close(logits, model(input_ids=ids[:, :6]).logits[:, 4:6])
    with pytest.raises(ValueError, match="attention_mask must be 2-D"):
        model(input_ids=ids[:, 6:7], attention_mask=torch.ones(1, 3), cache=cache, use_cache=True)
    assert not cache.mid_update
    torch.testing.assert_close(model(input_ids=ids[:, 6:8], cache=cache, use_cache=True).logits,
                               model(input_ids=ids).logits[:, 6:8])


def test_a_cache_state_cast_past_its_exact_token_counts_is_refused():
    """A state_dict cast whole to bfloat16 rounded seen_tokens (1001 -> 1000) while the keys of 1001 tokens stayed:
    the next token's position was wrong. Counts the dtype holds exactly are taken."""
    model = tiny_model(SeqArchForCausalLM, ["attention"])
    for length, taken in ((200, True), (257, False), (301, False)):  # bfloat16: 257 reads 256, exact below it
        filled = getattr(model(input_ids=random_ids(1, length), use_cache=True), CACHE_FIELD)
        cast = {name: t.to(torch.bfloat16) if name == "seen_tokens" else t for name, t in filled.state_dict().items()}
        if taken:
            assert SeqArchCache.from_state_dict(cast, num_layers=1).get_seq_length() == length
        else:
            with pytest.raises(ValueError, match="cast to torch.bfloat16, which holds token counts exactly only below"):
                SeqArchCache.from_state_dict(cast, num_layers=1)


@pytest.mark.parametrize("restore", ["empty", "state_dict"])
def test_a_cache_made_without_a_config_is_checked_too(restore):
    """SeqArchCache(num_layers=...) and from_state_dict(..., config=None) held no layout and were never checked: an
    LSTM's state continued in a GRU model (garbage logits), a full-attention one in a sliding-window layer."""
    lstm, gru = tiny_model(SeqArchForCausalLM, ["lstm"]), tiny_model(SeqArchForCausalLM, ["gru"])
    if restore == "empty":  # the first model to use it gives it its layout
        cache = SeqArchCache(num_layers=1)
        lstm(input_ids=random_ids(2, 5), cache=cache, use_cache=True)
    else:  # the layout is saved with the states
        filled = getattr(lstm(input_ids=random_ids(2, 5), use_cache=True), CACHE_FIELD)
        cast = {name: t.double() for name, t in filled.state_dict().items()}  # every tensor cast, the layout's too
        cache = SeqArchCache.from_state_dict(cast, num_layers=1)
        with pytest.raises(ValueError, match='made for a model with mixer_types=\\["lstm"\\]'):  # at load, with a config
            SeqArchCache.from_state_dict(filled.state_dict(), num_layers=1, config=gru.config)
    with pytest.raises(ValueError, match='made for a model with mixer_types=\\["lstm"\\]; this model has .*"gru"'):
        gru(input_ids=random_ids(2, 1), cache=cache)
    assert lstm(input_ids=random_ids(2, 1), cache=cache).logits.shape == (2, 1, VOCAB)


def test_training_under_gradient_checkpointing_refuses_a_cached_context():
    """The checkpointed backward re-runs the layers: the cache was dropped, silently training on the new tokens
    without their context (positions from 0). Without gradients (generate from a model left in train mode) nothing is
    re-run, and the cache is used: it was dropped there too, and each token generated from the last one alone."""
    model, ids = tiny_model(SeqArchForCausalLM, ["lstm", "attention"]), random_ids(1, 6)
    expected = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    model.gradient_checkpointing_enable()
    model.train()
    assert torch.equal(model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0), expected)
    cache = getattr(model(input_ids=ids[:, :4], use_cache=True), CACHE_FIELD)  # (no cache made under checkpointing)
    assert cache is None
    with torch.no_grad():
        cache = getattr(model(input_ids=ids[:, :4], use_cache=True), CACHE_FIELD)
    for passed in (cache, SeqArchCache(model.config)):  # an empty one, passed on from chunk to chunk, never filled
        with pytest.raises(ValueError, match="cannot read or fill a cache.*gradient_checkpointing_disable"):
            model(input_ids=ids[:, 4:], labels=ids[:, 4:], cache=passed)


def test_a_cache_on_another_device_is_refused_with_how_to_move_it():
    """A cache left on another device than the model's input failed inside a mixer (torch's device mismatch)."""
    from hf_seqarch.tools.streaming import StreamingSession

    model, ids = tiny_model(SeqArchForCausalLM, ["lstm", "attention"]), random_ids(2, 5)
    cache = getattr(model(input_ids=ids, use_cache=True), CACHE_FIELD)
    elsewhere = SeqArchCache.from_state_dict(cache.state_dict(), 2).to("meta")  # (no other device on a CPU machine)
    assert {t.device.type for state in elsewhere.layers for t in state.values()} == {"meta"}
    with pytest.raises(ValueError, match=r"This cache is on meta; the input is on cpu.*cache.to\('cpu'\)"):
        model(input_ids=ids[:, :2], cache=elsewhere)
    with pytest.raises(ValueError, match="This cache is on meta"):
        StreamingSession(model, cache=elsewhere)
    with torch.no_grad():  # a decode step without autograd: attention's keys go to a buffer with spare room
        model(input_ids=ids[:, :1], cache=cache)
    room = dict(cache._kv_room)
    assert room and cache.to("cpu") is cache and cache._kv_room == room  # already there: kept as it is
    assert model(input_ids=ids[:, :2], cache=cache).logits.shape == (2, 2, VOCAB)
    # accelerate's device_map hooks would call .to() on it with every forward: they are told to leave it
    assert {"cache", "past_key_values"} <= set(model._skip_keys_device_placement)


def test_a_causal_recurrence_loaded_as_an_encoder_says_why_not(tmp_path):
    """A bidirectional LSTM/GRU has other weights than a causal one: the error once only said "other shapes". The
    mixers whose weights do not change load either way."""
    tiny_model(SeqArchForCausalLM, ["attention", "mamba2"]).save_pretrained(tmp_path / "attention")
    encoder = SeqArchForSequenceClassification.from_pretrained(tmp_path / "attention", bidirectional=True)
    assert encoder.config.bidirectional
    tiny_model(SeqArchForCausalLM, ["attention", "lstm"]).save_pretrained(tmp_path / "lstm")
    for load in (lambda: SeqArchForSequenceClassification.from_pretrained(tmp_path / "lstm", bidirectional=True),
                 lambda: SeqArchModel.from_pretrained(tmp_path / "lstm", config=tiny_config(["attention", "lstm"],
                                                                                               bidirectional=True))):
        with pytest.raises(ValueError, match=r"causal model \(bidirectional=False\) with lstm layers, which cannot "
                                             r"load as an encoder"):
            load()
    # and the other way: an encoder's LSTM as causal (what the causal LM's refusal of an encoder config advises)
    tiny_model(SeqArchForSequenceClassification, ["attention", "lstm"], bidirectional=True).save_pretrained(
        tmp_path / "encoder")
    for load in (lambda: SeqArchForCausalLM.from_pretrained(tmp_path / "encoder", bidirectional=False),
                 lambda: AutoModelForCausalLM.from_pretrained(tmp_path / "encoder", bidirectional=False)):
        with pytest.raises(ValueError, match=r"is an encoder \(bidirectional=True\) with lstm layers, which cannot "
                                             r"load as a causal model"):
            load()
    assert SeqArchForSequenceClassification.from_pretrained(tmp_path / "encoder").config.bidirectional


@pytest.mark.parametrize(
    "shapes,window,message",
    [
        (((2, 4, 6, 8), (2, 2, 6, 8)), 0, "window must be an integer >= 1"),  # once a ZeroDivisionError
        (((2, 4, 6, 8), (2, 2, 6, 8)), 3.0, "window must be an integer >= 1"),
        (((2, 4, 6, 8), (2, 2, 5, 8)), 3, r"Expected query \(B, nh, T, hd\)"),  # keys shorter than queries
        (((2, 4, 6, 8), (2, 3, 6, 8)), 3, r"nkv dividing nh"),
        (((2, 4, 0, 8), (2, 2, 0, 8)), 3, r"T >= 1"),
    ],
)
def test_sliding_window_attention_op_checks_its_inputs(shapes, window, message):
    """The op the sliding_attention mixer runs (also public): errors came from its block arithmetic or sdpa."""
    query_shape, kv_shape = shapes
    with pytest.raises(ValueError, match=message):
        sliding_window_attention(torch.randn(query_shape), torch.randn(kv_shape), torch.randn(kv_shape), window, 0.5)


def test_token_classification_with_one_label_is_refused_when_trained():
    """Its cross-entropy over one class is 0 for every token: training silently did nothing."""
    model = tiny_model(SeqArchForTokenClassification, ["gru"], num_labels=1)
    ids = random_ids(2, 4)
    assert model(ids).logits.shape == (2, 4, 1)  # (inference stays allowed)
    with pytest.raises(ValueError, match="num_labels=1 has nothing to learn"):
        model(ids, labels=torch.zeros(2, 4, dtype=torch.long))


@pytest.mark.parametrize("targets", [[[2.0, 0.0, 1.0], [0.0, 1.0, 1.0]], [[0.0, -1.0, 1.0], [0.5, 1.0, 0.0]],
                                     [[float("nan"), 0.0, 1.0], [0.0, 1.0, 0.0]]], ids=["above_1", "below_0", "nan"])
def test_multi_label_targets_outside_0_1_are_refused(targets):
    """Binary cross-entropy of targets outside [0, 1] is a finite number that means nothing: it trained silently."""
    model = tiny_model(SeqArchForSequenceClassification, ["gru"], num_labels=3,
                       problem_type="multi_label_classification")
    with pytest.raises(ValueError, match=r"multi_label_classification takes targets in \[0, 1\]"):
        model(random_ids(2, 4), labels=torch.tensor(targets))
    model(random_ids(2, 4), labels=torch.tensor([[1.0, 0.0, 0.25], [0.0, 1.0, 1.0]]))  # soft targets stay allowed


def test_a_model_tied_against_its_config_is_not_saved(tmp_path):
    """config.tie_word_embeddings set to False on a tied model: the saved folder said untied and held no
    lm_head.weight, and from_pretrained refused it (saving again wrote the same folder)."""
    model = tiny_model(SeqArchForCausalLM, ["gru"])
    model.config.tie_word_embeddings = False
    with pytest.raises(ValueError, match="lm_head.weight is still the input embeddings' tensor"):
        model.save_pretrained(tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())  # the advised untying
    model.save_pretrained(tmp_path / "untied")
    loaded = SeqArchForCausalLM.from_pretrained(tmp_path / "untied")
    assert not loaded.config.tie_word_embeddings and torch.equal(loaded.lm_head.weight, model.lm_head.weight)


def test_a_damaged_cache_state_is_refused_with_what_is_wrong():
    """from_state_dict took a state with a layer's tensors missing (that layer restarted from zeros, silently), a
    seen_tokens that no cache can have, unknown entries and 'layers.-1.*' (written into the last layer); a missing
    seen_tokens or a damaged layout raised a bare KeyError / JSONDecodeError."""
    model = tiny_model(SeqArchForCausalLM, ["lstm", "attention"])
    saved = getattr(model(input_ids=random_ids(1, 5), use_cache=True), CACHE_FIELD).state_dict()

    def restored(**changes):
        tensors = {**saved, **changes}
        return SeqArchCache.from_state_dict({k: v for k, v in tensors.items() if v is not None}, num_layers=2)

    for changes, message in [
        (dict(**{"layers.0.c": None}), r"has \['h'\] for layer 0 \(lstm\) after 5 tokens; it needs \['c', 'h'\]"),
        (dict(seen_tokens=None), "'seen_tokens' must hold one integer >= 0"),
        (dict(seen_tokens=torch.tensor(-3)), "'seen_tokens' must hold one integer >= 0"),
        (dict(seen_tokens=torch.tensor(2.5)), "'seen_tokens' must hold one integer >= 0"),
        (dict(**{"layers.-1.h": saved["layers.0.h"]}), "Not an entry of a 2-layer SeqArchCache .*: 'layers.-1.h'"),
        (dict(extra=torch.zeros(1)), "Not an entry of a 2-layer SeqArchCache state_dict: 'extra'"),
        (dict(layout=torch.tensor([123, 34], dtype=torch.uint8)), "layout is damaged"),
    ]:
        with pytest.raises(ValueError, match=message):
            restored(**changes)
    cache = restored()  # whole: continues as the original
    assert model(input_ids=random_ids(1, 1), cache=cache).logits.shape == (1, 1, VOCAB)


def test_inputs_that_are_not_tensors_are_refused_by_name():
    """Lists and numpy arrays for the inputs failed deep inside ('list' object has no attribute 'dim'), every head."""
    import numpy as np

    ids = random_ids(1, 4)
    for head in (SeqArchModel, SeqArchForCausalLM, SeqArchForSequenceClassification, SeqArchForTokenClassification):
        model = tiny_model(head, ["lstm", "attention"])
        for name, value in [("input_ids", ids.tolist()), ("attention_mask", np.ones((1, 4))),
                            ("position_ids", [[0, 1, 2, 3]])]:
            inputs = {"input_ids": ids, name: value}
            with pytest.raises(TypeError, match=f"{name} must be a torch.Tensor \\(or None\\), got"):
                model(**inputs)
        if head is not SeqArchModel:
            with pytest.raises(TypeError, match="labels must be a torch.Tensor"):
                model(input_ids=ids, labels=[1])


@pytest.mark.parametrize("count", [-2, torch.tensor([3, 4]), torch.tensor(-1.0), "3"])
def test_num_items_in_batch_must_be_one_number_at_least_0(count):
    """A negative count or a 1-D tensor gave a negative or vector loss (the regression and multi-label heads rescale by
    it in our own code). 0 is a batch without a label, which the Trainer's evaluate() passes: taken, as Llama does."""
    model = tiny_model(SeqArchForSequenceClassification, ["lstm"], num_labels=1, problem_type="regression")
    lm, ids = tiny_model(SeqArchForCausalLM, ["lstm"]), random_ids(2, 4)
    assert torch.isnan(lm(input_ids=ids, labels=torch.full_like(ids, -100), num_items_in_batch=torch.tensor(0)).loss)
    with pytest.raises(ValueError, match="num_items_in_batch must be one number >= 0"):
        model(input_ids=random_ids(2, 4), labels=torch.rand(2), num_items_in_batch=count)
    assert model(input_ids=random_ids(2, 4), labels=torch.rand(2), num_items_in_batch=torch.tensor(2)).loss.dim() == 0


def test_num_items_in_batch_0_with_labels_is_refused():
    """0 with labels the loss counts made the loss their sum / 0: inf, silently (the regression and multi-label heads
    rescale by it themselves; transformers' cross-entropy divides by it). Without such labels it stays nan (0 / 0)."""
    ids = random_ids(2, 4)
    lm = tiny_model(SeqArchForCausalLM, ["lstm"])
    last_only = torch.full_like(ids, -100)
    last_only[:, 0] = 5  # the first position is never a target (the loss shifts the labels): still none counted
    assert torch.isnan(lm(input_ids=ids, labels=last_only, num_items_in_batch=0).loss)
    tokens = tiny_model(SeqArchForTokenClassification, ["lstm"], num_labels=3)
    labelled = [
        (lm, ids), (tokens, torch.tensor([[-100, 1, -100, -100], [-100] * 4])),
        (tiny_model(SeqArchForSequenceClassification, ["lstm"], num_labels=3), torch.tensor([-100, 2])),
        (tiny_model(SeqArchForSequenceClassification, ["lstm"], num_labels=1, problem_type="regression"), torch.rand(2)),
        (tiny_model(SeqArchForSequenceClassification, ["lstm"], num_labels=3), torch.tensor([[1.0, 0, 1], [0, 0, 0]])),
    ]
    for model, labels in labelled:
        for count in (0, torch.tensor(0), torch.tensor(0.0)):
            with pytest.raises(ValueError, match="num_items_in_batch is 0, but this batch has [0-9]+ labels"):
                model(input_ids=ids, labels=labels, num_items_in_batch=count)
    assert torch.isnan(tokens(input_ids=ids, labels=torch.full_like(ids, -100), num_items_in_batch=0).loss)
    # every label counts for regression and multi-label targets, -100.0 too (it is a value there)
    regression = tiny_model(SeqArchForSequenceClassification, ["lstm"], num_labels=1, problem_type="regression")
    with pytest.raises(ValueError, match="num_items_in_batch is 0, but this batch has 2 labels"):
        regression(input_ids=ids, labels=torch.full((2,), -100.0), num_items_in_batch=0)
    # refused before the layers run: a cache passed in is left as it was
    cache = getattr(lm(input_ids=ids, use_cache=True), CACHE_FIELD)
    with pytest.raises(ValueError, match="num_items_in_batch is 0"):
        lm(input_ids=ids, labels=ids, cache=cache, use_cache=True, num_items_in_batch=0)
    assert cache.get_seq_length() == 4
    # counted as the loss counts: its ignore_index, and a causal LM's shift_labels where given
    assert torch.isnan(tokens(input_ids=ids, labels=torch.full_like(ids, 2), num_items_in_batch=0, ignore_index=2).loss)
    assert torch.isnan(lm(input_ids=ids, labels=ids, shift_labels=torch.full_like(ids, -100), num_items_in_batch=0).loss)
    with pytest.raises(ValueError, match="num_items_in_batch is 0, but this batch has 2 labels"):
        lm(input_ids=ids, labels=last_only, shift_labels=last_only, num_items_in_batch=0)



def test_labels_are_checked_against_the_ignore_index_passed():
    """The heads take ignore_index= and hand it to transformers' loss, but their label check allowed only -100: labels
    using the ignore_index passed were refused, and -100 with another ignore_index failed inside cross_entropy."""
    ids = random_ids(2, 6)
    heads = [
        (tiny_model(SeqArchForCausalLM, ["lstm"]), ids.clone()),
        (tiny_model(SeqArchForTokenClassification, ["lstm"], num_labels=3), ids % 3),
        (tiny_model(SeqArchForSequenceClassification, ["lstm"], num_labels=3), torch.tensor([1, 2])),
    ]
    for model, labels in heads:
        labels.view(-1)[-1] = -1
        ignored = labels.clone()
        ignored.view(-1)[-1] = -100
        # -1 ignored as -100 is: the same loss
        torch.testing.assert_close(model(input_ids=ids, labels=labels, ignore_index=-1).loss,
                                   model(input_ids=ids, labels=ignored).loss)
        with pytest.raises(ValueError, match=r"labels must be in \[0, [a-z_]+=[0-9]+\) or 2 \(ignored\); got values in \[-100"):
            model(input_ids=ids, labels=ignored, ignore_index=2)
        with pytest.raises(ValueError, match="ignore_index must be an int"):
            model(input_ids=ids, labels=ignored, ignore_index=-100.0)
    lm = heads[0][0]
    with pytest.raises(ValueError, match=r"shift_labels must be in \[0, vocab_size=32\) or -1 \(ignored\)"):
        lm(input_ids=ids, labels=ids, shift_labels=torch.full_like(ids, -100), ignore_index=-1)


def test_a_subclass_under_another_name_keeps_its_heads_loss():
    """transformers picks a model's loss from its class name: a subclass named otherwise (NERTagger) fell back to the
    causal-LM loss and failed inside it (view() got a SeqArchConfig)."""
    ids = random_ids(2, 6)
    cases = [(SeqArchForCausalLM, {}, ids), (SeqArchForTokenClassification, dict(num_labels=3), ids % 3),
             (SeqArchForSequenceClassification, dict(num_labels=3), torch.tensor([0, 2]))]
    for head, overrides, labels in cases:
        renamed = type("Renamed", (head,), {})
        expected = tiny_model(head, ["lstm"], **overrides)(input_ids=ids, labels=labels).loss
        torch.testing.assert_close(tiny_model(renamed, ["lstm"], **overrides)(input_ids=ids, labels=labels).loss,
                                   expected, rtol=0, atol=0)

def test_ops_take_sizes_past_the_input_and_their_documented_defaults():
    """A chunk or window longer than the sequence padded it to that size (chunk_size=10**6 on 5 tokens: an allocator
    error); a numpy window was refused where the other ops take numpy integers; scan_step without a state failed
    inside; ssd_chunked dropped a complex A's imaginary part."""
    import numpy as np

    from hf_seqarch.ops_chunked_scan import chunked_scan, scan_reference, scan_step
    from hf_seqarch.ops_ssd import ssd_chunked

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 5, 2, 3, generator=g, dtype=torch.float64) for _ in range(3))
    a = -torch.rand(1, 5, 2, generator=g, dtype=torch.float64)
    for got, want in zip(chunked_scan(q, k, v, a, chunk_size=10**6), scan_reference(q, k, v, a)):
        torch.testing.assert_close(got, want)
    y, state = scan_step(q[:, 0], k[:, 0], v[:, 0], a[:, 0], None)  # None: the first step, from zeros
    torch.testing.assert_close(y, scan_reference(q[:, :1], k[:, :1], v[:, :1], a[:, :1])[0][:, 0])
    query, key = torch.randn(1, 2, 5, 4, generator=g), torch.randn(1, 2, 5, 4, generator=g)
    whole = sliding_window_attention(query, key, key, 5, 0.5)
    torch.testing.assert_close(sliding_window_attention(query, key, key, 10**6, 0.5), whole)
    torch.testing.assert_close(sliding_window_attention(query, key, key, np.int64(5), 0.5), whole)
    with pytest.raises(ValueError, match=r"A \(H,\), real floating point; got .* torch.complex64"):
        complex_A = torch.tensor([-1 + 1j, -2 + 0j])
        ssd_chunked(v, torch.rand(1, 5, 2, dtype=torch.float64), complex_A, q[:, :, :1], q[:, :, :1])


def test_generate_with_a_mask_of_another_shape_says_so():
    """generate() numbers positions from the mask: a mask of the wrong shape was blamed on position_ids."""
    model = tiny_model(SeqArchForCausalLM, ["lstm", "attention"]).eval()
    with pytest.raises(ValueError, match=r"attention_mask must have the shape of the input ids, \(2, 5\).*\(2, 4\)"):
        model.generate(random_ids(2, 5), attention_mask=torch.ones(2, 4, dtype=torch.long), max_new_tokens=2)


def test_small_ops_say_what_they_take():
    """RMSNorm of a 0-d tensor raised an IndexError; sliding_window_attention of integer tensors or a negative dropout
    failed inside sdpa (a flash-attention message); StreamingSession.load(None, path) an AttributeError."""
    from hf_seqarch.ops_rms_norm import RMSNorm

    with pytest.raises(ValueError, match=r"RMSNorm over \(4,\) takes input \(\.\.\., 4\), got shape \(\)"):
        RMSNorm(4)(torch.tensor(1.0))
    query = torch.randn(1, 2, 5, 4)
    with pytest.raises(ValueError, match="floating point of one dtype"):
        sliding_window_attention(query.long(), query.long(), query.long(), 2, 0.5)
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\)"):
        sliding_window_attention(query, query, query, 2, 0.5, dropout=-1.0)
    with pytest.raises(ValueError, match="StreamingSession"):
        StreamingSession.load(None, "state.safetensors")


def test_shift_labels_are_checked_as_labels_are():
    """They are the loss's targets when given: a wrong shape, ids out of range or floats failed inside the loss."""
    model = tiny_model(SeqArchForCausalLM, ["lstm"])
    ids = random_ids(2, 5)
    for shift_labels, message in ((ids[:, :3], r"shift_labels must hold one target per logit, shape \(2, 5\), got \(2, 3\)"),
                                  (ids + VOCAB, r"shift_labels must be in \[0, vocab_size="),
                                  (ids.float(), "shift_labels must be integer ids")):
        with pytest.raises(ValueError, match=message):
            model(input_ids=ids, labels=ids, shift_labels=shift_labels)
    shifted = torch.nn.functional.pad(ids[:, 1:], (0, 1), value=-100)
    torch.testing.assert_close(model(input_ids=ids, labels=ids, shift_labels=shifted.int()).loss,
                               model(input_ids=ids, labels=ids).loss)


@pytest.mark.parametrize("bidirectional", [False, True], ids=["causal", "encoder"])
def test_sequence_classification_refuses_a_row_without_tokens(bidirectional):
    """It pooled a pad (causal) or zeros (an encoder's mean: logits 0), silently."""
    model = tiny_model(SeqArchForSequenceClassification, ["lstm"], bidirectional=bidirectional)
    ids, mask = random_ids(2, 5), torch.ones(2, 5, dtype=torch.long)
    mask[1] = 0
    with pytest.raises(ValueError, match="attention_mask row 1 has no real token"):
        model(input_ids=ids, attention_mask=mask)


def test_the_cache_methods_check_their_arguments():
    model = tiny_model(SeqArchForCausalLM, ["lstm", "attention"])
    with pytest.raises(ValueError, match=r"SeqArchCache needs its model's config \(or num_layers\)"):
        SeqArchCache()
    with torch.no_grad():
        cache = getattr(model(input_ids=random_ids(2, 4), use_cache=True), CACHE_FIELD)
    for call, message in (
        (lambda: cache.reorder_cache(torch.tensor([0, 5])), r"reorder_cache: row indices must be in \[0, 2\)"),
        (lambda: cache.reorder_cache(torch.tensor([-1, 0])), r"row indices must be in \[0, 2\)"),
        (lambda: cache.batch_select_indices(torch.tensor([[0]])), "takes a 1-D list of row indices"),
        (lambda: cache.batch_repeat_interleave(0), "number of copies of each row >= 1, got 0"),
        (lambda: cache.batch_repeat_interleave(2.0), "number of copies of each row >= 1, got 2.0"),
        (lambda: cache.advance(-3), "advance takes the number of tokens the layers have read, >= 0"),
    ):
        with pytest.raises(ValueError, match=message):
            call()
    assert cache.seen_tokens == 4 and cache.layers[0]["h"].shape[0] == 2  # (refused before any change)
    cache.reorder_cache([1, 0])  # a list, as DynamicCache takes one
    cache.batch_select_indices(torch.tensor([True, False]))  # a mask of the rows
    assert cache.layers[1]["key"].shape[0] == 1


def test_a_damaged_cache_state_is_refused_at_loading():
    """Keys for another number of positions than the tokens seen, or states cast to integers, once loaded and gave
    wrong logits silently; rows of two batch sizes failed inside torch."""
    model = tiny_model(SeqArchForCausalLM, ["lstm", "attention"])
    with torch.no_grad():
        state = getattr(model(input_ids=random_ids(2, 5), use_cache=True), CACHE_FIELD).state_dict()
    for damage, message in (
        (dict(**{"layers.1.key": state["layers.1.key"][:, :, :2]}), r"layers.1.key has shape \(2, 2, 2, 8\): after 5 "
                                                                      "tokens its attention layer keeps 5 positions"),
        (dict(seen_tokens=torch.tensor(100)), "after 100 tokens its attention layer keeps 100 positions"),
        (dict(**{"layers.0.h": state["layers.0.h"].long()}), "layers.0.h is a torch.int64 tensor"),
        (dict(**{"layers.0.c": state["layers.0.c"][:1]}), r"rows of several batch sizes \[1, 2\]"),
        (dict(real_tokens=torch.tensor([5, 6])), r"'real_tokens' must be one count in \[0, seen_tokens=5\] per row"),
        (dict(real_tokens=torch.tensor([5, 4, 3])), r"rows of several batch sizes \[2, 3\]"),
        # one key/value head of two: broadcast over both as the keys were copied, 0.07 off, silently
        (dict(**{"layers.1.key": state["layers.1.key"][:, :1]}),
         r"layers.1.key has shape \(2, 1, 5, 8\): attention layers of this cache's layout keep \(batch, 2, positions, "
         r"8\)"),
        (dict(**{"layers.0.h": state["layers.0.h"][..., :16]}), r"layers.0.h has shape \(2, 1, 16\): lstm layers"),
    ):
        with pytest.raises(ValueError, match=message):
            SeqArchCache.from_state_dict({**state, **damage}, config=model.config)
    # saved without its layout, the states are checked against that of the first model that uses them
    damaged = {**state, "layers.1.key": state["layers.1.key"][:, :1]}
    del damaged["layout"]
    cache = SeqArchCache.from_state_dict(damaged, num_layers=2)
    for _ in range(2):  # (and again: the first refusal once took the layout, and the second call went through)
        with pytest.raises(ValueError, match=r"layers.1.key has shape \(2, 1, 5, 8\)"):
            model(input_ids=random_ids(2, 1), cache=cache)
    missing = {name: t for name, t in state.items() if name not in ("layout", "layers.0.c")}
    with pytest.raises(ValueError, match=r"has \['h'\] for layer 0 \(lstm\) after 5 tokens; it needs \['c', 'h'\]"):
        model(input_ids=random_ids(2, 1), cache=SeqArchCache.from_state_dict(missing, num_layers=2))


def test_deepcopy_of_a_cache_filled_under_autograd_says_how_to_copy_it():
    """torch's own error blamed weight_norm."""
    import copy

    model = tiny_model(SeqArchForCausalLM, ["lstm"])
    cache = getattr(model(input_ids=random_ids(1, 4), use_cache=True), CACHE_FIELD)
    with pytest.raises(RuntimeError, match=r"filled with gradients on.* Fill it under torch.no_grad\(\)"):
        copy.deepcopy(cache)


def test_a_shallow_copy_or_a_dtype_cast_of_a_cache_says_what_to_do():
    """copy.copy shared the states a forward updates in place: the original's later steps were 0.02-0.24 off. .to() of
    a dtype failed inside torch.device."""
    import copy

    model = tiny_model(SeqArchForCausalLM, ["lstm", "attention"])
    with torch.no_grad():
        cache = getattr(model(input_ids=random_ids(1, 4), use_cache=True), CACHE_FIELD)
    with pytest.raises(TypeError, match=r"would share the states .* use copy.deepcopy\(cache\)"):
        copy.copy(cache)
    with pytest.raises(TypeError, match="takes a device, got the dtype torch.float16"):
        cache.to(torch.float16)
    assert cache.to("cpu", non_blocking=True) is cache


def test_generate_refuses_a_legacy_cache():
    """transformers 4.57 failed on it inside generate() (an AttributeError); there is no tuple form of these states."""
    model = tiny_model(SeqArchForCausalLM, ["lstm"])
    with pytest.raises(ValueError, match="return_legacy_cache: a SeqArchCache has no legacy"):
        model.generate(random_ids(1, 4), max_new_tokens=2, return_legacy_cache=True, return_dict_in_generate=True)


def test_resizing_the_vocabulary_keeps_the_special_ids():
    """A vocabulary without the eos id once resized, and generation could never stop; 0 tokens left every input
    refused, a negative count failed inside torch."""
    model = tiny_model(SeqArchForCausalLM, ["lstm"], pad_token_id=20, eos_token_id=30)
    for size in (10, 0, -5, 2.5):
        with pytest.raises(ValueError, match=r"at least 31 token\(s\) .* pad, bos and eos ids \[20, 30\]"):
            model.resize_token_embeddings(size)
    assert model.resize_token_embeddings(31).num_embeddings == model.config.vocab_size == 31


def test_position_ids_that_are_not_finite_are_refused():
    """A NaN position gave finite logits, silently other ones."""
    model = tiny_model(SeqArchForCausalLM, ["attention"])
    positions = torch.arange(5, dtype=torch.float32)[None]
    positions[0, 2] = float("nan")
    with pytest.raises(ValueError, match="position_ids hold NaN or infinite values"):
        model(input_ids=random_ids(1, 5), position_ids=positions)


def test_causal_conv_refuses_integer_inputs():
    from hf_seqarch.ops_causal_conv import causal_conv

    x, weight, bias = torch.ones(1, 3, 2, dtype=torch.long), torch.ones(2, 4, dtype=torch.long), torch.ones(2, dtype=torch.long)
    with pytest.raises(ValueError, match="causal_conv takes real floating-point tensors"):
        causal_conv(x, weight, bias)


def test_the_example_datasets_check_their_fractions_and_counts():
    """eval_fraction=0 still held out a paragraph per class, 1 left nothing to train on without a word (or blamed the
    block size), and per_section=-1 gave texts without labels."""
    from transformers import ByT5Tokenizer

    from hf_seqarch.tools.text_data import lm_blocks, section_classification, section_paragraphs

    tokenizer = ByT5Tokenizer()
    train, held_out = section_classification(tokenizer, max_length=16, per_section=3, eval_fraction=0)
    assert len(train) == 12 and held_out == []
    train, held_out = lm_blocks(tokenizer, 16, max_chars=400, eval_fraction=0)
    assert len(train) == 25 and held_out == []
    for bad in (1.0, -0.1, 2, "0.1", True):
        with pytest.raises(ValueError, match=re.escape("eval_fraction must be a number in [0, 1)")):
            lm_blocks(tokenizer, 16, max_chars=400, eval_fraction=bad)
        with pytest.raises(ValueError, match=re.escape("eval_fraction must be a number in [0, 1)")):
            section_classification(tokenizer, per_section=3, eval_fraction=bad)
    for bad in (0, -1, 2.5):
        with pytest.raises(ValueError, match="per_section must be an integer >= 1"):
            section_paragraphs(per_section=bad)
    with pytest.raises(ValueError, match="none left to train on"):
        lm_blocks(tokenizer, 16, max_chars=20, eval_fraction=0.5)

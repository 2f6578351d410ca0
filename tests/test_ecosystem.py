"""The rest of the HuggingFace ecosystem, for every mixer stack: pipelines, PEFT LoRA, accelerate's
device_map="auto", torch.compile."""

import copy
import os
import subprocess
import sys
import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM, ByT5Tokenizer, pipeline

from hf_seqarch import SeqArchForCausalLM, SeqArchForSequenceClassification, SeqArchForTokenClassification
from hf_seqarch.modeling_seqarch import CACHE_FIELD
from tester import STACKS, random_ids, tiny_config, tiny_model

stack_params = pytest.mark.parametrize("stack", list(STACKS), ids=list(STACKS))
RNN_MIXERS = ("lstm", "gru")
TEXTS = ["hello world, this is longer", "hi"]  # different lengths: batches are padded


@pytest.fixture
def tokenizer():
    return ByT5Tokenizer()  # byte-level: no vocabulary file, nothing downloaded; fresh (pipelines set padding_side)


def text_model(model_class, stack, tokenizer):
    return tiny_model(model_class, STACKS[stack], vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                      eos_token_id=tokenizer.eos_token_id)


# -- pipelines ---------------------------------------------------------------------------------------


@stack_params
def test_text_generation_pipeline(stack, tokenizer):
    model = text_model(SeqArchForCausalLM, stack, tokenizer)
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
    got = generator(TEXTS[0], max_new_tokens=8, do_sample=False, return_tensors=True)[0]["generated_token_ids"]
    ids = tokenizer(TEXTS[0], return_tensors="pt").input_ids
    want = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)[0]
    assert list(got) == want.tolist()
    text = generator(TEXTS[0], max_new_tokens=8, do_sample=False)[0]["generated_text"]
    assert text.startswith(TEXTS[0])


@stack_params
@pytest.mark.parametrize("side", ["right", "left"])
def test_text_classification_pipeline(stack, side, tokenizer):
    tokenizer.padding_side = side
    model = text_model(SeqArchForSequenceClassification, stack, tokenizer)
    classifier = pipeline("text-classification", model=model, tokenizer=tokenizer)
    results = classifier(TEXTS, batch_size=2, top_k=None)  # one padded batch
    for text, scores in zip(TEXTS, results):
        with torch.no_grad():
            alone = model(**tokenizer(text, return_tensors="pt")).logits.softmax(-1)[0]  # no padding
        got = torch.tensor([s["score"] for s in sorted(scores, key=lambda s: model.config.label2id[s["label"]])])
        torch.testing.assert_close(got, alone, rtol=1e-5, atol=1e-5)


@stack_params
@pytest.mark.parametrize("side", ["right", "left"])
def test_token_classification_pipeline(stack, side, tokenizer):
    tokenizer.padding_side = side
    model = text_model(SeqArchForTokenClassification, stack, tokenizer)
    tagger = pipeline("token-classification", model=model, tokenizer=tokenizer)
    results = tagger(TEXTS, batch_size=2)
    for text, entities in zip(TEXTS, results):
        encoded = tokenizer(text, return_tensors="pt", return_special_tokens_mask=True)
        special = encoded.pop("special_tokens_mask")[0].bool()
        with torch.no_grad():
            probs = model(**encoded).logits.softmax(-1)[0]  # (T, num_labels), no padding
        real = torch.nonzero(~special).flatten().tolist()  # one entity per real token, in order
        assert [e["word"] for e in entities] == tokenizer.convert_ids_to_tokens(encoded.input_ids[0, real].tolist())
        for entity, position in zip(entities, real):
            best = probs[position].max(-1)
            assert entity["entity"] == model.config.id2label[int(best.indices)]
            assert abs(float(entity["score"]) - float(best.values)) < 1e-5


# -- PEFT LoRA ---------------------------------------------------------------------------------------

# nn.Linear projections LoRA adapts, per mixer. nn.LSTM/nn.GRU keep their weights inside one fused
# module (not nn.Linear), so for them LoRA goes on the block's MLP projections, which every stack has.
MIXER_PROJECTIONS = {
    "attention": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "sliding_attention": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "linear_attention": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "mamba2": ("in_proj", "out_proj"),
    "lstm": (),
    "gru": (),
}
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


class ScaledEmbeddings(torch.nn.Module):
    """A user's wrapper around the input embeddings."""

    def __init__(self, embeddings):
        super().__init__()
        self.inner = embeddings

    def forward(self, ids):
        return self.inner(ids) * 2.0



def test_a_peft_adapter_folder_loads_with_its_base_model(tmp_path):
    """transformers loads a PEFT adapter's folder (its adapter_config.json names the base model) with from_pretrained,
    as it does for Llama: ours refused it for lacking a config.json."""
    peft = pytest.importorskip("peft")
    tiny_model(SeqArchForCausalLM, ["attention", "lstm"]).save_pretrained(tmp_path / "base")
    base = SeqArchForCausalLM.from_pretrained(tmp_path / "base")
    lora = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    lora.save_pretrained(tmp_path / "adapter")
    ids = random_ids(2, 6)
    with torch.no_grad():
        expected = lora(input_ids=ids).logits
        for loader in (SeqArchForCausalLM, AutoModelForCausalLM):
            loaded = loader.from_pretrained(tmp_path / "adapter").eval()
            torch.testing.assert_close(loaded(input_ids=ids).logits, expected, rtol=0, atol=0)

@pytest.mark.parametrize("stack", ["lstm", "mamba2+attention"])
@pytest.mark.parametrize("wrapping", ["lora", "trainable_tokens", "user"])
def test_wrapped_input_embeddings_work(stack, wrapping):
    """PEFT's LoRA on the embeddings and its trainable tokens wrap the nn.Embedding, as may a module of the user's:
    every forward failed on the embeddings' num_embeddings. The vocabulary check still reads through the wrapper."""
    from hf_seqarch import StreamingSession

    peft = pytest.importorskip("peft")
    model = tiny_model(SeqArchForCausalLM, STACKS[stack])
    if wrapping == "user":
        model.set_input_embeddings(ScaledEmbeddings(model.get_input_embeddings()))
        wrapped = model
    else:
        extra = dict(target_modules=["embed_tokens"]) if wrapping == "lora" else dict(target_modules=["down_proj"],
                                                                                     trainable_token_indices=[3, 4])
        wrapped = peft.get_peft_model(model, peft.LoraConfig(r=4, **extra))
    ids = random_ids(2, 8)
    wrapped(input_ids=ids, labels=ids).loss.backward()
    embeds = wrapped.get_input_embeddings()(ids)
    with torch.no_grad():
        torch.testing.assert_close(wrapped(inputs_embeds=embeds.double()).logits, wrapped(input_ids=ids).logits)
    assert StreamingSession(model).greedy(ids[:1], max_new_tokens=2).shape == (1, 2)
    model.config.vocab_size += 1
    with pytest.raises(ValueError, match="config.vocab_size is .* but the embeddings hold"):
        wrapped(input_ids=ids)


def test_lora_on_the_mamba2_conv_is_refused_by_peft():
    """mamba2's conv takes its cached state in forward: PEFT used to take it for a plain nn.Conv1d and fail inside
    (TypeError building a conv of its class); it is no nn.Conv1d now, and PEFT says it does not support it."""
    peft = pytest.importorskip("peft")
    with pytest.raises(ValueError, match="ShortCausalConv.* is not supported"):
        peft.get_peft_model(tiny_model(SeqArchForCausalLM, ["mamba2"]),
                            peft.LoraConfig(r=80, target_modules=["conv1d"]))


@stack_params
def test_lora_trains_and_merges_back(stack, tmp_path):
    peft = pytest.importorskip("peft")
    from peft.tuners.lora import LoraLayer

    model = tiny_model(SeqArchForCausalLM, STACKS[stack])
    ids = random_ids(2, 8)
    with torch.no_grad():
        before = model(input_ids=ids).logits
    targets = sorted({p for m in STACKS[stack] for p in MIXER_PROJECTIONS[m]} | set(MLP_PROJECTIONS))
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets))
    for block, mixer in zip(lora.base_model.model.model.layers, STACKS[stack]):
        for name in MIXER_PROJECTIONS[mixer]:
            assert isinstance(getattr(block.mixer, name), LoraLayer), (mixer, name)
        for name in MLP_PROJECTIONS:
            assert isinstance(getattr(block.mlp, name), LoraLayer), name
    lora.eval()  # (as `before` ran: get_peft_model may leave the model in training mode)
    with torch.no_grad():  # LoRA starts as the identity (B = 0)
        with lora.disable_adapter():
            # (bit for bit only against the frozen base: torch's CPU nn.GRU takes another kernel, which rounds
            # differently, when its weights do not require grad, as PEFT leaves them)
            without_adapter = lora(input_ids=ids).logits
        torch.testing.assert_close(lora(input_ids=ids).logits, without_adapter, rtol=0, atol=0)
        torch.testing.assert_close(without_adapter, before)

    trainable = [p for p in lora.parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n, p in lora.named_parameters() if p.requires_grad)
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    lora.train()
    lora(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    lora.eval()
    with torch.no_grad():
        adapted = lora(input_ids=ids).logits
    assert not torch.allclose(adapted, before, atol=1e-4), "the LoRA step changed nothing"

    merged = lora.merge_and_unload()
    assert type(merged) is SeqArchForCausalLM
    assert not any(isinstance(m, LoraLayer) for m in merged.modules())
    with torch.no_grad():
        # W x + B (A x) and (W + B A) x differ by float32 rounding only.
        torch.testing.assert_close(merged(input_ids=ids).logits, adapted, rtol=1e-5, atol=1e-5)
    merged.save_pretrained(tmp_path)
    reloaded = SeqArchForCausalLM.from_pretrained(tmp_path).eval()
    for mine, theirs in zip(reloaded.parameters(), merged.parameters()):
        mine.requires_grad_(theirs.requires_grad)  # (frozen where PEFT left them frozen: the GRU kernel, see above)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, merged(input_ids=ids).logits, rtol=0, atol=0)


# -- accelerate: device_map="auto" -------------------------------------------------------------------


def assert_blocks_whole(device_map):
    """No entry of the map is inside a block: each SeqArchBlock sits whole on one device."""
    for name in device_map:
        parts = name.split(".")
        if parts[:2] == ["model", "layers"] and len(parts) > 3:
            raise AssertionError(f"block split across devices: {name} placed on its own ({device_map})")


@stack_params
def test_infer_auto_device_map_keeps_blocks_whole(stack):
    from accelerate import infer_auto_device_map
    from accelerate.utils import compute_module_sizes

    model = tiny_model(SeqArchForCausalLM, STACKS[stack] * 3, intermediate_size=96)
    total = compute_module_sizes(model)[""]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "device 0 is not available": only the plan is made, nothing moves
        device_map = infer_auto_device_map(
            model, max_memory={0: total // 3, 1: total // 3, "cpu": total}, no_split_module_classes=model._no_split_modules
        )
    assert len(set(device_map.values())) >= 2, device_map
    assert_blocks_whole(device_map)


def saved_three_layer_copy(stack, folder):
    """A model with each mixer of the stack three times (enough blocks to split), saved; its outputs."""
    model = tiny_model(SeqArchForCausalLM, STACKS[stack] * 3, intermediate_size=96)
    model.save_pretrained(folder)
    ids = random_ids(2, 6)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    generated = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
    return model, ids, logits, generated


@stack_params
def test_from_pretrained_with_device_map_auto(stack, tmp_path):
    _, ids, logits, generated = saved_three_layer_copy(stack, tmp_path)
    placed = AutoModelForCausalLM.from_pretrained(tmp_path, device_map="auto")
    assert {p.device.type for p in placed.parameters()} == {"cpu"}
    with torch.no_grad():
        torch.testing.assert_close(placed(input_ids=ids).logits, logits, rtol=0, atol=0)
    assert torch.equal(placed.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False), generated)


@pytest.mark.parametrize("stack", list(STACKS), ids=list(STACKS))
def test_device_map_auto_with_disk_offload(stack, tmp_path):
    from accelerate.utils import compute_module_sizes

    model, ids, logits, generated = saved_three_layer_copy(stack, tmp_path / "model")
    # Half the model in memory, the rest offloaded to disk: a split, whole blocks on each side.
    budget = {"cpu": compute_module_sizes(model)[""] // 2}  # what does not fit goes to "disk"
    split = AutoModelForCausalLM.from_pretrained(
        tmp_path / "model", device_map="auto", max_memory=budget, offload_folder=tmp_path / "offload"
    )
    assert {"cpu", "disk"} <= set(split.hf_device_map.values()), split.hf_device_map
    assert_blocks_whole(split.hf_device_map)
    with torch.no_grad():
        torch.testing.assert_close(split(input_ids=ids).logits, logits, rtol=0, atol=0)
    assert torch.equal(split.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False), generated)



@pytest.mark.parametrize("offload", ["cpu_offload", "disk_offload"])
def test_accelerate_offload_generates_and_streams(offload, tmp_path):
    """accelerate.cpu_offload / disk_offload put a hook on the model that calls cache.to(None) at every forward (a
    no-op for a tensor): generate() failed in SeqArchCache.to. And with the embeddings offloaded (weights on "meta",
    loaded at each call), a StreamingSession sent the ids to "meta"."""
    import accelerate

    from hf_seqarch import StreamingSession

    model = tiny_model(SeqArchForCausalLM, ["attention", "lstm"])
    ids = random_ids(2, 6)
    expected = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False)
    with torch.no_grad():
        streamed = StreamingSession(model).feed(ids)
    offloaded = copy.deepcopy(model)
    if offload == "cpu_offload":
        accelerate.cpu_offload(offloaded, execution_device="cpu")
    else:
        accelerate.disk_offload(offloaded, str(tmp_path), execution_device="cpu")
    assert offloaded.model.embed_tokens.weight.device.type == "meta"
    generated = offloaded.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False)
    assert torch.equal(generated, expected)
    with torch.no_grad():
        torch.testing.assert_close(StreamingSession(offloaded).feed(ids), streamed, rtol=0, atol=0)

def split_over_two_devices(model, from_layer):
    """The blocks from `from_layer` on, the final norm and the head run on a second device, as a device_map over two
    GPUs places them: accelerate's hooks, with "meta" standing in for the second GPU on a CPU-only machine (a tensor of
    the first device reaching it raises, as cuda:0 vs cuda:1 does; its outputs are shapes only)."""
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module

    for module in [*model.model.layers[from_layer:], model.model.norm, model.lm_head]:
        add_hook_to_module(module, AlignDevicesHook(execution_device="meta", io_same_device=False, place_submodules=True))


@pytest.mark.parametrize("mixer", ["attention", "sliding_attention"])
@pytest.mark.parametrize("masked", [False, True])
def test_blocks_split_over_devices_run_where_they_are(mixer, masked):
    """Each block reads the forward's context (positions, rotary tables, masks) on its own device: they stayed on the
    first, and the second device's attention failed inside torch (cpu vs meta)."""
    model = tiny_model(SeqArchForCausalLM, [mixer, mixer]).eval()
    split_over_two_devices(model, from_layer=1)
    ids = random_ids(2, 6)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask if masked else None).logits
    assert logits.device.type == "meta" and logits.shape == (2, 6, model.config.vocab_size)


def test_cached_decode_with_the_first_block_on_another_device():
    """A cache whose layers live on another device than the embeddings (each state beside its block) is not refused
    as being "on another device than the input" when accelerate places the blocks."""
    model = tiny_model(SeqArchForCausalLM, ["attention", "attention"]).eval()
    split_over_two_devices(model, from_layer=0)
    ids = random_ids(2, 6)
    with torch.no_grad():
        cache = getattr(model(input_ids=ids, use_cache=True), CACHE_FIELD)
        step = model(input_ids=ids[:, -1:], **{CACHE_FIELD: cache}).logits
    assert step.device.type == "meta" and step.shape == (2, 1, model.config.vocab_size)
    assert cache.get_seq_length() == 7


def test_attention_models_run_on_the_meta_device():
    """Shape inference on the meta device (transformers' own models run there): the value checks of ids, masks and
    labels failed copying out of the meta tensors."""
    for head, labels in ((SeqArchForCausalLM, torch.zeros(2, 5, dtype=torch.long)),
                         (SeqArchForSequenceClassification, torch.zeros(2, dtype=torch.long))):
        with torch.device("meta"):
            model = head(tiny_config(["attention", "sliding_attention"]))
        ids, mask = torch.zeros(2, 5, dtype=torch.long, device="meta"), torch.ones(2, 5, device="meta")
        out = model(input_ids=ids, attention_mask=mask, labels=labels.to("meta"))
        assert out.logits.is_meta and out.logits.shape[0] == 2 and out.loss.is_meta


def test_mixer_context_moves_its_tensors_once_per_device():
    from hf_seqarch.mixer_context import MixerContext

    cache, attentions = object(), []
    cos_sin = (torch.ones(1, 4, 8), torch.zeros(1, 4, 8))
    context = MixerContext(padding_mask=torch.ones(1, 4, dtype=torch.bool), position_ids=torch.arange(4)[None],
                           past_length=0, cache=cache, causal=True, position_embeddings=cos_sin, attentions=attentions)
    context.memo["mask"] = "built on cpu"
    assert context.to("cpu") is context
    moved = context.to("meta")
    assert moved is context.to(torch.device("meta")) and moved.to("meta") is moved  # one copy per device
    tensors = (moved.padding_mask, moved.position_ids, *moved.position_embeddings)
    assert all(t.device.type == "meta" for t in tensors)
    assert moved.cache is cache and moved.attentions is attentions  # shared: states stay beside their layers
    assert moved.memo == {} and context.memo == {"mask": "built on cpu"}  # masks are per device
    # positions given on the model's device and a mask elsewhere: the mask moves too (it was taken as there already)
    apart = MixerContext(padding_mask=torch.ones(1, 4, dtype=torch.bool),
                         position_ids=torch.arange(4, device="meta")[None], past_length=0, cache=cache, causal=True)
    assert apart.to("meta").padding_mask.device.type == "meta"


# -- torch.compile -----------------------------------------------------------------------------------


@stack_params
def test_torch_compile_forward(stack):
    """Every stack compiles (backend aot_eager: Dynamo tracing and AOTAutograd without inductor's slow
    C++ codegen). Without LSTM/GRU the whole forward is one graph (fullgraph=True); Dynamo does not
    trace nn.LSTM/nn.GRU, so those stacks run with graph breaks around them."""
    model = tiny_model(SeqArchForCausalLM, STACKS[stack])
    ids = random_ids(2, 6)
    with torch.no_grad():
        want = model(input_ids=ids, use_cache=False).logits
    torch._dynamo.reset()
    fullgraph = not any(m in RNN_MIXERS for m in STACKS[stack])
    compiled = torch.compile(model, backend="aot_eager", fullgraph=fullgraph)
    with torch.no_grad():
        torch.testing.assert_close(compiled(input_ids=ids, use_cache=False).logits, want, rtol=1e-6, atol=1e-6)


def test_torch_compile_fullgraph_with_a_padding_mask():
    """Padded training batches carry a mask: checking whether it is all ones read its values (a graph break, so
    fullgraph=True failed whenever a mask was passed); compiled, the masked paths run whatever the mask holds."""
    model = tiny_model(SeqArchForCausalLM, ["attention", "mamba2", "linear_attention"])
    ids, padded = random_ids(2, 6), torch.ones(2, 6, dtype=torch.long)
    padded[1, :2] = 0
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        for mask in (padded, torch.ones_like(padded)):
            got = compiled(input_ids=ids, attention_mask=mask, use_cache=False).logits
            want = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_torch_compile_fullgraph_training_step():
    """A compiled training step (backward included) of a classification head at two lengths, the second compiled
    with dynamic shapes: the loss and gradients of eager mode. The CPU norm's hand-written backward once failed to
    trace there (it orders dims by their strides); compiled, torch's own norm runs instead."""
    model = tiny_model(SeqArchForSequenceClassification, ["attention", "mamba2"]).train()
    labels = torch.tensor([0, 2])
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    for length in (6, 9):
        ids = random_ids(2, length)
        grads = []
        for run in (compiled, model):
            model.zero_grad()
            run(input_ids=ids, labels=labels).loss.backward()
            grads.append([p.grad.clone() for p in model.parameters()])
        for got, want in zip(*grads):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_torch_compile_training_is_not_recompiled_for_each_length():
    """Batches of new lengths reuse the dynamic graph: the length was specialised by the labels' shape check
    (len(range(T)[keep])), the attention masks' memo (a dict keyed by the lengths) and the scan's loop over chunks,
    so every new length compiled afresh until dynamo's limit (8) sent the model back to eager."""
    from torch._dynamo.utils import counters

    model = tiny_model(SeqArchForCausalLM, ["attention", "mamba2", "linear_attention"]).train()
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    for length in (6, 9, 12, 15, 18, 21, 24, 27, 30):
        ids = random_ids(2, length)
        compiled(input_ids=ids, labels=ids).loss.backward()
    # The first length's static graph, then two dynamic ones: lengths that are a multiple of the chunk length (4 in
    # tiny models) and lengths that the scans pad to one. However many lengths follow.
    assert counters["stats"]["unique_graphs"] <= 3


def test_torch_compile_fullgraph_before_any_eager_call(monkeypatch):
    """A mamba2 model compiled before it ever ran eagerly: the once-per-backend log of kernels_mamba2 would be traced
    (a graph break, so fullgraph=True failed); it is skipped while compiling."""
    from hf_seqarch import kernels_mamba2

    monkeypatch.setattr(kernels_mamba2, "_announced", set())
    model = tiny_model(SeqArchForCausalLM, ["mamba2"])
    ids = random_ids(2, 6)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        got = compiled(input_ids=ids, use_cache=False).logits
        torch.testing.assert_close(got, model(input_ids=ids, use_cache=False).logits, rtol=1e-6, atol=1e-6)


def test_torch_compiled_decoding_is_one_graph():
    """Compiled one-token steps on a cache, several in a row, fullgraph: the attention cache's in-place appends
    compared data pointers and read inference-mode flags (a graph break in every layer at every step from the second
    one on, so fullgraph=True failed, and deep models ran out of recompiles); compiled, it concatenates."""
    from torch._dynamo.utils import counters

    model = tiny_model(SeqArchForCausalLM, ["attention", "mamba2", "attention", "linear_attention"])
    ids = random_ids(2, 10)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with torch.no_grad():
        want = model(input_ids=ids).logits[:, 5:]
        cache = getattr(model(input_ids=ids[:, :5], use_cache=True), CACHE_FIELD)
        got = [compiled(input_ids=ids[:, t : t + 1], cache=cache).logits for t in range(5, 10)]
    torch.testing.assert_close(torch.cat(got, dim=1), want, rtol=1e-5, atol=1e-5)
    assert counters["stats"]["unique_graphs"] <= 2  # the first step's static graph, then one with a dynamic past


def test_torch_compiled_padded_prefill_marks_its_cache():
    """A padded batch leaves pads in the cache, which attention reads unless every later call passes their mask: an
    eager forward marks the cache so that a call without the mask is refused. Compiled, the mask's values are not
    read and the mark was skipped: the continuation ran and attended to the pads. Any mask marks it there."""
    model = tiny_model(SeqArchForCausalLM, ["attention"])
    ids, mask = random_ids(2, 6), torch.ones(2, 6, dtype=torch.long)
    mask[1, :2] = 0
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with torch.no_grad():
        cache = getattr(compiled(input_ids=ids, attention_mask=mask, use_cache=True), CACHE_FIELD)
        assert cache.holds_padding
        with pytest.raises(ValueError, match="padded"):
            model(input_ids=random_ids(2, 1, seed=5), cache=cache)


@pytest.mark.slow
def test_torch_compile_inductor():
    """One real inductor compile (C++ codegen, ~30 s on 2 CPU cores): attention and Mamba-2 in one graph."""
    mixers = [m for m in ("mamba2", "linear_attention", "attention") if any(m in s for s in STACKS.values())]
    model = tiny_model(SeqArchForCausalLM, mixers)
    ids = random_ids(2, 6)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        want = model(input_ids=ids, use_cache=False).logits
        torch.testing.assert_close(compiled(input_ids=ids, use_cache=False).logits, want, rtol=1e-5, atol=1e-5)


# -- dynamic quantization (small devices) ------------------------------------------------------------


@pytest.mark.parametrize("mixers", [["lstm", "gru"], ["gru", "attention"]], ids=["lstm-gru", "gru-attention"])
def test_dynamically_quantized_recurrent_layers_decode_with_a_cache(mixers):
    """torch's dynamic int8 quantization (torch.ao quantize_dynamic: the usual way to shrink an LSTM for a CPU device)
    replaces nn.LSTM / nn.GRU by layers that keep packed weights: the one-token cached path read weight_ih_l0 and
    failed. Quantized activations are rounded per call, so cached and full forwards agree only to int8 rounding."""
    import torch.ao.quantization as quantization

    model = tiny_model(SeqArchForCausalLM, mixers)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (torch.ao.quantization announces its move to torchao)
        quantized = quantization.quantize_dynamic(model, {torch.nn.LSTM, torch.nn.GRU, torch.nn.Linear}, torch.qint8)
    assert type(quantized.model.layers[0].mixer.rnn) is not type(model.model.layers[0].mixer.rnn)
    ids = random_ids(2, 9)
    full = quantized(input_ids=ids).logits
    out = quantized(input_ids=ids[:, :6], use_cache=True)
    pieces, cache = [out.logits], getattr(out, CACHE_FIELD)
    for t in range(6, 9):  # one token at a time on the cache
        out = quantized(input_ids=ids[:, t : t + 1], cache=cache, use_cache=True)
        pieces.append(out.logits)
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=0, atol=0.05)  # (measured: ~0.01)
    with_cache = quantized.generate(ids, max_new_tokens=4, do_sample=False)
    assert torch.equal(with_cache, quantized.generate(ids, max_new_tokens=4, do_sample=False, use_cache=False))


# -- the example -------------------------------------------------------------------------------------


def test_share_on_hub_example_runs(tmp_path):
    """examples/share_on_hub.py end to end, briefly: it exits non-zero if the user's reload differs."""
    script = os.path.join(os.path.dirname(__file__), "..", "examples", "share_on_hub.py")
    run = subprocess.run(
        [sys.executable, script, "--output_dir", str(tmp_path / "out"), "--steps", "2"],
        capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")},
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "same output" in run.stdout and "transformers_modules." in run.stdout
    assert {"README.md", "tokenizer_config.json", "model.safetensors"} <= set(os.listdir(tmp_path / "out"))


@stack_params
def test_models_and_their_caches_pickle(stack, tmp_path):
    """torch.save(model) (and deepcopy's fallbacks, multiprocessing) pickle the whole model: linear attention's
    feature maps were lambdas and failed. A cache (alone, or in a generate() output) held a weak reference to its
    model's config and failed too; it keeps its layout and checks the next model against it."""
    import io
    import pickle

    model = tiny_model(SeqArchForCausalLM, STACKS[stack])
    ids, step = random_ids(1, 6), random_ids(1, 1, seed=3)
    out = model(ids, use_cache=True)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert torch.equal(loaded(ids).logits, out.logits)
    filled = getattr(out, CACHE_FIELD)  # (the output field's name differs between transformers 4 and 5)
    cache = pickle.loads(pickle.dumps(filled))
    assert torch.equal(model(step, cache=cache).logits, model(step, cache=filled).logits)


@pytest.mark.parametrize("stack", ["lstm", "gru", "sliding", "mamba2+attention", "lstm+linear+sliding"])
def test_torch_func_per_sample_gradients(stack):
    """torch.func (Opacus-style per-sample gradients, influence functions, meta-learning) failed on every model: the
    hand-written backwards are autograd.Functions without setup_context, the checks read values vmap does not have,
    and vmap has no rule for the fused LSTM / GRU. Under torch.func the plain ops run: per-sample gradients
    (vmap(grad)) are each sample's own, and vmap of the forward is the batched forward."""
    from torch.func import functional_call, grad, vmap

    model = tiny_model(SeqArchForCausalLM, STACKS[stack], use_cache=False)
    ids = random_ids(3, 7)
    params = {name: p.detach() for name, p in model.named_parameters()}

    def loss(p, row):  # one sample: row (T,)
        return functional_call(model, p, (row[None],), {"labels": row[None]}).loss

    per_sample = vmap(grad(loss), in_dims=(None, 0))(params, ids)  # each (3, *p.shape)
    for i in range(3):
        own = torch.autograd.grad(model(ids[i : i + 1], labels=ids[i : i + 1]).loss, list(model.parameters()))
        for (name, mine), theirs in zip(per_sample.items(), own):
            torch.testing.assert_close(mine[i], theirs, rtol=1e-4, atol=1e-6, msg=f"sample {i}, {name}")
    with torch.no_grad():
        logits = vmap(lambda row: functional_call(model, params, (row[None],)).logits[0])(ids)
        torch.testing.assert_close(logits, model(ids).logits, rtol=1e-5, atol=1e-6)

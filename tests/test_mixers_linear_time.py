"""mamba2 and linear_attention mixers: three paths, padding, a step-by-step reference, encoders, long inputs.

The op itself (chunked_scan vs scan_reference) is tested in test_ops_chunked_scan.py; here every mixer
is held to a plain loop over time written from its parameters (no chunks, no gathers, no kernels).
"""

import pytest
import torch
import torch.nn.functional as F

from hf_seqarch import SeqArchCache, SeqArchForCausalLM, SeqArchModel
from hf_seqarch import mixer_token_blocks
from hf_seqarch.mixer_context import MixerContext
from hf_seqarch.mixer_token_blocks import cpu_token_block
from hf_seqarch.modeling_seqarch import CACHE_FIELD
from tester import random_ids, tiny_config, tiny_model

# name -> (mixer type, config overrides); every variant runs every property below.
VARIANTS = {
    "mamba2": ("mamba2", {}),
    "mamba2_groups2_kernel3": ("mamba2", dict(mamba_n_groups=2, mamba_conv_kernel=3)),
    "linear_elu_decay": ("linear_attention", {}),
    "linear_relu_nodecay": ("linear_attention", dict(linear_attention_feature_map="relu", linear_attention_use_decay=False)),
}
variant_params = pytest.mark.parametrize("variant", list(VARIANTS))


def make_mixer(variant, bidirectional=False, seed=0):
    """A float32 mixer from a one-layer tiny model, its parameters jittered so no init symmetry hides a bug."""
    kind, overrides = VARIANTS[variant]
    model = tiny_model(SeqArchModel, [kind], seed=seed, bidirectional=bidirectional, **overrides)
    mixer = model.layers[0].mixer
    generator = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for parameter in mixer.parameters():
            parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator))
    mixer.reference_config = model.config  # what the references read, rather than the choices the mixer made from it
    return mixer


def random_hidden(batch, length, seed=0):
    return torch.randn(batch, length, 32, generator=torch.Generator().manual_seed(seed))


def run(mixer, hidden, mask=None, cache=None, causal=True):
    """One mixer forward. `mask` covers the cached past and the new tokens, as the model's padding mask does."""
    past = cache.get_seq_length() if cache is not None else 0
    length = hidden.shape[1]
    context = MixerContext(
        padding_mask=mask,
        position_ids=torch.arange(past, past + length)[None],
        past_length=past,
        cache=cache,
        causal=causal,
    )
    output = mixer(hidden, context)
    if cache is not None:
        cache.advance(length)
    return output


def assert_states_equal(a, b, **tolerance):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], msg=name, **tolerance)


# -- step-by-step references ------------------------------------------------------------------------
def mamba2_core_reference(m, xBC, dt_raw):
    """Conv and SSM one token at a time. xBC (B, T, conv_dim), dt_raw (B, T, H) -> y (B, T, inner)."""
    batch, length, channels = xBC.shape
    H, P, N, G = m.num_heads, m.head_dim, m.state_size, m.n_groups
    window = torch.zeros(batch, channels, m.conv_kernel)
    state = torch.zeros(batch, H, P, N)
    A = -torch.exp(m.A_log)
    ys = []
    for t in range(length):
        window = torch.cat([window[..., 1:], xBC[:, t, :, None]], dim=-1)  # the last K inputs
        u = F.silu((window * m.conv1d.weight[:, 0]).sum(-1) + m.conv1d.bias)  # (B, C)
        x, B, C = u.split([m.inner_size, G * N, G * N], dim=-1)
        x = x.view(batch, H, P)
        B = B.view(batch, G, 1, N).expand(batch, G, H // G, N).reshape(batch, H, N)  # head h uses group h // (H/G)
        C = C.view(batch, G, 1, N).expand(batch, G, H // G, N).reshape(batch, H, N)
        dt = F.softplus(dt_raw[:, t] + m.dt_bias)  # (B, H)
        state = torch.exp(dt * A)[..., None, None] * state + (dt[..., None] * x)[..., None] * B[:, :, None, :]
        y = (state * C[:, :, None, :]).sum(-1) + m.D[:, None] * x  # (B, H, P)
        ys.append(y.reshape(batch, -1))
    return torch.stack(ys, 1)


def mamba2_reference(m, hidden, bidirectional=False):
    z, xBC, dt_raw = m.in_proj(hidden).split([m.inner_size, m.conv_dim, m.num_heads], dim=-1)
    y = mamba2_core_reference(m, xBC, dt_raw)
    if bidirectional:
        y = y + mamba2_core_reference(m, xBC.flip(1), dt_raw.flip(1)).flip(1)
    gated = (y * F.silu(z)).unflatten(-1, (m.n_groups, -1))  # (B, T, G, inner / G)
    normed = gated * torch.rsqrt(gated.pow(2).mean(-1, keepdim=True) + m.norm.eps)
    return m.out_proj(normed.flatten(-2) * m.norm.weight)


def linear_attention_core_reference(q, k, v, gamma):
    """S_t = gamma S_{t-1} + v_t k_t^T, y_t = S_t q_t, one token at a time. q/k/v (B, T, H, D), gamma (H,)."""
    batch, length, heads, dim = q.shape
    state = torch.zeros(batch, heads, dim, dim)
    ys = []
    for t in range(length):
        state = gamma[:, None, None] * state + v[:, t, :, :, None] * k[:, t, :, None, :]
        ys.append((state * q[:, t, :, None, :]).sum(-1))
    return torch.stack(ys, 1)  # (B, T, H, D)


# The feature maps as the config documents them, written out rather than taken from the mixer under test.
FEATURE_MAPS = {"elu": lambda x: F.elu(x) + 1, "relu": F.relu, "identity": lambda x: x}


def linear_attention_reference(m, hidden, bidirectional=False):
    shape = (*hidden.shape[:2], m.num_heads, m.head_dim)
    feature_map = FEATURE_MAPS[m.reference_config.linear_attention_feature_map]
    q = feature_map(m.q_proj(hidden).view(shape)) / m.head_dim**0.5
    k = feature_map(m.k_proj(hidden).view(shape))
    v = m.v_proj(hidden).view(shape)
    gamma = torch.sigmoid(m.decay_logit) if m.decay_logit is not None else torch.ones(m.num_heads)
    y = linear_attention_core_reference(q, k, v, gamma)
    if bidirectional:
        y = y + linear_attention_core_reference(q.flip(1), k.flip(1), v.flip(1), gamma).flip(1)
    y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + m.out_norm.eps) * m.out_norm.weight
    return m.o_proj(y.flatten(-2))


def reference(mixer, hidden, bidirectional=False):
    fn = mamba2_reference if hasattr(mixer, "A_log") else linear_attention_reference
    return fn(mixer, hidden, bidirectional)


# -- tests ------------------------------------------------------------------------------------------
@variant_params
@pytest.mark.parametrize("bidirectional", [False, True], ids=["causal", "bidir"])
def test_mixer_matches_step_by_step_reference(variant, bidirectional):
    mixer = make_mixer(variant, bidirectional)
    hidden = random_hidden(2, 13)  # 13: three full chunks of 4 and a partial one
    with torch.no_grad():
        got = run(mixer, hidden, causal=not bidirectional)
        want = reference(mixer, hidden, bidirectional)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@variant_params
def test_bidirectional_sees_both_ends(variant):
    mixer = make_mixer(variant, bidirectional=True)
    hidden = random_hidden(1, 10)
    changed_last, changed_first = hidden.clone(), hidden.clone()
    changed_last[:, -1] += 1.0
    changed_first[:, 0] += 1.0
    with torch.no_grad():
        base = run(mixer, hidden, causal=False)
        assert not torch.allclose(base[:, 0], run(mixer, changed_last, causal=False)[:, 0])  # backward scan
        assert not torch.allclose(base[:, -1], run(mixer, changed_first, causal=False)[:, -1])  # forward scan


@variant_params
def test_full_forward_prefill_chunks_and_decode_agree(variant):
    mixer = make_mixer(variant)
    hidden = random_hidden(2, 13)
    with torch.no_grad():
        full_cache = SeqArchCache(num_layers=1)
        full = run(mixer, hidden, cache=full_cache)
        torch.testing.assert_close(full, run(mixer, hidden), rtol=0, atol=0)  # a cache changes nothing

        # Uneven chunks, each a prefill from the state the previous one left; length-1 pieces take the decode path.
        chunk_cache = SeqArchCache(num_layers=1)
        bounds = [0, 5, 6, 7, 11, 13]
        chunks = [run(mixer, hidden[:, a:b], cache=chunk_cache) for a, b in zip(bounds, bounds[1:])]

        step_cache = SeqArchCache(num_layers=1)
        steps = [run(mixer, hidden[:, t : t + 1], cache=step_cache) for t in range(13)]

    torch.testing.assert_close(torch.cat(chunks, 1), full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-5, atol=1e-5)
    assert_states_equal(chunk_cache.get_state(0), full_cache.get_state(0), rtol=1e-5, atol=1e-5)
    assert_states_equal(step_cache.get_state(0), full_cache.get_state(0), rtol=1e-5, atol=1e-5)


@variant_params
@pytest.mark.parametrize("layout", ["left", "right", "holes"])
def test_padding_never_enters_the_state(variant, layout):
    """A padded row leaves exactly the state of its real tokens alone, and continues from it exactly."""
    mixer = make_mixer(variant)
    long, short = random_hidden(1, 9, seed=1), random_hidden(1, 5, seed=2)
    where = {
        "left": [4, 5, 6, 7, 8],
        "right": [0, 1, 2, 3, 4],
        "holes": [0, 2, 3, 6, 8],
    }[layout]
    padded = torch.randn(1, 9, 32) * 10  # loud garbage at the pads
    padded[0, where] = short[0]
    mask = torch.zeros(2, 9, dtype=torch.bool)
    mask[0] = True
    mask[1, where] = True
    continuation = random_hidden(2, 4, seed=3)

    with torch.no_grad():
        batch_cache, alone_cache = SeqArchCache(num_layers=1), SeqArchCache(num_layers=1)
        batched = run(mixer, torch.cat([long, padded]), mask=mask, cache=batch_cache)
        alone = run(mixer, short, cache=alone_cache)
        batch_state = {name: t[1:] for name, t in batch_cache.get_state(0).items()}
        assert_states_equal(batch_state, alone_cache.get_state(0), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(batched[1, where], alone[0], rtol=1e-5, atol=1e-5)

        # Continue both: a decode step, then a 3-token chunk with a pad in it (the mask includes the past).
        full_mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.bool)], 1)
        step = run(mixer, continuation[:, :1], mask=full_mask, cache=batch_cache)
        step_alone = run(mixer, continuation[1:, :1], cache=alone_cache)
        torch.testing.assert_close(step[1], step_alone[0], rtol=1e-5, atol=1e-5)
        chunk_mask = torch.cat([full_mask, torch.tensor([[True, True, True], [True, False, True]])], 1)
        chunk = run(mixer, continuation[:, 1:], mask=chunk_mask, cache=batch_cache)
        chunk_alone = run(mixer, continuation[1:, [1, 3]], cache=alone_cache)
    torch.testing.assert_close(chunk[1, [0, 2]], chunk_alone[0], rtol=1e-5, atol=1e-5)
    batch_state = {name: t[1:] for name, t in batch_cache.get_state(0).items()}
    assert_states_equal(batch_state, alone_cache.get_state(0), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mixers", [["mamba2"], ["linear_attention"]])
def test_deferred_initialisation_initialises_every_parameter(mixers):
    """torch's recipe for a model built on the meta device (to_empty(), then each module's reset_parameters; FSDP's
    default) left mamba2's dt_bias, A_log, D, conv and gated norm and linear attention's decays as raw memory."""
    with torch.device("meta"):
        model = SeqArchForCausalLM(tiny_config(mixers))
    model.to_empty(device="cpu")
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.fill_(float("nan"))  # what the uninitialised memory may hold
    for module in model.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    assert [name for name, p in model.named_parameters() if p.isnan().any()] == []
    mixer = model.model.layers[0].mixer
    if mixers == ["mamba2"]:  # the model's own initialisation
        assert torch.equal(mixer.D, torch.ones_like(mixer.D)) and not mixer.conv1d.bias.any()
        assert ((-mixer.A_log.exp() <= -1) & (-mixer.A_log.exp() >= -16)).all()


@pytest.mark.parametrize("kernel", [2, 4, 7])
def test_mamba2_conv_has_a_depthwise_conv1ds_parameters_and_init(kernel):
    from hf_seqarch.mixer_mamba2 import ShortCausalConv

    torch.manual_seed(0)
    conv = ShortCausalConv(12, kernel)
    torch.manual_seed(0)
    reference = torch.nn.Conv1d(12, 12, kernel, groups=12, bias=True)
    assert conv.state_dict().keys() == reference.state_dict().keys()
    for name, tensor in reference.state_dict().items():
        assert torch.equal(conv.state_dict()[name], tensor), name


def test_mamba2_conv_state_holds_the_last_real_inputs():
    """After a right-padded chunk, the conv state is the last K-1 real conv inputs, not pads."""
    mixer = make_mixer("mamba2")
    hidden = random_hidden(1, 6)
    mask = torch.tensor([[True, True, True, True, False, False]])
    cache = SeqArchCache(num_layers=1)
    with torch.no_grad():
        run(mixer, hidden, mask=mask, cache=cache)
        xBC = mixer.in_proj(hidden).split([mixer.inner_size, mixer.conv_dim, mixer.num_heads], -1)[1]
    expected = xBC[0, 4 - (mixer.conv_kernel - 1) : 4].T  # (conv_dim, K-1)
    torch.testing.assert_close(cache.get_state(0)["conv"][0], expected)


def largest_activation_bytes_per_token(mixer):
    """What each mixer passes cpu_token_block, in float32: mamba2's in-projection, linear attention's q, k or v."""
    features = mixer.in_proj.out_features if hasattr(mixer, "in_proj") else mixer.num_heads * mixer.head_dim
    return features * 4


@pytest.mark.parametrize("variant", ["mamba2", "linear_elu_decay", "linear_relu_nodecay"])
@pytest.mark.parametrize("padding", ["none", "left", "holes"])
@pytest.mark.parametrize("cache_kind", ["no_cache", "cache", "filled_cache"])
def test_long_cpu_sequence_in_token_blocks_matches_one_block(monkeypatch, variant, padding, cache_kind):
    """On CPU a long sequence runs in blocks of tokens (mixer_token_blocks): outputs, final state and the gradients
    of the input and every parameter are those of one forward over the whole sequence, also when the cache already
    holds tokens (pads among them: the padding mask covers the past too)."""
    mixer = make_mixer(variant)
    hidden, prefix = random_hidden(2, 17), random_hidden(2, 3, seed=7)
    mask = None if padding == "none" else torch.ones(2, 17, dtype=torch.bool)
    if padding == "left":
        mask[1, :5] = False
    elif padding == "holes":
        mask[1, [3, 7, 8, 9, 16]] = False  # across the block boundary at 8, and the one-token last block
    prefix_mask = torch.tensor([[True, True, True], [True, False, True]])
    if cache_kind == "filled_cache":
        mask = torch.cat([prefix_mask, torch.ones(2, 17, dtype=torch.bool) if mask is None else mask], 1)
    weights = torch.randn(2, 17, 32, generator=torch.Generator().manual_seed(5))
    blocks = []

    def forward_and_gradients():
        cache = None if cache_kind == "no_cache" else SeqArchCache(num_layers=1)
        if cache_kind == "filled_cache":
            with torch.no_grad():
                run(mixer, prefix, mask=prefix_mask, cache=cache)
            blocks.clear()
        inputs = hidden.clone().requires_grad_()
        output = run(mixer, inputs, mask=mask, cache=cache)
        gradients = torch.autograd.grad((output * weights).sum(), [inputs, *mixer.parameters()])
        return output, cache, gradients

    whole = forward_and_gradients()
    bytes_per_token = largest_activation_bytes_per_token(mixer)
    monkeypatch.setattr(mixer_token_blocks, "CPU_BLOCK_BYTES", 8 * 2 * bytes_per_token)  # 8 tokens at batch 2
    assert cpu_token_block(hidden, bytes_per_token, mixer.chunk_size) == 8
    unblocked_forward = mixer._forward
    monkeypatch.setattr(mixer, "_forward", lambda h, context: blocks.append(h.shape[1]) or unblocked_forward(h, context))
    blocked = forward_and_gradients()

    assert blocks == [8, 8, 1]  # the last block takes the decode path
    torch.testing.assert_close(blocked[0], whole[0], rtol=1e-5, atol=1e-5)
    if cache_kind != "no_cache":
        assert_states_equal(blocked[1].get_state(0), whole[1].get_state(0), rtol=1e-5, atol=1e-5)
    for name, got, want in zip(["input", *dict(mixer.named_parameters())], blocked[2], whole[2]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=name)


def test_token_blocks_only_for_long_cpu_sequences(monkeypatch):
    """Blocks are a multiple of the chunk size; none where one block holds the sequence, off the CPU, for an empty
    batch, or in half precision (each block's parameter gradients would be added in 16 bits)."""
    row = 1000  # bytes per token and batch row
    monkeypatch.setattr(mixer_token_blocks, "CPU_BLOCK_BYTES", 100 * row)
    assert cpu_token_block(torch.empty(1, 101, 8), row, multiple=16) == 96
    assert cpu_token_block(torch.empty(1, 96, 8), row, multiple=16) is None  # fits in one block
    assert cpu_token_block(torch.empty(4, 101, 8), row, multiple=16) == 16  # at least one chunk, whatever the batch
    assert cpu_token_block(torch.empty(1, 101, 8, device="meta"), row, multiple=16) is None
    assert cpu_token_block(torch.empty(0, 101, 8), row, multiple=16) is None
    for dtype in (torch.float16, torch.bfloat16):
        assert cpu_token_block(torch.empty(1, 101, 8, dtype=dtype), row, multiple=16) is None
    assert cpu_token_block(torch.empty(1, 101, 8, dtype=torch.float64), row, multiple=16) == 96



@pytest.mark.parametrize("variant", ["mamba2", "linear_elu_decay"])
def test_encoder_runs_whole_however_long(monkeypatch, variant):
    """An encoder's backward scan starts from the end: no blocks, and it still matches the reference."""
    mixer = make_mixer(variant, bidirectional=True)
    hidden = random_hidden(2, 13)
    bytes_per_token = largest_activation_bytes_per_token(mixer)
    monkeypatch.setattr(mixer_token_blocks, "CPU_BLOCK_BYTES", 4 * 2 * bytes_per_token)
    assert cpu_token_block(hidden, bytes_per_token, mixer.chunk_size) == 4
    with torch.no_grad():
        torch.testing.assert_close(run(mixer, hidden, causal=False), reference(mixer, hidden, True), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["mamba2", "linear_attention"])
def test_generate_matches_full_forward_argmax(kind):
    """generate() drives the decode path through the model; greedy tokens equal step-wise argmax of a full forward."""
    model = tiny_model(SeqArchForCausalLM, [kind, kind])
    prompt = random_ids(2, 6)
    out = model.generate(prompt, max_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        logits = model(input_ids=out[:, :-1]).logits
    assert torch.equal(logits[:, prompt.shape[1] - 1 :].argmax(-1), out[:, prompt.shape[1] :])


@pytest.mark.parametrize("kind", ["mamba2", "linear_attention"])
def test_bfloat16_model_runs_all_paths_close_to_float32(kind):
    """States stay float32 in a bfloat16 model; its outputs track the float32 model's to bfloat16 precision."""
    model = tiny_model(SeqArchForCausalLM, [kind, kind])
    ids = random_ids(2, 9)
    reference = model(input_ids=ids).logits
    model = model.to(torch.bfloat16)
    cache = SeqArchCache(model.config)
    pieces = [model(input_ids=ids[:, a:b], cache=cache, use_cache=True).logits for a, b in ((0, 6), (6, 7), (7, 9))]
    # The recurrent states accumulate over the whole sequence: float32. (mamba2's conv state is raw inputs.)
    assert all(state[name].dtype == torch.float32 for state in cache.layers for name in state if name != "conv")
    for logits in (model(input_ids=ids).logits, torch.cat(pieces, 1)):
        assert logits.dtype == torch.bfloat16
        error = (logits.float() - reference).norm() / reference.norm()
        assert error < 2e-2, float(error)


def test_float16_linear_attention_without_decay_stays_finite():
    """Without decay the scan's outputs grow with length and only the per-head norm brings them back to scale:
    scan and norm run in float32 in a float16 model (its outputs once overflowed to inf/NaN past ~200 tokens here)."""
    model = tiny_model(
        SeqArchForCausalLM, ["linear_attention"], intermediate_size=0, initializer_range=1.0,
        linear_attention_use_decay=False, linear_attention_num_heads=1,
    )
    ids = random_ids(1, 256)
    with torch.no_grad():
        reference = model(input_ids=ids).logits
        half = model.half()(input_ids=ids).logits
    assert half.dtype == torch.float16 and torch.isfinite(half).all()
    assert (half.float() - reference).norm() / reference.norm() < 1e-2



def test_float16_mamba2_decode_stays_finite_where_the_full_forward_does():
    """The decode step computes in the scan's dtype, as the full forward does: it returned the SSM output in
    float16, which overflowed to inf (NaN logits, garbage from generate()) where the full forward's float32 output
    was ~3e5 and fine."""
    model = tiny_model(SeqArchForCausalLM, ["mamba2"], intermediate_size=0, initializer_range=2.0, hidden_size=48,
                       mamba_state_size=16, mamba_chunk_size=16)
    ids = random_ids(1, 64)
    with torch.no_grad():
        half = model.half()
        full = half(input_ids=ids).logits
        cache = getattr(half(input_ids=ids[:, :56], use_cache=True), CACHE_FIELD)  # (named by transformers version)
        steps = torch.cat([half(input_ids=ids[:, t : t + 1], past_key_values=cache).logits for t in range(56, 64)], 1)
    assert torch.isfinite(full).all() and torch.isfinite(steps).all()
    assert (steps.float() - full[:, 56:].float()).norm() / full[:, 56:].float().norm() < 1e-2


@pytest.mark.parametrize("training", [False, True])
def test_mamba2_norm_keeps_the_model_dtype_with_float32_weights(training):
    """Norms kept in float32 in a bfloat16 model (a common mixed-precision recipe): the gated norm returned float32,
    and the bfloat16 out_proj then failed inside torch."""
    model = tiny_model(SeqArchForCausalLM, ["mamba2", "attention"]).to(torch.bfloat16).train(training)
    for module in model.modules():
        if "RMSNorm" in type(module).__name__:
            module.float()
    ids = random_ids(2, 7)
    with torch.set_grad_enabled(training):  # training: the CPU fast path of the norm
        logits = model(input_ids=ids).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
    if training:
        logits.float().sum().backward()
        assert all(p.grad is not None for p in model.parameters() if p.requires_grad)

def test_long_sequence_with_strong_decay_stays_finite():
    """T = 16,384 forward and backward of a tiny mamba2 model whose gates decay to ~exp(-1000) per step."""
    torch.manual_seed(0)
    model = SeqArchForCausalLM(
        tiny_config(["mamba2"], intermediate_size=0, mamba_chunk_size=64, mamba_state_size=4, mamba_expand=1)
    ).train()
    mixer = model.model.layers[0].mixer
    with torch.no_grad():
        mixer.A_log.fill_(7.0)  # A = -exp(7) ~ -1100
        mixer.dt_bias[::2] = 5.0  # half the heads: dt ~ 5, log decay ~ -5500 per step
    ids = random_ids(1, 16384)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss)
    for name, parameter in model.named_parameters():
        assert torch.isfinite(parameter.grad).all(), name


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(mixer_types=["mamba2"], mamba_head_dim=7), "multiple of mamba_head_dim"),
        (dict(mixer_types=["mamba2"], mamba_n_groups=3), "mamba_n_groups"),
        (dict(mixer_types=["mamba2"], mamba_chunk_size=0), "mamba_chunk_size"),
        (dict(mixer_types=["linear_attention"], linear_attention_feature_map="softmax"), "feature_map"),
        (dict(mixer_types=["linear_attention"], linear_attention_num_heads=5), "do not divide hidden_size"),
    ],
)
def test_bad_linear_time_config(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(overrides.pop("mixer_types"), **overrides)


# -- optional CUDA kernels --------------------------------------------------------------------------
def test_backend_choice_is_queryable_and_torch_on_cpu():
    from hf_seqarch.kernels_mamba2 import conv1d_backend, mamba2_backend

    assert mamba2_backend("cpu") == "torch" and conv1d_backend("cpu") == "torch"


def test_kernels_only_where_they_apply(monkeypatch):
    """With the kernel packages installed (stand-ins here: only the choice is tested), CUDA tensors take them only in
    a dtype they compute in and, for causal_conv1d, a width it has: float64 would fail there (the conv) or be computed
    in float32 (the scan), and causal_conv1d has no kernel wider than 4; and not while a graph is recorded (the README
    says an exported graph runs the plain ops). Each refusal is announced with its reason."""
    from hf_seqarch import kernels_mamba2

    monkeypatch.setattr(kernels_mamba2, "mamba_chunk_scan_combined", object())
    monkeypatch.setattr(kernels_mamba2, "causal_conv1d_fn", object())
    monkeypatch.setattr(kernels_mamba2, "_announced", set())
    assert kernels_mamba2.mamba2_backend("cuda", torch.bfloat16) == "mamba_ssm"
    assert kernels_mamba2.mamba2_backend("cuda", torch.float64) == "torch"
    assert kernels_mamba2.conv1d_backend("cuda", torch.float32, 4) == "causal_conv1d"
    assert kernels_mamba2.conv1d_backend("cuda", torch.float32, 5) == "torch"
    assert kernels_mamba2.conv1d_backend("cuda", torch.float64, 4) == "torch"
    # a padded batch or a continued cache runs the PyTorch conv: said (it was silent, the query answering the kernel)
    assert kernels_mamba2.conv1d_backend("cuda", torch.float32, 4, fresh=False) == "torch"
    monkeypatch.setattr(kernels_mamba2, "plain_ops_only", lambda: True)  # torch.export, jit.trace, torch.func
    assert kernels_mamba2.mamba2_backend("cuda", torch.bfloat16) == "torch"
    assert kernels_mamba2.conv1d_backend("cuda", torch.float32, 4) == "torch"
    reasons = {why for *_, why in kernels_mamba2._announced if why}
    recording = "torch.export, torch.jit.trace or torch.func cannot take {}'s kernel"
    assert reasons == {"mamba-ssm's kernel does not compute in torch.float64", "causal-conv1d has no kernel 5 wide",
                       "causal-conv1d's kernel does not compute in torch.float64", recording.format("mamba-ssm"),
                       recording.format("causal-conv1d"), "causal-conv1d's kernel as used here takes neither padding "
                       "nor a carried state (a padded batch, a continued cache)"}


def test_conv_kernel_input_is_channels_first():
    """One token of batch 1: x (1, C, 1) transposed from (1, 1, C) counts as contiguous with T's stride C, which
    causal_conv1d takes for its channels-last layout (and refuses unless C is a multiple of 8)."""
    from hf_seqarch.kernels_mamba2 import channels_first

    x = torch.randn(1, 1, 230).transpose(1, 2)  # (B, C, T) = (1, 230, 1)
    assert x.is_contiguous() and x.stride(-1) == 230
    assert channels_first(x).stride() == (230, 1, 1) and torch.equal(channels_first(x), x)
    y = torch.randn(2, 230, 5)
    assert channels_first(y) is y



def test_mamba2_asks_for_the_conv_kernel_only_where_it_applies(monkeypatch):
    """The conv kernel runs only unpadded from a zero state: the mixer says which case it is in when it asks, so that
    the PyTorch conv of a padded batch or a continued cache is announced (it ran silently, the query answering the
    kernel)."""
    from hf_seqarch import mixer_mamba2

    asked = []
    monkeypatch.setattr(mixer_mamba2, "conv1d_backend", lambda *args, fresh=True: asked.append(fresh) or "torch")
    model = tiny_model(SeqArchForCausalLM, ["mamba2"])
    ids = random_ids(2, 6)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    with torch.no_grad():
        cache = getattr(model(input_ids=ids, use_cache=True), CACHE_FIELD)
        model(input_ids=ids, attention_mask=mask)
        model(input_ids=ids[:, :3], cache=cache, use_cache=True)  # (a chunk: one token decodes by a step of its own)
    assert asked == [True, False, False]

@pytest.mark.cuda
@pytest.mark.parametrize("kernel,masked", [("mamba_ssm", False), ("mamba_ssm", True), ("causal_conv1d", False)])
def test_mamba2_kernels_match_pytorch_path(monkeypatch, kernel, masked):
    """mamba_ssm's scan or causal_conv1d's conv (each alone, the other off, so that neither passes by the other's
    absence) on CUDA against the PyTorch path: outputs, final states, gradients. The conv kernel takes unpadded
    prefills only (a padded batch's real tokens are reordered first, on the PyTorch conv)."""
    pytest.importorskip(kernel)
    from hf_seqarch import kernels_mamba2

    other = {"mamba_ssm": "causal_conv1d_fn", "causal_conv1d": "mamba_chunk_scan_combined"}[kernel]
    monkeypatch.setattr(kernels_mamba2, other, None)
    chosen = kernels_mamba2.mamba2_backend("cuda") if kernel == "mamba_ssm" else kernels_mamba2.conv1d_backend("cuda")
    assert chosen == kernel, f"{kernel} imports but its kernel is not chosen"
    torch.manual_seed(0)
    model = SeqArchForCausalLM(
        tiny_config(["mamba2", "mamba2"], hidden_size=64, mamba_head_dim=16, mamba_state_size=16, mamba_chunk_size=16)
    ).cuda()
    ids = random_ids(2, 100).cuda()
    mask = torch.ones_like(ids)
    if masked:
        mask[1, :37] = 0

    def forward_backward():
        model.zero_grad()
        out = model(input_ids=ids, attention_mask=mask, use_cache=True)
        (out.logits.float().pow(2).mean()).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        cache = out.cache if hasattr(out, "cache") else out.past_key_values
        return out.logits.detach(), cache, grads

    kernel_logits, kernel_cache, kernel_grads = forward_backward()
    monkeypatch.setattr(kernels_mamba2, "mamba_chunk_scan_combined", None)
    monkeypatch.setattr(kernels_mamba2, "causal_conv1d_fn", None)
    assert kernels_mamba2.mamba2_backend("cuda") == "torch"
    torch_logits, torch_cache, torch_grads = forward_backward()

    # Relative errors, because Triton's tl.dot runs float32 matmuls in TF32 (a 10-bit mantissa).
    def relative_error(a, b):
        return float((a - b).norm() / b.norm().clamp(min=1e-12))

    real = mask.bool()
    assert relative_error(kernel_logits[real], torch_logits[real]) < 1e-3
    for layer in range(2):
        for name, tensor in torch_cache.get_state(layer).items():
            assert relative_error(kernel_cache.get_state(layer)[name], tensor) < 1e-3, (layer, name)
    for name, grad in torch_grads.items():
        assert relative_error(kernel_grads[name], grad) < 1e-2, name

"""chunked_scan (Mamba-2 SSD chunked algorithm) against the plain sequential loop."""

import pytest
import torch

from hf_seqarch import ops_chunked_scan
from hf_seqarch.ops_chunked_scan import chunked_scan, scan_reference, scan_step


def make_inputs(B=2, T=37, H=3, N=5, P=4, dtype=torch.float64, initial_state=True, seed=0, strong=False):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, N, generator=g, dtype=dtype) * 0.5
    k = torch.randn(B, T, H, N, generator=g, dtype=dtype) * 0.5
    v = torch.randn(B, T, H, P, generator=g, dtype=dtype)
    log_decay = -torch.rand(B, T, H, generator=g, dtype=dtype)  # decay in (e^-1, 1]
    if strong:  # some strongly decaying gates, -5 .. -20
        hit = torch.rand(B, T, H, generator=g) < 0.1
        log_decay = torch.where(hit, -5 - 15 * torch.rand(B, T, H, generator=g, dtype=dtype), log_decay)
    s0 = torch.randn(B, H, P, N, generator=g, dtype=dtype) if initial_state else None
    return q, k, v, log_decay, s0


def outputs_and_grads(fn, q, k, v, log_decay, s0, **kw):
    """Forward, then backward with random upstream gradients for y and the final state."""
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v, log_decay)]
    if s0 is not None:
        leaves.append(s0.detach().clone().requires_grad_())
    y, s = fn(*leaves[:4], initial_state=leaves[4] if s0 is not None else None, **kw)
    g = torch.Generator().manual_seed(1)
    gy = torch.randn(y.shape, generator=g, dtype=torch.float64).to(y.dtype)  # same values for any dtype
    gs = torch.randn(s.shape, generator=g, dtype=torch.float64).to(s.dtype)
    grads = torch.autograd.grad((y, s), leaves, (gy, gs))
    return [y.detach(), s.detach(), *grads]


NAMES = ["y", "final_state", "dq", "dk", "dv", "dlog_decay", "dinitial_state"]


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("chunk_size", [1, 16, 64])
@pytest.mark.parametrize("T", [1, 7, 64, 100, 129])
@pytest.mark.parametrize("with_state", [False, True])
def test_matches_reference(dtype, tol, chunk_size, T, with_state):
    inputs = make_inputs(T=T, dtype=dtype, initial_state=with_state)
    got = outputs_and_grads(chunked_scan, *inputs, chunk_size=chunk_size)
    want = outputs_and_grads(scan_reference, *inputs)
    for name, a, b in zip(NAMES, got, want):
        assert a.dtype == dtype and a.shape == b.shape, name
        torch.testing.assert_close(a, b, atol=tol, rtol=tol, msg=name)


def test_matches_reference_strong_decay():
    inputs = make_inputs(T=200, strong=True)
    got = outputs_and_grads(chunked_scan, *inputs, chunk_size=32)
    want = outputs_and_grads(scan_reference, *inputs)
    for name, a, b in zip(NAMES, got, want):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10, msg=name)


@pytest.mark.parametrize("groups", [3, 1])
@pytest.mark.parametrize("strong", [False, True])
def test_the_recordable_scan_matches_reference(monkeypatch, groups, strong):
    """While torch.export or torch.jit.trace records, chunked_scan runs `_recordable_scan` (plain ops, so that the
    recorded graph keeps a backward): the same outputs and gradients, grouped q and k included."""
    monkeypatch.setattr(ops_chunked_scan, "plain_ops_only", lambda: True)
    q, k, v, log_decay, s0 = make_inputs(T=45, H=3, strong=strong)
    q, k = q[:, :, :groups], k[:, :, :groups]  # (B, T, G, N): shared by H / G heads
    got = outputs_and_grads(chunked_scan, q, k, v, log_decay, s0, chunk_size=16)
    want = outputs_and_grads(scan_reference, q, k, v, log_decay, s0)
    for name, a, b in zip(NAMES, got, want):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10, msg=name)


def test_prefill_in_two_parts_and_decode_steps():
    q, k, v, a, s0 = make_inputs(T=90)
    y, s = chunked_scan(q, k, v, a, chunk_size=16, initial_state=s0)

    # two halves, the state carried (prefill from a state); the cut is not on a chunk boundary
    y1, s1 = chunked_scan(q[:, :50], k[:, :50], v[:, :50], a[:, :50], chunk_size=16, initial_state=s0)
    y2, s2 = chunked_scan(q[:, 50:], k[:, 50:], v[:, 50:], a[:, 50:], chunk_size=16, initial_state=s1)
    torch.testing.assert_close(torch.cat([y1, y2], 1), y)
    torch.testing.assert_close(s2, s)

    # token-by-token decoding
    state, ys = s0, []
    for t in range(q.shape[1]):
        y_t, state = scan_step(q[:, t], k[:, t], v[:, t], a[:, t], state)
        ys.append(y_t)
    torch.testing.assert_close(torch.stack(ys, 1), y)
    torch.testing.assert_close(state, s)


def test_pad_positions_leave_state_unchanged():
    q, k, v, a, s0 = make_inputs(T=40)
    pad = torch.zeros(40, dtype=torch.bool)
    pad[5:9] = pad[30:] = True  # pads in the middle and at the end (as with left/right padding)
    mask = pad[None, :, None]
    v_p, k_p, a_p = v.masked_fill(mask[..., None], 0), k.masked_fill(mask[..., None], 0), a.masked_fill(mask, 0)
    y_p, s_p = chunked_scan(q, k_p, v_p, a_p, chunk_size=16, initial_state=s0)

    keep = ~pad
    y, s = chunked_scan(q[:, keep], k[:, keep], v[:, keep], a[:, keep], chunk_size=16, initial_state=s0)
    torch.testing.assert_close(s_p, s)  # the state passed through every pad unchanged
    torch.testing.assert_close(y_p[:, keep], y)

    # and position by position: the state after a pad equals the state before it
    _, before = chunked_scan(q[:, :5], k_p[:, :5], v_p[:, :5], a_p[:, :5], chunk_size=16, initial_state=s0)
    _, after = chunked_scan(q[:, :9], k_p[:, :9], v_p[:, :9], a_p[:, :9], chunk_size=16, initial_state=s0)
    torch.testing.assert_close(after, before)


@pytest.mark.parametrize("factorized", [False, True])
@pytest.mark.parametrize("T,chunk_size", [(100, 32), (64, 64)])
def test_both_decay_paths_match_reference(monkeypatch, factorized, T, chunk_size):
    """Mild gates take the factorised path by default; each path, forced, must match the reference."""
    monkeypatch.setattr(ops_chunked_scan, "_factorised_heads", lambda a, L: torch.full(a.shape[-1:], factorized))
    inputs = make_inputs(T=T)
    got = outputs_and_grads(chunked_scan, *inputs, chunk_size=chunk_size)
    want = outputs_and_grads(scan_reference, *inputs)
    for name, a, b in zip(NAMES, got, want):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10, msg=name)


@pytest.mark.parametrize("chunks_per_group", [1, 2, 3])
def test_factorized_path_in_groups_of_chunks(monkeypatch, chunks_per_group):
    """The factorised path works a group of chunks at a time (the scan over chunks carried from group to group,
    backwards in the backward): any group size, groups of unequal sizes, must give the reference's results."""
    q, k, v, log_decay, s0 = make_inputs(T=100)  # 7 chunks of 16
    bytes_per_chunk = sum(x[:, :16].numel() * x.element_size() for x in (q, k, v))
    monkeypatch.setattr(ops_chunked_scan, "_CACHE_BYTES", chunks_per_group * bytes_per_chunk)
    padded = [torch.empty(x.shape[0], 112, *x.shape[2:], dtype=x.dtype) for x in (q, k, v)]  # as the scan pads them
    groups = ops_chunked_scan._chunk_groups(*padded, 16)
    assert len(groups) == -(-7 // chunks_per_group) and groups[0].start == 0 and groups[-1].stop == 7
    assert all(a.stop == b.start for a, b in zip(groups, groups[1:]))  # every chunk once, in order
    assert ops_chunked_scan._factorised_heads(log_decay[:, :96], 16).all()  # mild gates: the factorised path
    got = outputs_and_grads(chunked_scan, q, k, v, log_decay, s0, chunk_size=16)
    want = outputs_and_grads(scan_reference, q, k, v, log_decay, s0)
    for name, a, b in zip(NAMES, got, want):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10, msg=name)


def test_factorised_heads_only_within_the_exponent_range():
    L = 16

    def factors(per_step, length=L):  # every step the same log decay
        return bool(ops_chunked_scan._factorised_heads(torch.full((1, length, 1), per_step, dtype=torch.float64), L))

    assert factors(-3.75)  # spread 60: exp(+-60) is still a normal float32
    assert not factors(-3.8)
    assert factors(3.75) and not factors(3.8)  # growth (log decay > 0) counts as well
    # the spread is per chunk: the cumulative sum restarts at each chunk's start
    assert factors(-3.75, length=10 * L)


def test_factorised_heads_only_with_mild_steps():
    """One step decaying by more than e^-4 puts its head on the exact path, whatever the spread: the factorised
    log-decay gradient would lose float32 precision there (see the next test)."""
    a = torch.full((2, 128, 3), -0.1, dtype=torch.float64)
    a[1, 70, 1] = -4.5
    a[0, 3, 2] = -4.0
    assert ops_chunked_scan._factorised_heads(a, 64).tolist() == [True, False, True]


@pytest.mark.parametrize("chunk_size,pads", [(4, False), (64, True)], ids=["short_chunks", "gated_steps_among_pads"])
def test_strong_gates_keep_a_heads_log_decay_gradient_exact(chunk_size, pads):
    """A head whose steps decay by e^-14 (within the factorised path's spread of 60 per chunk: short chunks, or few
    gated steps among pads of decay 1 and v = k = 0). The true gradient of its log decay is tiny; the factorised
    path's identity once left float32 rounding noise of O(1) terms in it: its sum (what a decay parameter gets)
    came out 90% off (short chunks) and 1.5x off with the wrong sign (among pads)."""
    q, k, v, a, s0 = make_inputs(B=2, T=128, H=2, N=8, P=8)
    a[..., 0] = -14.0  # head 0 strongly gated, head 1 gentle
    if pads:
        pad = torch.ones(2, 128, dtype=torch.bool)
        for start in range(0, 128, 64):
            pad[:, start + 10 : start + 14] = False
        a = a.masked_fill(pad[..., None], 0.0)
        q, k, v = (x.masked_fill(pad[..., None, None], 0.0) for x in (q, k, v))
    got = outputs_and_grads(chunked_scan, *(x.float() for x in (q, k, v, a, s0)), chunk_size=chunk_size)
    want = outputs_and_grads(scan_reference, q, k, v, a, s0)
    gated = a != 0
    da_got, da_want = got[NAMES.index("dlog_decay")], want[NAMES.index("dlog_decay")]
    per_head_got, per_head_want = ((x.double() * gated).sum((0, 1)) for x in (da_got, da_want))
    torch.testing.assert_close(per_head_got, per_head_want, rtol=1e-4, atol=0)


@pytest.mark.parametrize("shared_qk", [False, True])
def test_float32_factorized_path_near_its_limit(shared_qk):
    # Every chunk decays by e^-58 (the factorised path's largest spread is 60): float32 must keep its precision.
    # Shared: q and k of one group for the 3 heads, whose decays differ (e^-58, e^-29, 1 per chunk), so that each
    # head's factors scale its own values side by side with the others'.
    q, k, v, a, s0 = make_inputs(T=128, dtype=torch.float64)
    a = torch.full_like(a, -58.0 / 64)
    if shared_qk:
        q, k, a = q[:, :, :1], k[:, :, :1], a * torch.tensor([1.0, 0.5, 0.0], dtype=a.dtype)
    assert ops_chunked_scan._factorised_heads(a, 64).all()
    got = outputs_and_grads(chunked_scan, *(x.float() for x in (q, k, v, a, s0)), chunk_size=64)
    want = outputs_and_grads(scan_reference, q, k, v, a, s0)
    for name, x, ref in zip(NAMES, got, want):
        torch.testing.assert_close(x.double(), ref, atol=2e-5, rtol=2e-5, msg=name)


def test_float32_factorised_backward_keeps_precision_for_tiny_upstream_gradients():
    """The factorised backward multiplies dy by exp(cs), down to e^-58 here: upstream gradients of 1e-17 fell into
    float32's denormals (relative errors of 1e-2 in every gradient, silently)."""
    q, k, v, a, s0 = make_inputs(T=128, dtype=torch.float64)
    a = torch.full_like(a, -58.0 / 64)
    assert ops_chunked_scan._factorised_heads(a, 64).all()

    def tiny_gradients(fn, *inputs):
        leaves = [x.detach().clone().requires_grad_() for x in inputs]
        y, s = fn(*leaves[:4], initial_state=leaves[4])
        g = torch.Generator().manual_seed(1)
        gy, gs = (torch.randn(t.shape, generator=g, dtype=torch.float64).to(t.dtype) * 1e-17 for t in (y, s))
        return [grad.double() * 1e17 for grad in torch.autograd.grad((y, s), leaves, (gy, gs))]

    got = tiny_gradients(lambda *x, **kw: chunked_scan(*x, chunk_size=64, **kw), *(x.float() for x in (q, k, v, a, s0)))
    want = tiny_gradients(scan_reference, q, k, v, a, s0)
    for name, x, ref in zip(NAMES[2:], got, want):
        torch.testing.assert_close(x, ref, atol=2e-5, rtol=2e-5, msg=name)


def test_large_activations_at_a_wide_spread_take_the_exact_path():
    """The factorised path scales values by up to e^60 before its products: with |q|, |k|, |v| ~ 3000 and a spread
    of 60 per chunk, 6 of 8192 outputs were inf where the result is ~1e13. Such heads now take the exact path."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 64, 2, 64, generator=g).abs() * 3000
    k, v = q.clone(), torch.randn(1, 64, 2, 64, generator=g) * 3000
    a = torch.full((1, 64, 2), -60 / 64)
    assert ops_chunked_scan._factorised_path_heads(a, 64).all()  # by the decays alone
    assert ops_chunked_scan._factorised_path_heads(a, 64, q, k, v) is None
    y, state = chunked_scan(q, k, v, a, 64)
    want_y, want_state = scan_reference(q.double(), k.double(), v.double(), a.double())
    for got, want in ((y, want_y), (state, want_state)):  # (float32 rounding, relative to the largest value)
        torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-6 * float(want.abs().max()))
    assert ops_chunked_scan._factorised_path_heads(a, 64, q / 3000, k / 3000, v / 3000).all()  # ordinary sizes


def test_strong_gates_choose_the_exact_path_without_reading_the_inputs(monkeypatch):
    """Where the decays alone send most heads to the exact path, the inputs' magnitudes (a pass over q, k and v each)
    are not read."""
    def refuse(*args):
        raise AssertionError("the inputs were read")

    monkeypatch.setattr(ops_chunked_scan, "_products_stay_finite", refuse)
    q = k = v = torch.ones(1, 64, 2, 8)
    assert ops_chunked_scan._factorised_path_heads(torch.full((1, 64, 2), -8.0), 64, q, k, v) is None


def test_long_sequence_strong_decay_is_finite():
    T = 16384
    q, k, v, a, s0 = make_inputs(B=1, T=T, H=2, N=16, P=16, dtype=torch.float32, strong=True)
    a[:, T // 2 : T // 2 + 1000] = -20.0  # a long run of very strong decay
    got = outputs_and_grads(chunked_scan, q, k, v, a, s0, chunk_size=64)
    for name, x in zip(NAMES, got):
        assert torch.isfinite(x).all(), name
    # and accurate: the float64 evaluation of the same inputs
    want = outputs_and_grads(chunked_scan, *(x.double() for x in (q, k, v, a, s0)), chunk_size=64)
    for name, x, ref in zip(NAMES, got, want):
        torch.testing.assert_close(x.double(), ref, atol=1e-4, rtol=1e-4, msg=name)


def test_float32_keeps_precision_after_a_strong_gate():
    # A strong decay at the start of each chunk makes the chunk's cumulative log decay large (-300), while
    # the segments after it are short and mild: their decays must not lose float32 precision to it.
    q, k, v, a, s0 = make_inputs(T=128, dtype=torch.float64)
    a[:, ::64] = -300.0
    assert not ops_chunked_scan._factorised_heads(a, 64).any()  # the exact (segment-sum) path
    got = outputs_and_grads(chunked_scan, *(x.float() for x in (q, k, v, a, s0)), chunk_size=64)
    want = outputs_and_grads(scan_reference, q, k, v, a, s0)
    for name, x, ref in zip(NAMES, got, want):
        torch.testing.assert_close(x.double(), ref, atol=2e-5, rtol=2e-5, msg=name)


def test_bfloat16_in_bfloat16_out():
    q, k, v, a, s0 = (x.bfloat16() for x in make_inputs(T=100, dtype=torch.float32))
    y, s = chunked_scan(q, k, v, a, chunk_size=32)
    assert y.dtype == torch.bfloat16 and s.dtype == torch.bfloat16
    y32, s32 = chunked_scan(q.float(), k.float(), v.float(), a.float(), chunk_size=32)
    torch.testing.assert_close(y.float(), y32, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(s.float(), s32, atol=2e-2, rtol=2e-2)

    # a float32 initial state keeps the carried state in float32
    _, s_f = chunked_scan(q, k, v, a, chunk_size=32, initial_state=s0.float())
    assert s_f.dtype == torch.float32
    y_t, s_t = scan_step(q[:, 0], k[:, 0], v[:, 0], a[:, 0], s0.float())
    assert y_t.dtype == torch.bfloat16 and s_t.dtype == torch.float32


def test_constant_and_zero_decay():
    """Linear attention: per-head constant (or zero) log decay."""
    q, k, v, _, s0 = make_inputs(T=70)
    per_head = torch.tensor([0.0, -0.1, -1.0], dtype=torch.float64).expand(2, 70, 3)
    for a in (torch.zeros(2, 70, 3, dtype=torch.float64), per_head):
        y, s = chunked_scan(q, k, v, a, chunk_size=16, initial_state=s0)
        y_ref, s_ref = scan_reference(q, k, v, a, initial_state=s0)
        torch.testing.assert_close(y, y_ref)
        torch.testing.assert_close(s, s_ref)


def test_empty_sequence():
    q, k, v, a, s0 = make_inputs(T=0)
    y, s = chunked_scan(q, k, v, a, initial_state=s0)
    assert y.shape == (2, 0, 3, 4)
    torch.testing.assert_close(s, s0)


@pytest.mark.parametrize("factorized", [False, True])
@pytest.mark.parametrize("groups", [1, 3])
def test_empty_batch(monkeypatch, factorized, groups):
    """A batch of no rows (B = 0) gives empty outputs and gradients of the inputs' shapes on either path."""
    monkeypatch.setattr(ops_chunked_scan, "_factorised_heads", lambda a, L: torch.full(a.shape[-1:], factorized))
    q, k, v, a, s0 = (x[:0].requires_grad_() for x in make_inputs(T=37))
    q, k = (x[:, :, :groups] for x in (q, k))
    y, s = chunked_scan(q, k, v, a, chunk_size=16, initial_state=s0)
    assert y.shape == (0, 37, 3, 4) and s.shape == (0, 3, 4, 5)
    grads = torch.autograd.grad((y.sum() + s.sum()), (q, k, v, a, s0))
    assert [g.shape for g in grads] == [x.shape for x in (q, k, v, a, s0)]


def test_non_contiguous_inputs():
    """Mamba-2 passes B/C groups expanded to heads (stride 0) and slices of one projection."""
    B, T, H, N, P = 2, 50, 4, 6, 5
    g = torch.Generator().manual_seed(0)
    proj = torch.randn(B, T, H * P + 2 * N + H, generator=g, dtype=torch.float64)
    v = proj[..., : H * P].view(B, T, H, P)
    k = proj[..., H * P : H * P + N][:, :, None].expand(B, T, H, N)  # one group for all heads
    q = proj[..., H * P + N : H * P + 2 * N][:, :, None].expand(B, T, H, N)
    a = -torch.nn.functional.softplus(proj[..., -H:])
    y, s = chunked_scan(q, k, v, a, chunk_size=16)
    y_ref, s_ref = scan_reference(q.contiguous(), k.contiguous(), v.contiguous(), a.contiguous())
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(s, s_ref)


def test_sum_loss_gradients():
    """An expanded (stride-0) upstream gradient, as from y.sum(), and no gradient for the final state."""
    q, k, v, a, s0 = (x.requires_grad_() for x in make_inputs(T=45))
    grads = torch.autograd.grad(chunked_scan(q, k, v, a, chunk_size=16, initial_state=s0)[0].sum(), (q, k, v, a, s0))
    want = torch.autograd.grad(scan_reference(q, k, v, a, initial_state=s0)[0].sum(), (q, k, v, a, s0))
    for name, g, w in zip(NAMES[2:], grads, want):
        torch.testing.assert_close(g, w, msg=name)


@pytest.mark.parametrize("factorized", [False, True])
def test_backward_inside_cpu_autocast(monkeypatch, factorized):
    """A hand-written training loop calls backward inside `torch.autocast`: the backwards compute in float32 as the
    forward does, and give what they give outside it."""
    monkeypatch.setattr(ops_chunked_scan, "_factorised_heads", lambda a, L: torch.full(a.shape[-1:], factorized))
    inputs = make_inputs(T=40, dtype=torch.float32)
    want = outputs_and_grads(chunked_scan, *inputs, chunk_size=16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = outputs_and_grads(chunked_scan, *inputs, chunk_size=16)
    for name, a, b in zip(NAMES, got, want):
        assert a.dtype == b.dtype == torch.float32, name
        torch.testing.assert_close(a, b, msg=name)


@pytest.mark.parametrize("factorized", [False, True])
def test_double_backward_is_refused(monkeypatch, factorized):
    """The backwards build no graph: create_graph=True through them raises rather than treat them as constants."""
    monkeypatch.setattr(ops_chunked_scan, "_factorised_heads", lambda a, L: torch.full(a.shape[-1:], factorized))
    q, k, v, log_decay, s0 = (x.requires_grad_() for x in make_inputs(T=20))
    y, _ = chunked_scan(q, k, v, log_decay, chunk_size=8, initial_state=s0)
    with pytest.raises(RuntimeError, match="create_graph=True"):
        torch.autograd.grad(y.pow(2).sum(), q, create_graph=True)


@pytest.mark.parametrize("factorized", [False, True])
@pytest.mark.parametrize("groups", [1, 2, 6])
def test_grouped_q_and_k_match_reference(monkeypatch, factorized, groups):
    """q and k shared by groups of heads (Mamba-2's C and B), on each path: the same as the reference, which expands
    them to every head; gradients come back per group."""
    monkeypatch.setattr(ops_chunked_scan, "_factorised_heads", lambda a, L: torch.full(a.shape[-1:], factorized))
    g = torch.Generator().manual_seed(3)
    B, T, H, N, P = 2, 37, 6, 5, 4
    q, k = (torch.randn(B, T, groups, N, generator=g, dtype=torch.float64) * 0.5 for _ in range(2))
    v = torch.randn(B, T, H, P, generator=g, dtype=torch.float64)
    log_decay = -torch.rand(B, T, H, generator=g, dtype=torch.float64)
    s0 = torch.randn(B, H, P, N, generator=g, dtype=torch.float64)
    got = outputs_and_grads(chunked_scan, q, k, v, log_decay, s0, chunk_size=8)
    want = outputs_and_grads(scan_reference, q, k, v, log_decay, s0)
    for name, a, b in zip(NAMES, got, want):
        assert a.shape == b.shape, name
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10, msg=name)


@pytest.mark.parametrize("groups,strong_heads", [(6, [4]), (1, [0, 5]), (3, [2, 3]), (3, [1]), (2, [0, 4]),
                                                 (1, [0, 1, 2, 3]), (6, [1, 2, 3, 4, 5])])
def test_strong_heads_alone_take_the_exact_path(monkeypatch, groups, strong_heads):
    """A call whose heads differ (some gated strongly enough that their decays do not factor) runs the factorised scan
    on the others and the exact one on those: whole groups of q and k, single heads of a group, or the group shared
    by both paths. Where fewer than half the heads factorise, the split would cost more than it saves: all take the
    exact path. Outputs and gradients as the reference's, each head's on the path it needs."""
    g = torch.Generator().manual_seed(6)
    B, T, H, N, P, L = 2, 45, 6, 5, 4, 16
    q, k = (torch.randn(B, T, groups, N, generator=g, dtype=torch.float64) * 0.5 for _ in range(2))
    v = torch.randn(B, T, H, P, generator=g, dtype=torch.float64)
    log_decay = -torch.rand(B, T, H, generator=g, dtype=torch.float64)
    log_decay[:, :, strong_heads] = -5.0 - torch.rand(B, T, len(strong_heads), generator=g, dtype=torch.float64)
    s0 = torch.randn(B, H, P, N, generator=g, dtype=torch.float64)
    heads_on = {}
    for scan in (ops_chunked_scan._ChunkedScan, ops_chunked_scan._FactorizedChunkedScan):
        def spy(*args, _apply=scan.apply, _name=scan.__name__):
            heads_on[_name] = args[2].shape[2]  # v's heads
            return _apply(*args)
        monkeypatch.setattr(scan, "apply", spy)
    got = outputs_and_grads(chunked_scan, q, k, v, log_decay, s0, chunk_size=L)
    split = 2 * len(strong_heads) <= H
    assert heads_on == ({"_ChunkedScan": len(strong_heads), "_FactorizedChunkedScan": H - len(strong_heads)} if split
                        else {"_ChunkedScan": H})
    want = outputs_and_grads(scan_reference, q, k, v, log_decay, s0)
    for name, a, b in zip(NAMES, got, want):
        assert a.shape == b.shape, name
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10, msg=name)


@pytest.mark.parametrize("groups", [0, 2, 6])
def test_groups_must_divide_heads(groups):
    q, k, v, log_decay, s0 = make_inputs(H=3)
    q, k = (x[:, :, :1].expand(-1, -1, groups, -1) for x in (q, k))
    for call in (lambda: chunked_scan(q, k, v, log_decay), lambda: scan_reference(q, k, v, log_decay),
                 lambda: scan_step(q[:, 0], k[:, 0], v[:, 0], log_decay[:, 0], s0)):
        with pytest.raises(ValueError, match="G dividing"):
            call()


@pytest.mark.parametrize("bad", ["v_longer", "decay_per_row", "state_batch_1", "k_shorter"])
def test_mismatched_shapes_are_refused(bad):
    """The reference once zipped over time (stopping at the shortest input) and broadcast a (B, T, 1) decay or a
    batch-1 state: a silently wrong ground truth; the chunked scan failed deep inside its products."""
    q, k, v, log_decay, s0 = make_inputs(H=3)
    if bad == "v_longer":
        v = torch.cat([v, v[:, :2]], 1)
    elif bad == "decay_per_row":
        log_decay = log_decay[..., :1]
    elif bad == "state_batch_1":
        s0 = s0[:1]
    else:
        k = k[:, :-1]
    for call in (lambda: chunked_scan(q, k, v, log_decay, 4, s0), lambda: scan_reference(q, k, v, log_decay, s0)):
        with pytest.raises(ValueError, match=r"Expected q and k \(B, T, G, N\), v \(B, T, H, P\).* got q"):
            call()


def test_a_step_checks_its_shapes_too():
    q, k, v, log_decay, s0 = make_inputs(H=3)
    with pytest.raises(ValueError, match=r"Expected q and k \(B, G, N\), v \(B, H, P\) and log_decay \(B, H\)"):
        scan_step(q, k, v, log_decay, s0)  # a whole sequence given to the one-step update
    with pytest.raises(ValueError, match=r"Expected q and k \(B, T, G, N\)"):
        chunked_scan(q[:, 0], k[:, 0], v[:, 0], log_decay[:, 0])  # one step given to the sequence scan
    with pytest.raises(ValueError, match=r"a state \(B, H, P, N\); got .* state \(1, 3, 4, 5\)"):
        scan_step(q[:, 0], k[:, 0], v[:, 0], log_decay[:, 0], s0[:1])


@pytest.mark.parametrize("bad", ["int_v", "complex_q", "int_state", "no_heads", "no_state_size"])
def test_inputs_of_other_kinds_are_refused(bad):
    """Integer v or state came back truncated, a complex q lost its imaginary part; no heads failed in a reshape."""
    q, k, v, log_decay, s0 = make_inputs(H=3)
    if bad == "int_v":
        v = v.round().long()
    elif bad == "complex_q":
        q = torch.complex(q, q)
    elif bad == "int_state":
        s0 = s0.round().long()
    elif bad == "no_heads":
        q, k, v, log_decay, s0 = q[:, :, :0], k[:, :, :0], v[:, :, :0], log_decay[..., :0], None
    else:
        q, k, s0 = q[..., :0], k[..., :0], None
    with pytest.raises(ValueError, match="real floating-point tensors|Expected q and k"):
        chunked_scan(q, k, v, log_decay, 4, s0)


def test_positive_log_decay_is_refused_and_minus_infinity_resets():
    """Decays above 1 were clamped in the segment sums (96% off at log_decay 1); a decay of 0 (-inf) gave NaN. The
    reference takes both."""
    q, k, v, log_decay, s0 = make_inputs(T=20, H=3)
    with pytest.raises(ValueError, match="log_decay must be <= 0"):
        chunked_scan(q, k, v, log_decay.abs(), 4, s0)
    log_decay[:, 9] = -torch.inf  # the state is forgotten at step 9
    for chunk_size in (4, 64):
        for got, want in zip(chunked_scan(q, k, v, log_decay, chunk_size, s0), scan_reference(q, k, v, log_decay, s0)):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("chunk_size", [0, -3, 4.0])
def test_chunk_size_must_be_a_positive_integer(chunk_size):
    q, k, v, log_decay, _ = make_inputs(H=3)
    with pytest.raises(ValueError, match=f"chunk_size must be a positive integer, got {chunk_size}"):
        chunked_scan(q, k, v, log_decay, chunk_size)


def test_chunk_size_may_be_a_numpy_integer():
    """A chunk size from a numpy sweep was refused as not an integer (the config fields take them)."""
    import numpy as np

    q, k, v, log_decay, _ = make_inputs(H=3)
    for got, want in zip(chunked_scan(q, k, v, log_decay, np.int64(4)), chunked_scan(q, k, v, log_decay, 4)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_compiled_backward_with_grouped_q_and_k():
    """Under torch.compile (the exact path: no data-dependent choice while tracing) forward and backward with q and k
    shared by groups of heads: AOTAutograd traces the hand-written backward's in-place writes into grouped views."""
    g = torch.Generator().manual_seed(5)
    q, k = (torch.randn(2, 8, 2, 3, generator=g) for _ in range(2))  # G = 2 groups of H = 4 heads
    v, log_decay = torch.randn(2, 8, 4, 5, generator=g), -torch.rand(2, 8, 4, generator=g)
    torch._dynamo.reset()
    compiled = torch.compile(lambda *x, **kw: chunked_scan(*x, chunk_size=4, **kw), backend="aot_eager")
    got = outputs_and_grads(compiled, q, k, v, log_decay, None)
    want = outputs_and_grads(scan_reference, q, k, v, log_decay, None)
    for name, a, b in zip(NAMES, got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_scan_over_chunks_as_one_product_matches_the_loop(reverse, dtype):
    """The compiled form of the recurrence between chunks (a product with the matrix of decays between chunks) against
    the loop, forward and backward direction, gentle to vanishing decays (a chunk's log decay down to -90)."""
    g = torch.Generator().manual_seed(6)
    states = torch.randn(9, 2, 3, 4, 5, generator=g, dtype=torch.float64)  # (C + 1, B, H, P, N), C = 8
    chunk_log_decay = -torch.rand(8, 2, 3, generator=g, dtype=torch.float64) * torch.tensor([0.1, 3.0, 90.0])
    chunk_log_decay[2, 0, 0] = 0.0  # a chunk of padding: the state passes through
    scan = ops_chunked_scan._scan_over_chunks
    want = scan(states.clone().to(dtype), chunk_log_decay, reverse=reverse, as_product=False)
    got = scan(states.clone().to(dtype), chunk_log_decay, reverse=reverse, as_product=True)
    tolerance = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(got, want, rtol=tolerance, atol=tolerance)


def test_compiled_scan_is_not_recompiled_for_each_length():
    """Under torch.compile the recurrence between chunks is one product, not a loop that dynamo unrolls: new lengths
    (numbers of chunks) reuse the dynamic graph instead of compiling one each (the 8th would fall back to eager)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(lambda *x: chunked_scan(*x, chunk_size=4), backend="eager")
    g = torch.Generator().manual_seed(7)
    for T in (8, 12, 16, 20, 24, 28):
        q, k, v = (torch.randn(1, T, 2, 3, generator=g) for _ in range(3))
        log_decay = -torch.rand(1, T, 2, generator=g)
        for got, want in zip(compiled(q, k, v, log_decay), scan_reference(q, k, v, log_decay)):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert counters["stats"]["unique_graphs"] <= 2  # the first length's static graph, then one dynamic


def test_decode_step_with_grouped_q_and_k():
    g = torch.Generator().manual_seed(4)
    q, k = (torch.randn(2, 2, 5, generator=g, dtype=torch.float64) for _ in range(2))  # (B, G, N)
    v, state = torch.randn(2, 6, 4, generator=g, dtype=torch.float64), torch.randn(2, 6, 4, 5, generator=g, dtype=torch.float64)
    log_decay = -torch.rand(2, 6, generator=g, dtype=torch.float64)
    per_head = [x.repeat_interleave(3, dim=1) for x in (q, k)]  # head h uses group h // 3
    for got, want in zip(scan_step(q, k, v, log_decay, state), scan_step(*per_head, v, log_decay, state)):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_decode_step_from_no_state_returns_it_in_the_dtype_chunked_scan_does(dtype):
    """chunked_scan(initial_state=None) returns its state in q's dtype; scan_step(state=None) returned float32."""
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 1, 3, 4, generator=g).to(dtype) for _ in range(3))  # (B, T=1, H, N or P)
    log_decay = -torch.rand(2, 1, 3, generator=g).to(dtype)
    y_step, state_step = scan_step(q[:, 0], k[:, 0], v[:, 0], log_decay[:, 0], None)
    y_scan, state_scan = chunked_scan(q, k, v, log_decay)
    assert state_step.dtype == state_scan.dtype == dtype and y_step.dtype == dtype
    torch.testing.assert_close(state_step, state_scan)
    torch.testing.assert_close(y_step, y_scan[:, 0])


def test_recordable_scans_log_decay_gradient_is_exact_in_float32_with_strong_gates(monkeypatch):
    """The plain-ops scan (torch.export, torch.func) took the log decays' gradient through cs_i - cs_j, which cancels
    terms up to exp(|a|) times the result: in float32 with steps of -8 to -16 it came out 16% off (median), 100% at
    -20 to -40, where the hand-written backward stays at float32's rounding."""
    monkeypatch.setattr(ops_chunked_scan, "plain_ops_only", lambda: True)
    g = torch.Generator().manual_seed(7)
    q, k, v, w = (torch.randn(1, 128, 2, 8, generator=g, dtype=torch.float64) for _ in range(4))
    a = -(torch.rand(1, 128, 2, generator=g, dtype=torch.float64) * 32 + 8)  # steps in [-40, -8]
    a64, a32 = a.clone().requires_grad_(), a.float().requires_grad_()
    (want,) = torch.autograd.grad((scan_reference(q, k, v, a64)[0] * w).sum(), a64)
    (got,) = torch.autograd.grad((chunked_scan(q.float(), k.float(), v.float(), a32, 64)[0] * w.float()).sum(), a32)
    error = (got.double() - want).abs()
    relative = error / want.abs().clamp(min=1e-30)  # (the first step's gradient is ~0: relative to the largest too)
    assert float(relative.median()) < 1e-5 and float(error.max() / want.abs().max()) < 1e-5, relative.median()

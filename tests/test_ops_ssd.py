"""mamba2's fast ops against their plain references: grouped SSD (ops_ssd) and the causal conv (ops_causal_conv)."""

import pytest
import torch

from hf_seqarch.ops_causal_conv import causal_conv, causal_conv_reference
from hf_seqarch.ops_ssd import ssd_chunked, ssd_reference


def ssd_inputs(T, heads, groups, dtype, with_state, strong=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    b, P, N = 2, 3, 5

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)

    x, B, C = randn(b, T, heads, P), randn(b, T, groups, N), randn(b, T, groups, N)
    dt = torch.rand(b, T, heads, generator=g, dtype=torch.float64).to(dtype)
    dt[0, T // 2 :: 3] = 0  # pads: dt = 0 leaves the state unchanged
    A = -torch.rand(heads, generator=g, dtype=torch.float64).to(dtype) * (400 if strong else 1)
    state = randn(b, heads, P, N) if with_state else None
    return x, dt, A, B, C, state


def outputs_and_grads(fn, inputs, **kwargs):
    leaves = [t.clone().requires_grad_() if t is not None else None for t in inputs]
    y, state = fn(*leaves[:5], initial_state=leaves[5], **kwargs)
    g = torch.Generator().manual_seed(1)
    upstream = [torch.randn(t.shape, generator=g, dtype=torch.float64).to(t.dtype) for t in (y, state)]
    used = [t for t in leaves if t is not None]
    return [y.detach(), state.detach(), *torch.autograd.grad((y, state), used, upstream)]


NAMES = ["y", "final_state", "dx", "ddt", "dA", "dB", "dC", "dinitial_state"]


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
@pytest.mark.parametrize("T", [1, 4, 11, 16])
@pytest.mark.parametrize("heads,groups", [(4, 1), (4, 2), (4, 4)])
@pytest.mark.parametrize("with_state", [False, True], ids=["zero_state", "initial_state"])
def test_ssd_chunked_matches_sequential_reference(dtype, tol, T, heads, groups, with_state):
    inputs = ssd_inputs(T, heads, groups, dtype, with_state)
    got = outputs_and_grads(ssd_chunked, inputs, chunk_size=4)  # 11: two full chunks and a partial one
    want = outputs_and_grads(ssd_reference, inputs)
    for name, a, b in zip(NAMES, got, want):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=name)


def test_ssd_chunked_is_finite_with_strong_decay():
    """dt * A down to about -400 per step: segment sums stay inside a chunk, nothing overflows."""
    inputs = ssd_inputs(64, 4, 1, torch.float32, with_state=True, strong=True)
    got = outputs_and_grads(ssd_chunked, inputs, chunk_size=16)
    want = outputs_and_grads(ssd_reference, inputs)
    for name, a, b in zip(NAMES, got, want):
        assert torch.isfinite(a).all(), name
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=name)


@pytest.mark.parametrize("T", [1, 2, 3, 9])  # shorter and longer than the kernel's K-1 = 3 taps of past
@pytest.mark.parametrize("with_past", [False, True], ids=["zero_past", "past"])
def test_causal_conv_matches_conv1d(T, with_past):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, T, 6, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(6, 4, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(6, generator=g, dtype=torch.float64, requires_grad=True)
    past = torch.randn(2, 3, 6, generator=g, dtype=torch.float64, requires_grad=True) if with_past else None
    leaves = [t for t in (x, weight, bias, past) if t is not None]
    upstream = torch.randn(2, T, 6, generator=g, dtype=torch.float64)
    got = causal_conv(x, weight, bias, past)
    want = causal_conv_reference(x, weight, bias, past)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for a, b in zip(torch.autograd.grad(got, leaves, upstream), torch.autograd.grad(want, leaves, upstream)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(causal_conv, (x, weight, bias, past))


def test_causal_conv_of_no_steps():
    """An empty sequence: the reference (the plain ops of torch.func, export and trace) failed inside F.conv1d, whose
    window was shorter than its kernel, where the hand-written op returns an empty output."""
    x, weight, bias = torch.randn(2, 0, 6), torch.randn(6, 4), torch.randn(6)
    assert causal_conv(x, weight, bias).shape == causal_conv_reference(x, weight, bias).shape == (2, 0, 6)
    gradient = torch.func.grad(lambda w: causal_conv(x, w, bias).sum())(weight)  # (the plain ops under torch.func)
    assert torch.equal(gradient, torch.zeros_like(weight))


@pytest.mark.parametrize("with_past", [False, True], ids=["zero_past", "past"])
def test_causal_conv_double_backward(with_past):
    """A gradient penalty (create_graph=True) differentiates the conv's gradient again, the weight's part included:
    the hand-written backward builds no graph, so it must not count as a constant there."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 7, 5, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(5, generator=g, dtype=torch.float64, requires_grad=True)
    past = torch.randn(2, 3, 5, generator=g, dtype=torch.float64, requires_grad=True) if with_past else None
    leaves = [t for t in (x, weight, bias, past) if t is not None]

    def penalty_grads(conv):
        first = torch.autograd.grad(conv(x, weight, bias, past).pow(3).sum(), leaves, create_graph=True)
        return torch.autograd.grad(sum(grad.pow(2).sum() for grad in first), leaves, allow_unused=True)

    for got, want in zip(penalty_grads(causal_conv), penalty_grads(causal_conv_reference)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    assert torch.autograd.gradgradcheck(causal_conv, (x, weight, bias, past))


@pytest.mark.parametrize("past_shape", [(2, 6, 5), (1, 3, 5), (2, 1, 5), (2, 3, 4)],
                         ids=["longer_than_K-1", "batch_1", "shorter", "other_channels"])
def test_causal_conv_refuses_a_past_of_another_shape(past_shape):
    """A past longer than K-1 was read from its oldest rows (outputs off by up to 8), one of batch 1 was broadcast
    over the batch (the reference refuses both), and the others failed deep in addcmul."""
    x, weight, bias = torch.randn(2, 6, 5), torch.randn(5, 4), torch.randn(5)
    with pytest.raises(ValueError, match=r"past \(B, K-1, C\) or None; got x \(2, 6, 5\), weight \(5, 4\)"):
        causal_conv(x, weight, bias, torch.randn(past_shape))


@pytest.mark.parametrize("weight_shape,bias", [((5, 1, 4), True), ((3, 4), True), ((5, 4), False)],
                         ids=["conv1d_layout", "other_channels", "no_bias"])
def test_causal_conv_refuses_weights_of_another_shape(weight_shape, bias):
    with pytest.raises(ValueError, match="causal_conv"):
        causal_conv(torch.randn(2, 6, 5), torch.randn(weight_shape), torch.randn(5) if bias else None)


@pytest.mark.parametrize("op", [ssd_chunked, ssd_reference], ids=["chunked", "reference"])
@pytest.mark.parametrize("which,shape", [("A", (3,)), ("A", (4, 1)), ("dt", (2, 7))])
def test_ssd_refuses_dt_and_A_of_other_shapes(op, which, shape):
    """They failed in a broadcast inside the products, naming neither argument."""
    inputs = dict(x=torch.randn(2, 7, 4, 5), dt=torch.rand(2, 7, 4), A=-torch.rand(4), B=torch.randn(2, 7, 2, 3),
                  C=torch.randn(2, 7, 2, 3))
    inputs[which] = torch.rand(shape) * (-1 if which == "A" else 1)
    with pytest.raises(ValueError, match=r"Expected x \(b, T, H, P\), dt \(b, T, H\) and A \(H,\)"):
        op(**inputs)


def test_ssd_chunked_refuses_a_growing_decay():
    """A negative dt (or a positive A) was reported as a log_decay, an argument ssd_chunked does not have."""
    x, dt, A = torch.randn(1, 5, 2, 3), -torch.rand(1, 5, 2), -torch.rand(2)
    with pytest.raises(ValueError, match=r"dt \* A must be <= 0"):
        ssd_chunked(x, dt, A, torch.randn(1, 5, 1, 4), torch.randn(1, 5, 1, 4))


def test_ops_take_keyword_arguments():
    """Called with keywords only, their autocast wrapper found no tensor among the positional ones: StopIteration."""
    x, dt, A = torch.randn(1, 5, 2, 3), torch.rand(1, 5, 2), -torch.rand(2)
    B, C = torch.randn(1, 5, 1, 4), torch.randn(1, 5, 1, 4)
    y, _ = ssd_chunked(x=x, dt=dt, A=A, B=B, C=C, chunk_size=4)
    torch.testing.assert_close(y, ssd_reference(x, dt, A, B, C)[0])


def test_strong_gates_with_pads_keep_dA_exact():
    """dA of a head whose gates are strong (dt * A down to -400 per step) with dt = 0 at half the steps (pads, decay
    1): its true value is tiny (~1e-22), and summing the log decay's gradient from segment ends would leave rounding
    noise of O(1) terms (~1e-8) in it; float32 must get it to float32 precision, as the sequential loop does."""
    g = torch.Generator().manual_seed(0)
    b, T, H, P, N = 2, 200, 4, 8, 16
    x = torch.randn(b, T, H, P, generator=g, dtype=torch.float64)
    B, C = (torch.randn(b, T, 1, N, generator=g, dtype=torch.float64) * N**-0.5 for _ in range(2))
    dt = torch.rand(b, T, H, generator=g, dtype=torch.float64) * 0.9 + 0.1
    dt[torch.rand(dt.shape, generator=g) < 0.5] = 0
    A = torch.tensor([-400.0, -0.5, -0.5, -0.5], dtype=torch.float64)  # head 0 strong, the others gentle
    state = torch.randn(b, H, P, N, generator=g, dtype=torch.float64)
    inputs = (x, dt, A, B, C, state)
    got = outputs_and_grads(ssd_chunked, [t.float() for t in inputs], chunk_size=64)
    want = outputs_and_grads(ssd_reference, inputs)
    dA_got, dA_want = got[NAMES.index("dA")], want[NAMES.index("dA")]
    torch.testing.assert_close(dA_got.double(), dA_want, rtol=1e-2, atol=0)

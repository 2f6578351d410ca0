"""The RMSNorm fast backward against torch's nn.RMSNorm (its reference): outputs and gradients."""

import warnings

import pytest
import torch
from torch import nn

from hf_seqarch import SeqArchForCausalLM, ops_rms_norm
from hf_seqarch.ops_rms_norm import RMSNorm, RMSNormFunction
from tester import random_ids, tiny_model


def outputs_and_grads(norm, x, grad_output, input_grad=True):
    x = x.detach().clone().requires_grad_(input_grad)
    norm.zero_grad(set_to_none=True)
    y = norm(x)
    y.backward(grad_output)
    return y.detach(), x.grad, norm.weight.grad


def fast_and_reference(width):
    """Our RMSNorm and torch's nn.RMSNorm with the same (non-trivial) weight."""
    torch.manual_seed(0)
    fast, reference = RMSNorm(width, eps=1e-5), nn.RMSNorm(width, eps=1e-5)
    with torch.no_grad():
        fast.weight.uniform_(0.5, 1.5)
        reference.weight.copy_(fast.weight)
    return fast, reference


@pytest.mark.parametrize("layout", ["contiguous", "transposed_grad", "transposed_input", "2d"])
def test_matches_torch_rms_norm(layout):
    width = 48
    fast, reference = fast_and_reference(width)
    x, grad_output = torch.randn(3, 7, width), torch.randn(3, 7, width)
    if layout == "transposed_grad":  # what nn.LSTM hands back for a batch-first input
        grad_output = torch.randn(7, 3, width).transpose(0, 1)
    elif layout == "transposed_input":
        x = torch.randn(7, 3, width).transpose(0, 1)
    elif layout == "2d":
        x, grad_output = x[0], grad_output[0]
    for got, want in zip(outputs_and_grads(fast, x, grad_output), outputs_and_grads(reference, x, grad_output)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_gradcheck_float64():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 6, dtype=torch.float64, requires_grad=True)
    weight = torch.rand(6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: RMSNormFunction.apply(a, b, 1e-5), (x, weight))


def test_frozen_weight_and_inference_fall_back_cleanly():
    norm = RMSNorm(8, eps=1e-5)
    norm.weight.requires_grad_(False)
    x = torch.randn(2, 3, 8, requires_grad=True)
    norm(x).sum().backward()
    assert x.grad is not None and norm.weight.grad is None
    with torch.no_grad():  # torch's fused forward
        torch.testing.assert_close(norm(x), nn.functional.rms_norm(x, (8,), norm.weight, 1e-5))


@pytest.mark.parametrize("case", ["input_without_grad", "empty_batch", "4d_permuted"])
def test_matches_torch_rms_norm_edge_cases(case):
    """The fused backward's cases beside the common one: only the weight wants a gradient (a frozen embedding before
    the first norm), no rows at all, and a 4-D input laid out in another order than its dims."""
    width = 16
    fast, reference = fast_and_reference(width)
    shape = {"input_without_grad": (3, 5, width), "empty_batch": (0, 5, width), "4d_permuted": (2, 3, 4, width)}[case]
    x, grad_output = torch.randn(shape), torch.randn(shape)
    if case == "4d_permuted":
        x = torch.randn(4, 2, 3, width).permute(1, 2, 0, 3)
    input_grad = case != "input_without_grad"
    (y, x_grad, weight_grad), (want_y, want_x_grad, want_weight_grad) = (
        outputs_and_grads(norm, x, grad_output, input_grad) for norm in (fast, reference)
    )
    torch.testing.assert_close(y, want_y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(weight_grad, want_weight_grad, rtol=1e-5, atol=1e-5)
    if not input_grad:
        assert x_grad is None
    else:
        torch.testing.assert_close(x_grad, want_x_grad, rtol=1e-5, atol=1e-5)
        assert x_grad.stride() == x.stride()  # laid out like the input, as autograd's own gradients are


def test_mixed_dtypes_compute_in_float32_without_warning():
    # Under bf16 autocast a mixer can hand a bf16 activation to a norm whose weight is float32.
    torch.manual_seed(0)
    norm = RMSNorm(16, eps=1e-5)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 3, 16).bfloat16()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns when it cannot use its kernel for mixed dtypes
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = norm(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, norm(x.float()).bfloat16(), rtol=0, atol=0)


@pytest.mark.parametrize("frozen_weight", [False, True])
def test_double_backward_matches_torch_rms_norm(frozen_weight):
    """A gradient penalty (create_graph=True) differentiates the fast path's gradient again: it must not count as
    a constant (the hand-written backward builds no graph)."""
    torch.manual_seed(0)
    fast, reference = RMSNorm(8, eps=1e-5), nn.RMSNorm(8, eps=1e-5)
    with torch.no_grad():
        fast.weight.uniform_(0.5, 1.5)
        reference.weight.copy_(fast.weight)
    for norm in (fast, reference):
        norm.weight.requires_grad_(not frozen_weight)
    x0 = torch.randn(3, 4, 8)

    def penalty_grads(norm):
        x = x0.clone().requires_grad_()
        (grad_x,) = torch.autograd.grad(norm(x).pow(3).sum(), x, create_graph=True)
        wrt = [x] if frozen_weight else [x, norm.weight]
        return torch.autograd.grad(grad_x.pow(2).sum(), wrt)

    for got, want in zip(penalty_grads(fast), penalty_grads(reference)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_the_hand_written_backward_runs_where_it_applies(monkeypatch):
    """Float32 training on CPU takes RMSNormFunction (each norm of a block stack), torch.compile does not: without
    this, every other test here would pass with the fast path never taken."""
    calls = []
    original = ops_rms_norm.RMSNormFunction.apply
    monkeypatch.setattr(ops_rms_norm.RMSNormFunction, "apply", lambda *args: calls.append(1) or original(*args))
    model = tiny_model(SeqArchForCausalLM, ["attention", "mamba2"]).train()
    ids = random_ids(2, 6)
    model(input_ids=ids, labels=ids).loss.backward()
    assert len(calls) >= 3  # two pre-norms and the final norm (and mamba2's gated norm)
    calls.clear()
    torch._dynamo.reset()
    torch.compile(model, backend="aot_eager")(input_ids=ids, labels=ids).loss.backward()
    assert not calls


def test_integer_input_is_refused():
    """Computed in float32 and cast back, [1, 2, 3, 40] came out as [0, 0, 0, 1]; torch's nn.RMSNorm raises."""
    with pytest.raises(ValueError, match="RMSNorm takes floating-point input, got torch.int64"):
        RMSNorm(4)(torch.tensor([[1, 2, 3, 40]]))

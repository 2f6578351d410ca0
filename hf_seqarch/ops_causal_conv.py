"""Short causal depthwise convolution over (B, T, C), time-major, with a hand-written backward.

Mamba-2's conv (kernel K = 4 over ~1000 channels) is all memory traffic and no arithmetic. torch's
`F.conv1d` wants (B, C, T), so a time-major model pays two transposes, and its depthwise backward on
CPU is slow; K multiply-adds over shifted views of the (B, T, C) input, forward and backward, are ~25%
faster end to end. `causal_conv_reference` (F.conv1d) is the ground truth the tests hold it to.

    out[b, t, c] = bias[c] + sum_k weight[c, k] * window[b, t + k, c]        k = 0 .. K-1

where `window` (B, K-1 + T, C) is the K-1 previous inputs (the cached conv state, or zeros) followed by
the T new ones, so out[t] sees inputs t-K+1 .. t.
"""

import torch
import torch.nn.functional as F


class _CausalDepthwiseConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, window, weight, bias):
        kernel = weight.shape[1]
        length = window.shape[1] - kernel + 1
        taps = weight.t().contiguous()  # (K, C): one row of channel weights per tap
        out = torch.addcmul(bias, window[:, :length], taps[0])  # (B, T, C)
        for k in range(1, kernel):
            out.addcmul_(window[:, k : k + length], taps[k])
        ctx.save_for_backward(window, taps)
        return out

    @staticmethod
    def backward(ctx, grad):
        window, taps = ctx.saved_tensors
        kernel, length = taps.shape[0], grad.shape[1]
        grad = grad.contiguous()
        grad_window = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_window = grad.new_zeros(window.shape)  # (B, K-1 + T, C)
            for k in range(kernel):
                grad_window[:, k : k + length].addcmul_(grad, taps[k])
        if ctx.needs_input_grad[1]:
            # per channel, a dot product over batch and time of the gradient with each shifted input
            grad_weight = torch.stack([(grad * window[:, k : k + length]).sum((0, 1)) for k in range(kernel)], 1)
        if ctx.needs_input_grad[2]:
            grad_bias = grad.sum((0, 1))
        return grad_window, grad_weight, grad_bias


def causal_conv(window: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """window (B, K-1 + T, C), weight (C, K), bias (C,) -> (B, T, C)."""
    return _CausalDepthwiseConv.apply(window, weight, bias)


def causal_conv_reference(window: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The same with torch's F.conv1d (channels first, no padding: the window already holds the past)."""
    out = F.conv1d(window.transpose(1, 2), weight[:, None, :], bias, groups=weight.shape[0])  # (B, C, T)
    return out.transpose(1, 2)

"""RMSNorm whose CPU training path has a hand-written backward.

Why: on CPU, torch's `rms_norm` has a fused forward but no fused backward, so autograd replays the
composite (pow, mean, rsqrt, mul, mul) and its backward makes a dozen passes over the activations,
each into a fresh tensor. With five norms in a 4-layer LSTM stack that was ~15% of a training step
(benchmarks/bench_train_step.py).

The backward below is torch's fused LayerNorm backward kernel (RMSNorm is LayerNorm without the mean
subtraction: given a mean of 0, the kernel's gradient differs by one per-row term), one matrix-vector
product and one in-place pass; it allocates one tensor (under glibc's malloc every fresh page is a page
fault, at every step). The reference is torch's own `nn.RMSNorm`, which this class subclasses (same
parameters, same state dict), and its rms_norm, which the class calls wherever the fast path does not apply:
inference, GPUs (fused CUDA kernels both ways), dtypes other than float32 (`rms_norm` below: torch's, or its
formula written out while torch.jit.trace records).
"""

import torch
import torch.nn.functional as F
from torch import nn

from .graph_capture import capturing_graph


class RMSNormFunction(torch.autograd.Function):
    """y = x * r * weight with r = rsqrt(mean(x^2, -1) + eps); float32 inputs and weight."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        width = x.shape[-1]
        # On the rows in x's memory order (a time-major LSTM stream, see backward): a reduction and products over a
        # permuted layout walk memory out of order, about 1.5x slower.
        order = _memory_order(x) or tuple(range(x.dim()))
        rows = x.permute(order)  # contiguous where x is dense in some order of its dims
        # mean(x^2) from the 2-norm: one fused reduction, where vecdot(x, x) on CPU writes x * x out first
        mean_square = torch.linalg.vector_norm(rows, dim=-1, keepdim=True).square_().div_(width)  # (..., 1)
        r = mean_square.add_(eps).rsqrt_()
        y = torch.mul(rows, r).mul_(weight)
        ctx.save_for_backward(x, weight, r)  # (r in the rows' order)
        ctx.eps, ctx.order = eps, order
        return y.permute(_inverse(order))  # laid out like x

    @staticmethod
    def backward(ctx, grad_output):
        x, weight, r = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True (a double backward): a gradient that is itself differentiable
            reference = lambda x, weight: F.rms_norm(x, (x.shape[-1],), weight, ctx.eps)  # noqa: E731
            return (*gradients_through(reference, ctx, (x, weight), grad_output), None)
        width, order = x.shape[-1], ctx.order
        # Work on the rows in x's memory order, as the forward did (an LSTM stack keeps its activations time-major, see
        # modeling_seqarch): a permuted view, so nothing is copied (but an x dense in no order) and the gradient comes
        # out laid out like x. nn.LSTM hands back its input gradient laid out like x; the final norm's comes
        # batch-first (a copy here).
        x, grad_output = x.permute(order).contiguous(), grad_output.permute(order).contiguous()
        # LayerNorm's fused CPU backward, given a mean of 0 and RMSNorm's r as its rstd, is RMSNorm's backward but
        # for the term of LayerNorm's mean subtraction, -r * mean(dy * weight) per row, added back below: one fused
        # pass where the composite takes a dozen. A frozen weight (adapters, partial fine-tuning) gets no gradient.
        needs_input, needs_weight = ctx.needs_input_grad[:2]
        grad_input, grad_weight, _ = torch.ops.aten.native_layer_norm_backward(
            grad_output, x, [width], torch.zeros_like(r), r, weight, None, [needs_input, needs_weight, False]
        )
        if not needs_input:
            return None, grad_weight, None
        mean_term = (grad_output.view(-1, width) @ weight).mul_(r.view(-1)).div_(width)  # (N,)
        grad_input.view(-1, width).add_(mean_term[:, None])
        return grad_input.permute(_inverse(order)), grad_weight, None


def rms_norm(x, normalized_shape, weight=None, eps=None):
    """F.rms_norm; while torch.jit.trace records (and so the legacy ONNX exporter, which has no rms_norm op), the same
    formula written out."""
    if not torch.jit.is_tracing():
        return F.rms_norm(x, normalized_shape, weight, eps)
    eps = eps if eps is not None else torch.finfo(x.dtype).eps
    dims = tuple(range(-len(normalized_shape), 0))
    y = x * torch.rsqrt(x.pow(2).mean(dims, keepdim=True) + eps)
    return y if weight is None else y * weight


def _inverse(order: tuple[int, ...]) -> list[int]:
    """The permutation that undoes x.permute(order)."""
    return sorted(range(len(order)), key=order.__getitem__)


def _memory_order(x: torch.Tensor) -> tuple[int, ...] | None:
    """The order of x's dims (the last one last) in which x is contiguous, or None if there is none."""
    order = (*sorted(range(x.dim() - 1), key=lambda d: -x.stride(d)), x.dim() - 1)
    return order if x.permute(order).is_contiguous() else None


def fast_path_applies(x: torch.Tensor, weight: torch.Tensor | None) -> bool:
    """Where RMSNormFunction is used: float32 training on CPU outside autocast (which would run its
    products in bf16) and outside torch.compile (which fuses torch's own norm, and cannot trace the
    backward's layout logic under dynamic shapes) and other graph recording (export, jit.trace). Everywhere else
    torch's own rms_norm is as fast."""
    return (
        not capturing_graph()
        and x.device.type == "cpu"
        and weight is not None
        and x.dtype == weight.dtype == torch.float32
        and torch.is_grad_enabled()
        and not torch.is_autocast_enabled("cpu")
        and (x.requires_grad or weight.requires_grad)
    )


def gradients_through(reference, ctx, inputs, grad_output):
    """For a double backward (create_graph=True, e.g. a gradient penalty) through a hand-written backward, which builds
    no graph: the gradients of `inputs` (those ctx needs) through reference(*inputs), recomputed under autograd from
    the saved inputs themselves so that they join those tensors' graph; the second differentiation would otherwise
    see constants."""
    needed = ctx.needs_input_grad[: len(inputs)]
    wanted = [t for t, need in zip(inputs, needed) if need]
    grads = iter(torch.autograd.grad(reference(*inputs), wanted, grad_output, create_graph=True))
    return tuple(next(grads) if need else None for need in needed)


class RMSNorm(nn.RMSNorm):
    """nn.RMSNorm (same weights and outputs) with a faster backward for float32 training on CPU."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not x.is_floating_point():  # the mixed-dtype branch below would compute and cast back: truncated to 0s
            raise ValueError(f"RMSNorm takes floating-point input, got {x.dtype}.")
        if x.shape[x.dim() - len(self.normalized_shape):] != self.normalized_shape:  # (a 0-d x: an empty shape)
            raise ValueError(f"RMSNorm over {tuple(self.normalized_shape)} takes input (..., "
                             f"{', '.join(map(str, self.normalized_shape))}), got shape {tuple(x.shape)}.")
        fast = len(self.normalized_shape) == 1 and fast_path_applies(x, self.weight)  # (x's last dim checked above)
        if not fast and self.weight is not None and x.dtype != self.weight.dtype:
            # Mixed dtypes (a bf16 activation and float32 weight under autocast): torch's kernel would warn and
            # take its slow path; compute in the wider dtype (as Llama's norm does) and return the input's.
            dtype = torch.promote_types(x.dtype, self.weight.dtype)
            return rms_norm(x.to(dtype), self.normalized_shape, self.weight.to(dtype), self.eps).to(x.dtype)
        if not fast:
            return rms_norm(x, self.normalized_shape, self.weight, self.eps)
        eps = self.eps if self.eps is not None else torch.finfo(x.dtype).eps
        return RMSNormFunction.apply(x, self.weight, eps)

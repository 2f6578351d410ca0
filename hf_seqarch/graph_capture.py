"""Whether torch is recording this call into a graph (torch.compile, torch.export, torch.jit.trace) or transforming it
(torch.func: grad, vmap, per-sample gradients).

A recorded graph replays the Python branches taken while it was recorded for inputs it never saw. So code that reads
a tensor's values to choose a path (an all-ones mask taken as no mask, which heads suit the factorised scan, whether
any row is empty) takes the path that is right for every input instead, and skips checks that read values. Under
torch.func's vmap there are no values to read at all.
"""

import torch


def capturing_graph() -> bool:
    """Values may not be read: torch.compile, torch.export, torch.jit.trace, or a torch.func transform."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing() or transforming()


def values_readable(tensor: torch.Tensor) -> bool:
    """Whether a check may read `tensor`'s values: not while a graph is recorded (capturing_graph), nor on the meta
    device (shape inference, as transformers' own models run there: it holds no values)."""
    return not capturing_graph() and not tensor.is_meta


def recording_one_graph() -> bool:
    """torch.export or torch.jit.trace: unlike torch.compile, one graph is replayed for every input (no guard to
    compile again on when a branch would go the other way) and it holds no hand-written backward."""
    return torch.compiler.is_exporting() or torch.jit.is_tracing()


def transforming() -> bool:
    """Inside a torch.func transform (grad, vmap, ...; also where torch.compile traces one), whose wrapped tensors
    autograd.Functions without a setup_context (the hand-written backwards here) and vmap's lack of values refuse.
    Not torch.compile alone: while it traces, functorch's interpreter stack is not empty either (its
    functionalization), but the hand-written backwards, nn.LSTM and the CUDA kernels compile."""
    return torch._C._are_functorch_transforms_active()


def plain_ops_only() -> bool:
    """Ops with hand-written backwards (autograd.Functions, CUDA kernels) must give way to plain differentiable ones:
    a graph recorded by torch.export / jit.trace cannot hold them, nor can torch.func transform them."""
    return recording_one_graph() or transforming()

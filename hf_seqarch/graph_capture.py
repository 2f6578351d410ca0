"""Whether torch is recording this call into a graph: torch.compile, torch.export or torch.jit.trace.

A recorded graph replays the Python branches taken while it was recorded for inputs it never saw. So code that reads
a tensor's values to choose a path (an all-ones mask taken as no mask, which heads suit the factorised scan, whether
any row is empty) takes the path that is right for every input instead, and skips checks that read values.
"""

import torch


def capturing_graph() -> bool:
    return torch.compiler.is_compiling() or torch.jit.is_tracing()


def recording_one_graph() -> bool:
    """torch.export or torch.jit.trace: unlike torch.compile, one graph is replayed for every input (no guard to
    compile again on when a branch would go the other way) and it holds no hand-written backward."""
    return torch.compiler.is_exporting() or torch.jit.is_tracing()

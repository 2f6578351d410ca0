"""Whether torch is recording this call into a graph: torch.compile, torch.export or torch.jit.trace.

A recorded graph replays the Python branches taken while it was recorded for inputs it never saw. So code that reads
a tensor's values to choose a path (an all-ones mask taken as no mask, which heads suit the factorised scan, whether
any row is empty) takes the path that is right for every input instead, and skips checks that read values.
"""

import torch


def capturing_graph() -> bool:
    return torch.compiler.is_compiling() or torch.jit.is_tracing()

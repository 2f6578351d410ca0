"""Optional CUDA kernels for the mamba2 mixer, and the visible choice between them and PyTorch.

mamba_ssm's fused SSD scan (`mamba_chunk_scan_combined`) and causal_conv1d's depthwise conv
(`causal_conv1d_fn`) are used when they import and the tensors are on CUDA; everything else runs the
pure-PyTorch path (`ops_chunked_scan.chunked_scan`, `F.conv1d`). The choice is never silent: it is
logged once per backend and device type, and `mamba2_backend(device)` / `conv1d_backend(device)`
say which one a forward on that device uses.
"""

import torch
from transformers.utils import logging

logger = logging.get_logger(__name__)

try:  # optional: pip install mamba-ssm (CUDA + triton)
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
except Exception:  # ImportError, or a CUDA/triton install that fails at import
    mamba_chunk_scan_combined = None

try:  # optional: pip install causal-conv1d (CUDA)
    from causal_conv1d import causal_conv1d_fn
except Exception:
    causal_conv1d_fn = None

_announced = set()


def _announce(kind: str, backend: str, device_type: str):
    """Log each (kernel kind, backend, device type) once, so the path a model runs is always on record. Not while
    torch.compile traces: a log call would break the graph (fullgraph=True fails); the first eager call logs."""
    key = (kind, backend, device_type)
    if key in _announced or torch.compiler.is_compiling():
        return
    _announced.add(key)
    if backend == "torch" and device_type == "cuda":
        package = "mamba-ssm" if kind == "scan" else "causal-conv1d"
        logger.warning(
            f"mamba2 {kind}: {package} is not importable, so CUDA tensors run the pure-PyTorch path "
            f"(correct but slower). `pip install {package}` to use its kernel."
        )
    else:
        logger.info(f"mamba2 {kind}: using the {backend!r} backend on {device_type}.")


def mamba2_backend(device) -> str:
    """The SSD scan backend for tensors on `device`: "mamba_ssm" (CUDA kernel) or "torch"."""
    device_type = torch.device(device).type
    backend = "mamba_ssm" if mamba_chunk_scan_combined is not None and device_type == "cuda" else "torch"
    _announce("scan", backend, device_type)
    return backend


def conv1d_backend(device) -> str:
    """The depthwise conv backend for tensors on `device`: "causal_conv1d" (CUDA kernel) or "torch"."""
    device_type = torch.device(device).type
    backend = "causal_conv1d" if causal_conv1d_fn is not None and device_type == "cuda" else "torch"
    _announce("conv", backend, device_type)
    return backend


def ssd_kernel(x, dt, A, B, C, chunk_size, initial_state):
    """mamba_ssm's fused chunked scan, without the D skip (the caller adds it, as on the PyTorch path).

    x (B, T, H, P), dt (B, T, H) already softplus'ed and zero at pads, A (H,), B/C (B, T, G, N),
    initial_state (B, H, P, N) or None. Returns y (B, T, H, P) and the final state (B, H, P, N).
    """
    return mamba_chunk_scan_combined(
        x.contiguous(), dt.contiguous(), A, B.contiguous(), C.contiguous(), chunk_size,
        D=None, initial_states=initial_state, dt_softplus=False, return_final_states=True,
    )


def conv1d_kernel(x, weight, bias):
    """causal_conv1d's depthwise causal conv + SiLU, zero initial state. x (B, C, T), weight (C, K)."""
    return causal_conv1d_fn(x.contiguous(), weight, bias, activation="silu")

"""Optional CUDA kernels for the mamba2 mixer, and the visible choice between them and PyTorch.

mamba_ssm's fused SSD scan (`mamba_chunk_scan_combined`) and causal_conv1d's depthwise conv
(`causal_conv1d_fn`) are used when they import, the tensors are on CUDA in a dtype they compute in (not
float64: causal_conv1d refuses it, and the scan would compute in float32), and, for the conv, its width is
one causal_conv1d has (2, 3 or 4), and a conv from a zero state over unpadded tokens (a padded batch and a
continued cache run the PyTorch conv, which keeps pads out and carries the state); everything else runs the
pure-PyTorch path (`ops_ssd.ssd_chunked`, `ops_causal_conv.causal_conv`). The choice is never silent: it is logged
once per backend, device type and reason, and `mamba2_backend(device, dtype)` / `conv1d_backend(device, dtype,
width, fresh)` say which one a forward uses.
"""

import torch
from transformers.utils import logging

from .graph_capture import plain_ops_only

logger = logging.get_logger(__name__)

try:  # optional: pip install mamba-ssm (CUDA + triton)
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
except Exception:  # ImportError, or a CUDA/triton install that fails at import
    mamba_chunk_scan_combined = None

try:  # optional: pip install causal-conv1d (CUDA)
    from causal_conv1d import causal_conv1d_fn
except Exception:
    causal_conv1d_fn = None

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
CONV_KERNEL_WIDTHS = (2, 3, 4)  # causal_conv1d's

_announced = set()


def _announce(kind: str, backend: str, device_type: str, why_not: str | None):
    """Log each (kernel kind, backend, device type, reason) once, so the path a model runs is always on record. Not
    while torch.compile traces: a log call would break the graph (fullgraph=True fails); the first eager call logs."""
    key = (kind, backend, device_type, why_not)
    if key in _announced or torch.compiler.is_compiling():
        return
    _announced.add(key)
    if why_not is not None:
        logger.warning(f"mamba2 {kind}: {why_not}, so these CUDA tensors run the pure-PyTorch path (correct but "
                       "slower).")
    else:
        logger.info(f"mamba2 {kind}: using the {backend!r} backend on {device_type}.")


def _choose(kind, kernel, package, device, dtype, extra_reason=None):
    """The kernel's backend name where it applies, else "torch", announced with the reason on CUDA."""
    device_type = torch.device(device).type
    why_not = None
    if device_type == "cuda":
        if kernel is None:
            why_not = f"{package} is not importable (`pip install {package}` to use its kernel)"
        elif dtype not in KERNEL_DTYPES:
            why_not = f"{package}'s kernel does not compute in {dtype}"
        elif plain_ops_only():
            why_not = f"torch.export, torch.jit.trace or torch.func cannot take {package}'s kernel"
        else:
            why_not = extra_reason
    backend = package.replace("-", "_") if device_type == "cuda" and why_not is None else "torch"
    _announce(kind, backend, device_type, why_not)
    return backend


def mamba2_backend(device, dtype=torch.float32) -> str:
    """The SSD scan backend for tensors of `dtype` on `device`: "mamba_ssm" (CUDA kernel) or "torch"."""
    return _choose("scan", mamba_chunk_scan_combined, "mamba-ssm", device, dtype)


def conv1d_backend(device, dtype=torch.float32, width=4, fresh=True) -> str:
    """The depthwise conv backend for tensors of `dtype` on `device`, a conv `width` wide, from a zero state over
    unpadded tokens (fresh; not a padded batch or a continued cache): "causal_conv1d" (CUDA kernel) or "torch"."""
    if width not in CONV_KERNEL_WIDTHS:
        reason = f"causal-conv1d has no kernel {width} wide"
    elif not fresh:
        reason = ("causal-conv1d's kernel as used here takes neither padding nor a carried state (a padded batch, a "
                  "continued cache)")
    else:
        reason = None
    return _choose("conv", causal_conv1d_fn, "causal-conv1d", device, dtype, reason)


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
    return causal_conv1d_fn(channels_first(x), weight, bias, activation="silu")


def channels_first(x):
    """x (B, C, T) with stride 1 along T, the layout causal_conv1d reads as channels-first. .contiguous() is not
    enough: a (B, C, 1) transpose already counts as contiguous with T's stride C, which causal_conv1d would take
    for its channels-last layout (and refuse unless C is a multiple of 8)."""
    return x if x.stride(-1) == 1 and x.is_contiguous() else x.clone(memory_format=torch.contiguous_format)

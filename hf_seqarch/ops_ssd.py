"""Mamba-2's SSD (grouped B/C) as the gated linear recurrence of `ops_chunked_scan`.

Mamba-2 is that recurrence with v = x * dt, k = B, q = C and log_decay = dt * A, where the H heads
come in G groups that share B and C (which `chunked_scan` takes per group). `ssd_chunked` maps its
arguments onto `chunked_scan` and so runs the same hand-tuned chunked algorithm as linear attention;
`ssd_reference` maps them onto the plain loop over time, `scan_reference`, the ground truth the tests
hold `ssd_chunked` to.

Shapes: b batch, T time, H heads, G groups (R = H / G heads each), P head dim, N state size.
"""

import torch

from .graph_capture import capturing_graph
from .ops_chunked_scan import autocast_off, chunked_scan, scan_reference


@autocast_off
def ssd_chunked(x, dt, A, B, C, chunk_size=64, initial_state=None):
    """y_t = C_t . S_t with S_t = exp(dt_t A) S_{t-1} + (dt_t x_t) B_t^T, per head, in chunks.

    Args:
        x: (b, T, H, P).  dt: (b, T, H) >= 0 (0 at pads: the state passes them unchanged).  A: (H,) <= 0.
        B, C: (b, T, G, N), G dividing H.
        chunk_size: L; T need not be a multiple of it.  initial_state: (b, H, P, N) or None (zeros).

    Returns:
        y: (b, T, H, P) without the D skip;  final_state: (b, H, P, N). Both float32 (float64 for float64 x).
    """
    _check_dt_and_A(x, dt, A)
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32  # bf16/fp16 are computed in float32
    x, dt, A, B, C = (t.to(dtype) for t in (x, dt, A, B, C))
    state = None if initial_state is None else initial_state.to(dtype)
    log_decay = dt * A  # (b, T, H)
    if log_decay.device.type == "cpu" and not capturing_graph() and bool((log_decay > 0).any()):
        raise ValueError("dt * A must be <= 0 (dt >= 0, A <= 0: a decay exp(dt * A) in [0, 1]); got positive values.")
    return chunked_scan(C, B, x * dt[..., None], log_decay, chunk_size, state)


def ssd_reference(x, dt, A, B, C, initial_state=None):
    """Ground truth for `ssd_chunked`: the plain loop over time, in float32 (float64 for float64 inputs)."""
    _check_dt_and_A(x, dt, A)
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    x, dt, A, B, C = (t.to(dtype) for t in (x, dt, A, B, C))
    if initial_state is None:
        initial_state = x.new_zeros(x.shape[0], x.shape[2], x.shape[3], B.shape[3])
    return scan_reference(C, B, x * dt[..., None], dt * A, initial_state.to(dtype))


def _check_dt_and_A(x, dt, A):
    """dt (b, T, H) and A (H,) for x (b, T, H, P): a clear error rather than a broadcast failing (or, for an A of
    shape (H, 1), succeeding with other shapes) inside the products. B, C and the state are checked by the scan."""
    tensors = (x, dt, A)
    if not all(isinstance(t, torch.Tensor) and t.is_floating_point() for t in tensors) or not (
        x.dim() == 4 and tuple(dt.shape) == tuple(x.shape[:3]) and tuple(A.shape) == (x.shape[2],)
    ):
        shapes = [tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__ for t in tensors]
        dtypes = [t.dtype if isinstance(t, torch.Tensor) else None for t in tensors]
        raise ValueError(f"Expected x (b, T, H, P), dt (b, T, H) and A (H,), real floating point; got x {shapes[0]}, "
                         f"dt {shapes[1]}, A {shapes[2]} of {dtypes}.")

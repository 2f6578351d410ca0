"""Mamba-2's SSD with grouped B/C: the chunked algorithm of `ops_chunked_scan`, specialised for speed.

Mamba-2 is the gated linear recurrence of `ops_chunked_scan` with v = x * dt, k = B, q = C and
log_decay = dt * A, where the H heads come in G groups that share B and C. `chunked_scan` needs B
and C copied out to every head; here they stay per group, which saves those copies, computes C B^T
once per group instead of once per head, and batches the heads of a group into one wide matmul for
the chunk states and the state-to-output step. Numerically it is the same algorithm (segment sums in
log space inside a chunk, a scan over chunks), and `ssd_reference` (the plain loop over time of
`ops_chunked_scan.scan_reference`) is the ground truth the tests hold it to.

Shapes: b batch, T time, H heads, G groups (R = H / G heads each), P head dim, N state size,
nc chunks of L steps.
"""

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .ops_chunked_scan import autocast_off, scan_reference


@autocast_off
def ssd_chunked(x, dt, A, B, C, chunk_size=64, initial_state=None):
    """y_t = C_t . S_t with S_t = exp(dt_t A) S_{t-1} + (dt_t x_t) B_t^T, per head, in chunks.

    Args:
        x: (b, T, H, P).  dt: (b, T, H) >= 0 (0 at pads: the state passes them unchanged).  A: (H,) <= 0.
        B, C: (b, T, G, N), G dividing H (head h uses group h // (H / G)).
        chunk_size: L; T need not be a multiple of it.  initial_state: (b, H, P, N) or None (zeros).

    Returns:
        y: (b, T, H, P) without the D skip;  final_state: (b, H, P, N). Both float32 (float64 for float64 x).
    """
    b, T, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    R, L = H // G, chunk_size
    pad = -T % L  # the tail is padded with dt = 0 and x = B = C = 0: nothing enters the state
    nc = (T + pad) // L
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32  # bf16/fp16 are computed in float32

    def to_chunks(t):  # (b, T, ...) -> (b, nc, L, ...)
        t = t.to(dtype)
        if pad:
            t = F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad))
        return t.reshape(b, nc, L, *t.shape[2:])

    a = to_chunks(dt * A).permute(0, 3, 1, 2)  # (b, H, nc, L) log decay per step
    a_cum = a.cumsum(-1)  # (b, H, nc, L): log decay from the chunk's start to step i (inclusive)
    x_chunks, dt_chunks = to_chunks(x), to_chunks(dt)  # (b, nc, L, H, P), (b, nc, L, H)
    v = (x_chunks * dt_chunks[..., None]).permute(0, 3, 1, 2, 4).contiguous()  # (b, H, nc, L, P)
    v = v.view(b, G, R, nc, L, P)
    Bc = to_chunks(B).permute(0, 3, 1, 2, 4)  # (b, G, nc, L, N)
    Cc = to_chunks(C).permute(0, 3, 1, 2, 4)  # (b, G, nc, L, N)

    # 1. Inside a chunk: y_i = sum_{j<=i} exp(a_{j+1} + ... + a_i) (C_i . B_j) v_j; C B^T once per group.
    CB = Cc @ Bc.transpose(-1, -2)  # (b, G, nc, L, L)
    y_diag = _DecayedScores.apply(CB, a_cum.view(b, G, R, nc, L)) @ v  # (b, G, R, nc, L, P)

    # 2. Each chunk's own state at its end, sum_j exp(a_{j+1..L}) dt_j x_j B_j^T, a group's heads stacked
    # as rows. Weighting x in its own (time-major) layout makes the rows a transposed view, not a copy;
    # states are kept as (b, G, nc, R*P, N) so that step 4 reads them without a copy either.
    decay_to_end = torch.exp(a_cum[..., -1:] - a_cum).permute(0, 2, 3, 1)  # (b, nc, L, H)
    weighted = x_chunks * (dt_chunks * decay_to_end)[..., None]  # (b, nc, L, H, P)
    rows = weighted.view(b, nc, L, G, R * P).permute(0, 3, 1, 4, 2)  # (b, G, nc, R*P, L)
    chunk_states = rows @ Bc  # (b, G, nc, R*P, N)

    # 3. Across chunks, a scan: S_c = exp(sum of a over chunk c) S_{c-1} + chunk_states_c.
    chunk_decay = torch.exp(a_cum[..., -1]).view(b, G, R, 1, nc).expand(b, G, R, P, nc).reshape(b, G, R * P, nc)
    if initial_state is None:
        state = x.new_zeros(b, G, R * P, N, dtype=dtype)
    else:
        state = initial_state.to(dtype).reshape(b, G, R * P, N)
    states_in = []  # the state entering each chunk
    for contribution, d in zip(chunk_states.unbind(2), chunk_decay.unbind(-1)):  # unbind: one cheap backward
        states_in.append(state)
        state = torch.addcmul(contribution, d[..., None], state)  # (b, G, R*P, N): d * state + contribution
    states_in = torch.stack(states_in, 2)  # (b, G, nc, R*P, N)

    # 4. State to output, y_i += exp(a_1 + ... + a_i) C_i . S_in, a group's heads as columns.
    y_state = (Cc @ states_in.transpose(-1, -2)).view(b, G, nc, L, R, P)
    y_state = y_state * torch.exp(a_cum).view(b, G, R, nc, L).permute(0, 1, 3, 4, 2)[..., None]
    y = y_state + y_diag.permute(0, 1, 3, 4, 2, 5)  # (b, G, nc, L, R, P), laid out as y_state
    y = y.permute(0, 2, 3, 1, 4, 5).reshape(b, nc * L, H, P)[:, :T]  # (b, T, H, P): a view when G == 1
    return y, state.view(b, H, P, N)


class _DecayedScores(torch.autograd.Function):
    """scores[i, j] = (C_i . B_j) exp(a_cum_i - a_cum_j) for j <= i, 0 above the diagonal (step 1).

    The backward is by hand: autograd would replay sub, masked_fill, exp and mul, about six passes over
    these (b, H, nc, L, L) tensors, where two and three reductions do. Segment sums are masked with
    -inf before the exp, so nothing overflows however strong the decay; the backward never touches an inf.
    """

    @staticmethod
    def forward(ctx, CB, a_cum):  # CB (b, G, nc, L, L), a_cum (b, G, R, nc, L)
        L = a_cum.shape[-1]
        causal = torch.ones(L, L, dtype=torch.bool, device=CB.device).tril()
        segsum = a_cum[..., :, None] - a_cum[..., None, :]  # (b, G, R, nc, L, L)
        decay = segsum.masked_fill_(~causal, float("-inf")).exp_()  # 0 above the diagonal
        ctx.save_for_backward(CB, decay)
        return decay * CB[:, :, None]

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        CB, decay = ctx.saved_tensors
        grad_decayed = grad * decay  # (b, G, R, nc, L, L)
        grad_CB = grad_decayed.sum(2) if ctx.needs_input_grad[0] else None  # the R heads of a group share CB
        grad_a_cum = None
        if ctx.needs_input_grad[1]:
            grad_segsum = grad_decayed.mul_(CB[:, :, None])  # d scores / d segsum = scores
            grad_a_cum = grad_segsum.sum(-1) - grad_segsum.sum(-2)  # segsum = a_cum_i - a_cum_j
        return grad_CB, grad_a_cum


def ssd_reference(x, dt, A, B, C, initial_state=None):
    """Ground truth for `ssd_chunked`: the plain loop over time, in float32 (float64 for float64 inputs)."""
    R = x.shape[2] // B.shape[2]
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    x, dt, B, C = x.to(dtype), dt.to(dtype), B.to(dtype), C.to(dtype)
    if initial_state is None:
        initial_state = x.new_zeros(x.shape[0], x.shape[2], x.shape[3], B.shape[3])
    q, k = C.repeat_interleave(R, dim=2), B.repeat_interleave(R, dim=2)  # (b, T, H, N)
    return scan_reference(q, k, x * dt[..., None], dt * A.to(dtype), initial_state.to(dtype))

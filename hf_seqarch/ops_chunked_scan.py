"""Chunked linear recurrence shared by the Mamba-2 (SSD) and linear-attention mixers.

The gated linear recurrence, per batch b and head h,

    S_t = exp(log_decay_t) * S_{t-1} + v_t k_t^T        S: (P, N)
    y_t = S_t q_t                                        y: (P,)

is evaluated with the "state space duality" chunked algorithm of Mamba-2 (Dao & Gu, 2024, Listing 1):
inside a chunk of L steps it is a masked, decayed attention (quadratic in L); across chunks only the
(P, N) states are carried, with a scan over chunks (linear in T / L). Every decay is an exp of a
difference of cumulative sums of log_decay <= 0 taken inside one chunk, masked with -inf before the
exp, so nothing can overflow however long the sequence or strong the gates.

Pure PyTorch, imports only torch (this file is copied flat to the Hub as remote code).
Shapes: B batch, T time, H heads, N key/query size (Mamba-2: state size), P value size (head dim).
"""

import torch
import torch.nn.functional as F


def _compute_dtype(dtype):
    """float64 stays float64; everything else (bf16, fp16, fp32) is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def chunked_scan(q, k, v, log_decay, chunk_size=64, initial_state=None):
    """Chunked (state-space-duality) evaluation of the gated linear recurrence
         S_t = exp(log_decay_t) * S_{t-1} + v_t k_t^T        S: (B, H, P, N)
         y_t = S_t q_t                                        y: (B, T, H, P)

    Args:
        q, k: (B, T, H, N).  v: (B, T, H, P).
        log_decay: (B, T, H), values <= 0 (log of the decay in (0, 1]).
        chunk_size: L, the length of a chunk; T need not be a multiple of it.
        initial_state: (B, H, P, N) or None (zeros).

    Returns:
        y: (B, T, H, P) in q's dtype.
        final_state: (B, H, P, N) in initial_state's dtype if given, else q's dtype.

    A position with v = 0 (or k = 0) and log_decay = 0 leaves the state unchanged (padding).
    bf16 / fp16 inputs are computed in float32.
    """
    B, T, H, N = q.shape
    P = v.shape[-1]
    out_dtype, dtype = q.dtype, _compute_dtype(q.dtype)
    state_dtype = initial_state.dtype if initial_state is not None else out_dtype
    L = chunk_size
    pad = -T % L  # pad the tail with q = k = v = 0, log_decay = 0: the state passes through
    C = (T + pad) // L  # number of chunks

    def to_chunks(x):  # (B, T, H, D) -> (B, H, C, L, D)
        x = F.pad(x.to(dtype), (0, 0, 0, 0, 0, pad))
        return x.reshape(B, C, L, H, -1).permute(0, 3, 1, 2, 4).contiguous()

    q, k, v = to_chunks(q), to_chunks(k), to_chunks(v)
    a = to_chunks(log_decay.unsqueeze(-1)).squeeze(-1)  # (B, H, C, L)
    a_cum = a.cumsum(-1)  # (B, H, C, L): log decay from the chunk's start to step i (inclusive)

    # 1. Intra-chunk (diagonal blocks): y_i = sum_{j<=i} exp(a_{j+1} + ... + a_i) (q_i . k_j) v_j
    segsum = a_cum[..., :, None] - a_cum[..., None, :]  # (B, H, C, L, L)
    causal = torch.ones(L, L, dtype=torch.bool, device=q.device).tril()
    decay = torch.exp(segsum.masked_fill(~causal, float("-inf")))  # (B, H, C, L, L), 0 above diag
    scores = (q @ k.transpose(-1, -2)) * decay  # (B, H, C, L, L)
    y = scores @ v  # (B, H, C, L, P)

    # 2. Each chunk's own contribution to the state at its end: sum_j exp(a_{j+1..L}) v_j k_j^T
    decay_to_end = torch.exp(a_cum[..., -1:] - a_cum)  # (B, H, C, L)
    chunk_states = v.transpose(-1, -2) @ (k * decay_to_end[..., None])  # (B, H, C, P, N)

    # 3. Inter-chunk recurrence: a scan over chunks, S_c = exp(sum of a over chunk c) S_{c-1} + states_c
    chunk_decay = torch.exp(a_cum[..., -1])  # (B, H, C)
    if initial_state is None:
        state = q.new_zeros(B, H, P, N)
    else:
        state = initial_state.to(dtype)
    states_in = []  # the state entering each chunk
    for contrib, d in zip(chunk_states.unbind(2), chunk_decay.unbind(2)):  # unbind: cheap backward
        states_in.append(state)
        state = d[..., None, None] * state + contrib  # (B, H, P, N)
    states_in = torch.stack(states_in, 2)  # (B, H, C, P, N)

    # 4. State -> output: y_i += exp(a_1 + ... + a_i) S_in q_i
    q_decayed = q * torch.exp(a_cum)[..., None]  # (B, H, C, L, N)
    y = y + q_decayed @ states_in.transpose(-1, -2)  # (B, H, C, L, P)

    y = y.permute(0, 2, 3, 1, 4).reshape(B, C * L, H, P)[:, :T]  # (B, T, H, P)
    return y.to(out_dtype), state.to(state_dtype)



def scan_step(q, k, v, log_decay, state):
    """One decode step of the recurrence.

    Args:
        q, k: (B, H, N).  v: (B, H, P).  log_decay: (B, H).  state: (B, H, P, N).

    Returns:
        y: (B, H, P) in q's dtype; new_state: (B, H, P, N) in state's dtype.
    """
    out_dtype, dtype = q.dtype, _compute_dtype(q.dtype)
    q, k, v, log_decay = q.to(dtype), k.to(dtype), v.to(dtype), log_decay.to(dtype)
    new_state = torch.exp(log_decay)[..., None, None] * state.to(dtype) + v[..., :, None] * k[..., None, :]
    y = (new_state @ q[..., None]).squeeze(-1)  # (B, H, P, N) @ (B, H, N, 1) -> (B, H, P)
    return y.to(out_dtype), new_state.to(state.dtype)


def scan_reference(q, k, v, log_decay, initial_state=None):
    """Ground truth: a plain loop over time, in float32 (float64 for float64 inputs).

    Same arguments and returns as `chunked_scan` (without chunk_size).
    """
    B, T, H, N = q.shape
    P = v.shape[-1]
    dtype = _compute_dtype(q.dtype)
    state_dtype = initial_state.dtype if initial_state is not None else q.dtype
    state = q.new_zeros(B, H, P, N, dtype=dtype) if initial_state is None else initial_state.to(dtype)
    ys = []
    # unbind (not q[:, t]) so that the backward is one stack, not T full-size zero tensors
    for q_t, k_t, v_t, a_t in zip(q.unbind(1), k.unbind(1), v.unbind(1), log_decay.unbind(1)):
        y_t, state = scan_step(q_t, k_t, v_t, a_t, state)
        ys.append(y_t)
    y = torch.stack(ys, 1) if ys else q.new_zeros(B, 0, H, P)  # (B, T, H, P)
    return y.to(q.dtype), state.to(state_dtype)

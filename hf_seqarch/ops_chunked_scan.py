"""Chunked linear recurrence shared by the Mamba-2 (SSD) and linear-attention mixers.

The gated linear recurrence, per batch b and head h,

    S_t = exp(a_t) * S_{t-1} + v_t k_t^T        S: (P, N),   a_t = log_decay_t <= 0
    y_t = S_t q_t                                y: (P,)

is evaluated with the state-space-duality chunked algorithm of Mamba-2 (Dao & Gu, 2024, Listing 1).
With cs the cumulative sum of a inside a chunk of L steps:

  1. intra-chunk:  y_i  = sum_{j<=i} exp(cs_i - cs_j) (q_i . k_j) v_j      masked attention, O(L^2)
  2. chunk states: S^c  = sum_j exp(cs_L - cs_j) v_j k_j^T                 what a chunk adds to the state
  3. recurrence:   S_in^{c+1} = exp(cs_L) S_in^c + S^c                      a scan over chunks, O(T / L)
  4. output:       y_i += exp(cs_i) S_in q_i                                 the state entering the chunk

Every decay is exp of a sum of log_decay over a segment inside one chunk (a difference of float64
cumsums, kept exact in float32 by a hi + lo split), so nothing overflows or loses precision however
long the sequence or strong the gates. Segment sums are clamped to [-60, 60] before the exp and the
causal mask is applied with tril rather than exp(-inf): float32 denormals, exp(-inf) and exp(+large)
all take a very slow path on CPU (10-80x), no result can tell exp(-60) ~ 1e-26 from anything smaller,
and above the diagonal (where the sums are positive and can be large) the values are masked anyway.

On CPU, for the heads whose log decays span at most 60 in every chunk and are at most 4 in size at every step (all
but strongly gated heads; and, for spans over 30, whose inputs are small enough that e^span cannot take the products
past float32's range), exp(cs_i - cs_j) is computed as exp(cs_i) * exp(-cs_j), folded into the values and
outputs, and the L x L decay matrix is never formed (`_FactorizedChunkedScan`); the other heads take the exact
segment sums above
(`_ChunkedScan`), and a call with both kinds runs each on its own path (`_scan`). Tests hold both to the
reference.

The backwards are written by hand (torch.autograd.Function): they need the same 8 batched matmuls as
autograd would but far fewer elementwise passes and fresh tensors (on CPU each fresh tensor costs page
faults at every step). The factorised one gets the log_decay gradient from the identity
d cs_i = dy_i . y_i - dv'_i . v'_i (+ the chunk's end-state term), as exp(cs) only ever scales values and
outputs; the exact one, whose gates may be strong, from each segment sum's gradient directly (see there).
They are not differentiable in turn: a double backward (create_graph=True, e.g. a gradient penalty) through
them raises.

Pure PyTorch, imports only torch and graph_capture (this file is copied flat to the Hub as remote code).
Shapes: B batch, T time, H heads, G groups of heads sharing q and k (G = H unless shared; R = H / G),
N key/query size (Mamba-2: state size), P value size (head dim), C number of chunks, L chunk length.
"""

import functools
import math
import numbers

import torch
import torch.nn.functional as F

from .graph_capture import capturing_graph, plain_ops_only

_CACHE_BYTES = 3 << 20  # 3 MiB: the q, k and v of one set of chunks in the factorised scan (see _chunk_groups)
LOG_DECAY_FLOOR = -60.0  # exp(-60) ~ 1e-26: the smallest decay ever formed (keeps float32 out of denormals)
# The largest |log decay| of one step that the factorised scan takes: its log-decay gradient is a difference of O(1)
# terms whose true value is ~exp(-|a_t|) times smaller, so float32 rounding grows as exp(|a_t|) relative to it
# (measured on a head's summed gradient: 1.5e-4 at 4, 1e-2 at 8, 1.5x at 14; the exact path stays near 1e-6).
FACTORISED_MAX_STEP = 4.0


def autocast_off(fn):
    """Run `fn` with autocast disabled: it picks its compute dtype itself (float32), which autocast would override."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        device_type = tensors[0].device.type if tensors else "cpu"  # (no tensor: the op's own checks say so)
        with torch.autocast(device_type, enabled=False):
            return fn(*args, **kwargs)

    return wrapper


def _refuse_double_backward():
    """The hand-written backwards build no graph: under create_graph=True their gradients would silently count as
    constants in a second differentiation (e.g. a gradient penalty)."""
    if torch.is_grad_enabled():  # autograd runs a backward with grad mode on only for create_graph=True
        raise RuntimeError(
            "The chunked scan of the mamba2 and linear_attention mixers has a hand-written backward that is not "
            "itself differentiable: create_graph=True through it (a double backward, e.g. a gradient penalty) is "
            "not supported."
        )


def _compute_dtype(dtype):
    """float64 stays float64; everything else (bf16, fp16, fp32) is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _decay(log_decay, dtype):
    return torch.exp(log_decay.clamp(min=LOG_DECAY_FLOOR)).to(dtype)


def _bmm(x, y, add_to=None, out=None):
    """x (..., m, k) @ y (..., k, n) as one bmm over the flattened leading dims.
    add_to: accumulate into it in place; out: write into it (contiguous)."""
    x3, y3 = x.reshape(-1, *x.shape[-2:]), y.reshape(-1, *y.shape[-2:])
    if add_to is not None:
        add_to.view(-1, *add_to.shape[-2:]).baddbmm_(x3, y3)
        return add_to
    if out is not None:
        torch.bmm(x3, y3, out=out.view(-1, *out.shape[-2:]))
        return out
    return torch.bmm(x3, y3).view(*x.shape[:-1], y.shape[-1])


def _chunks(x, L):
    """(B, T, H, D) -> (C, B, H, L, D), T = C * L: chunk-major, so that the scan over chunks walks contiguous
    slices once copied. A view: the copy is left to the caller, who can often fuse it with a product."""
    B, T, H, D = x.shape
    return x.view(B, T // L, L, H, D).permute(1, 0, 3, 2, 4)


def _unchunk(x):
    """(C, B, H, L, D) -> (B, C * L, H, D), a contiguous copy."""
    C, B, H, L, D = x.shape
    return x.permute(1, 0, 3, 2, 4).reshape(B, C * L, H, D)


class _ChunkedScan(torch.autograd.Function):
    """The recurrence on q, k (B, T, G, N), v (B, T, H, P), a (B, T, H), state (B, H, P, N), with G dividing H and T
    a multiple of the chunk length L -> y (B, T, H, P), final state (B, H, P, N). Works on chunk-major copies
    (C, B, ., L, .); q and k stay per group, so q k^T and the intra-chunk gradients of q and k are formed once per
    group (Mamba-2's B and C are shared by the heads of a group).
    Products over groups of heads are written with out= into a (C, B, G, R, ...) view of a (C, B, H, ...) buffer,
    and the buffer itself is used afterwards: reshaping the view that out= returns breaks torch.compile's backward."""

    @staticmethod
    def forward(ctx, q, k, v, a, state, L):
        groups = q.shape[2]
        q, k, v = (_chunks(x, L).contiguous() for x in (q, k, v))  # (C, B, G, L, N), (C, B, G, L, N), (C, B, H, L, P)
        # (C, B, H, L): log decay from the chunk's start to step i inclusive; in float64 so that
        # differences of large cumsums (strong gates) keep float32 precision.
        cs = _chunks(a[..., None], L)[..., 0].to(torch.float64).cumsum(-1)
        # Few fresh large tensors, on purpose: on CPU each can cost as much in page faults as a pass over it.

        # 1. Intra-chunk (diagonal blocks): decay[i, j] = exp(a_{j+1} + ... + a_i) for j <= i, else 0.
        segsum = _segment_sums(cs, q.dtype)  # (C, B, H, L, L)
        decay = segsum.clamp_(LOG_DECAY_FLOOR, -LOG_DECAY_FLOOR).exp_().tril_()  # (C, B, H, L, L)
        qk = _bmm(q, k.transpose(-1, -2))  # (C, B, G, L, L), once per group
        scores = torch.empty_like(decay)  # (C, B, H, L, L)
        torch.mul(_by_group(decay, groups), qk.unsqueeze(3), out=_by_group(scores, groups))
        y = _bmm(scores, v)  # (C, B, H, L, P)

        # 2. Each chunk's own contribution to the state at its end, written where the scan below wants it:
        #    states[c + 1] = v^T (k * exp(cs_L - cs)) of chunk c, for now.
        to_end = _decay(cs[..., -1:] - cs, q.dtype)[..., None]  # (C, B, H, L, 1): exp(cs_L - cs_j)
        k_to_end = q.new_empty(*to_end.shape[:-1], k.shape[-1])  # (C, B, H, L, N)
        torch.mul(_by_group(to_end, groups), k.unsqueeze(3), out=_by_group(k_to_end, groups))
        states = q.new_empty(len(q) + 1, *state.shape)  # (C + 1, B, H, P, N)
        _bmm(v.transpose(-1, -2), k_to_end, out=states[1:])

        # 3. Inter-chunk recurrence, a scan over chunks: states[c] enters chunk c, states[C] is final.
        states[0] = state
        states = _scan_over_chunks(states, cs[..., -1])  # d * S_in + the chunk's own contribution

        # 4. State -> output: y_i += exp(cs_i) S_in q_i.
        grow = _by_group(_decay(cs, q.dtype)[..., None], groups)  # (C, B, G, R, L, 1): exp(cs_i)
        torch.mul(q.unsqueeze(3), grow, out=_by_group(k_to_end, groups))
        q_decayed = k_to_end  # (C, B, H, L, N): the buffer reused
        _bmm(q_decayed, states[:-1].transpose(-1, -2), add_to=y)  # (C, B, H, L, P)

        ctx.save_for_backward(q, k, v, cs, decay, scores, states, q_decayed)
        return _unchunk(y), states[-1].clone()

    @staticmethod
    @autocast_off
    def backward(ctx, dy, dstate):
        _refuse_double_backward()
        q, k, v, cs, decay, scores, states, q_decayed = ctx.saved_tensors
        groups = q.shape[2]
        dy = _chunks(dy, q.shape[-2]).contiguous()  # (C, B, H, L, P)

        # 4. y_i += q_decayed_i S_in^T. dstates[c] will be the gradient of states[c]; first the direct part.
        dstates = torch.empty_like(states)  # (C + 1, B, H, P, N)
        _bmm(dy.transpose(-1, -2), q_decayed, out=dstates[:-1])
        dq_decayed = _bmm(dy, states[:-1])  # (C, B, H, L, N)

        # 3. The scan backwards; dstates[0] is the gradient of the initial state.
        chunk_decay = _decay(cs[..., -1], q.dtype)[..., None, None]  # (C, B, H, 1, 1)
        dstates[-1] = dstate
        dstates = _scan_over_chunks(dstates, cs[..., -1], reverse=True)

        # 2. chunk_states = v^T k_to_end. The gradient of k_to_end, and dv from each group's k against the
        # group's heads' state gradients side by side: one (L, N) @ (N, R * P) product per group.
        to_end = _decay(cs[..., -1:] - cs, q.dtype)[..., None]  # (C, B, H, L, 1)
        dk_to_end = _bmm(v, dstates[1:])  # (C, B, H, L, N)
        dstates_side_by_side = _by_group(dstates[1:], groups).flatten(3, 4).transpose(-1, -2)  # (C, B, G, N, R * P)
        dv = _bmm(k, dstates_side_by_side).unflatten(-1, (-1, v.shape[-1])).transpose(3, 4)  # (C, B, G, R, L, P), a view
        # copy_ then mul_ into the buffer: mul's out= from this transposed view breaks torch.compile's backward
        dv_heads = torch.empty_like(v)  # (C, B, H, L, P)
        _by_group(dv_heads, groups).copy_(dv).mul_(_by_group(to_end, groups))
        dv = dv_heads

        # log decay. Every decay is exp of a segment sum, cs_i - cs_j = a_{j+1} + ... + a_i, so d a_t is the sum of
        # d segsum over the segments that contain step t. Summed that way, as positive contributions, rather than as
        # d cs at the two ends of each segment followed by a cumsum: that would cancel O(1) terms against each other
        # (segments of decay 1, across steps with a = 0 such as pads), and under strong gates the true d a is tiny.
        # The state terms: y_i gets exp(cs_i) S_in q_i, segment [0, i]; the state leaving the chunk
        # exp(cs_L) S_in + sum_j exp(cs_L - cs_j) v_j k_j^T, segments [0, L] and (j, L].
        from_start_terms = _row_dots(q_decayed, dq_decayed)  # (C, B, H, L): segment [0, i]
        to_end_terms = _group_row_dots(k, dk_to_end).mul_(to_end[..., 0])  # (C, B, H, L): segment (j, L]
        carried = torch.linalg.vecdot(dstates[1:].flatten(-2), states[:-1].flatten(-2))  # <dS_out, S_in>, see _row_dots
        da = from_start_terms.flip(-1).cumsum(-1).flip(-1) + _exclusive_cumsum(to_end_terms)  # (C, B, H, L)
        da += (carried * chunk_decay[..., 0, 0])[..., None]

        # The state parts of dq and dk, summed over each group's heads.
        dq = _sum_over_group(dq_decayed.mul_(_decay(cs, q.dtype)[..., None]), groups)  # (C, B, G, L, N)
        dk = _sum_over_group(dk_to_end.mul_(to_end), groups)  # (C, B, G, L, N)

        # 1. y = (q k^T * decay) v
        _bmm(scores.transpose(-1, -2), dy, add_to=dv)
        dqk = _bmm(dy, v.transpose(-1, -2))  # (C, B, H, L, L)
        dsegsum = (dqk * scores).tril_(-1)  # (C, B, H, L, L): d segsum_ij = (dy_i . v_j) scores_ij, segment (j, i]
        da += _exclusive_cumsum(dsegsum).tril_().sum(-2)  # sum over i >= t of sum over j < t
        dqk_group = _sum_over_group(dqk.mul_(decay), groups)  # (C, B, G, L, L): the gradient of q k^T
        _bmm(dqk_group, k, add_to=dq)
        _bmm(dqk_group.transpose(-1, -2), q, add_to=dk)
        return _unchunk(dq), _unchunk(dk), _unchunk(dv), _unchunk(da[..., None])[..., 0], dstates[0], None


def _scan_over_chunks(states, chunk_log_decay, reverse=False, as_product=None):
    """The recurrence between chunks, on states (C + 1, B, H, P, N) and chunk_log_decay (C, B, H), each chunk's summed
    log decay (float64), d_c = exp(chunk_log_decay[c]):
        forward:  states[c + 1] += d_c * states[c]  for c = 0 .. C - 1  (before: the initial state, then each chunk's
                  own contribution; after: the state entering each chunk, then the final one)
        reverse:  states[c] += d_c * states[c + 1]  for c = C - 1 .. 0  (the backward's, on state gradients)
    In place. A loop over chunks; while a graph is recorded (as_product=None: whether one is, see graph_capture) the
    same as one product with the (C + 1) x (C + 1) matrix of decays between chunks, W[c, j] = exp(sum of
    chunk_log_decay[j:c]) for j <= c: dynamo unrolls a loop, and would compile it again for every new number of chunks
    (every new length). (A graph recorded by torch.export or jit.trace keeps its example's length either way.)
    The product costs C + 1 times the loop's arithmetic (C = T / L is small), in one batched kernel."""
    if as_product is None:
        as_product = capturing_graph()
    if not as_product:
        decays = _decay(chunk_log_decay, states.dtype)[..., None, None].unbind()  # C of (B, H, 1, 1)
        _carry_between_chunks(states.unbind(), decays, reverse)
        return states
    product = "cjbh,cbhpn->jbhpn" if reverse else "cjbh,jbhpn->cbhpn"
    weights = _between_chunks(chunk_log_decay, states.dtype)
    return states.copy_(torch.einsum(product, weights, states))  # (in place, as the loop: the callers view states)


def _between_chunks(chunk_log_decay, dtype):
    """(C, B, H) each chunk's summed log decay (float64) -> W (C + 1, C + 1, B, H) in `dtype`: W[c, j] = exp(sum of
    chunk_log_decay[j:c]) for j <= c, else 0, the matrix of `_scan_over_chunks` as one product."""
    entering = F.pad(chunk_log_decay.cumsum(0), (0, 0, 0, 0, 1, 0))  # (C + 1, B, H): log decay from the start to c
    spans = entering[:, None] - entering[None, :]  # (C + 1, C + 1, B, H): [c, j] the chunks j .. c - 1
    reaches = torch.ones(len(entering), len(entering), dtype=torch.bool, device=entering.device).tril()[..., None, None]
    weights = torch.where(reaches, spans.clamp(min=LOG_DECAY_FLOOR), LOG_DECAY_FLOOR).exp().to(dtype)
    return weights * reaches  # (C + 1, C + 1, B, H): W[c, j], 0 for j > c


def _carry_between_chunks(rows, decays, reverse=False):
    """The loop between chunks, in place, on C + 1 rows (states, or their gradients) and C decays that broadcast:
        forward:  rows[c + 1] += decays[c] * rows[c]  for c = 0 .. C - 1
        reverse:  rows[c] += decays[c] * rows[c + 1]  for c = C - 1 .. 0"""
    if reverse:
        for c in reversed(range(len(decays))):
            rows[c].addcmul_(decays[c], rows[c + 1])
    else:
        for c in range(len(decays)):
            rows[c + 1].addcmul_(decays[c], rows[c])


class _FactorizedChunkedScan(torch.autograd.Function):
    """`_ChunkedScan` for inputs whose decays factor: in every chunk the log decays from its start (cs, with
    the 0 before the first step) span at most 60, so exp(cs_i - cs_j) = exp(cs_i) * exp(-cs_j) with both
    factors within [e^-60, e^60], each exact to float32 rounding; and no step decays by more than e^-4
    (FACTORISED_MAX_STEP: the log-decay gradient's identity in the backward cancels terms up to that much larger
    than its result). The decays then move off the L x L products onto the values and outputs: with
    v'_j = exp(-cs_j) v_j, a chunk gives

        y_i = exp(cs_i) (sum_{j <= i} (q_i . k_j) v'_j + S_in q_i)        S_out = exp(cs_L) (S_in + sum_j v'_j k_j^T)

    so q k^T is formed once per group of heads sharing q and k, undecayed (the causal tril is the only pass over
    it), and in every other product the R heads of a group stand side by side: values (L, R * P), states
    (R * P, N), one matmul R times as wide per group instead of R narrow ones per head.
    Everything runs a set of Gc chunks at a time (`_chunk_groups`), read from and written to the (B, T, ., .)
    tensors directly: no full-size chunk-major copy of the inputs is ever made (the backward gathers its
    chunks again).
    Same arguments and returns as `_ChunkedScan`."""

    @staticmethod
    def forward(ctx, q, k, v, a, state, L):
        groups = q.shape[2]
        cs = _chunks_by_group(a, L, groups).to(torch.float64).cumsum(3)  # (C, B, G, L, R)
        grow = cs.exp().to(q.dtype)  # (C, B, G, L, R): exp(cs_i)
        shrink = cs.neg().exp_().to(q.dtype)  # (C, B, G, L, R): exp(-cs_j)
        chunk_decay = _per_head(grow[:, :, :, -1])[..., None, None]  # (C, B, H, 1, 1): exp(cs_L)
        q_chunks, k_chunks = _chunks(q, L), _chunks(k, L)  # (C, B, G, L, N) views
        y = v.new_empty(v.shape)  # (B, T, H, P)
        v_chunks, y_chunks = (_chunks(_side_by_side(x, groups), L) for x in (v, y))  # (C, B, G, L, R * P) views
        states = q.new_empty(len(cs) + 1, *state.shape)  # (C + 1, B, H, P, N): states[c] enters chunk c
        states[0] = state
        qk = q.new_empty(*cs.shape[:-1], L)  # (C, B, G, L, L): tril(q k^T), kept for the backward
        sets = _chunk_groups(q, k, v, L)
        work = _Workspace(sets)
        wide = v.shape[2] * v.shape[3] // groups  # R * P: a group's heads side by side
        # Each set's products are batched over (Gc, B, G), flattened: M = Gc * B * G matrices.
        for g in sets:
            q_g, k_g = work.copy("q", q_chunks[g]).flatten(0, 2), work.copy("k", k_chunks[g]).flatten(0, 2)  # (M, L, N)
            v_set = _scale_heads(v_chunks[g], shrink[g], out=work.like("v", v_chunks[g]))  # (Gc, B, G, L, R * P): v'
            v_g = v_set.flatten(0, 2)  # (M, L, R * P)
            s_in, s_out = states[g.start : g.stop], states[g.start + 1 : g.stop + 1]  # (Gc, B, H, P, N) each
            # 2.-3. The state leaving chunk c is exp(cs_L) (S_in + v'^T k): the chunk's own part, decayed, then the
            # scan over the set's chunks, in place.
            torch.bmm(v_g.mT, k_g, out=s_out.view(-1, wide, s_out.shape[-1]))
            s_out.mul_(chunk_decay[g])
            _carry_between_chunks(states[g.start : g.stop + 1].unbind(), chunk_decay[g].unbind())  # (Gc + 1 rows)
            # 1. and 4.: y = exp(cs) (tril(q k^T) v' + q S_in^T).
            qk_g = torch.bmm(q_g, k_g.mT, out=qk[g].flatten(0, 2)).tril_()  # (M, L, L)
            y_g = work.like("y", v_chunks[g])  # (Gc, B, G, L, R * P)
            torch.bmm(qk_g, v_g, out=y_g.flatten(0, 2)).baddbmm_(q_g, s_in.view(-1, wide, s_in.shape[-1]).mT)
            _scale_heads(y_g, grow[g], out=y_chunks[g])

        ctx.save_for_backward(q, k, v, grow, shrink, qk, states, y)
        return y, states[-1].clone()

    @staticmethod
    @autocast_off
    def backward(ctx, dy, dstate):
        _refuse_double_backward()
        q, k, v, grow, shrink, qk, states, y = ctx.saved_tensors
        (B, _, groups, _), L, per_group = q.shape, qk.shape[-1], grow.shape[-1]  # per_group: R
        # dy is multiplied by exp(cs), as small as e^-60: uniformly tiny upstream gradients (under ~1e-12) went into
        # float32's denormals (errors of 1e-2 at 1e-17). They are scaled by a power of two that brings the largest to
        # about 1, and every gradient returned (linear in them) is scaled back: exact.
        scale = _power_of_two_scale(dy, dstate)
        dy = dy.contiguous() if scale == 1.0 else dy * scale
        dstate = dstate if scale == 1.0 else dstate * scale
        chunk_decay = _per_head(grow[:, :, :, -1])[..., None, None]  # (C, B, H, 1, 1)
        q_chunks, k_chunks = _chunks(q, L), _chunks(k, L)  # (C, B, G, L, N) views
        dq_out, dk_out, dv_out = q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)  # (B, T, G or H, .)
        dq_chunks, dk_chunks = _chunks(dq_out, L), _chunks(dk_out, L)  # (C, B, G, L, N) views
        side_by_side_chunks = (_chunks(_side_by_side(x, groups), L) for x in (v, dy, dv_out))
        v_chunks, dy_chunks, dv_chunks = side_by_side_chunks  # (C, B, G, L, R * P) views
        # cs_i enters as exp(cs_i) on y_i, as exp(-cs_i) on v'_i and, at i = L, as exp(cs_L) on the state leaving
        # the chunk: d cs_i = dy_i . y_i - dv'_i . v'_i (+ <dS_out, S_out> at i = L), per head.
        dcs = _row_dots(dy, y)  # (B, T, H): the first term; the others are added below
        dcs_chunks = _chunks_by_group(dcs, L, groups)  # (C, B, G, L, R) view
        d_end = dcs.new_empty(len(qk), B, dstate.shape[1])  # (C, B, H): <dS_out, S_out>
        sets = _chunk_groups(q, k, v, L)
        work = _Workspace(sets)
        d_carry = dstate  # the gradient of the state leaving the set's last chunk: the final state's, at first
        wide = v.shape[2] * v.shape[3] // groups  # R * P: a group's heads side by side
        # Each set's products are batched over (Gc, B, G), flattened: M = Gc * B * G matrices.
        for g in reversed(sets):  # the scan runs backwards: the last set of chunks first
            q_g, k_g = work.copy("q", q_chunks[g]).flatten(0, 2), work.copy("k", k_chunks[g]).flatten(0, 2)  # (M, L, N)
            v_set = _scale_heads(v_chunks[g], shrink[g], out=work.like("v", v_chunks[g]))  # (Gc, B, G, L, R * P): v'
            dy_set = _scale_heads(dy_chunks[g], grow[g], out=work.like("dy", dy_chunks[g]))  # the gradient of y/exp(cs)
            v_g, dy_g = v_set.flatten(0, 2), dy_set.flatten(0, 2)  # (M, L, R * P)
            # 3. The scan backwards, in place, from 4.'s direct part. dstates[c] is the gradient of the state entering
            # the set's chunk c, dstates[c + 1] of the state leaving it; dstates[0] is the carry to the set before.
            dstates = work.extended("dstates", states[g])  # (Gc + 1, B, H, P, N)
            dstates[-1] = d_carry  # (before the product below: the carry may be the buffer's first row)
            torch.bmm(dy_g.mT, q_g, out=dstates[:-1].view(-1, wide, dstates.shape[-1]))
            _carry_between_chunks(dstates.unbind(), chunk_decay[g].unbind(), reverse=True)
            d_carry = dstates[0]
            d_out = dstates[1:]  # (Gc, B, H, P, N): the gradients of the states leaving the set's chunks
            torch.linalg.vecdot(d_out.flatten(-2), states[g.start + 1 : g.stop + 1].flatten(-2), out=d_end[g])
            d_own = d_out.mul_(chunk_decay[g]).view(-1, wide, d_out.shape[-1])  # in place: the gradient of v'^T k
            s_in = states[g].view(-1, wide, d_out.shape[-1])  # (M, R * P, N)

            dqk = torch.bmm(dy_g, v_g.mT, out=work.like("dqk", qk[g]).flatten(0, 2)).tril_()  # 1.  (M, L, L)
            dv_set = work.like("dv", v_set)  # (Gc, B, G, L, R * P): the gradient of v'
            torch.bmm(qk[g].flatten(0, 2).mT, dy_g, out=dv_set.flatten(0, 2)).baddbmm_(k_g, d_own.mT)  # 1. + 2.
            dq, dk = work.like("dq", q_chunks[g]), work.like("dk", k_chunks[g])  # (Gc, B, G, L, N) each
            torch.bmm(dqk, k_g, out=dq.flatten(0, 2)).baddbmm_(dy_g, s_in)  # 1. + 4.
            torch.bmm(dqk.mT, q_g, out=dk.flatten(0, 2)).baddbmm_(v_g, d_own)  # 1. + 2.
            dcs_chunks[g].sub_(_row_dots(_heads_apart(dv_set, per_group), _heads_apart(v_set, per_group)))  # per head
            dq_chunks[g].copy_(dq)
            dk_chunks[g].copy_(dk)
            _scale_heads(dv_set, shrink[g], out=dv_chunks[g])

        per_chunk = dcs.view(B, len(qk), L, dcs.shape[-1])  # (B, C, L, H)
        per_chunk[:, :, -1] += d_end.transpose(0, 1)
        da = per_chunk.flip(2).cumsum(2).flip(2).view(dcs.shape)  # cs = cumsum(a)  =>  da_j = sum_{i >= j} dcs_i
        d_initial = d_carry.clone()  # (B, H, P, N)
        if scale != 1.0:
            for grad in (dq_out, dk_out, dv_out, da, d_initial):
                grad.div_(scale)
        return dq_out, dk_out, dv_out, da, d_initial, None


def _power_of_two_scale(*tensors) -> float:
    """1, or the power of two that brings the largest magnitude in `tensors` to [1, 2) when it lies outside
    [2^-24, 2^24] (one pass and a sync each: the factorised path runs on CPU only)."""
    ranges = [torch.aminmax(t) for t in tensors if t.numel()]  # (one pass each: 10x faster than vector_norm(inf))
    largest = max((max(-float(low), float(high)) for low, high in ranges), default=0.0)
    if largest == 0.0 or not math.isfinite(largest) or 2.0**-24 <= largest <= 2.0**24:
        return 1.0
    return 2.0 ** -math.floor(math.log2(largest))


def _side_by_side(x, groups):
    """(B, T, H, P) -> (B, T, G, R * P): each group's R heads side by side (head h = g * R + r); a view if x allows."""
    return x.reshape(*x.shape[:2], groups, x.shape[2] * x.shape[3] // groups)


def _chunks_by_group(a, L, groups):
    """(B, T, H) per-head values -> (C, B, G, L, R), a view: the chunk-major layout of `_side_by_side` tensors."""
    B, T, H = a.shape
    return a.view(B, T // L, L, groups, H // groups).permute(1, 0, 3, 2, 4)


def _per_head(x):
    """(C, B, G, R) -> (C, B, H), a copy."""
    return x.reshape(*x.shape[:2], x.shape[2] * x.shape[3])


def _scale_heads(x, factor, out):
    """x (..., L, R * P), a group's heads side by side, times factor (..., L, R), one per row and head
    -> out (..., L, R * P), any view."""
    per_group = factor.shape[-1]
    if per_group == 1:  # one head per group: factor broadcasts as it is
        return torch.mul(x, factor, out=out)
    torch.mul(_heads_apart(x, per_group), factor.unsqueeze(-1), out=_heads_apart(out, per_group))
    return out


def _heads_apart(x, per_group):
    """(..., R * P) -> (..., R, P), a view: the heads of a group that stand side by side, apart. (view, not unflatten:
    it is called in the factorised scan's loop, where unflatten's Python wrapper shows.)"""
    return x.view(*x.shape[:-1], per_group, x.shape[-1] // per_group)


class _Workspace:
    """The temporaries of a call's sets of chunks (`_chunk_groups`), each allocated once, for the largest set, and
    reused by every set: the same memory stays in cache from set to set, and no set makes fresh tensors (which can
    cost page faults under glibc's malloc). Measured against a fresh tensor per set and a full-size state gradient in
    the backward: forward+backward at T=2048 (B=2, H=8, N=P=64) 4-11% faster on 2 cores."""

    def __init__(self, sets):
        self.largest = max(s.stop - s.start for s in sets)
        self.buffers = {}

    def like(self, name, x):
        """Buffer `name`, uninitialised and contiguous, in the shape of x (Gc, ...), a set's tensor."""
        return self._rows(name, x, x.shape[0])

    def extended(self, name, x):
        """Buffer `name` in the shape of x (Gc, ...) with one row more: (Gc + 1, ...)."""
        return self._rows(name, x, x.shape[0] + 1)

    def _rows(self, name, x, rows):
        if name not in self.buffers:
            self.buffers[name] = x.new_empty(self.largest + rows - x.shape[0], *x.shape[1:])
        return self.buffers[name][:rows]

    def copy(self, name, x):
        return self.like(name, x).copy_(x)


def _chunk_groups(q, k, v, L):
    """Slices of the chunk axis (T / L chunks of q, k, v (B, T, ., .)), each about _CACHE_BYTES of q, k and v: the
    factorised scan works through its chunks a set at a time, so that a set's temporaries, a few times the size of
    its inputs, stay in cache (and are not page-faulted in afresh, as full-size ones are at every call under glibc's
    malloc). Measured on 2 cores: 1 MiB of v per set suits per-head q and k best, 2 MiB shared ones; this is both."""
    num_chunks = v.shape[1] // L
    chunk_bytes = max(1, (q.numel() + k.numel() + v.numel()) * v.element_size() // num_chunks)  # 1: an empty batch
    sets = -(-num_chunks // max(1, _CACHE_BYTES // chunk_bytes))
    bounds = [round(i * num_chunks / sets) for i in range(sets + 1)]  # sets of equal size, to within one chunk
    return [slice(start, stop) for start, stop in zip(bounds, bounds[1:])]


def _factorised_heads(a, L):
    """Which heads `_FactorizedChunkedScan` applies to, for log decays a (B, T, H): (H,) bool, True where in every
    chunk of L steps (of every batch row) the cumulative sums, with the 0 at the chunk's start, span at most
    -LOG_DECAY_FLOOR (its factors exp(+-cs) stay normal floats), and no step's |a| exceeds FACTORISED_MAX_STEP (its
    log-decay gradient stays accurate). None (no head) on GPUs and while a graph is recorded (graph_capture): reading
    the values would cost a GPU a device sync and a compiled graph a break, and a trace would replay the choice for
    inputs it does not suit; the exact path needs neither."""
    if a.device.type != "cpu" or capturing_graph():
        return None
    a = a.detach()
    spread = _chunk_spreads(a, L)  # (C, B, H)
    mild_steps = (a.abs() <= FACTORISED_MAX_STEP).flatten(0, 1).all(0)  # (H,)
    return (spread <= -LOG_DECAY_FLOOR).flatten(0, 1).all(0) & mild_steps  # (H,)


def _chunk_spreads(a, L):
    """(B, T, H) log decays -> (C, B, H): how far the cumulative sums, with the 0 at the chunk's start, spread in each
    chunk of L steps (in float64)."""
    cs = _chunks(a[..., None], L)[..., 0].to(torch.float64).cumsum(-1)  # (C, B, H, L)
    return cs.amax(-1).clamp(min=0) - cs.amin(-1).clamp(max=0)


def _factorised_path_heads(a, L, q=None, k=None, v=None):
    """The heads `_scan` runs on the factorised path, for log decays a (B, T, H): (H,) bool, or None for none.
    Splitting the heads between the paths costs a copy of the inputs and outputs each way, which pays when at least
    half of them factorise; with fewer, all take the exact path. Given q, k and v, heads whose products could
    overflow float32 there are left out (`_products_stay_finite`)."""
    factorised = _factorised_heads(a, L)
    if factorised is None or 2 * int(factorised.sum()) < len(factorised):
        return None  # (before reading q, k and v: passes over them, for strong gates, which go to the exact path)
    if v is not None:
        factorised = factorised & _products_stay_finite(a, L, q, k, v)
    return None if 2 * int(factorised.sum()) < len(factorised) else factorised


def _products_stay_finite(a, L, q, k, v):
    """(H,) bool: where the factorised scan's products stay below float32's largest value. It scales values by up to
    exp(spread), e^60, before products that sum N * L terms of |q| |k| |v|: with activations of ~1000 at that spread
    they overflowed to inf where the result is ~1e13. Read only when some head's spread passes 30 (below it, that
    takes activations of ~1e7); then the inputs' largest magnitudes are read too (a pass over each)."""
    spreads = _chunk_spreads(a.detach(), L)  # (C, B, H)
    if spreads.numel() == 0:  # an empty batch
        return torch.ones(a.shape[-1], dtype=torch.bool)
    spread = spreads.flatten(0, 1).amax(0)  # (H,): the widest chunk
    if float(spread.max()) <= 30:
        return torch.ones_like(spread, dtype=torch.bool)
    largest = [max(-float(low), float(high), 1e-30) for low, high in (torch.aminmax(x.detach()) for x in (q, k, v))]
    log_products = math.log(q.shape[-1] * L) + sum(math.log(x) for x in largest)  # N * L * |q| |k| |v|, at most
    return spread + log_products <= 80.0  # e^80 ~ 5e34: float32's largest is e^88.7


def _scan(q, k, v, a, state, L):
    """Each head on the fastest path that is exact for it (`_factorised_path_heads`): the factorised scan for the
    heads whose decays factor, the segment-sum scan for the others, so that a few strongly gated heads do not put
    every head on the slower path. Arguments and returns as `_ChunkedScan`'s."""
    factorised = _factorised_path_heads(a, L, q, k, v)
    if factorised is None:
        return _ChunkedScan.apply(q, k, v, a, state, L)
    if factorised.all():
        return _FactorizedChunkedScan.apply(q, k, v, a, state, L)
    heads = [factorised.nonzero()[:, 0], (~factorised).nonzero()[:, 0]]  # ascending head indices of each path
    order, sizes = torch.cat(heads), [len(index) for index in heads]  # the heads reordered: each path's together
    inverse = order.argsort()
    v_parts, a_parts, state_parts = (
        _HeadOrder.apply(x, dim, order, inverse).split(sizes, dim) for x, dim in ((v, 2), (a, 2), (state, 1))
    )
    q_parts, k_parts = (_qk_of_heads(x, heads, order, inverse, v.shape[2]) for x in (q, k))
    inputs = zip(q_parts, k_parts, v_parts, a_parts, state_parts)  # each path's
    parts = [scan.apply(*path_inputs, L) for scan, path_inputs in zip((_FactorizedChunkedScan, _ChunkedScan), inputs)]
    y = _HeadOrder.apply(torch.cat([y_part for y_part, _ in parts], 2), 2, inverse, order)  # (B, T, H, P)
    return y, _HeadOrder.apply(torch.cat([s_part for _, s_part in parts], 1), 1, inverse, order)


def _recordable_scan(q, k, v, a, state, L):
    """`_ChunkedScan`'s algorithm (exact segment sums) in plain differentiable ops: no out=, no writes in place, no
    loop (the scan between chunks is one product, `_between_chunks`). What torch.export and torch.jit.trace record
    (the recorded graph keeps autograd's backward, and the legacy ONNX exporter, to which an autograd.Function is an
    opaque Python op, takes it) and what torch.func transforms (grad, vmap: per-sample gradients). Slower than the
    hand-written scans (every product per head, the L x L decays kept for autograd). Arguments and returns as
    `_ChunkedScan`'s."""
    q, k = _heads_of_groups(q, v.shape[2]), _heads_of_groups(k, v.shape[2])  # (B, T, H, N): everything per head
    q, k, v = (_chunks(x, L) for x in (q, k, v))  # (C, B, H, L, N), (C, B, H, L, N), (C, B, H, L, P) views
    steps = _chunks(a[..., None], L)[..., 0].to(torch.float64)  # (C, B, H, L)
    cs = steps.cumsum(-1)  # (C, B, H, L), as in _ChunkedScan
    segsum = _segment_sums_of_steps(steps).to(q.dtype)  # (C, B, H, L, L)
    decay = segsum.clamp(LOG_DECAY_FLOOR, -LOG_DECAY_FLOOR).exp().tril()  # (C, B, H, L, L)
    y = (decay * (q @ k.transpose(-1, -2))) @ v  # (C, B, H, L, P): within each chunk
    to_end = _decay(cs[..., -1:] - cs, q.dtype)[..., None]  # (C, B, H, L, 1): exp(cs_L - cs_j)
    own = v.transpose(-1, -2) @ (k * to_end)  # (C, B, H, P, N): what each chunk adds to the state
    weights = _between_chunks(cs[..., -1], q.dtype)  # (C + 1, C + 1, B, H)
    states = torch.einsum("cjbh,jbhpn->cbhpn", weights, torch.cat([state[None], own]))  # (C + 1, B, H, P, N)
    from_state = (q * _decay(cs, q.dtype)[..., None]) @ states[:-1].transpose(-1, -2)  # (C, B, H, L, P)
    return _unchunk(y + from_state), states[-1]


class _HeadOrder(torch.autograd.Function):
    """x with its heads (dim `dim`) put in `order`, a permutation of which `inverse` undoes: a copy each way
    (index_select's own backward would fill a zero tensor first and add into it)."""

    @staticmethod
    def forward(ctx, x, dim, order, inverse):
        ctx.dim, ctx.inverse = dim, inverse
        return x.index_select(dim, order)

    @staticmethod
    def backward(ctx, grad):
        return grad.index_select(ctx.dim, ctx.inverse), None, None, None


def _qk_of_heads(x, heads, order, inverse, num_heads):
    """q or k (B, T, G, N) for each path's heads (`heads`: ascending indices into the H heads, `order` them one path
    after the other): one (B, T, G', N) per path, each of its heads in the same place of its group as before. Whole
    groups stay shared."""
    groups = x.shape[2]
    if groups == 1:  # one group: shared by any subset of its heads
        return [x] * len(heads)
    if groups == num_heads:  # one head per group: reordered as v is
        return _HeadOrder.apply(x, 2, order, inverse).split([len(index) for index in heads], 2)
    return [_qk_of_some_heads(x, index, num_heads) for index in heads]


def _qk_of_some_heads(x, heads, num_heads):
    """q or k (B, T, G, N) of 1 < G < H groups for the heads `heads` alone: the groups they fill whole, else one
    group per head."""
    per_group = num_heads // x.shape[2]
    group_of = heads // per_group  # each head's group
    runs = group_of.view(-1, per_group) if len(heads) % per_group == 0 else None
    if runs is not None and bool((runs == runs[:, :1]).all()):  # whole groups
        return x.index_select(2, runs[:, 0])
    return x.index_select(2, group_of)


def _segment_sums_of_steps(a):
    """(..., L) log decays -> (..., L, L): below the diagonal a_{j+1} + ... + a_i, each segment summed from its own
    steps (0 on and above the diagonal). What autograd differentiates in the recordable scan: the gradient of a step
    then adds the gradients of the segments holding it, where that of cs_i - cs_j cancels terms up to exp(|a|) times
    larger than the result (the log decays' float32 gradient came out 16% off for steps of -8 to -16)."""
    L = a.shape[-1]
    later = torch.ones(L, L, dtype=torch.bool, device=a.device).tril(-1)  # (k, j): k > j
    terms = a[..., :, None].expand(*a.shape, L).masked_fill(~later, 0)  # (..., k, j): a_k where k > j
    return terms.cumsum(-2)  # (..., i, j): the sum over j < k <= i


def _segment_sums(cs, dtype):
    """(..., L) float64 cumulative sums -> (..., L, L) cs_i - cs_j in `dtype`, as exact as the result allows.

    In float32, cs is split as hi + lo (two float32 whose sum is cs to float64 precision): the difference
    of the hi parts is rounded relative to the (small) result rather than to the (large) cs, and the lo
    parts restore what rounding cs to float32 lost. So a short segment late in a strongly decaying chunk
    keeps its precision."""
    if dtype == torch.float64:
        return cs[..., :, None] - cs[..., None, :]
    hi = cs.to(dtype)
    lo = (cs - hi).to(dtype)
    segsum = hi[..., :, None] - hi[..., None, :]
    return segsum.add_(lo[..., :, None]).sub_(lo[..., None, :])


def _by_group(x, groups):
    """(C, B, H, ...) -> (C, B, G, R, ...), a view: the heads of each of the G groups (head h in group h // R)."""
    return x.unflatten(2, (groups, -1))


def _sum_over_group(x, groups):
    """(C, B, H, ...) -> (C, B, G, ...): the sum over each group's heads (x itself when every head is a group)."""
    return x if x.shape[2] == groups else _by_group(x, groups).sum(3)


def _group_row_dots(x, y):
    """x (C, B, G, L, D) per group, y (C, B, H, L, D) per head -> (C, B, H, L): each head's row dots with its group's x."""
    groups = x.shape[2]
    if y.shape[2] == groups:
        return _row_dots(x, y)
    return (_by_group(y, groups) * x.unsqueeze(3)).sum(-1).flatten(2, 3)


def _exclusive_cumsum(x):
    """Along the last dim: out[..., t] = sum over j < t of x[..., j]."""
    return F.pad(x[..., :-1].cumsum(-1), (1, 0))


def _row_dots(x, y):
    """(..., D), (..., D) -> (...): each row's dot product, as one batched (1, D) @ (D, 1) matmul: as fast as
    vecdot for D = 64 without its (..., D) temporary (vecdot writes x * y out first). For long rows (a state's
    P * N) batched matmuls of vectors are ~4x slower than vecdot, which is used there."""
    return torch.matmul(x.reshape(-1, 1, x.shape[-1]), y.reshape(-1, y.shape[-1], 1)).view(x.shape[:-1])


@autocast_off
def chunked_scan(q, k, v, log_decay, chunk_size=64, initial_state=None):
    """Chunked (state-space-duality) evaluation of the gated linear recurrence
         S_t = exp(log_decay_t) * S_{t-1} + v_t k_t^T        S: (B, H, P, N)
         y_t = S_t q_t                                        y: (B, T, H, P)

    Args:
        q, k: (B, T, G, N): per head (G = H), or shared by groups of H / G heads (head h uses group h // (H / G)),
            as Mamba-2's C and B are.
        v: (B, T, H, P).
        log_decay: (B, T, H), <= 0: the log of a decay in [0, 1] (-inf: 0, which forgets the state). Positive values
            are refused on CPU; elsewhere they are not checked (that would cost a device sync), and wrong.
        chunk_size: L, the length of a chunk; T need not be a multiple of it.
        initial_state: (B, H, P, N) or None (zeros).

    Returns:
        y: (B, T, H, P) in q's dtype.
        final_state: (B, H, P, N) in initial_state's dtype if given, else q's dtype.

    A position with v = 0 (or k = 0) and log_decay = 0 leaves the state unchanged (padding).
    bf16 / fp16 inputs are computed in float32, float64 in float64.
    The backward may use y itself (as torch.exp's does its output): modifying y in place before the backward makes
    autograd raise, as it does for torch's own ops.
    """
    _check_inputs(q, k, v, log_decay, initial_state, dims=4)
    if not isinstance(chunk_size, numbers.Integral) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}.")
    chunk_size = int(chunk_size)  # (a numpy integer, say, from a sweep)
    if log_decay.device.type == "cpu" and not capturing_graph() and bool((log_decay > 0).any()):
        raise ValueError("log_decay must be <= 0 (the log of a decay in [0, 1]); got positive values, which the "
                         "chunked algorithm cannot take (scan_reference can).")
    B, T, G, N = q.shape
    H, P = v.shape[2], v.shape[3]
    out_dtype, dtype = q.dtype, _compute_dtype(q.dtype)
    state_dtype = initial_state.dtype if initial_state is not None else out_dtype
    state = q.new_zeros(B, H, P, N, dtype=dtype) if initial_state is None else initial_state.to(dtype)
    if T == 0:
        return v.new_zeros(B, 0, H, P, dtype=out_dtype), state.to(state_dtype)
    L = min(chunk_size, T)  # (a chunk past the sequence would only pad it: a chunk of 10**6 allocated 10**6 steps)
    pad = -T % L  # pad the tail with q = k = v = 0, log_decay = 0: the state passes through

    def padded(x):  # (B, T, H, D) -> (B, C * L, H, D): the tail padded with q = k = v = 0, log_decay = 0
        return F.pad(x.to(dtype), (0, 0, 0, 0, 0, pad)) if pad else x.to(dtype)

    # (B, C * L, H). Clamped: -inf (or below) would make inf - inf in the segment sums; exp(-60) is 0 to them anyway.
    log_decay = padded(log_decay[..., None])[..., 0].clamp(min=LOG_DECAY_FLOOR)
    q, k, v = padded(q), padded(k), padded(v)
    scan = _recordable_scan if plain_ops_only() else _scan
    y, state = scan(q, k, v, log_decay, state, L)  # y (B, C * L, H, P)
    y = y[:, :T]
    return y.to(out_dtype), state.to(state_dtype)


def scan_step(q, k, v, log_decay, state):
    """One decode step of the recurrence.

    Args:
        q, k: (B, G, N), per head (G = H) or per group of heads as in `chunked_scan`.  v: (B, H, P).
        log_decay: (B, H).  state: (B, H, P, N), or None (zeros: the first step).

    Returns:
        y: (B, H, P) in q's dtype; new_state: (B, H, P, N) in state's dtype.
    """
    _check_inputs(q, k, v, log_decay, state, dims=3)
    if state is None:
        state = v.new_zeros(*v.shape, q.shape[-1], dtype=q.dtype)  # (B, H, P, N), as chunked_scan's (computed wider)
    if q.shape[-2] != v.shape[-2]:  # shared by groups of heads
        q, k = _heads_of_groups(q, v.shape[-2]), _heads_of_groups(k, v.shape[-2])
    return _step(q, k, v, log_decay, state)


def _step(q, k, v, log_decay, state):
    """`scan_step` with q and k per head, unchecked."""
    out_dtype, dtype = q.dtype, _compute_dtype(q.dtype)
    y, new_state = _recurrence(q.to(dtype), k.to(dtype), v.to(dtype), log_decay.to(dtype).exp(), state.to(dtype))
    return y.to(out_dtype), new_state.to(state.dtype)


def _recurrence(q, k, v, decay, state):
    """One step of the recurrence, in the inputs' dtype: q, k (B, H, N), v (B, H, P), decay (B, H) (exp of the log
    decay), state (B, H, P, N) -> y (B, H, P), the new state."""
    new_state = decay[..., None, None] * state + v[..., :, None] * k[..., None, :]  # (B, H, P, N)
    return (new_state @ q[..., None]).squeeze(-1), new_state  # (B, H, P, N) @ (B, H, N, 1) -> (B, H, P)


def _check_inputs(q, k, v, log_decay, state, dims):
    """The shapes of `chunked_scan` (dims=4: q, k (B, T, G, N), v (B, T, H, P), log_decay (B, T, H)) or of `scan_step`
    (dims=3: the same without T), with G dividing H and state None or (B, H, P, N): a clear error rather than one from
    deep in the products, or (in the reference's loop) a silent truncation or broadcast."""
    tensors = [t for t in (q, k, v, log_decay, state) if t is not None]
    if not all(isinstance(t, torch.Tensor) and t.is_floating_point() for t in tensors):
        raise ValueError("q, k, v, log_decay and the state must be real floating-point tensors, got "
                         f"{[t.dtype if isinstance(t, torch.Tensor) else type(t).__name__ for t in tensors]}.")
    ranks_ok = q.dim() == k.dim() == v.dim() == dims
    groups, heads = (q.shape[-2], v.shape[-2]) if ranks_ok else (0, 0)
    state_shape = (v.shape[0], heads, v.shape[-1], q.shape[-1]) if ranks_ok else None
    if not (
        ranks_ok and k.shape == q.shape and groups >= 1 and heads % groups == 0
        and min(heads, q.shape[-1], v.shape[-1]) >= 1
        and q.shape[:-2] == v.shape[:-2] and log_decay.shape == v.shape[:-1]
        and (state is None or tuple(state.shape) == state_shape)
    ):
        lead = "B, T" if dims == 4 else "B"
        raise ValueError(
            f"Expected q and k ({lead}, G, N), v ({lead}, H, P) and log_decay ({lead}, H) with the same "
            f"leading sizes, G dividing H, and a state (B, H, P, N); got q {tuple(q.shape)}, k {tuple(k.shape)}, "
            f"v {tuple(v.shape)}, log_decay {tuple(log_decay.shape)}, state "
            f"{None if state is None else tuple(state.shape)}."
        )


def _heads_of_groups(t: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(..., G, N) -> (..., H, N): each group's q or k for each of its H / G heads (head h uses group h // (H / G)).
    A stride-0 view where it can be one (G == 1), else a copy."""
    groups = t.shape[-2]
    return t.unsqueeze(-2).expand(*t.shape[:-1], num_heads // groups, t.shape[-1]).flatten(-3, -2)


def scan_reference(q, k, v, log_decay, initial_state=None):
    """Ground truth: a plain loop over time, in float32 (float64 for float64 inputs).

    Same arguments and returns as `chunked_scan` (without chunk_size).
    """
    _check_inputs(q, k, v, log_decay, initial_state, dims=4)
    B, T, _, N = q.shape
    H, P = v.shape[2], v.shape[3]
    out_dtype, dtype = q.dtype, _compute_dtype(q.dtype)
    state_dtype = initial_state.dtype if initial_state is not None else q.dtype
    # Cast and exponentiated once, outside the loop: its body is the recurrence alone (`_step` without the casts).
    q, k = _heads_of_groups(q.to(dtype), H), _heads_of_groups(k.to(dtype), H)
    v, decay = v.to(dtype), log_decay.to(dtype).exp()
    state = q.new_zeros(B, H, P, N) if initial_state is None else initial_state.to(dtype)
    ys = []
    # unbind (not q[:, t]): its backward is one stack, not T full-size zero tensors
    for q_t, k_t, v_t, decay_t in zip(q.unbind(1), k.unbind(1), v.unbind(1), decay.unbind(1)):
        y_t, state = _recurrence(q_t, k_t, v_t, decay_t, state)  # (B, H, P), (B, H, P, N)
        ys.append(y_t)
    y = torch.stack(ys, 1) if ys else v.new_zeros(B, 0, H, P)  # (B, T, H, P)
    return y.to(out_dtype), state.to(state_dtype)

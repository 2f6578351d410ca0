"""Mamba-2 mixer: in-projection, short causal depthwise conv, SSD scan, gated RMSNorm, out-projection.

The SSD layer is the gated linear recurrence of `ops_chunked_scan` with, per head h,

    dt = softplus(dt_raw + dt_bias),  A = -exp(A_log)
    v = x * dt,  k = B,  q = C (B and C shared by the heads of a group),  log_decay = dt * A
    y = scan(q, k, v, log_decay) + D * x

Three paths that agree: the full-sequence forward and the chunked prefill from a cached state (both
`ops_ssd.ssd_chunked`, i.e. `ops_chunked_scan.chunked_scan`; or mamba_ssm's kernel on CUDA), and the
single-step decode (`scan_step` and one conv step). Cached state per layer: {"conv": (B, conv_dim, K-1)
last K-1 conv inputs, "ssm": (B, H, P, N)}.

Padding never enters a state. Before the conv, each row's real tokens are moved to the front (in
order) and the conv output is moved back, so the conv only ever sees real tokens and its cached state
is the last K-1 *real* inputs, whatever the padding side. Pads get dt = 0, i.e. v = 0 and decay 1:
the SSM state passes them unchanged.

Shapes: B batch, T time, H heads, P head dim, G groups, N state size, K conv kernel.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from .kernels_mamba2 import conv1d_backend, conv1d_kernel, mamba2_backend, ssd_kernel
from .mixer_context import real_tokens_first
from .mixer_token_blocks import forward_in_cpu_token_blocks
from .ops_causal_conv import causal_conv
from .ops_chunked_scan import scan_step
from .ops_rms_norm import RMSNormFunction, fast_path_applies, rms_norm
from .ops_ssd import ssd_chunked


def init_copy(init, parameter, value):
    """`init.copy_` (transformers >= 5: skips weights loaded from a checkpoint), or a plain copy on 4.x."""
    copy = getattr(init, "copy_", None)
    if copy is not None:
        return copy(parameter, value)
    with torch.no_grad():
        return parameter.copy_(value)


def init_conv(init, conv):
    """The short conv's initialisation: nn.Conv1d's weights, a zero bias (as transformers' Mamba2)."""
    init.kaiming_uniform_(conv.weight, a=math.sqrt(5))
    init.zeros_(conv.bias)


class GatedRMSNorm(nn.Module):
    """Mamba-2's output norm: RMSNorm(y * silu(z)) per group of channels, computed in float32."""

    def __init__(self, width: int, group_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.group_size = group_size
        self.eps = eps

    def forward(self, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        dtype = gate.dtype  # the model's dtype (y may come out of the scan in float32)
        compute_dtype = torch.promote_types(dtype, torch.float32)  # float32, or float64 for a float64 model
        y = y.to(compute_dtype) * F.silu(gate.to(compute_dtype))
        # Returned in the model's dtype also where the weight is kept in float32 in a half model (norms in float32)
        if self.group_size == y.shape[-1] and fast_path_applies(y, self.weight):
            return RMSNormFunction.apply(y, self.weight, self.eps).to(dtype)  # one group: the fast CPU backward
        groups = y.unflatten(-1, (-1, self.group_size))  # (..., G, width / G)
        y = rms_norm(groups, (self.group_size,), eps=self.eps).flatten(-2)  # (..., width)
        return (self.weight * y.to(dtype)).to(dtype)

    def init_mixer_weights(self, init):
        init.ones_(self.weight)

    def reset_parameters(self):
        """torch's deferred-initialisation recipe (to_empty(), then each module's reset_parameters; FSDP's default):
        the model's own initialisation."""
        self.init_mixer_weights(nn.init)


class ShortCausalConv(nn.Module):
    """Mamba-2's causal depthwise conv + SiLU over (B, T, C), from a cached state, padding-aware.

    The parameters, their names and their init are a depthwise nn.Conv1d's (weight (C, 1, K), bias (C)), but it is
    not one: its forward takes the conv state, so tools that adapt or replace convolutions by their class (PEFT's
    LoRA builds a conv of the same class and calls it as a plain conv) would break it; they refuse it instead. The
    weights are read inside this module's own call, so accelerate's offload hooks load them first.
    """

    def __init__(self, channels: int, kernel: int):
        super().__init__()
        self.kernel_size = (kernel,)
        self.weight = nn.Parameter(torch.empty(channels, 1, kernel))
        self.bias = nn.Parameter(torch.empty(channels))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # nn.Conv1d's init, drawn in its order
        nn.init.uniform_(self.bias, -(kernel**-0.5), kernel**-0.5)  # (fan-in of a depthwise conv: its kernel)

    def reset_parameters(self):
        """As the model initialises it (Mamba2Mixer.init_mixer_weights), for torch's deferred-initialisation recipe."""
        init_conv(nn.init, self)

    def forward(self, xBC, conv_state, mask, keep_state, decode=False):
        if decode:
            return self._step(xBC, conv_state, mask)
        return self._full(xBC, conv_state, mask, keep_state)

    def _full(self, xBC, conv_state, mask, keep_state):
        """Causal conv + SiLU over (B, T, conv_dim), from `conv_state` (B, conv_dim, K-1) or zeros.

        Returns the output (B, T, conv_dim) and, with keep_state, the last K-1 real inputs.
        """
        batch, length, channels = xBC.shape
        order = None
        if mask is not None:
            # Real tokens first, in order, so the conv never sees a pad (works for left, right and holes).
            order = real_tokens_first(mask)[..., None].expand_as(xBC)  # (B, T, C)
            xBC = xBC.gather(1, order)
        weight, bias, kernel = self.weight[:, 0], self.bias, self.kernel_size[0]  # weight (C, K)

        past = None if conv_state is None else conv_state.transpose(1, 2).to(xBC.dtype)  # (B, K-1, C)
        if conv1d_backend(xBC.device, xBC.dtype, kernel, fresh=past is None and mask is None) == "causal_conv1d":
            out = conv1d_kernel(xBC.transpose(1, 2), weight, bias).transpose(1, 2)  # (B, T, C)
        else:
            out = F.silu(causal_conv(xBC, weight, bias, past))  # (B, T, C)

        new_state = None
        if keep_state:
            if past is None:
                past = xBC.new_zeros(batch, kernel - 1, channels)
            window = torch.cat([past, xBC], dim=1)  # (B, K-1 + T, C): the inputs the conv has seen
            real = mask.sum(1) if mask is not None else torch.full((batch,), length, device=xBC.device)
            # The row's last K-1 inputs end where its real tokens end: window[:, real : real + K-1].
            index = real[:, None] + torch.arange(kernel - 1, device=xBC.device)  # (B, K-1)
            new_state = window.gather(1, index[..., None].expand(-1, -1, channels)).transpose(1, 2).contiguous()
        if order is not None:
            out = torch.empty_like(out).scatter(1, order, out)  # back to the original positions
        return out, new_state

    def _step(self, xBC, conv_state, mask):
        """One token: xBC (B, 1, C). A pad token leaves the conv state unchanged."""
        batch, _, channels = xBC.shape
        if conv_state is None:
            conv_state = xBC.new_zeros(batch, channels, self.kernel_size[0] - 1)
        window = torch.cat([conv_state.to(xBC.dtype), xBC.transpose(1, 2)], dim=-1)  # (B, C, K)
        out = (window * self.weight[:, 0]).sum(-1) + self.bias  # (B, C)
        new_state = window[..., 1:].contiguous()  # laid out as the prefill's (a compiled step would recompile)
        if mask is not None:
            new_state = torch.where(mask[:, :, None], new_state, conv_state)
        return F.silu(out)[:, None], new_state  # (B, 1, C)


class Mamba2Mixer(nn.Module):
    """The Mamba-2 block (without its residual and pre-norm, which the SeqArchBlock supplies)."""

    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.inner_size = config.mamba_expand * config.hidden_size
        self.head_dim = config.mamba_head_dim  # P
        self.num_heads = self.inner_size // self.head_dim  # H
        self.state_size = config.mamba_state_size  # N
        self.n_groups = config.mamba_n_groups  # G: the heads of a group share B and C
        self.conv_kernel = config.mamba_conv_kernel  # K
        self.chunk_size = config.mamba_chunk_size
        self.conv_dim = self.inner_size + 2 * self.n_groups * self.state_size  # channels of xBC
        # One projection gives every input of the block: gate z, conv input xBC = (x, B, C), time step dt.
        self.in_proj = nn.Linear(config.hidden_size, self.inner_size + self.conv_dim + self.num_heads, bias=False)
        self.conv1d = ShortCausalConv(self.conv_dim, self.conv_kernel)
        self.dt_bias = nn.Parameter(torch.empty(self.num_heads))
        self.A_log = nn.Parameter(torch.empty(self.num_heads))
        self.D = nn.Parameter(torch.empty(self.num_heads))
        self.norm = GatedRMSNorm(self.inner_size, self.inner_size // self.n_groups, config.rms_norm_eps)
        self.out_proj = nn.Linear(self.inner_size, config.hidden_size, bias=False)
        self.init_mixer_weights(nn.init)  # usable on its own; the model re-initialises through transformers

    def init_mixer_weights(self, init):
        """mamba_ssm's initialisation: A in [1, 16], dt log-uniform in [1e-3, 1e-1] (stored as softplus^-1), D = 1."""
        heads = self.num_heads
        dt = torch.exp(torch.rand(heads) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3)).clamp(min=1e-4)
        init_copy(init, self.dt_bias, dt + torch.log(-torch.expm1(-dt)))  # inverse of softplus
        init_copy(init, self.A_log, torch.empty(heads).uniform_(1, 16).log())
        init.ones_(self.D)
        init_conv(init, self.conv1d)

    def reset_parameters(self):
        """torch's deferred-initialisation recipe (to_empty(), then each module's reset_parameters; FSDP's default):
        the model's own initialisation."""
        self.init_mixer_weights(nn.init)

    def forward(self, hidden_states: torch.Tensor, context) -> torch.Tensor:
        # A long causal sequence on CPU runs in blocks of tokens whose activations malloc keeps (mixer_token_blocks).
        bytes_per_token = self.in_proj.out_features * hidden_states.element_size()  # the widest activation
        return forward_in_cpu_token_blocks(self._forward, hidden_states, context, bytes_per_token, self.chunk_size)

    def _forward(self, hidden_states: torch.Tensor, context) -> torch.Tensor:
        z, xBC, dt = self.in_proj(hidden_states).split([self.inner_size, self.conv_dim, self.num_heads], dim=-1)
        scan_dtype = torch.promote_types(dt.dtype, torch.float32)  # float32, or float64 for a float64 model
        dt = F.softplus(dt.to(scan_dtype) + self.dt_bias.to(scan_dtype))  # (B, T, H), > 0
        mask = context.token_mask  # (B, T) or None
        if mask is not None:
            dt = dt * mask[..., None]  # pads: v = 0 and decay exp(0) = 1, the SSM state passes them unchanged

        cache = context.cache
        if context.causal:
            state = cache.get_state(self.layer_idx) if cache is not None else None
            y, state = self._scan(xBC, dt, mask, state, keep_state=cache is not None)
            if cache is not None:
                cache.set_state(self.layer_idx, state)
        else:
            # Encoder: the same conv and SSM also run over the reversed sequence; the two directions add.
            y, _ = self._scan(xBC, dt, mask, None, keep_state=False)
            flipped_mask = None if mask is None else mask.flip(1)
            y_backward, _ = self._scan(xBC.flip(1), dt.flip(1), flipped_mask, None, keep_state=False)
            y = y + y_backward.flip(1)
        if mask is not None:
            y = y * mask[..., None].to(y.dtype)  # pads output zeros, as the other mixers' pads do
        return self.out_proj(self.norm(y, z))  # (B, T, width)

    def _scan(self, xBC, dt, mask, state, keep_state):
        """Conv and SSM in one direction. xBC (B, T, conv_dim), dt (B, T, H). Returns y (B, T, inner) and the new state.

        keep_state: a cache wants the final state (and a one-token forward takes the decode path).
        """
        batch, length, _ = xBC.shape
        decode = keep_state and length == 1
        conv_state = None if state is None else state["conv"]
        ssm_state = None if state is None else state["ssm"]
        xBC, conv_state = self.conv1d(xBC, conv_state, mask, keep_state, decode=decode)
        x, B, C = xBC.split([self.inner_size, self.n_groups * self.state_size, self.n_groups * self.state_size], -1)
        x = x.view(batch, length, self.num_heads, self.head_dim)  # (B, T, H, P)
        B = B.view(batch, length, self.n_groups, self.state_size)  # (B, T, G, N)
        C = C.view(batch, length, self.n_groups, self.state_size)
        A = -torch.exp(self.A_log.to(dt.dtype))  # (H,), < 0; dt is in the scan's dtype (float32 or float64)
        if ssm_state is not None:
            ssm_state = ssm_state.to(dt.dtype)  # (filled before the model was cast: another dtype)
        elif keep_state:
            ssm_state = x.new_zeros(batch, self.num_heads, self.head_dim, self.state_size, dtype=dt.dtype)

        if decode:
            y, ssm_state = self._ssm_step(x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], ssm_state)
            y = y[:, None]  # (B, 1, H, P)
        elif mamba2_backend(x.device, x.dtype) == "mamba_ssm":
            y, ssm_state = ssd_kernel(x, dt, A, B, C, self.chunk_size, ssm_state)
        else:
            y, ssm_state = ssd_chunked(x, dt, A, B, C, self.chunk_size, ssm_state)
        y = torch.addcmul(y, self.D[:, None].to(y.dtype), x)  # (B, T, H, P): y + D x, the skip connection
        new_state = {"conv": conv_state, "ssm": ssm_state} if keep_state else None
        return y.reshape(batch, length, self.inner_size), new_state

    # -- SSM ----------------------------------------------------------------------------------------
    def _ssm_step(self, x, dt, A, B, C, ssm_state):
        """One token: x (B, H, P), dt (B, H), B/C (B, G, N). In the scan's dtype (dt's: float32 or float64), as
        ssd_chunked computes the full forward: y, returned in C's dtype, would overflow float16 where the full
        forward's does not."""
        C, B, x = (t.to(dt.dtype) for t in (C, B, x))
        return scan_step(C, B, x * dt[..., None], dt * A, ssm_state)

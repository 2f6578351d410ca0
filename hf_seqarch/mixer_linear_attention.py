"""Linear attention mixer: causal attention without softmax, as a recurrence with a constant-size state.

With a feature map phi (elu + 1 by default, or relu: positive; or identity) and an optional learned per-head decay
gamma_h in (0, 1),

    S_t = gamma_h * S_{t-1} + v_t phi(k_t)^T        S: (B, H, P, N)
    y_t = S_t phi(q_t)

which is `ops_chunked_scan` with log_decay = log(gamma_h) (0 without decay). Instead of dividing by
a normaliser sum_j phi(q_t).phi(k_j) (unstable in low precision), each head's output goes through
an RMSNorm, as in RetNet / GLA. Three paths that agree: full forward and chunked prefill from a cached
state (`chunked_scan`), single-step decode (`scan_step`). Cached state per layer: {"state": (B, H, P, N)}.

Padding never enters the state: pads get v = 0 and log_decay = 0, which leaves S unchanged wherever
the pad is (left, right, holes), with or without a cached state.
"""

import torch
import torch.nn.functional as F
from torch import nn

from .mixer_token_blocks import forward_in_cpu_token_blocks
from .ops_chunked_scan import chunked_scan, scan_step
from .ops_rms_norm import RMSNorm

def elu_plus_one(x):
    """Positive and smooth, as in Katharopoulos et al. (2020)."""
    return F.elu(x) + 1


def identity(x):
    return x


# Module-level functions, not lambdas: a mixer holds one, and a model must pickle (torch.save(model), deepcopy).
FEATURE_MAPS = {"elu": elu_plus_one, "relu": F.relu, "identity": identity}


class LinearAttentionMixer(nn.Module):
    """q/k/v projections, feature map, (decayed) linear-attention scan, per-head RMSNorm, output projection."""

    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.linear_attention_heads_in_use  # H
        self.head_dim = config.linear_attention_head_dim_in_use  # N = P
        self.chunk_size = config.linear_attention_chunk_size
        self.feature_map = FEATURE_MAPS[config.linear_attention_feature_map]
        width, inner = config.hidden_size, self.num_heads * self.head_dim
        self.q_proj = nn.Linear(width, inner, bias=False)
        self.k_proj = nn.Linear(width, inner, bias=False)
        self.v_proj = nn.Linear(width, inner, bias=False)
        # gamma_h = sigmoid(decay_logit_h): a per-head forgetting rate, learned.
        self.decay_logit = nn.Parameter(torch.empty(self.num_heads)) if config.linear_attention_use_decay else None
        self.out_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)  # per head (nn.RMSNorm, faster CPU backward)
        self.o_proj = nn.Linear(inner, width, bias=False)
        self.init_mixer_weights(nn.init)  # usable on its own; the model re-initialises through transformers

    def init_mixer_weights(self, init):
        """RetNet's decays, gamma_h = 1 - 2^(-5 - 7 h / H): memory spans from ~32 to ~4096 tokens across heads."""
        if self.decay_logit is None:
            return
        gamma = 1 - 2.0 ** (-5 - 7 * torch.arange(self.num_heads, dtype=torch.float32) / self.num_heads)
        logit = torch.log(gamma) - torch.log1p(-gamma)
        copy = getattr(init, "copy_", None)
        if copy is not None:
            copy(self.decay_logit, logit)
        else:  # torch.nn.init (transformers 4.x) has no copy_
            with torch.no_grad():
                self.decay_logit.copy_(logit)

    def reset_parameters(self):
        """torch's deferred-initialisation recipe (to_empty(), then each module's reset_parameters; FSDP's default):
        the model's own initialisation of the decays."""
        self.init_mixer_weights(nn.init)

    def forward(self, hidden_states: torch.Tensor, context) -> torch.Tensor:
        # A long causal sequence on CPU runs in blocks of tokens whose activations malloc keeps (mixer_token_blocks).
        bytes_per_token = self.num_heads * self.head_dim * max(hidden_states.element_size(), 4)  # q, k or v
        return forward_in_cpu_token_blocks(self._forward, hidden_states, context, bytes_per_token, self.chunk_size)

    def _forward(self, hidden_states: torch.Tensor, context) -> torch.Tensor:
        batch, length, _ = hidden_states.shape
        shape = (batch, length, self.num_heads, self.head_dim)
        q = self.feature_map(self.q_proj(hidden_states).view(shape)) * self.head_dim**-0.5  # (B, T, H, N)
        k = self.feature_map(self.k_proj(hidden_states).view(shape))  # (B, T, H, N)
        v = self.v_proj(hidden_states).view(shape)  # (B, T, H, P)
        # The scan and the norm after it run in at least float32: without decay the outputs grow with length
        # (past fp16's 65504 within a few thousand tokens), and only the norm brings them back to scale.
        scan_dtype = torch.promote_types(v.dtype, torch.float32)
        q, k, v = q.to(scan_dtype), k.to(scan_dtype), v.to(scan_dtype)
        if self.decay_logit is None:
            log_decay = hidden_states.new_zeros(batch, length, self.num_heads, dtype=scan_dtype)
        else:
            log_decay = F.logsigmoid(self.decay_logit.to(scan_dtype)).expand(batch, length, -1)  # (B, T, H)
        mask = context.token_mask
        if mask is not None:  # pads: v = 0 and decay 1, the state passes them unchanged
            v = v * mask[:, :, None, None].to(v.dtype)
            log_decay = log_decay * mask[..., None]

        cache = context.cache
        if context.causal:
            state = None
            if cache is not None:
                cached = cache.get_state(self.layer_idx)
                if cached is not None:
                    state = cached["state"].to(scan_dtype)  # (filled before the model was cast: another dtype)
                else:  # the first forward of a cache starts from the zero state, kept in float32 (float64 models: 64)
                    state = q.new_zeros(batch, self.num_heads, self.head_dim, self.head_dim, dtype=scan_dtype)
            if cache is not None and length == 1:
                y, state = scan_step(q[:, 0], k[:, 0], v[:, 0], log_decay[:, 0], state)
                y = y[:, None]  # (B, 1, H, P)
            else:
                y, state = chunked_scan(q, k, v, log_decay, self.chunk_size, state)
            if cache is not None:
                cache.set_state(self.layer_idx, {"state": state})
        else:
            # Encoder: a forward and a backward scan over the same features; the two directions add.
            y, _ = chunked_scan(q, k, v, log_decay, self.chunk_size)
            y_backward, _ = chunked_scan(q.flip(1), k.flip(1), v.flip(1), log_decay.flip(1), self.chunk_size)
            y = y + y_backward.flip(1)

        y = self.out_norm(y).to(hidden_states.dtype)  # (B, T, H, P)
        if mask is not None:
            y = y * mask[:, :, None, None].to(y.dtype)  # pads output zeros, as the other mixers' pads do
        return self.o_proj(y.reshape(batch, length, self.num_heads * self.head_dim))  # (B, T, width)

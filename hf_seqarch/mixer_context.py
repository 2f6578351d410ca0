"""MixerContext: what the model hands every token mixer for one forward.

The model builds it once; each mixer reads what it needs, so the model never asks which mixer it drives.
"""

from dataclasses import dataclass, field

import torch


@dataclass
class MixerContext:
    # (B, past + T) bool, True at real tokens; None when every position is real.
    padding_mask: torch.Tensor | None
    # (B, T) positions of the new tokens, for rotary embeddings.
    position_ids: torch.Tensor
    # Tokens already in the cache before this forward (0 without a cache).
    past_length: int
    # SeqArchCache to read and update, or None (no caching).
    cache: object | None
    # False in encoder mode (bidirectional=True).
    causal: bool
    # Rotary (cos, sin), each (B, T, head_dim), or None if the stack has no attention layer.
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None
    # Values computed once per forward and shared by the layers that need them (attention masks).
    memo: dict = field(default_factory=dict)
    # output_attentions: a list the attention layers append their (B, heads, T, K) probabilities to; else None.
    attentions: list | None = None

    @property
    def token_mask(self) -> torch.Tensor | None:
        """(B, T) bool mask of the new tokens only, None when all are real. Recurrent mixers gate on it."""
        if self.padding_mask is None:
            return None
        return self.padding_mask[:, self.past_length :]


def real_tokens_first(mask: torch.Tensor) -> torch.Tensor:
    """(B, T) indices that put each row's real tokens first, in their order, pads after.

    Gathering with them lets a recurrence run over real tokens only (left, right or holed padding alike);
    scattering with them puts the outputs back in place.
    """
    return torch.argsort((~mask).to(torch.int8), dim=1, stable=True)

"""MixerContext: what the model hands every token mixer for one forward.

The model builds it once; each mixer reads what it needs, so the model never asks which mixer it drives.
"""

from dataclasses import dataclass, field, replace

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
    # This context's copies on other devices, by device: see `to`.
    on_devices: dict = field(default_factory=dict, repr=False, compare=False)

    def to(self, device, non_blocking: bool = False) -> "MixerContext":
        """This context with its tensors on `device`: itself if they are there, else one copy per device (kept).

        For a model whose layers are split across devices (device_map): each block reads the context where it runs
        (the model hands every block this one; accelerate's hooks call `to` too, as for any argument that has one).
        The copies share the cache (each layer keeps its state beside it) and the output_attentions list; each has its
        own memo (its masks on its device).
        """
        device = torch.device(device)
        mask = self.padding_mask
        if self.position_ids.device == device and (mask is None or mask.device == device):  # (both: given apart)
            return self
        if device not in self.on_devices:
            def move(x):
                return None if x is None else x.to(device, non_blocking=non_blocking)

            embeddings = self.position_embeddings
            self.on_devices[device] = replace(
                self,
                padding_mask=move(self.padding_mask),
                position_ids=move(self.position_ids),
                position_embeddings=None if embeddings is None else tuple(move(x) for x in embeddings),
                memo={},
                on_devices={},  # (its own: a shared one would make each copy part of a reference cycle)
            )
        return self.on_devices[device]

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
    length = mask.shape[1]
    # Distinct keys (pads shifted up by T), so that a plain sort keeps each row's order: ONNX has no stable sort.
    keys = (~mask).long() * length + torch.arange(length, device=mask.device)  # (B, T)
    return torch.argsort(keys, dim=1)

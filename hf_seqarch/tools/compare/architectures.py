"""The architectures `compare` sets side by side, and how their sizes are matched.

An architecture is a per-layer list of mixers at the preset's depth. Parameter matching: width, depth,
heads and vocabulary are the same for all; each architecture's MLP width is set so that its
non-embedding parameters (all but the tied byte embedding, the same for all at equal width) match
the transformer's with MLP ratio `mlp_ratio`. A mixer with more parameters than attention (LSTM:
8 width^2 against 4 width^2) thus gets a narrower MLP, and one with fewer a wider MLP: the budget is
spent on the same residual stream, the mixer itself is never altered.
"""

import torch

from ...configuration_seqarch import SeqArchConfig
from ...modeling_seqarch import MIXER_CLASSES, SeqArchForCausalLM

# name -> (description, mixer of the even layers, mixer of the odd layers). Order = report order.
ARCHITECTURES = {
    "lstm": ("LSTM (nn.LSTM, fused kernels)", "lstm", "lstm"),
    "transformer": ("Transformer (sdpa attention)", "attention", "attention"),
    "sliding_window": ("Sliding-window transformer (sdpa)", "sliding_attention", "sliding_attention"),
    "mamba2": ("Mamba-2 (SSD, chunked scan)", "mamba2", "mamba2"),
    "linear_attention": ("Linear attention (chunked scan, decay)", "linear_attention", "linear_attention"),
    "hybrid": ("Hybrid: Mamba-2 and attention layers alternating", "mamba2", "attention"),
    "gru": ("GRU (nn.GRU, fused kernels)", "gru", "gru"),
}
DEFAULT_ARCHITECTURES = ("lstm", "transformer", "sliding_window", "mamba2", "linear_attention", "hybrid")
# Families used by the verdicts: which architectures stand for which claim.
RECURRENT = ("lstm", "gru")
LINEAR_TIME = ("mamba2", "linear_attention")
MATCH_TOLERANCE = 0.02  # non-embedding parameters within 2% of the transformer's


def mixer_types(name: str, num_layers: int) -> list[str]:
    description, even, odd = ARCHITECTURES[name]
    if name == "hybrid" and "mamba2" not in MIXER_CLASSES:
        even = "lstm"  # until mamba2 is built in, the hybrid pairs attention with the LSTM
    return [even if i % 2 == 0 else odd for i in range(num_layers)]


def describe(name: str, num_layers: int) -> str:
    if name == "hybrid":
        mixers = mixer_types(name, num_layers)
        return f"Hybrid: {' / '.join(dict.fromkeys(mixers))} layers alternating"
    return ARCHITECTURES[name][0]


def missing_mixers(name: str, num_layers: int) -> list[str]:
    return sorted(set(mixer_types(name, num_layers)) - set(MIXER_CLASSES))


def resolve_architectures(requested: str | None, num_layers: int) -> tuple[list[str], dict[str, str]]:
    """(architectures to run, {skipped: reason}). Explicitly requested ones must all be runnable."""
    if requested is None:
        names, explicit = list(DEFAULT_ARCHITECTURES), False
    else:
        names = list(dict.fromkeys(n.strip() for n in requested.split(",") if n.strip()))
        explicit = True
        if not names:
            raise ValueError(f"--architectures is empty; choose from {list(ARCHITECTURES)}.")
        unknown = [n for n in names if n not in ARCHITECTURES]
        if unknown:
            raise ValueError(f"Unknown architecture(s) {unknown}; choose from {list(ARCHITECTURES)}.")
    runnable, skipped = [], {}
    for name in names:
        missing = missing_mixers(name, num_layers)
        if missing and explicit:
            raise ValueError(f"Architecture {name!r} needs mixer(s) {missing}, which this build does not have "
                             f"(available: {sorted(MIXER_CLASSES)}).")
        if missing:
            skipped[name] = f"mixer(s) {missing} not available in this build"
        else:
            runnable.append(name)
    return runnable, skipped


def build_config(name: str, width: int, preset, intermediate_size: int | None = None) -> SeqArchConfig:
    return SeqArchConfig(
        vocab_size=preset.vocab_size,
        hidden_size=width,
        intermediate_size=preset.mlp_ratio * width if intermediate_size is None else intermediate_size,
        mixer_types=mixer_types(name, preset.num_layers),
        num_attention_heads=preset.num_heads,
        sliding_window=preset.sliding_window,
        max_position_embeddings=max(*preset.train_lengths, *preset.decode_contexts, 8192),
        attn_implementation="sdpa",
        **preset.mamba,
        **preset.linear_attention,
    )


def count_parameters(config) -> tuple[int, int]:
    """(total, non-embedding) parameters of the causal LM; built on the meta device, so nothing is allocated."""
    with torch.device("meta"):
        model = SeqArchForCausalLM(config)
    total = sum(p.numel() for p in model.parameters())  # the tied lm_head is counted once
    return total, total - model.get_input_embeddings().weight.numel()


def match_size(name: str, preset, target: int) -> tuple[SeqArchConfig, int, int]:
    """Config (and its total and non-embedding parameters) of `name` with about `target` non-embedding parameters.

    Width stays at the preset's target_width; the MLP takes up the difference between this mixer's
    parameters and attention's (an MLP of width m adds num_layers * (3 * width * m + width): three
    projections and a norm). Only when the mixers alone exceed the budget is the width lowered.
    """
    for width in range(preset.target_width, 0, -preset.width_step):
        try:
            _, mixers_only = count_parameters(build_config(name, width, preset, intermediate_size=0))
        except ValueError:  # e.g. heads that do not divide this width: not a candidate
            continue
        per_unit = preset.num_layers * 3 * width
        mlp = max(0, round((target - mixers_only - preset.num_layers * width) / per_unit))
        config = build_config(name, width, preset, intermediate_size=mlp)
        total, body = count_parameters(config)
        if body <= target * (1 + MATCH_TOLERANCE):
            return config, total, body
    raise ValueError(f"No width up to {preset.target_width} keeps {name!r} within the parameter budget of preset {preset.name!r}.")


def matched_configs(names: list[str], preset) -> tuple[int, dict[str, dict]]:
    """Target (the transformer's non-embedding parameters at target_width) and, per architecture, its matched size."""
    _, target = count_parameters(build_config("transformer", preset.target_width, preset))
    sizes = {}
    for name in names:
        config, total, body = match_size(name, preset, target)
        sizes[name] = dict(config=config, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
                           mixer_types=list(config.mixer_types), parameters=total, non_embedding_parameters=body,
                           description=describe(name, preset.num_layers))
    return target, sizes

"""What saving and loading refuse or repair: a config edited against the model's tensors, a checkpoint whose head
would be lost or replaced, a recurrent checkpoint loaded in the other direction, and clearer messages for unreadable
or misfitting weights. Used by SeqArchPreTrainedModel (modeling_seqarch)."""

import os

import torch
from torch import nn
from transformers.utils import logging

from .configuration_seqarch import SeqArchConfig, without_other_models_fields

logger = logging.get_logger(__name__)


def refuse_head_tied_against_config(model):
    """config.tie_word_embeddings set against the tensors, at saving. To False on a tied model, lm_head and the
    embeddings stay one tensor: the folder lacked lm_head.weight while its config said untied, and from_pretrained
    refused it. To True on an untied model (or a tied one given a head of its own), the model runs its own head while
    the folder says tied: loading replaced the trained head by the embeddings (transformers 4.x), or the next
    tie_weights() did (5.x), silently. A head of another width than config.vocab_size is refused too."""
    head, embeddings = getattr(model, "lm_head", None), embedding_table(model.get_input_embeddings())
    if head is None or embeddings is None:
        return
    refuse_head_of_another_vocabulary(model)
    known = head.weight.data_ptr() != 0 and embeddings.weight.data_ptr() != 0  # (0: offloaded to meta, unknown)
    one_tensor = head.weight is embeddings.weight or known and head.weight.data_ptr() == embeddings.weight.data_ptr()
    if not model.config.tie_word_embeddings and one_tensor:
        raise ValueError(
            "config.tie_word_embeddings is False, but lm_head.weight is still the input embeddings' tensor (the model "
            "was built tied): saved, the folder would say untied and hold no lm_head.weight. Untie the tensors first, "
            "model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone()), or set "
            "config.tie_word_embeddings back to True."
        )
    if model.config.tie_word_embeddings and known and not one_tensor:
        raise ValueError(
            "config.tie_word_embeddings is True, but lm_head.weight is a tensor of its own, not the input embeddings' "
            "(the model was built untied, or given another head): saved, the folder would say tied, and loading "
            "would replace this head by the embeddings. Tie them first, model.tie_weights(), or set "
            "config.tie_word_embeddings back to False."
        )


def refuse_head_of_another_vocabulary(model):
    """A causal LM's head (its output width) against config.vocab_size, as the embeddings are checked: a head set
    with set_output_embeddings of another width failed inside the loss, and generate() produced ids past the
    vocabulary."""
    head, embeddings = model.get_output_embeddings(), embedding_table(model.get_input_embeddings())
    width = getattr(head, "out_features", None)
    if embeddings is not None and embeddings.num_embeddings != model.config.vocab_size:
        return  # (config.vocab_size itself changed by hand: the embeddings' check says so, refuse_config_changed...)
    if width is not None and width != model.config.vocab_size:
        raise ValueError(f"lm_head has {width} outputs, but config.vocab_size is {model.config.vocab_size}: change the "
                         f"vocabulary with model.resize_token_embeddings(n), which resizes both.")


def embedding_table(embeddings: nn.Module | None) -> nn.Embedding | None:
    """The nn.Embedding that holds the vocabulary: the input embeddings themselves, or the one inside a wrapper (PEFT's
    LoRA on the embeddings and its trainable tokens keep it as their base layer, as may a module of the user's);
    None if there is none."""
    modules = embeddings.modules() if embeddings is not None else ()
    return next((module for module in modules if isinstance(module, nn.Embedding)), None)


def untie_lm_head_left_out(model, info, source, load_kwargs):
    """An untied lm_head the checkpoint has no weight for (it was saved tied, and transformers stored only the
    embeddings; or it is a model body alone) starts from the input embeddings, what a tied head is, not random.
    Unless the checkpoint's own config.json says it is an untied causal LM: then its trained head is lost (whatever
    config the caller passed, as the Auto classes always pass one), and loading refuses."""
    missing = info.get("missing_keys", [])
    head = getattr(model, "lm_head", None)
    if "lm_head.weight" not in missing or head is None or model.config.tie_word_embeddings:
        return
    if _saved_as_untied_causal_lm(source, load_kwargs):
        raise ValueError(
            f"The checkpoint {source!r} was saved as a SeqArchForCausalLM with untied embeddings "
            "(tie_word_embeddings=false in its config.json) but has no lm_head.weight: its weights are incomplete, "
            "and the head would not be the one trained. Save the model again; or load the body alone "
            "(SeqArchModel.from_pretrained) and put a head of your own on it. (A folder saved from a tied model whose "
            "config alone was set untied, which earlier versions allowed, has the embeddings as its head: set "
            "tie_word_embeddings to true in its config.json.)"
        )
    if head.weight.is_meta or model.get_input_embeddings().weight.is_meta:  # offloaded by device_map
        raise ValueError(
            f"The checkpoint {source!r} has no lm_head.weight (it was saved tied), so the untied lm_head must start "
            "from the input embeddings, but device_map offloads one of them (to the CPU or disk), where they cannot "
            "be copied. Load it tied (without tie_word_embeddings=False), or with both on the main device."
        )
    with torch.no_grad():
        head.weight.copy_(model.get_input_embeddings().weight)
    info["missing_keys"] = type(missing)(key for key in missing if key != "lm_head.weight")
    logger.warning("The checkpoint has no lm_head.weight (saved with tied embeddings, or a model body alone): the "
                   "untied lm_head starts from the input embeddings, the head a tied model has (not newly initialized, "
                   "as transformers' loading report may say).")


def refuse_tying_a_trained_head(model, source, load_kwargs):
    """A causal LM saved untied has a trained lm_head of its own: loaded with tie_word_embeddings=True, transformers
    4.x replaced it by the input embeddings without a word, and 5.x kept it beside a config saying it is tied (whose
    next save_pretrained drops it)."""
    if getattr(model, "lm_head", None) is None or not model.config.tie_word_embeddings:
        return
    if _saved_as_untied_causal_lm(source, load_kwargs):
        raise ValueError(
            f"The checkpoint {source!r} is a causal LM saved with untied embeddings: its lm_head.weight is trained, "
            "and tie_word_embeddings=True would replace it by the input embeddings. Load it as saved; to tie it "
            "anyway, set model.config.tie_word_embeddings = True and call model.tie_weights() after loading."
        )


# from_pretrained's arguments that say where and how its files are fetched (and so its config.json)
HUB_DOWNLOAD_ARGUMENTS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder", "proxies")


def refuse_recurrences_made_bidirectional(source, load_kwargs):
    """A checkpoint loads with its direction switched (a causal one as an encoder, bidirectional=True, or an encoder as
    causal) where its mixers keep their weights: attention, mamba2, linear attention. A bidirectional LSTM/GRU has
    other weights than a causal one (two directions of half the width each): say so, rather than fail on "other
    shapes" (whose advice, ignore_mismatched_sizes=True, would start those layers from random)."""
    asked = load_kwargs.get("bidirectional", getattr(load_kwargs.get("config"), "bidirectional", None))
    if asked is None:
        return
    saved = _saved_config(source, load_kwargs)
    recurrences = sorted({"lstm", "gru"} & set(saved.get("mixer_types") or []))
    saved_bidirectional = bool(saved.get("bidirectional", False))
    if saved and recurrences and bool(asked) != saved_bidirectional:
        encoder, causal = "an encoder (bidirectional=True)", "a causal model (bidirectional=False)"
        saved_as, asked_as = (encoder, causal) if saved_bidirectional else (causal, encoder)
        raise ValueError(
            f"{source!r} is {saved_as} with {' and '.join(recurrences)} layers, which cannot load as {asked_as}: a "
            "bidirectional LSTM/GRU has two directions of half the width, other weights than a causal one's. Load it "
            "as it was saved, or train the other kind from scratch (attention, mamba2 and linear attention layers do "
            "load either way)."
        )


def refuse_heads_split_otherwise(model, source, load_kwargs):
    """Loaded with other head counts or head sizes (from_pretrained's keyword overrides, or a config= of its own), a
    checkpoint keeps every weight's shape wherever heads x head size is unchanged, and its weights are read as another
    model's, silently (Llama alike); so with mamba2's groups x state size (its B and C projections). Refused, naming
    the fields (the resume check refuses the same)."""
    if not (model.config.has_attention or "mamba2" in model.config.mixer_types):
        return  # (linear attention's per-head norm weight changes shape with the head size: the load's own check)
    saved = _saved_config(source, load_kwargs)
    if not saved.get("mixer_types"):
        return
    try:
        saved_config = type(model.config).from_dict(without_other_models_fields(saved))  # (its load warned already)
    except Exception:  # noqa: BLE001  (a config.json it cannot read is the load's own error, raised before this)
        return
    if _split_widths(saved_config) != _split_widths(model.config):
        return  # other shapes: the load's own check says so
    saved_layout, asked_layout = _split_layout(saved_config), _split_layout(model.config)
    changed = [(name, saved_layout[name], asked_layout[name]) for name in saved_layout
               if saved_layout[name] != asked_layout.get(name)]
    if changed:
        raise ValueError(
            f"{source!r} was saved with " + ", ".join(f"{name}={saved}" for name, saved, _ in changed) + "; with "
            + ", ".join(f"{name}={asked}" for name, _, asked in changed) + " instead, its weights (of the same "
            "shapes) would be split into other heads or groups: another model. Load it with the layout it was saved "
            "with."
        )


def _split_widths(config) -> dict:
    """The widths that the fields of _split_layout split, of the mixers the config has: the q and k / v projections'
    output widths, mamba2's B / C projection width (groups x state size)."""
    widths = {"hidden": config.hidden_size}
    if config.has_attention:
        widths.update(q=config.num_attention_heads * config.attention_head_dim,
                      kv=config.num_key_value_heads * config.attention_head_dim)
    if "mamba2" in config.mixer_types:
        widths.update(mamba_b_c=config.mamba_n_groups * config.mamba_state_size)
    return widths


def _split_layout(config) -> dict:
    """The fields that split a weight into heads or groups, of the mixers the config has (head_dim as used: None in a
    config means hidden_size / num_attention_heads)."""
    layout = {}
    if config.has_attention:
        layout.update(num_attention_heads=config.num_attention_heads, num_key_value_heads=config.num_key_value_heads,
                      head_dim=config.attention_head_dim)
    if "mamba2" in config.mixer_types:
        layout.update(mamba_n_groups=config.mamba_n_groups, mamba_state_size=config.mamba_state_size)
    return layout


def _saved_as_untied_causal_lm(source, load_kwargs) -> bool:
    """Whether the checkpoint's own config.json says it is a causal LM with an lm_head of its own (untied): its
    architectures name SeqArchForCausalLM, or the class its auto_map loads as a causal LM (a user's subclass)."""
    saved = _saved_config(source, load_kwargs)
    causal = {"SeqArchForCausalLM", str((saved.get("auto_map") or {}).get("AutoModelForCausalLM", "")).split(".")[-1]}
    return saved.get("tie_word_embeddings") is False and bool(causal & set(saved.get("architectures") or []))


def _saved_config(source, load_kwargs) -> dict:
    """The checkpoint's own config.json as a dict ({} where it cannot be read: a config passed for a folder without
    one; no source at all, from_pretrained(None, config=..., state_dict=...)), fetched as from_pretrained fetched the
    weights."""
    if not isinstance(source, (str, os.PathLike)):
        return {}  # (None would be looked up on the Hub as a repository named "None")
    where = {name: load_kwargs[name] for name in HUB_DOWNLOAD_ARGUMENTS if name in load_kwargs}
    try:
        return SeqArchConfig.get_config_dict(source, **where)[0]
    except (OSError, ValueError):
        return {}


def explain_load_error(error, shown):
    """A clearer exception for the load failures users meet, or None to re-raise the original. shown: the checkpoint,
    as messages name it."""
    text = str(error)
    if type(error).__name__ == "SafetensorError" or "deserializing header" in text:
        return OSError(
            f"Could not read the weights of {shown}: a .safetensors file there is truncated or corrupted "
            f"({text}). Save the model again, or download it again with from_pretrained(..., force_download=True)."
        )
    if "ignore_mismatched_sizes" in text or "size mismatch" in text:
        return ValueError(
            f"The weights of {shown} have other shapes than this config gives (the loading report above lists "
            f"them). If only a task head differs (score or classifier: another num_labels), pass "
            f"ignore_mismatched_sizes=True to start it afresh; otherwise check that config.mixer_types and the sizes "
            f"match the checkpoint. ({text})"
        )
    return None



# torch's CPU allocator aligns every tensor to 64 bytes; its matrix kernels (MKL, oneDNN) take other code paths, which
# round differently, for operands that are not.
ALIGNMENT = 64


def is_unaligned(tensor: torch.Tensor) -> bool:
    """A CPU tensor not aligned as torch's allocator aligns: one read from a safetensors file (transformers 5 and
    safe_open place them 8 bytes past a 64-byte boundary)."""
    return tensor.device.type == "cpu" and tensor.data_ptr() % ALIGNMENT != 0


def align_loaded_weights(model):
    """Copy the CPU weights and buffers that loading left unaligned into tensors of their own. On unaligned weights
    torch's GEMMs (an nn.GRU's, for one) round differently from the same weights as built: the loaded model's outputs
    differed from the saved one's by ~1e-7. Tied weights stay tied: a Parameter keeps its identity (only its data
    moves), and tensors that shared memory share the copy."""
    copies = {}  # (address, shape, strides) -> the aligned copy
    for module in model.modules():
        for tensor in (*module._parameters.values(), *module._buffers.values()):
            if tensor is not None and is_unaligned(tensor):
                key = (tensor.data_ptr(), tuple(tensor.shape), tensor.stride())
                if key not in copies:
                    copies[key] = tensor.data.clone()
                tensor.data = copies[key]

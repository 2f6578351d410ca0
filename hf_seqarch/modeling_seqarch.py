"""SeqArch models: a stack of pre-norm residual blocks, each a token mixer (chosen per layer) and an MLP.

Reads top-down: mixer registry, MLP, block, the shared PreTrainedModel, the base model, the four heads.
"""

import inspect
import math
import numbers
import operator
import os
import tempfile

import torch
from torch import nn
from transformers import GenerationConfig, GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    BaseModelOutputWithPast,
    CausalLMOutputWithPast,
    SequenceClassifierOutputWithPast,
    TokenClassifierOutput,
)
from transformers.models.auto import modeling_auto
from transformers.utils import can_return_tuple, logging

from .cache_seqarch import SeqArchCache
from .configuration_seqarch import SeqArchConfig, near_miss
from .graph_capture import capturing_graph, recording_one_graph
from .mixer_attention import AttentionMixer, rotary_cos_sin
from .mixer_context import MixerContext
from .mixer_linear_attention import LinearAttentionMixer
from .mixer_mamba2 import Mamba2Mixer
from .mixer_rnn import RecurrentMixer
from .model_card_seqarch import HUB_UPLOAD_ARGUMENTS, create_hub_repo, upload_saved_folder, write_model_card
from .ops_rms_norm import RMSNorm  # nn.RMSNorm with a faster CPU training backward

# Every module of the model is imported here, even those only a mixer uses: transformers 4.x, loading
# remote code from a local folder, copies only the files that this one imports directly (it recurses
# for Hub repos, as 5.x always does). tests/test_hub.py checks that none is missing.
from .kernels_mamba2 import mamba2_backend  # noqa: F401
from .mixer_token_blocks import forward_in_cpu_token_blocks  # noqa: F401
from .ops_causal_conv import causal_conv  # noqa: F401
from .ops_chunked_scan import chunked_scan  # noqa: F401
from .ops_sliding_attention import sliding_window_attention  # noqa: F401
from .ops_ssd import ssd_chunked  # noqa: F401

try:  # transformers >= 5: init functions that skip weights already loaded from a checkpoint
    from transformers import initialization as init
except ImportError:  # transformers 4.x
    from torch.nn import init

logger = logging.get_logger(__name__)

MIXER_CLASSES = {
    "lstm": RecurrentMixer,
    "gru": RecurrentMixer,
    "attention": AttentionMixer,
    "sliding_attention": AttentionMixer,
    "mamba2": Mamba2Mixer,
    "linear_attention": LinearAttentionMixer,
}

# transformers 5.24 renamed the output's `past_key_values` to `cache`; fill whichever this release has.
CACHE_FIELD = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"
# A dict {target: source} in transformers 5, a list of targets in 4.x.
TRANSFORMERS_MAJOR = int(__import__("transformers").__version__.split(".")[0])
TIED_LM_HEAD = {"lm_head.weight": "model.embed_tokens.weight"} if TRANSFORMERS_MAJOR >= 5 else ["lm_head.weight"]


class SeqArchMLP(nn.Module):
    """SwiGLU feed-forward, as in Llama."""

    def __init__(self, config):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class SeqArchBlock(GradientCheckpointingLayer):
    """x + mixer(norm(x)), then x + mlp(norm(x)) unless intermediate_size == 0."""

    def __init__(self, config, layer_idx: int):
        super().__init__()
        mixer_type = config.mixer_types[layer_idx]
        if mixer_type not in MIXER_CLASSES:
            raise ValueError(f"Mixer {mixer_type!r} is not available in this build; available: {sorted(MIXER_CLASSES)}.")
        self.mixer_norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mixer = MIXER_CLASSES[mixer_type](config, layer_idx)
        self.mlp_norm = self.mlp = None
        if config.intermediate_size > 0:
            self.mlp_norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
            self.mlp = SeqArchMLP(config)

    def forward(self, hidden_states: torch.Tensor, context: MixerContext) -> torch.Tensor:
        context = context.to(hidden_states.device)  # (a model split across devices: this block's)
        hidden_states = hidden_states + self.mixer(self.mixer_norm(hidden_states), context)
        if self.mlp is not None:
            hidden_states = hidden_states + self.mlp(self.mlp_norm(hidden_states))
        return hidden_states


class SeqArchPreTrainedModel(PreTrainedModel):
    config_class = SeqArchConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["SeqArchBlock"]
    # accelerate's device_map hooks would move the cache with every forward's inputs (SeqArchCache.to), re-copying
    # the whole past at each decode step; each layer's state stays where its layer wrote it.
    _skip_keys_device_placement = ["cache", "past_key_values"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    # Weights of the task heads, which a checkpoint of another head legitimately lacks.
    _head_weight_prefixes = ("lm_head.", "score.", "classifier.")

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the model creates its own SeqArchCache (see design notes: own the recurrent state)

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.padding_idx is not None and not getattr(module.weight, "_is_hf_initialized", False):
                init.zeros_(module.weight[module.padding_idx])  # (nn.Embedding never trains it: as transformers)
        elif isinstance(module, nn.RMSNorm):
            init.ones_(module.weight)
        elif isinstance(module, (nn.LSTM, nn.GRU)):
            bound = module.hidden_size**-0.5  # torch's own default for recurrent layers
            for weight in module.parameters(recurse=False):
                init.uniform_(weight, -bound, bound)
        elif hasattr(module, "init_mixer_weights"):  # mixers with special parameters (decays, time steps)
            module.init_mixer_weights(init)

    def resize_token_embeddings(self, new_num_tokens=None, *args, **kwargs):
        """transformers' resize, refused for a vocabulary that leaves out the config's pad, bos or eos id (generation
        could never stop on an eos the model cannot produce) or holds no token."""
        if new_num_tokens is not None:
            config = self.config
            eos = config.eos_token_id if isinstance(config.eos_token_id, (list, tuple)) else [config.eos_token_id]
            special = [i for i in (config.pad_token_id, config.bos_token_id, *eos) if i is not None]
            smallest = max([1] + [i + 1 for i in special])
            integer = isinstance(new_num_tokens, numbers.Integral) and not isinstance(new_num_tokens, bool)
            if not integer or new_num_tokens < smallest:
                raise ValueError(f"resize_token_embeddings takes a vocabulary of at least {smallest} token(s) (one, "
                                 f"and the config's pad, bos and eos ids {special}), got {new_num_tokens!r}.")
        return super().resize_token_embeddings(new_num_tokens, *args, **kwargs)

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """As transformers' from_pretrained, but refuses to leave weights of the model body random: body
        weights the checkpoint lacks, has no place for, or (with ignore_mismatched_sizes=True) has in other
        shapes are an error.

        A missing or resized task head (e.g. `score` when a causal-LM checkpoint is loaded for
        classification) is the usual fine-tuning start and is only warned about, as in transformers.
        A causal LM loaded untied (tie_word_embeddings=False) from a checkpoint without lm_head.weight (saved
        tied, or a body alone) starts its lm_head from the input embeddings, the head a tied model has; a checkpoint
        whose own config.json says it is an untied causal LM has lost its trained head, and is refused.
        """
        return_info = kwargs.pop("output_loading_info", False)
        source = args[0] if args else kwargs.get("pretrained_model_name_or_path")
        if kwargs.get("config") is None and isinstance(source, (str, os.PathLike)) and os.path.isdir(source):
            folder = os.path.join(source, kwargs.get("subfolder") or "")
            if not os.path.isfile(os.path.join(folder, "config.json")):
                # transformers would build a default config and fail later on the weights' shapes
                raise OSError(
                    f"{str(folder)!r} has no config.json: the model's mixers and sizes are read from it. Save with "
                    f"save_pretrained (which writes it), or pass config=SeqArchConfig(...) to from_pretrained."
                )
        _refuse_recurrences_made_bidirectional(source, kwargs)
        try:
            model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        except Exception as error:
            explained = _explain_load_error(error, source)
            if explained is None:
                raise
            raise explained from error
        prefix = cls.base_model_prefix + "."
        _untie_lm_head_left_out(model, info, source, kwargs)
        _refuse_tying_a_trained_head(model, source, kwargs)

        def body(keys):
            return sorted(k for k in keys if not k.removeprefix(prefix).startswith(cls._head_weight_prefixes))

        missing_body, unexpected_body = body(info.get("missing_keys", [])), body(info.get("unexpected_keys", []))
        # transformers 5 lists mismatched keys as (key, shape, shape), 4.x as keys
        mismatched_body = body(k if isinstance(k, str) else k[0] for k in info.get("mismatched_keys", []))
        if missing_body or unexpected_body or mismatched_body:
            raise ValueError(
                f"The checkpoint {source!r} does not fit this {cls.__name__} "
                f"(mixer_types={list(model.config.mixer_types)}): "
                + (f"it lacks {len(missing_body)} weight(s), e.g. {missing_body[:4]}, that would stay random; " if missing_body else "")
                + (f"it has {len(unexpected_body)} weight(s) the model has no place for, e.g. {unexpected_body[:4]}; " if unexpected_body else "")
                + (f"{len(mismatched_body)} weight(s) of the body have other shapes, e.g. {mismatched_body[:4]}, and would "
                   "be re-initialised (ignore_mismatched_sizes only suits a task head); " if mismatched_body else "")
                + "check that config.mixer_types and the sizes match the checkpoint."
            )
        return (model, info) if return_info else model

    def save_pretrained(self, save_directory, is_main_process=True, *args, push_to_hub=False, tags=None, **kwargs):
        """As transformers' save_pretrained, and the folder is a self-contained Hub repository.

        config.json's auto_map names AutoConfig and all four Auto model classes (transformers writes
        only the saved class's), the code is copied flat beside the weights (register_for_auto_class at
        the end of this file), and README.md is our model card unless the user wrote one there; its tags
        include `tags` and those of `add_model_tags`. push_to_hub=True then uploads that folder, card included.
        """
        hub_kwargs = {k: kwargs.pop(k) for k in HUB_UPLOAD_ARGUMENTS if k in kwargs}
        # A config changed since it was built (resize_token_embeddings below pad_token_id, a field set by hand) is
        # checked now, not by the from_pretrained that would refuse it after the training that led here.
        self.config.validate_seqarch()
        _refuse_head_tied_against_config(self)
        self.config.auto_map = dict(AUTO_MAP)
        super().save_pretrained(save_directory, is_main_process, *args, **kwargs)
        if is_main_process:
            repo_id = hub_kwargs.pop("repo_id", None)
            if push_to_hub:  # created first: the card names the full owner/name the upload goes to
                repo_id = repo_id or os.path.basename(os.path.abspath(save_directory))
                repo_id = create_hub_repo(repo_id, token=kwargs.get("token"), private=hub_kwargs.get("private"))
            write_model_card(self, save_directory, repo_id=repo_id, tags=tags)
            if push_to_hub:
                return upload_saved_folder(save_directory, repo_id, token=kwargs.get("token"), **hub_kwargs)

    def push_to_hub(self, repo_id, *, commit_message=None, commit_description=None, private=None, token=None,
                    revision=None, create_pr=False, max_shard_size="5GB", tags=None):
        """Upload exactly what save_pretrained writes (code, weights, generation config, model card).

        transformers' own push_to_hub replaces the saved README.md by a generic card; this one keeps
        ours (with `tags` added), and keeps a card the user wrote on the Hub.
        """
        repo_id = create_hub_repo(repo_id, token=token, private=private)  # owner/name, as the card names it
        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(folder, max_shard_size=max_shard_size, repo_id=repo_id, tags=tags)
            return upload_saved_folder(folder, repo_id, token=token, commit_message=commit_message,
                                       commit_description=commit_description, private=private, create_pr=create_pr,
                                       revision=revision)


def _refuse_other_configs(model, config):
    """Each model class's first check: its config is a SeqArchConfig (by model_type: remote code's SeqArchConfig is
    another class of the same config). Another model's config failed on the first field it lacks."""
    if getattr(config, "model_type", None) != SeqArchConfig.model_type:
        name = type(model).__name__
        raise TypeError(f"{name} takes a SeqArchConfig, got {type(config).__name__}: e.g. "
                        f"{name}(SeqArchConfig(mixer_types=['attention', 'lstm'])).")


def _refuse_head_tied_against_config(model):
    """config.tie_word_embeddings set against the tensors, at saving. To False on a tied model, lm_head and the
    embeddings stay one tensor: the folder lacked lm_head.weight while its config said untied, and from_pretrained
    refused it. To True on an untied model (or a tied one given a head of its own), the model runs its own head while
    the folder says tied: loading replaced the trained head by the embeddings (transformers 4.x), or the next
    tie_weights() did (5.x), silently. A head of another width than config.vocab_size is refused too."""
    head, embeddings = getattr(model, "lm_head", None), embedding_table(model.get_input_embeddings())
    if head is None or embeddings is None:
        return
    _refuse_head_of_another_vocabulary(model)
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


def _refuse_head_of_another_vocabulary(model):
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


def _untie_lm_head_left_out(model, info, source, load_kwargs):
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
                   "untied lm_head starts from the input embeddings, the head a tied model has.")


def _refuse_tying_a_trained_head(model, source, load_kwargs):
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


def _refuse_recurrences_made_bidirectional(source, load_kwargs):
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


def _saved_as_untied_causal_lm(source, load_kwargs) -> bool:
    """Whether the checkpoint's own config.json says it is a causal LM with an lm_head of its own (untied)."""
    saved = _saved_config(source, load_kwargs)
    return saved.get("tie_word_embeddings") is False and "SeqArchForCausalLM" in (saved.get("architectures") or [])


def _saved_config(source, load_kwargs) -> dict:
    """The checkpoint's own config.json as a dict ({} where it cannot be read: a config passed for a folder without
    one), fetched as from_pretrained fetched the weights."""
    where = {name: load_kwargs[name] for name in HUB_DOWNLOAD_ARGUMENTS if name in load_kwargs}
    try:
        return SeqArchConfig.get_config_dict(source, **where)[0]
    except (OSError, ValueError):
        return {}


def _explain_load_error(error, source):
    """A clearer exception for the load failures users meet, or None to re-raise the original."""
    text = str(error)
    if type(error).__name__ == "SafetensorError" or "deserializing header" in text:
        return OSError(
            f"Could not read the weights of {source!r}: a .safetensors file there is truncated or corrupted "
            f"({text}). Save the model again, or download it again with from_pretrained(..., force_download=True)."
        )
    if "ignore_mismatched_sizes" in text or "size mismatch" in text:
        return ValueError(
            f"The weights of {source!r} have other shapes than this config gives (the loading report above lists "
            f"them). If only a task head differs (score or classifier: another num_labels), pass "
            f"ignore_mismatched_sizes=True to start it afresh; otherwise check that config.mixer_types and the sizes "
            f"match the checkpoint. ({text})"
        )
    return None


# The config fields a model's layers are built from, and rope_theta (read at every forward, checked only when the
# config is built or saved): set afterwards, the model would run one thing, save another, or fail inside torch.
BUILT_FROM = (
    "mixer_types", "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim", "intermediate_size",
    "hidden_act", "rms_norm_eps", "rope_theta", "sliding_window", "mamba_state_size", "mamba_head_dim", "mamba_expand",
    "mamba_conv_kernel", "mamba_n_groups", "mamba_chunk_size", "linear_attention_num_heads",
    "linear_attention_head_dim", "linear_attention_feature_map", "linear_attention_use_decay",
    "linear_attention_chunk_size",
)


def _built_from(config) -> tuple:
    """The values of BUILT_FROM (read from the instance's dict: a config attribute costs microseconds)."""
    values = vars(config)
    return tuple(list(value) if isinstance(value := values.get(name), list) else value  # (a copy: edits in place show)
                 for name in BUILT_FROM)


class SeqArchModel(SeqArchPreTrainedModel):
    """Embedding, the mixer blocks, a final RMSNorm. Returns hidden states and (use_cache) a SeqArchCache."""

    def __init__(self, config: SeqArchConfig):
        _refuse_other_configs(self, config)
        config.validate_seqarch()  # again: fields may have been set after the config was built
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(SeqArchBlock(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        # nn.LSTM / nn.GRU compute time-major. A stack of only those (and no MLP, whose linears would copy a
        # time-major input instead) keeps its residual stream time-major in memory, still indexed (B, T, width),
        # so that its layers do not each copy their input and gradient between batch-first and time-major.
        recurrent_only = all(mixer in ("lstm", "gru") for mixer in config.mixer_types)
        self.time_major = recurrent_only and config.intermediate_size == 0
        self.built_bidirectional = config.bidirectional  # the LSTM/GRU layers are built one- or two-directional
        self.built_from = _built_from(config)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    @can_return_tuple  # return_dict=False (argument or config): a tuple, as transformers' models give
    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        cache=None,
        past_key_values=None,
        inputs_embeds=None,
        use_cache=None,
        output_hidden_states=None,
        output_attentions=None,
        **kwargs,
    ):
        self.refuse_config_changed_since_built()
        if cache is not None and past_key_values is not None and cache is not past_key_values:
            raise ValueError("Pass the cache once, as `cache=` or as `past_key_values=`, not both.")
        _check_call(dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         inputs_embeds=inputs_embeds), kwargs)
        inputs_embeds = self._embedded(input_ids, inputs_embeds)  # (B, T, width)
        batch, length = inputs_embeds.shape[:2]
        if length == 0:
            raise ValueError(f"The input has no tokens (shape {(batch, length)}): pass at least one per row.")
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        output_attentions = self._wants_attention_weights(output_attentions)
        cache = self._cache_to_use(use_cache, cache if cache is not None else past_key_values, inputs_embeds)
        if cache is not None:
            # Claimed before its length is read: no other forward (another thread's) can advance it between this
            # call's reading of the length and its writing. Released if a check below refuses the call, which then
            # leaves the cache as it was.
            cache.begin_update()
        try:
            context = self._context(attention_mask, position_ids, cache, output_attentions, inputs_embeds)
        except BaseException:
            if cache is not None:
                cache.cancel_update()
            raise
        if cache is not None and context.padding_mask is not None:
            # While a graph is recorded the mask's values are not read, so any mask counts as padding (later calls
            # pass the whole mask, as generate does).
            cache.holds_padding = True

        hidden_states = inputs_embeds
        if self.time_major and length > 1:  # a no-op for the time-major embeddings of _embedded
            hidden_states = hidden_states.transpose(0, 1).contiguous().transpose(0, 1)  # (B, T, width), time-major
        all_hidden_states = () if output_hidden_states else None
        for block in self.layers:
            if output_hidden_states:
                all_hidden_states += (hidden_states.contiguous(),)
            hidden_states = block(hidden_states, context)
        hidden_states = self.norm(hidden_states).contiguous()  # batch-first again (a no-op unless time-major)
        if output_hidden_states:
            all_hidden_states += (hidden_states,)
        if cache is not None:
            mask = context.padding_mask
            cache.advance(length, real=None if mask is None else mask[:, -length:].sum(1))
        return BaseModelOutputWithPast(
            last_hidden_state=hidden_states,
            hidden_states=all_hidden_states,
            attentions=tuple(context.attentions) if output_attentions else None,
            **{CACHE_FIELD: cache},
        )

    def refuse_config_changed_since_built(self):
        """A config field the model was built from (BUILT_FROM, bidirectional), or vocab_size against the embeddings,
        set since: refused with the values, at every forward (and every StreamingSession step)."""
        config = self.config
        if config.bidirectional != self.built_bidirectional:
            raise ValueError(
                f"config.bidirectional was set to {config.bidirectional} after the model was built with "
                f"{self.built_bidirectional}: the layers (a bidirectional LSTM/GRU has two directions of half the "
                "width) and the heads' pooling are fixed when the model is built. Build it with the value wanted, "
                "e.g. from_pretrained(path, bidirectional=True) for an encoder from a causal checkpoint."
            )
        now = _built_from(config)
        if now != self.built_from:
            changed = [(name, built, value) for name, built, value in zip(BUILT_FROM, self.built_from, now)
                       if built != value]
            raise ValueError(
                "config." + ", config.".join(f"{name} was set to {value!r} after the model was built with {built!r}"
                                             for name, built, value in changed)
                + ": the layers are built from it, so the model would run one thing and save another. Build a model "
                "with the value wanted (SeqArchForCausalLM(config), or from_pretrained(path, name=value)), or set it "
                "back."
            )
        table = embedding_table(self.embed_tokens)
        if table is not None and config.vocab_size != table.num_embeddings:
            raise ValueError(
                f"config.vocab_size is {config.vocab_size} but the embeddings hold {table.num_embeddings} "
                f"tokens: change the vocabulary with model.resize_token_embeddings({config.vocab_size})."
            )

    @property
    def input_device(self) -> torch.device:
        """Where token ids go: the embedding table's device (under device_map, not necessarily the first layer's)."""
        table = embedding_table(self.embed_tokens)
        return table.weight.device if table is not None else next(self.parameters()).device

    def _embedded(self, input_ids, inputs_embeds):
        """The input as embeddings (B, T, width), checked: token ids embedded, or embeddings passed in (cast to the
        embeddings' dtype, as input_ids would give them)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds.")
        if input_ids is not None:
            if input_ids.dim() != 2:
                raise ValueError(f"input_ids must be (batch, length), got shape {tuple(input_ids.shape)}.")
            input_ids = self._checked_token_ids(input_ids)
            if self.time_major and input_ids.shape[1] > 1 and not _has_hooks(self.embed_tokens):
                # embedded time-major: no layout copy in forward. Not where a hook (NEFTune's noise, scaled by the
                # output's shape) would see (T, B, width).
                return self.embed_tokens(input_ids.t()).transpose(0, 1)  # (B, T, width), time-major
            return self.embed_tokens(input_ids)
        if (
            inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != self.config.hidden_size
            or not inputs_embeds.is_floating_point()
        ):
            raise ValueError(
                f"inputs_embeds must be (batch, length, hidden_size={self.config.hidden_size}) floating-point "
                f"values, got shape {tuple(inputs_embeds.shape)} of {inputs_embeds.dtype}."
            )
        table = embedding_table(self.embed_tokens)
        return inputs_embeds if table is None else inputs_embeds.to(table.weight.dtype)

    def _cache_to_use(self, use_cache, cache, inputs_embeds):
        """The SeqArchCache this call reads and advances (checked), a fresh one (use_cache), or None."""
        if recording_one_graph():  # torch.export, jit.trace: a graph's inputs and outputs are tensors
            if cache is not None or use_cache:
                raise ValueError(
                    "A graph recorded by torch.export or torch.jit.trace takes and returns tensors only: it cannot "
                    "read or return a SeqArchCache. Record without one (use_cache=False, the default while recording)."
                )
            return None
        use_cache = use_cache if use_cache is not None else self.config.use_cache
        use_cache = use_cache or cache is not None  # a cache passed in is read and advanced, as transformers' are
        if self.config.bidirectional:
            if cache is not None:
                raise ValueError("A bidirectional (encoder) model sees the whole sequence at once: it takes no cache.")
            return None
        if self.training and self.layers[0].gradient_checkpointing and torch.is_grad_enabled() and use_cache:
            # The backward re-runs each layer's forward, which would read and advance the cache a second time.
            # (Without gradients, as in generate() from a model left in train mode, nothing is re-run.)
            if cache is not None:  # dropping it would silently train without (or, empty, never fill) the context
                raise ValueError(
                    "A training forward under gradient checkpointing cannot read or fill a cache (the backward re-runs "
                    "the layers). Call model.gradient_checkpointing_disable() to train from a cached context, or "
                    "model.eval() (or torch.no_grad()) to only run it."
                )
            logger.warning_once("Caching is incompatible with gradient checkpointing; setting use_cache=False.")
            return None
        if cache is None:
            return SeqArchCache(self.config) if use_cache else None
        if not isinstance(cache, SeqArchCache):
            raise TypeError(
                f"cache must be a SeqArchCache (as returned with use_cache=True), got {type(cache).__name__}. Caches "
                "of other models, and key/value prefixes (PEFT's prefix tuning), do not fit recurrent layers; prompt "
                "tuning, p-tuning and LoRA do."
            )
        # Split across devices by accelerate's hooks (device_map), each layer's state is on its own layer's device.
        split_by_hooks = hasattr(self.layers[0], "_hf_hook")
        cache.check_usable_by(self.config, inputs_embeds.shape[0], None if split_by_hooks else inputs_embeds.device)
        return cache

    def _context(self, attention_mask, position_ids, cache, output_attentions, inputs_embeds):
        """What every mixer reads besides its input (MixerContext): the checked padding mask and positions, the
        cache and its past length, the rotary embeddings of attention layers."""
        batch, length = inputs_embeds.shape[:2]
        past_length = cache.get_seq_length() if cache is not None else 0
        padding_mask = self._padding_mask(attention_mask, batch, length, past_length, cache)  # (B, past + T)
        positions_given = position_ids is not None
        if position_ids is None and padding_mask is None:
            position_ids = torch.arange(past_length, past_length + length, device=inputs_embeds.device)[None]
        elif position_ids is None:
            # Real tokens counted, pads not (0 at left pads), as generate() counts them: a cache filled by one and
            # continued by the other agrees (RoPE keeps each key's position), and a row with holes gets the positions
            # it has alone.
            # (.long(): ONNX's CumSum takes no booleans, which the legacy exporter would give it)
            position_ids = (padding_mask.long().cumsum(-1) - 1).clamp_(min=0)[:, past_length:]  # (B, T)
        elif (
            position_ids.dim() != 2 or position_ids.shape[1] != length or position_ids.shape[0] not in (1, batch)
            or position_ids.dtype == torch.bool or position_ids.is_complex()
        ):
            raise ValueError(
                f"position_ids must be ({batch} or 1, {length}) positions for inputs of {length} tokens, got shape "
                f"{tuple(position_ids.shape)} of {position_ids.dtype}."
            )
        context = MixerContext(
            padding_mask=padding_mask,
            position_ids=position_ids,
            past_length=past_length,
            cache=cache,
            causal=not self.config.bidirectional,
            attentions=[] if output_attentions else None,
        )
        if positions_given and not capturing_graph():  # (no reading of values in a recorded graph)
            if position_ids.is_floating_point() and not bool(torch.isfinite(position_ids).all()):
                raise ValueError("position_ids hold NaN or infinite values: give each token a finite position.")
            if length > 1:
                _refuse_packed_sequences(position_ids, context.token_mask)
        if self.config.has_attention:
            context.position_embeddings = rotary_cos_sin(
                position_ids, self.config.attention_head_dim, self.config.rope_theta, inputs_embeds.dtype
            )
        return context

    def _wants_attention_weights(self, output_attentions) -> bool:
        """output_attentions (argument, else config): the eager kernel's probabilities, one (B, heads, T, K)
        tensor per attention layer. Other kernels never form them: a warning and None, as transformers' models."""
        output_attentions = output_attentions if output_attentions is not None else self.config.output_attentions
        if not output_attentions or not self.config.has_attention:
            return bool(output_attentions)
        implementation = self.config._attn_implementation or "eager"
        checkpointing = self.layers[0].gradient_checkpointing and self.training
        reentrant = getattr(getattr(self.layers[0], "_gradient_checkpointing_func", None), "keywords", {}).get(
            "use_reentrant", True
        )
        if checkpointing and reentrant:
            logger.warning_once(
                "output_attentions=True under reentrant gradient checkpointing (transformers 4.x's default): the "
                "attention weights come back without gradients. Pass gradient_checkpointing_kwargs="
                "{'use_reentrant': False} to gradient_checkpointing_enable() if a loss uses them."
            )
        if implementation != "eager":
            logger.warning_once(
                f"output_attentions=True needs attn_implementation='eager': {implementation!r} does not return "
                "attention weights, so `attentions` is None. Load the model with attn_implementation='eager' "
                "(or call model.set_attn_implementation('eager')) to get them."
            )
            return False
        return True

    def _checked_token_ids(self, input_ids):
        """input_ids, checked, as int64 if of a narrower integer dtype (nn.Embedding takes int32 and int64 only)."""
        if not _is_integer(input_ids):
            raise ValueError(f"input_ids must be integer token ids, got {input_ids.dtype}.")
        if input_ids.dtype not in (torch.int32, torch.int64):
            input_ids = input_ids.long()
        if capturing_graph():
            return input_ids  # no reading of values in a recorded graph (graph_capture); the embedding bounds-checks
        if not input_ids.numel():
            return input_ids
        low, high = _value_range(input_ids)
        if low < 0 or high >= self.config.vocab_size:
            raise ValueError(f"Token ids must be in [0, vocab_size={self.config.vocab_size}); got values in [{low}, {high}].")
        return input_ids

    def _padding_mask(self, attention_mask, batch, length, past_length, cache=None):
        """2-D mask -> (B, past + T) bool, or None when every position is real. Where the cache holds pads, only a
        mask with 0 at them keeps attention layers from reading them."""
        mask = None if attention_mask is None else self._checked_mask(attention_mask, batch, length, past_length, cache)
        if mask is None and past_length and cache.holds_padding and self.config.has_attention:
            raise ValueError(
                "This cache holds padded positions (it was filled from a padded batch), which its attention layers "
                f"keep: pass the attention_mask of the past and new tokens, ({batch}, {past_length + length}), with 0 "
                "at those pads, so that attention skips them (without one, or with all ones, it would attend to them)."
            )
        return mask

    def _checked_mask(self, attention_mask, batch, length, past_length, cache=None):
        """`_padding_mask` of a given mask: checked against the input and the cache (its past part against the
        cache's counts of the real tokens it read, `SeqArchCache.real_tokens`), None when it is all ones."""
        if attention_mask.dim() != 2 or attention_mask.shape[0] != batch or attention_mask.shape[1] not in (
            length,
            past_length + length,
        ):
            raise ValueError(
                f"attention_mask must be 2-D (batch, past + new tokens) = ({batch}, {past_length + length})"
                + (f" or ({batch}, {length})" if past_length else "")
                + f", with 1 at real tokens and 0 at padding; got shape {tuple(attention_mask.shape)}."
            )
        if attention_mask.shape[1] == length and past_length and self.config.has_attention:
            # even an all-ones one: the past may have had pads, which the attention layers would then attend to
            raise ValueError(
                "With a cache, attention layers need the mask of the past tokens too: pass attention_mask of "
                f"shape ({batch}, {past_length + length})."
            )
        mask = attention_mask.bool()
        if not capturing_graph():  # (recorded into a graph: the masked paths, right for any mask)
            not_binary = (attention_mask != mask).any() if attention_mask.dtype != torch.bool else mask.new_zeros(())
            # An all-zero float mask is an additive one without pads. (An all-zero integer one is a chunk of pads:
            # chunked prefill of a left-padded batch passes such chunks.)
            none_real = ~mask.any() if attention_mask.is_floating_point() and mask.numel() else mask.new_zeros(())
            past_disagrees, past_real = mask.new_zeros(()), None
            if past_length and mask.shape[1] == past_length + length and not cache.real_tokens_unknown:
                past_real = cache.real_tokens  # (None: every past position was real)
                past_counts = mask[:, :past_length].sum(1)  # (B,)
                expected = past_real.to(mask.device) if past_real is not None else past_length
                past_disagrees = (past_counts != expected).any()
            checks = torch.stack([mask.all(), none_real, not_binary, past_disagrees]).tolist()  # one sync
            all_real, none_real, not_binary, past_disagrees = checks
            if not_binary or none_real:
                raise ValueError(
                    "attention_mask must hold 1 at real tokens and 0 at padding (bool, int or float); got "
                    + ("other values" if not_binary else "only zeros (read as padding everywhere)")
                    + ". Additive masks (0 to keep, -inf or a large negative number to drop) are not taken here."
                )
            if past_disagrees:
                _refuse_past_mask_disagreeing(mask[:, :past_length], past_real, length)
            if all_real:
                return None
        if mask.shape[1] == length and past_length:
            past = torch.ones(batch, past_length, dtype=torch.bool, device=mask.device)
            mask = torch.cat([past, mask], dim=1)  # recurrent layers only read the new tokens' part
        return mask


def _refuse_past_mask_disagreeing(past_mask, past_real, length):
    """The mask's part for the cache's positions (B, past) marks another number of real tokens in some row than the
    cache read there: the cache's states hold what it read, so the layers would continue from one sequence while the
    mask (and the positions it numbers) describe another. generate() makes such a mask itself from pad_token_id when a
    cache read pad ids as tokens (a stream holding the pad id, or the pads generate() adds after a row's eos)."""
    batch, past_length = past_mask.shape
    counts = past_mask.sum(1).tolist()
    expected = past_real.tolist() if past_real is not None else [past_length] * batch
    row = next(i for i, (marked, read) in enumerate(zip(counts, expected)) if marked != read)
    where = (f"attention_mask's first {past_length} positions (the cache's) mark {counts[row]} real tokens in row "
             f"{row}, but the cache read {expected[row]} there")
    if counts[row] > expected[row]:
        raise ValueError(f"{where} (it was filled from a padded batch): pass the attention_mask of the past and new "
                         f"tokens, ({batch}, {past_length + length}), that it was filled with (0 at its pads).")
    raise ValueError(
        f"{where}: the mask of the past must be the one the cache was filled with. generate() makes a mask from "
        "pad_token_id: if the cache read pad ids as tokens (a stream holding the pad id, or the pads generate() adds "
        "after a row's eos), pass attention_mask yourself, with 1 wherever the cache read a token (e.g. "
        "torch.ones_like(input_ids))."
    )


def _is_integer(tensor) -> bool:
    """Integer dtype (any width), not bool."""
    return not (tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool)


def _refuse_packed_sequences(position_ids, token_mask):
    """position_ids that go back within a row, from one real token to a later one, mark several sequences packed
    into the row (transformers' DataCollatorWithFlattening, padding-free training). No mixer here separates them:
    recurrences would carry one sequence's state into the next and attention would see across them."""
    positions = position_ids.expand(token_mask.shape) if token_mask is not None else position_ids  # (B or 1, T)
    highest = positions  # so far, over the real tokens (pads may have any position: generate gives them 1)
    if token_mask is not None:
        lowest = -math.inf if positions.is_floating_point() else torch.iinfo(positions.dtype).min
        highest = torch.where(token_mask, positions, lowest)
    backwards = positions[:, 1:] < highest.cummax(1).values[:, :-1]  # (B or 1, T - 1)
    if token_mask is not None:
        backwards &= token_mask[:, 1:]
    if bool(backwards.any()):
        raise ValueError(
            "position_ids go back within a row, as they do when several sequences are packed into one "
            "(DataCollatorWithFlattening, padding-free training): these models would carry each sequence into the "
            "next. Pad the sequences instead (e.g. DataCollatorWithPadding / DataCollatorForLanguageModeling)."
        )


# What DataCollatorWithFlattening passes for packed sequences without position_ids (return_flash_attn_kwargs,
# return_seq_idx): the forwards' **kwargs would take them, silently.
PACKING_ARGUMENTS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx")


# The forwards' named arguments, and the keywords their **kwargs take knowingly: the loss's (transformers' loss
# functions read them), transformers 4.x generate()'s cache_position and a tokenizer's token_type_ids (not needed).
FORWARD_ARGUMENTS = (
    "input_ids", "attention_mask", "position_ids", "cache", "past_key_values", "inputs_embeds", "labels", "use_cache",
    "output_hidden_states", "output_attentions", "logits_to_keep", "return_dict",
)
KNOWN_KEYWORDS = ("num_items_in_batch", "ignore_index", "shift_labels", "cache_position", "token_type_ids")


def _check_call(tensors, kwargs):
    """The inputs (name -> value) of a forward are tensors or None (lists and numpy arrays failed deep inside), and
    its extra keyword arguments are none of the packing marks (`_refuse_packing_arguments`), no misspelt argument
    (`_refuse_misspelt_arguments`) and no bad num_items_in_batch (the Trainer's count of the labels the loss sums
    over)."""
    for name, value in tensors.items():
        if value is not None and not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor (or None), got {type(value).__name__}: e.g. "
                            f"torch.tensor({name}).")
    _refuse_packing_arguments(kwargs)
    _refuse_misspelt_arguments(kwargs)
    count = kwargs.get("num_items_in_batch")
    if count is None:
        return
    if isinstance(count, torch.Tensor):
        one_number = count.numel() == 1 and not (count.is_complex() or count.dtype == torch.bool)
        readable = count.device.type == "cpu"  # (a GPU's value is not read: that would wait for the device)
    else:
        one_number, readable = isinstance(count, numbers.Real) and not isinstance(count, bool), True
    # 0 is a batch without a label (an eval example truncated inside its prompt): its loss is 0/0, as Llama's.
    if not one_number or (readable and not float(count) >= 0):
        raise ValueError(f"num_items_in_batch must be one number >= 0 (the labels the loss sums over), got {count!r}.")


def _refuse_zero_count_with_labels(kwargs, labels, every_label_counts=False):
    """num_items_in_batch 0 is a batch without a label the loss counts (loss 0 / 0, nan, as Llama's): with such labels
    in this batch the loss would be their sum / 0, inf, silently. Counted: the labels the loss reads (a causal LM's
    `shift_labels` if given) but those equal to its ignore_index (-100 unless passed); every one where every label
    counts (regression, multi-label). Only a CPU count is read (a GPU's would wait for the device): with a GPU count
    the loss is inf there, as transformers' own."""
    count = kwargs.get("num_items_in_batch")
    if count is None or capturing_graph() or isinstance(count, torch.Tensor) and count.device.type != "cpu":
        return  # (no reading of values in a recorded graph)
    if float(count) != 0:
        return
    labelled = labels.numel() if every_label_counts else int((labels != kwargs.get("ignore_index", -100)).sum())
    if labelled:
        raise ValueError(f"num_items_in_batch is 0, but this batch has {labelled} labels the loss counts: the loss "
                         "would be their sum / 0 (inf). num_items_in_batch counts the labels (not ignore_index, -100) "
                         "of the whole accumulated batch, this one's included.")


def _refuse_misspelt_arguments(kwargs):
    """A keyword the forwards do not know is ignored, as transformers' models ignore theirs (callers pass extra ones);
    but one a letter or two off an argument's name (atention_mask, output_attention) is a typo that would run without
    it, silently: refused, naming the argument meant. So is head_mask, which older transformers models took: no mixer
    here masks heads."""
    if kwargs.get("head_mask") is not None:
        raise ValueError("head_mask is not supported: no mixer here masks attention heads (it would be ignored).")
    for name, value in kwargs.items():
        if value is None or name in KNOWN_KEYWORDS or name in FORWARD_ARGUMENTS:  # (another head's: its own checks)
            continue
        meant = near_miss(name, FORWARD_ARGUMENTS)
        if meant:
            raise ValueError(f"{name!r} is not an argument of these models' forward: did you mean {meant!r}? (An "
                             "unknown keyword would be ignored.)")


def _refuse_packing_arguments(kwargs):
    """Packed sequences marked by their boundaries rather than by position_ids (`_refuse_packed_sequences`)."""
    given = [name for name in PACKING_ARGUMENTS if kwargs.get(name) is not None]
    if given:
        raise ValueError(
            f"{', '.join(given)} mark several sequences packed into one row (DataCollatorWithFlattening, padding-free "
            "training): no mixer here keeps them apart, so each sequence would read the one before it. Pad the "
            "sequences instead (e.g. DataCollatorWithPadding / DataCollatorForLanguageModeling)."
        )


def _check_classification_inputs(head, output_layer, input_ids, attention_mask, kwargs):
    """The classification heads run whole sequences: a cache passed to them would be silently ignored (refused), and
    pad ids without a mask are read as tokens, every output of an encoder seeing them (warned, as transformers does).
    config.num_labels (or id2label) changed after the head was built is refused: the labels would be checked against
    it and the loss would fail inside torch on the layer's other width, as it does in transformers' own heads. A
    sequence classifier refuses a row without a real token (it would pool a pad, or zeros)."""
    if output_layer.out_features != head.config.num_labels:
        raise ValueError(
            f"config.num_labels is {head.config.num_labels} (id2label has as many entries), but this "
            f"{type(head).__name__} was built with {output_layer.out_features} labels: its output layer has that width. "
            "Set num_labels or id2label before building the model, or give a new head its size with "
            "from_pretrained(..., num_labels=N, ignore_mismatched_sizes=True)."
        )
    for name in ("cache", "past_key_values"):
        if kwargs.get(name) is not None:
            raise ValueError(f"{type(head).__name__} runs whole sequences and takes no cache (got {name}=); use "
                             "SeqArchForCausalLM or SeqArchModel to continue from one.")
    pools_rows = isinstance(head, SeqArchForSequenceClassification)
    if pools_rows and isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2 and not capturing_graph():
        # (B,): rows of 0s, which would pool a pad or zeros. Of a mask of 0s and 1s: the model refuses other values,
        # and an all-zero float mask (additive, without pads), with its own message.
        empty = ~attention_mask.bool().any(1)
        binary = (attention_mask == 0) | (attention_mask == 1)
        any_empty, binary, all_empty = torch.stack([empty.any(), binary.all(), empty.all()]).tolist()  # (one read)
        if any_empty and binary and not (all_empty and attention_mask.is_floating_point()):
            raise ValueError(f"attention_mask row {int(empty.nonzero()[0, 0])} has no real token (all 0; an empty "
                             "text?): nothing to classify there. Give each row at least one token.")
    if input_ids is not None:
        head.warn_if_padding_and_no_attention_mask(input_ids, attention_mask)


def _class_ids(labels, num_classes, name, argument="labels"):
    """Class-id labels checked to be in [0, num_classes) or -100, as int64: what cross_entropy takes (int32, int16 or
    uint8 ids fail inside it). One device sync (a GPU waits for the work queued before it: the heads check before
    running their layers)."""
    if not _is_integer(labels):
        raise ValueError(f"{argument} must be integer ids in [0, {name}={num_classes}) or -100 (ignored), got "
                         f"{labels.dtype}.")
    labels = labels.long()
    if capturing_graph() or not labels.numel():
        return labels  # no reading of values in a recorded graph (graph_capture)
    ignored = labels == -100
    low, high = _value_range(labels.masked_fill(ignored, 0))  # ignored ones read as class 0
    if low < 0 or high >= num_classes:
        valid = labels[~ignored]
        raise ValueError(f"{argument} must be in [0, {name}={num_classes}) or -100 (ignored); got values in "
                         f"[{int(valid.min())}, {int(valid.max())}].")
    return labels


class SeqArchForCausalLM(SeqArchPreTrainedModel, GenerationMixin):
    _tied_weights_keys = TIED_LM_HEAD

    def __init__(self, config: SeqArchConfig):
        _refuse_other_configs(self, config)
        if config.bidirectional:
            raise ValueError(
                "SeqArchForCausalLM needs a causal model, but config.bidirectional=True (an encoder that sees future "
                "tokens). Use bidirectional=False, or a classification head for encoders."
            )
        super().__init__(config)
        self.model = SeqArchModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def _reorder_cache(self, past_key_values, beam_idx):
        """generate()'s beam search, at each step: the cache's rows picked for the beams kept, and the cache marked as
        holding beams (`SeqArchCache.holds_beams`; only here: reorder_cache picking rows is otherwise a plain choice)."""
        past_key_values.reorder_cache(beam_idx)
        if isinstance(past_key_values, SeqArchCache):
            past_key_values.holds_beams = True
        return past_key_values

    def generate(self, *args, **kwargs):
        """transformers' generate(), refusing up front what it cannot do with a SeqArchCache (see below). Prefill
        chunking (prefill_chunk_size) gets the cache it needs: transformers makes none for these models."""
        arguments = _generate_arguments(self, args, kwargs)
        _refuse_assisted_decoding(self, arguments)
        ids, mask = arguments.get("inputs", arguments.get("input_ids")), arguments.get("attention_mask")
        if isinstance(ids, torch.Tensor) and ids.dim() != 2:  # (transformers' own code fails on it first)
            raise ValueError(f"input_ids must be (batch, length), got shape {tuple(ids.shape)}"
                             + (": e.g. input_ids[None] for one sequence." if ids.dim() == 1 else "."))
        _refuse_special_ids_out_of_range(self, arguments)
        if _generation_option(self, arguments, "return_legacy_cache"):  # (transformers 4.x; 5.x refuses it itself)
            raise ValueError("return_legacy_cache: a SeqArchCache has no legacy (tuple of key/value) form; recurrent "
                             "layers keep states, not keys. Leave it unset: the cache returned is a SeqArchCache.")
        if isinstance(ids, torch.Tensor) and isinstance(mask, torch.Tensor) and mask.shape != ids.shape:
            # (generate() numbers positions from the mask: the forward would blame positions the caller never gave)
            raise ValueError(f"attention_mask must have the shape of the input ids, {tuple(ids.shape)}, with 1 at "
                             f"real tokens and 0 at padding; got {tuple(mask.shape)}.")
        if CACHE_FIELD != "cache" and kwargs.get("past_key_values") is None and kwargs.get("cache") is not None:
            kwargs[CACHE_FIELD] = kwargs.pop("cache")  # transformers 4.x knows our name for it not
        chunked_prefill = _generation_option(self, arguments, "prefill_chunk_size")
        if TRANSFORMERS_MAJOR < 5 and (_generation_option(self, arguments, "num_beams") or 1) > 1:
            chunked_prefill = None  # transformers 4.x chunks the prompt in greedy search and sampling only
        use_cache = _generation_option(self, arguments, "use_cache")
        cache = next((kwargs[name] for name in ("cache", "past_key_values") if kwargs.get(name) is not None), None)
        _refuse_cache_misuse(self, arguments, cache, use_cache, chunked_prefill)
        if chunked_prefill and use_cache is not False:  # (without a cache transformers says it needs one)
            if kwargs.get("cache") is None and kwargs.get("past_key_values") is None:
                kwargs[CACHE_FIELD] = SeqArchCache(self.config)  # the name this transformers release reads
        return super().generate(*args, **kwargs)

    @can_return_tuple  # return_dict=False (argument or config): a tuple, as transformers' models give
    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        cache=None,
        past_key_values=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        output_hidden_states=None,
        output_attentions=None,
        logits_to_keep=0,
        **kwargs,
    ):
        _check_call(dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         inputs_embeds=inputs_embeds, labels=labels), kwargs)
        _refuse_head_of_another_vocabulary(self)
        tokens = _batch_and_length(input_ids, inputs_embeds)
        keep = _positions_to_keep(logits_to_keep, None if tokens is None else tokens[1], labels is not None)
        if labels is not None and tokens is not None:  # before the layers run: a GPU is then not stalled mid-step
            logits_shape = (tokens[0], _kept_count(keep, tokens[1]))
            if tuple(labels.shape[:2]) != logits_shape or labels.dim() != 2:
                raise ValueError(
                    f"labels {tuple(labels.shape)} need a logit at every position, but there are logits for "
                    f"{logits_shape} (logits_to_keep={logits_to_keep!r}): pass labels (batch, length) for the whole "
                    "input, without logits_to_keep."
                )
            labels = _class_ids(labels, self.config.vocab_size, "vocab_size")
            # (a refusal here, before the layers, leaves a cache passed in as it was)
            shifted = kwargs.get("shift_labels")  # (else the loss shifts labels: position 0 is never a target)
            if shifted is not None:  # the loss's targets then, position for position: checked as labels are
                if not isinstance(shifted, torch.Tensor) or tuple(shifted.shape) != logits_shape:
                    got = tuple(shifted.shape) if isinstance(shifted, torch.Tensor) else type(shifted).__name__
                    raise ValueError(f"shift_labels must hold one target per logit, shape {logits_shape}, got {got}.")
                shifted = kwargs["shift_labels"] = _class_ids(shifted, self.config.vocab_size, "vocab_size",
                                                              "shift_labels")
            _refuse_zero_count_with_labels(kwargs, shifted if shifted is not None else labels[:, 1:])
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
            return_dict=True,
        )
        hidden_states = outputs.last_hidden_state
        logits = self.lm_head(hidden_states[:, keep, :])  # (B, T or logits_to_keep, vocab)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            **{CACHE_FIELD: getattr(outputs, CACHE_FIELD)},
        )


def _kept_count(keep, length):
    """How many of `length` positions `keep` (from `_positions_to_keep`) leaves. Arithmetic on the slice, where
    len(range(length)[keep]) would make torch.compile specialize the graph to one length (a recompile for each)."""
    if isinstance(keep, slice):  # slice(-n, None): the last n, 0 keeping all
        return length if keep.start == 0 else min(-keep.start, length)
    return keep.shape[-1]


def _positions_to_keep(logits_to_keep, length, with_labels):
    """logits_to_keep as an index of the positions (transformers' meaning): an int n >= 0, the last n (0: all), or a
    1-D tensor of positions. With labels, a tensor must name the positions an int would (the last n, in order): the
    loss pairs logits with labels by place."""
    if isinstance(logits_to_keep, torch.Tensor) and logits_to_keep.dim() == 0 and _is_integer(logits_to_keep):
        logits_to_keep = int(logits_to_keep)
    if isinstance(logits_to_keep, numbers.Integral) and not isinstance(logits_to_keep, bool):  # numpy ints too
        if operator.index(logits_to_keep) < 0:
            raise ValueError(f"logits_to_keep must be >= 0 (the last n positions; 0 keeps all), got {logits_to_keep}.")
        return slice(-operator.index(logits_to_keep), None)
    if not isinstance(logits_to_keep, torch.Tensor) or logits_to_keep.dim() != 1 or not _is_integer(logits_to_keep):
        raise ValueError("logits_to_keep must be an int (the last n positions; 0 keeps all) or a 1-D integer tensor "
                         f"of positions, got {logits_to_keep!r}.")
    keep = logits_to_keep.long()  # (a uint8 tensor would index as a boolean mask)
    if length is None or capturing_graph():
        return keep
    low, high = _value_range(keep) if len(keep) else (0, 0)
    if low < -length or high >= length:
        raise ValueError(f"logits_to_keep holds positions in [{low}, {high}]; the input has {length} tokens.")
    if with_labels and not torch.equal(keep.remainder(length).cpu(), torch.arange(length - len(keep), length)):
        raise ValueError(
            "With labels, logits_to_keep must keep the last positions in order (the loss pairs each logit with the "
            "label at its place): pass labels (batch, length) for the whole input, without logits_to_keep."
        )
    return keep


def _value_range(tensor) -> tuple:
    """(min, max) of a non-empty tensor as Python numbers: one pass, one device sync."""
    low, high = torch.stack(torch.aminmax(tensor)).tolist()
    return low, high


def _has_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


ASSISTED_DECODING_OPTIONS = ("assistant_model", "prompt_lookup_num_tokens", "assistant_early_exit", "use_mtp")


def _generate_arguments(model, args, kwargs):
    """generate(*args, **kwargs)'s arguments by name, its **kwargs options flat among them."""
    arguments = inspect.signature(GenerationMixin.generate).bind_partial(model, *args, **kwargs).arguments
    return {**arguments.pop("kwargs", {}), **arguments}


def _generation_option(model, arguments, name):
    """The value of a generation option generate() will use: the argument (None too: generate() sets what its keyword
    arguments name), else the generation config passed, unless it leaves the option at its default (transformers then
    takes the model's generation config's, but with use_model_defaults=False), else the model's."""
    if name in arguments:
        return arguments[name]
    default = getattr(GenerationConfig(), name, None)
    passed_config = arguments.get("generation_config")
    passed = getattr(passed_config, name, None)
    own_defaults_off = passed_config is not None and arguments.get("use_model_defaults") is False
    if (passed is not None and passed != default) or own_defaults_off:
        return passed
    own = getattr(model.generation_config, name, None)
    return own if own is not None else default


def _refuse_special_ids_out_of_range(model, arguments):
    """generate()'s pad, eos and bos ids (its arguments, else the generation config's) are token ids the model has:
    an eos it cannot produce never stops generation, and a pad it cannot read, fed back for a finished row, failed
    with the forward's message about the caller's token ids; bos starts generation without a prompt. (The config
    refuses them; these may differ from it.)"""
    vocab_size = model.config.vocab_size
    prompted = any(arguments.get(name) is not None for name in ("inputs", "input_ids", "inputs_embeds"))
    for name in ("pad_token_id", "eos_token_id") + (() if prompted else ("bos_token_id",)):
        value = _generation_option(model, arguments, name)
        if value is None:
            continue
        ids = value.flatten().tolist() if isinstance(value, torch.Tensor) else value
        ids = ids if isinstance(ids, (list, tuple)) else [ids]
        if not all(isinstance(i, numbers.Integral) and not isinstance(i, bool) and 0 <= i < vocab_size for i in ids):
            raise ValueError(f"generate(): {name} must be token id(s) in [0, vocab_size={vocab_size}), got {value!r}.")


def _refuse_assisted_decoding(model, arguments):
    """Assisted decoding (a draft model, prompt lookup, early exit, multi-token prediction) drafts tokens and then
    drops the rejected ones from the main model's cache and the draft model's. A recurrent state cannot drop tokens
    once read, so SeqArchCache cannot, on either side; transformers would fail later with an error about a missing
    cache or method. Options are read as generate() will (_generation_option): one set in the model's generation
    config counts too, when the config passed leaves it at its default."""
    asked = [name for name in ASSISTED_DECODING_OPTIONS
             if (value := _generation_option(model, arguments, name)) is not None and value is not False]  # (0 asks)
    if asked:
        raise ValueError(
            f"Assisted decoding ({', '.join(asked)}) is not supported by hf_seqarch models: it drops rejected draft "
            "tokens from the cache, and recurrent states (LSTM, GRU, Mamba-2, linear attention) cannot be rolled "
            "back. Use greedy search, sampling or beam search."
        )
    if _generation_option(model, arguments, "is_assistant"):
        raise ValueError(
            "hf_seqarch models cannot be the assistant (draft) model of assisted decoding: after each round the "
            "draft tokens the main model rejects are dropped from the assistant's cache, and recurrent states (LSTM, "
            "GRU, Mamba-2, linear attention) cannot be rolled back. Generate without assistant_model, or draft with a "
            "model whose cache can be cropped."
        )


def _refuse_cache_misuse(model, arguments, cache, use_cache, chunked_prefill):
    """What transformers' generate() would get silently wrong (or fail on deep inside) with these models."""
    ids = arguments.get("inputs") if arguments.get("inputs") is not None else arguments.get("input_ids")
    embeds = arguments.get("inputs_embeds") is not None  # (transformers then always decodes with a cache)
    if isinstance(cache, SeqArchCache) and cache.holds_beams:
        raise ValueError("This cache comes from beam search: it holds the beams of its last step, not the sequences "
                         "generate() returned, in their order, so continuing it would continue other sequences. Pass "
                         "the returned sequences without a cache (or generate without beams to continue a cache).")
    if cache is not None and use_cache is False and not embeds:
        raise ValueError("generate() was given a cache, and use_cache is False (passed, or in the model's "
                         "generation_config): without a cache, generate() feeds the whole sequence at every step, "
                         "which the cache would read again on top of what it holds. Pass use_cache=True, or no cache.")
    for name, prompt, rank in (("input_ids", ids, 2), ("inputs_embeds", arguments.get("inputs_embeds"), 3)):
        if not (isinstance(cache, SeqArchCache) and isinstance(prompt, torch.Tensor) and prompt.dim() == rank):
            continue
        if 0 < prompt.shape[1] <= cache.get_seq_length():
            raise ValueError(f"The cache holds {cache.get_seq_length()} tokens and {name} has {prompt.shape[1]} "
                             "positions: generate() feeds only the positions past the cache's length, so pass the "
                             "whole sequence so far (what the cache has read, then at least one new position).")
    if chunked_prefill and embeds:
        raise ValueError("prefill_chunk_size does not work with inputs_embeds (transformers splits the prompt's "
                         "input_ids into chunks): pass input_ids, or drop prefill_chunk_size.")
    if chunked_prefill and TRANSFORMERS_MAJOR < 5 and isinstance(cache, SeqArchCache) and cache.get_seq_length() > 0:
        # transformers 4.x's chunked prefill feeds the prompt from position 0: the cache would read its tokens again.
        raise ValueError(f"On transformers 4.x, prefill_chunk_size restarts the prompt at position 0, so it cannot "
                         f"continue a cache that holds tokens ({cache.get_seq_length()} here): its states would read "
                         "them again. Continue without prefill_chunk_size, or upgrade to transformers 5.")
    if chunked_prefill and TRANSFORMERS_MAJOR < 5 and model.config.has_attention and _padded(model, arguments, ids):
        # transformers 4.x's chunked prefill numbers the positions without the mask: padded rows get shifted RoPE.
        raise ValueError("On transformers 4.x, prefill_chunk_size with a padded batch gives attention layers wrong "
                         "positions; upgrade to transformers 5, or generate without prefill_chunk_size.")


def _padded(model, arguments, ids) -> bool:
    """Whether generate() will see padding: zeros in the mask passed, or without one, as transformers makes it, the
    pad token (when it is not also the end-of-sequence token) among the ids."""
    mask = arguments.get("attention_mask")
    if mask is not None:
        return not bool(mask.all())
    pad, eos = (_generation_option(model, arguments, name) for name in ("pad_token_id", "eos_token_id"))
    if pad is None or not isinstance(ids, torch.Tensor) or pad in (eos if isinstance(eos, list) else [eos]):
        return False
    return bool((ids == pad).any())


class SeqArchForSequenceClassification(SeqArchPreTrainedModel):
    """Pools one vector per sequence: the last real token (causal) or the masked mean (bidirectional)."""

    def __init__(self, config: SeqArchConfig):
        _refuse_other_configs(self, config)
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = SeqArchModel(config)
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=False)
        self.post_init()

    @can_return_tuple  # return_dict=False (argument or config): a tuple, as transformers' models give
    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        inputs_embeds=None,
        labels=None,
        output_hidden_states=None,
        output_attentions=None,
        **kwargs,
    ):
        _check_call(dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         inputs_embeds=inputs_embeds, labels=labels), kwargs)
        _check_classification_inputs(self, self.score, input_ids, attention_mask, kwargs)
        tokens = _batch_and_length(input_ids, inputs_embeds)
        if labels is not None and tokens is not None:  # before the layers run (which check the inputs themselves)
            labels = _sequence_labels(labels, tokens[0], self.config)
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=False,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
            return_dict=True,
        )
        hidden_states = outputs.last_hidden_state  # (B, T, width)
        mask = self._real_token_mask(input_ids, attention_mask, hidden_states)  # (B, T) bool
        logits = self.score(self._pooled(hidden_states, mask))  # (B, num_labels)
        loss = None if labels is None else self._loss(logits, labels, kwargs)
        return SequenceClassifierOutputWithPast(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )

    def _pooled(self, hidden_states, mask):
        """(B, T, width), real tokens (B, T) -> (B, width): the masked mean (an encoder) or the last real token."""
        if self.config.bidirectional:
            # Summed in float32 at least: a float16 count passes its largest value (65,504) at that many tokens.
            sum_dtype = torch.promote_types(hidden_states.dtype, torch.float32)
            weights = mask[..., None].to(hidden_states.dtype)  # (B, T, 1): 0/1, exact in any dtype
            counts = mask.sum(1, dtype=sum_dtype)[:, None].clamp(min=1)  # (B, 1)
            return ((hidden_states * weights).sum(1, dtype=sum_dtype) / counts).to(hidden_states.dtype)  # (B, width)
        positions = torch.arange(mask.shape[1], device=mask.device)
        last_real = (positions * mask).argmax(dim=-1)  # (B,), works for left and right padding
        return hidden_states[torch.arange(hidden_states.shape[0], device=mask.device), last_real]

    def _loss(self, logits, labels, kwargs):
        """transformers' sequence-classification loss, in float32 (as its causal LM loss is: a bf16 cross-entropy is off
        in the second digit; float targets too, as BCE would return a half-precision loss for half-precision ones)."""
        every_label_counts = _sequence_problem(self.config, labels) in ("regression", "multi_label_classification")
        _refuse_zero_count_with_labels(kwargs, labels, every_label_counts)
        float_logits = logits.float()
        labels = labels.float() if labels.is_floating_point() else labels
        loss = self.loss_function(logits=float_logits, labels=labels, pooled_logits=float_logits, config=self.config,
                                  **kwargs)
        num_items = kwargs.get("num_items_in_batch")
        if num_items is not None and every_label_counts:
            # transformers' MSE / BCE losses return this micro-batch's mean and ignore num_items_in_batch, while the
            # Trainer (seeing **kwargs) no longer divides by the accumulation steps: make it sum / num_items.
            loss = loss * labels.numel() / num_items
        return loss

    def _real_token_mask(self, input_ids, attention_mask, hidden_states):
        if attention_mask is not None:
            return attention_mask.bool()
        all_real = torch.ones(hidden_states.shape[:2], dtype=torch.bool, device=hidden_states.device)
        if self.config.bidirectional:
            # The encoder read every token, pad ids too (transformers warns of them): the mean is over all of them, as
            # with a mask of ones. (Dropping the pad ids here only would pool a mix: pad == eos as a separator.)
            return all_real
        if hidden_states.shape[0] > 1:
            # Without a mask a row is pooled at its last non-pad id, or at position T - 1 when pads cannot be told:
            # refused without a pad_token_id, warned about for inputs_embeds, as transformers' causal classifiers do.
            if self.config.pad_token_id is None:
                raise ValueError(
                    "SeqArchForSequenceClassification pools each row's last real token: for a batch of more than one "
                    "row it needs attention_mask, or config.pad_token_id to tell the padding. Pass attention_mask "
                    "(all ones if no row is padded)."
                )
            if input_ids is None:
                logger.warning_once(
                    "inputs_embeds without attention_mask: padding cannot be told, every row is pooled at its last "
                    "position. Pass attention_mask if the batch is padded."
                )
        if input_ids is not None and self.config.pad_token_id is not None:
            return input_ids != self.config.pad_token_id
        return all_real


def _batch_and_length(input_ids, inputs_embeds):
    """(B, T) of the inputs given, or None when they are not one (B, T) or (B, T, width) tensor (the model says so)."""
    inputs = input_ids if input_ids is not None else inputs_embeds
    return tuple(inputs.shape[:2]) if isinstance(inputs, torch.Tensor) and inputs.dim() >= 2 else None


def _sequence_problem(config, labels) -> str:
    """The problem transformers' sequence-classification loss takes `labels` for: config.problem_type, else the one
    it infers (and then sets) as it does; integer labels of any width count as class ids (it would take int16 or
    uint8 ones for multi-label targets and fail inside BCE)."""
    if config.problem_type is not None:
        return config.problem_type
    if config.num_labels == 1:
        return "regression"
    return "single_label_classification" if _is_integer(labels) else "multi_label_classification"


def _sequence_labels(labels, batch, config):
    """`labels` checked to have the shape (and kind) the problem takes, class ids as int64: transformers' losses would
    fail inside torch, or (MSE on other shapes) broadcast into a wrong loss. One per sequence, in any shape with
    `batch` elements, as transformers' loss flattens them; (batch, num_labels) where there are several."""
    problem, num_labels = _sequence_problem(config, labels), config.num_labels
    if problem == "single_label_classification":
        if labels.numel() != batch:
            raise ValueError(f"{problem} takes one class id per sequence: labels of shape ({batch},), got "
                             f"{tuple(labels.shape)}.")
        return _class_ids(labels, num_labels, "num_labels")
    one_each = problem == "regression" and num_labels == 1
    fits = labels.numel() == batch if one_each else tuple(labels.shape) == (batch, num_labels)
    if not fits or (problem == "multi_label_classification" and not labels.is_floating_point()):
        what = "one target per label" if problem == "regression" else "float 0/1 targets, one per label"
        shape = f"({batch},)" if one_each else str((batch, num_labels))
        raise ValueError(f"{problem} with num_labels={num_labels} takes {what}: labels of shape {shape}, got "
                         f"{tuple(labels.shape)} ({labels.dtype}).")
    if problem == "multi_label_classification" and labels.numel() and not capturing_graph():
        low, high = _value_range(labels)  # (one device sync, as class ids take)
        if not (0 <= low and high <= 1):  # (NaN fails both)
            raise ValueError(f"multi_label_classification takes targets in [0, 1] (1: the label applies); got values "
                             f"in [{low}, {high}].")
    return labels


class SeqArchForTokenClassification(SeqArchPreTrainedModel):
    def __init__(self, config: SeqArchConfig):
        _refuse_other_configs(self, config)
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = SeqArchModel(config)
        self.dropout = nn.Dropout(config.classifier_dropout or 0.0)  # None: transformers' "the model's", 0 here
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    @can_return_tuple  # return_dict=False (argument or config): a tuple, as transformers' models give
    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        inputs_embeds=None,
        labels=None,
        output_hidden_states=None,
        output_attentions=None,
        **kwargs,
    ):
        _check_call(dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         inputs_embeds=inputs_embeds, labels=labels), kwargs)
        _check_classification_inputs(self, self.classifier, input_ids, attention_mask, kwargs)
        tokens = _batch_and_length(input_ids, inputs_embeds)
        if labels is not None and self.num_labels == 1:  # (not regression, as for sequences: cross-entropy)
            raise ValueError("Token classification with num_labels=1 has nothing to learn: the cross-entropy over one "
                             "class is 0 for every token. Use num_labels >= 2 (one per tag; e.g. 2 for yes/no).")
        if labels is not None and tokens is not None:  # before the layers run (which check the inputs themselves)
            if tuple(labels.shape) not in (tokens, (tokens[0] * tokens[1],)):  # (transformers' loss flattens them)
                raise ValueError(f"Token classification takes one label per token: labels of shape {tokens} "
                                 f"(batch, length), -100 where ignored; got {tuple(labels.shape)}.")
            labels = _class_ids(labels, self.num_labels, "num_labels")
            _refuse_zero_count_with_labels(kwargs, labels)
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=False,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
            return_dict=True,
        )
        dropout = self.config.classifier_dropout or 0.0
        if self.dropout.p != dropout:  # an edit of the config is followed, as attention_dropout's
            self.dropout.p = dropout
        logits = self.classifier(self.dropout(outputs.last_hidden_state))  # (B, T, num_labels)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, self.config, **kwargs)
        return TokenClassifierOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )


# Hub export: save_pretrained copies this file and every file it imports relatively (flat, beside the
# weights), and config.json's auto_map tells the Auto classes which class to take from them when a
# user without hf_seqarch loads the folder with trust_remote_code=True.
SeqArchConfig.register_for_auto_class("AutoConfig")
AUTO_MAP = {"AutoConfig": f"{SeqArchConfig.__module__.split('.')[-1]}.{SeqArchConfig.__name__}"}
for _auto_class, _model_class in (
    ("AutoModel", SeqArchModel),
    ("AutoModelForCausalLM", SeqArchForCausalLM),
    ("AutoModelForSequenceClassification", SeqArchForSequenceClassification),
    ("AutoModelForTokenClassification", SeqArchForTokenClassification),
):
    _model_class.register_for_auto_class(_auto_class)
    AUTO_MAP[_auto_class] = f"{__name__.split('.')[-1]}.{_model_class.__name__}"

# transformers' Trainer computes a label-smoothed loss itself and shifts the labels by one (next-token targets) only
# for the models its table of causal LMs names; AutoModelForCausalLM.register does not add to that table. Without
# this entry, label_smoothing_factor > 0 would train each position to predict its own token.
modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.setdefault(SeqArchConfig.model_type, SeqArchForCausalLM.__name__)

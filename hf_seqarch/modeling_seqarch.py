"""SeqArch models: a stack of pre-norm residual blocks, each a token mixer (chosen per layer) and an MLP.

Reads top-down: mixer registry, MLP, block, the shared PreTrainedModel, the base model, the four heads. What they
refuse (bad arguments, a checkpoint that would load wrong, generate() options these models cannot honour) is in
checks_arguments_seqarch, checks_loading_seqarch and checks_generation_seqarch.
"""

import contextlib
import numbers
import os
import shutil
import sys
import tempfile
import threading

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.dynamic_module_utils import get_relative_import_files
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
from .checks_arguments_seqarch import (
    batch_and_length,
    check_call,
    check_classification_inputs,
    class_ids,
    is_integer,
    kept_count,
    positions_to_keep,
    refuse_packed_sequences,
    refuse_past_mask_disagreeing,
    refuse_zero_count_with_labels,
    sequence_labels,
    sequence_problem,
    value_range,
)
from .checks_generation_seqarch import (
    generate_arguments,
    generation_option,
    refuse_assisted_decoding,
    refuse_cache_misuse,
    refuse_special_ids_out_of_range,
)
from .checks_loading_seqarch import (
    align_loaded_weights,
    embedding_table,
    explain_load_error,
    refuse_head_of_another_vocabulary,
    refuse_head_tied_against_config,
    refuse_heads_split_otherwise,
    refuse_recurrences_made_bidirectional,
    refuse_tying_a_trained_head,
    untie_lm_head_left_out,
)
from .configuration_seqarch import TRANSFORMERS_MAJOR, SeqArchConfig
from .graph_capture import recording_one_graph, values_readable
from .mixer_attention import AttentionMixer, rotary_cos_sin
from .mixer_context import MixerContext
from .mixer_linear_attention import LinearAttentionMixer
from .mixer_mamba2 import Mamba2Mixer
from .mixer_rnn import RecurrentMixer, has_forward_hooks
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
        CPU weights come back aligned as built (`align_loaded_weights`), so the loaded model computes bit for bit
        what the saved one did (weights offloaded with device_map excepted: accelerate loads them at each call).
        """
        return_info = kwargs.pop("output_loading_info", False)
        source = args[0] if args else kwargs.get("pretrained_model_name_or_path")
        if kwargs.get("config") is None and isinstance(source, (str, os.PathLike)) and os.path.isdir(source):
            folder = os.path.join(source, kwargs.get("subfolder") or "")
            # (a PEFT adapter's folder has no config.json: its adapter_config.json names the base model, and
            # transformers loads both)
            if not any(os.path.isfile(os.path.join(folder, name)) for name in ("config.json", "adapter_config.json")):
                # transformers would build a default config and fail later on the weights' shapes
                raise OSError(
                    f"{str(folder)!r} has no config.json: the model's mixers and sizes are read from it. Save with "
                    f"save_pretrained (which writes it), or pass config=SeqArchConfig(...) to from_pretrained."
                )
        refuse_recurrences_made_bidirectional(source, kwargs)
        shown = repr(source) if source is not None else "state_dict=..."  # (as messages name it)
        try:
            model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        except Exception as error:
            explained = explain_load_error(error, shown)
            if explained is None:
                raise
            raise explained from error
        prefix = cls.base_model_prefix + "."
        untie_lm_head_left_out(model, info, source, kwargs)
        refuse_tying_a_trained_head(model, source, kwargs)
        refuse_heads_split_otherwise(model, source, kwargs)

        def body(keys):
            return sorted(k for k in keys if not k.removeprefix(prefix).startswith(cls._head_weight_prefixes))

        missing_body, unexpected_body = body(info.get("missing_keys", [])), body(info.get("unexpected_keys", []))
        # transformers 5 lists mismatched keys as (key, shape, shape), 4.x as keys
        mismatched_body = body(k if isinstance(k, str) else k[0] for k in info.get("mismatched_keys", []))
        if missing_body or unexpected_body or mismatched_body:
            raise ValueError(
                f"The checkpoint {shown} does not fit this {cls.__name__} "
                f"(mixer_types={list(model.config.mixer_types)}): "
                + (f"it lacks {len(missing_body)} weight(s), e.g. {missing_body[:4]}, that would stay random; " if missing_body else "")
                + (f"it has {len(unexpected_body)} weight(s) the model has no place for, e.g. {unexpected_body[:4]}; " if unexpected_body else "")
                + (f"{len(mismatched_body)} weight(s) of the body have other shapes, e.g. {mismatched_body[:4]}, and would "
                   "be re-initialised (ignore_mismatched_sizes only suits a task head); " if mismatched_body else "")
                + "check that config.mixer_types and the sizes match the checkpoint."
            )
        align_loaded_weights(model)
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
        # A field the layers were built from, set since: saved, the folder would load as another model than this one.
        self.base_model.refuse_config_changed_since_built()
        refuse_head_tied_against_config(self)
        self.config.auto_map = dict(AUTO_MAP)
        # A subclass defined in the user's own module, with the Auto class ours registered: transformers would copy
        # that module, which imports hf_seqarch, and point auto_map at it; the folder then failed to load where
        # hf_seqarch is not installed. It ships our code instead, and loads there as the hf_seqarch head it extends.
        # (A subclass the user registered with an Auto class of its own keeps transformers' behaviour.)
        ours = next(c for c in type(self).__mro__ if c.__module__ == __name__)
        subclass_elsewhere = ours is not type(self) and "_auto_class" not in vars(type(self))
        if not subclass_elsewhere:
            super().save_pretrained(save_directory, is_main_process, *args, **kwargs)
        else:
            logger.warning_once(f"{type(self).__name__} is defined outside hf_seqarch: the saved folder's code (for "
                                f"trust_remote_code) is hf_seqarch's, and loads it as the {ours.__name__} it extends; "
                                "its own code is not saved.")
            with _SAVING_SUBCLASS, _without_auto_class(type(self)):
                super().save_pretrained(save_directory, is_main_process, *args, **kwargs)
            if is_main_process:
                _copy_own_code(save_directory)
                self.config.architectures = [ours.__name__]  # what loads (transformers wrote the subclass's name)
                self.config.save_pretrained(save_directory)
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


_SAVING_SUBCLASS = threading.Lock()  # (_without_auto_class changes the class, which other threads may be saving)


@contextlib.contextmanager
def _without_auto_class(cls):
    """cls with no Auto class of its own for a while: transformers' save_pretrained then copies none of its code."""
    own = cls.__dict__.get("_auto_class", _MISSING)
    cls._auto_class = None
    try:
        yield
    finally:
        if own is _MISSING:
            del cls._auto_class
        else:
            cls._auto_class = own


_MISSING = object()


def _copy_own_code(folder):
    """This file and the files it imports relatively, flat into `folder`: what save_pretrained copies for our classes."""
    source = sys.modules[__name__].__file__
    for path in (source, *get_relative_import_files(source)):
        shutil.copyfile(path, os.path.join(folder, os.path.basename(path)))


def _refuse_other_configs(model, config):
    """Each model class's first check: its config is a SeqArchConfig (by model_type: remote code's SeqArchConfig is
    another class of the same config). Another model's config failed on the first field it lacks."""
    if getattr(config, "model_type", None) != SeqArchConfig.model_type:
        name = type(model).__name__
        raise TypeError(f"{name} takes a SeqArchConfig, got {type(config).__name__}: e.g. "
                        f"{name}(SeqArchConfig(mixer_types=['attention', 'lstm'])).")


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
        check_call(dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
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
        """Where token ids go: the embedding table's device (under device_map, not necessarily the first layer's); for
        a table offloaded by accelerate (its weight on "meta", loaded at each call), the device its hook runs it on."""
        table = embedding_table(self.embed_tokens)
        weight = table.weight if table is not None else next(self.parameters())
        if weight.device.type != "meta":
            return weight.device
        for module in (table, self.embed_tokens):
            hook = getattr(module, "_hf_hook", None)
            for one in getattr(hook, "hooks", [hook]):  # (a SequentialHook holds several)
                if getattr(one, "execution_device", None) is not None:
                    return torch.device(one.execution_device)
        return torch.device("cpu")  # (accelerate's default execution device for offloaded weights on a CPU machine)

    def _embedded(self, input_ids, inputs_embeds):
        """The input as embeddings (B, T, width), checked: token ids embedded, or embeddings passed in (cast to the
        embeddings' dtype, as input_ids would give them)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds.")
        if input_ids is not None:
            if input_ids.dim() != 2:
                raise ValueError(f"input_ids must be (batch, length), got shape {tuple(input_ids.shape)}.")
            input_ids = self._checked_token_ids(input_ids)
            if self.time_major and input_ids.shape[1] > 1 and not has_forward_hooks(self.embed_tokens):
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
        if positions_given and values_readable(position_ids):  # (no reading of values in a recorded graph)
            if position_ids.is_floating_point() and not bool(torch.isfinite(position_ids).all()):
                raise ValueError("position_ids hold NaN or infinite values: give each token a finite position.")
            if length > 1:
                refuse_packed_sequences(position_ids, context.token_mask)
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
        if not is_integer(input_ids):
            raise ValueError(f"input_ids must be integer token ids, got {input_ids.dtype}.")
        if input_ids.dtype not in (torch.int32, torch.int64):
            input_ids = input_ids.long()
        if not values_readable(input_ids):
            return input_ids  # no reading of values in a recorded graph (graph_capture); the embedding bounds-checks
        if not input_ids.numel():
            return input_ids
        low, high = value_range(input_ids)
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
        if values_readable(mask):  # (recorded into a graph: the masked paths, right for any mask)
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
                refuse_past_mask_disagreeing(mask[:, :past_length], past_real, length)
            if all_real:
                return None
        if mask.shape[1] == length and past_length:
            past = torch.ones(batch, past_length, dtype=torch.bool, device=mask.device)
            mask = torch.cat([past, mask], dim=1)  # recurrent layers only read the new tokens' part
        return mask


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
        self.loss_type = "ForCausalLM"  # (transformers reads it from the class's name, which a subclass may not keep)
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
        arguments = generate_arguments(self, args, kwargs)
        refuse_assisted_decoding(self, arguments)
        ids, mask = arguments.get("inputs", arguments.get("input_ids")), arguments.get("attention_mask")
        if isinstance(ids, torch.Tensor) and ids.dim() != 2:  # (transformers' own code fails on it first)
            raise ValueError(f"input_ids must be (batch, length), got shape {tuple(ids.shape)}"
                             + (": e.g. input_ids[None] for one sequence." if ids.dim() == 1 else "."))
        refuse_special_ids_out_of_range(self, arguments)
        if generation_option(self, arguments, "return_legacy_cache"):  # (transformers 4.x; 5.x refuses it itself)
            raise ValueError("return_legacy_cache: a SeqArchCache has no legacy (tuple of key/value) form; recurrent "
                             "layers keep states, not keys. Leave it unset: the cache returned is a SeqArchCache.")
        if isinstance(ids, torch.Tensor) and isinstance(mask, torch.Tensor) and mask.shape != ids.shape:
            # (generate() numbers positions from the mask: the forward would blame positions the caller never gave)
            raise ValueError(f"attention_mask must have the shape of the input ids, {tuple(ids.shape)}, with 1 at "
                             f"real tokens and 0 at padding; got {tuple(mask.shape)}.")
        if CACHE_FIELD != "cache" and kwargs.get("past_key_values") is None and kwargs.get("cache") is not None:
            kwargs[CACHE_FIELD] = kwargs.pop("cache")  # transformers 4.x knows our name for it not
        chunked_prefill = generation_option(self, arguments, "prefill_chunk_size")
        if TRANSFORMERS_MAJOR < 5 and (generation_option(self, arguments, "num_beams") or 1) > 1:
            chunked_prefill = None  # transformers 4.x chunks the prompt in greedy search and sampling only
        use_cache = generation_option(self, arguments, "use_cache")
        cache = next((kwargs[name] for name in ("cache", "past_key_values") if kwargs.get(name) is not None), None)
        refuse_cache_misuse(self, arguments, cache, use_cache, chunked_prefill)
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
        check_call(dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         inputs_embeds=inputs_embeds, labels=labels), kwargs)
        refuse_head_of_another_vocabulary(self)
        tokens = batch_and_length(input_ids, inputs_embeds)
        keep = positions_to_keep(logits_to_keep, None if tokens is None else tokens[1], labels is not None)
        if labels is not None and tokens is not None:  # before the layers run: a GPU is then not stalled mid-step
            logits_shape = (tokens[0], kept_count(keep, tokens[1]))
            if tuple(labels.shape[:2]) != logits_shape or labels.dim() != 2:
                raise ValueError(
                    f"labels {tuple(labels.shape)} need a logit at every position, but there are logits for "
                    f"{logits_shape} (logits_to_keep={logits_to_keep!r}): pass labels (batch, length) for the whole "
                    "input, without logits_to_keep."
                )
            ignore_index = kwargs.get("ignore_index", -100)  # (the loss's)
            labels = class_ids(labels, self.config.vocab_size, "vocab_size", ignore_index=ignore_index)
            # (a refusal here, before the layers, leaves a cache passed in as it was)
            shifted = kwargs.get("shift_labels")  # (else the loss shifts labels: position 0 is never a target)
            if shifted is not None:  # the loss's targets then, position for position: checked as labels are
                if not isinstance(shifted, torch.Tensor) or tuple(shifted.shape) != logits_shape:
                    got = tuple(shifted.shape) if isinstance(shifted, torch.Tensor) else type(shifted).__name__
                    raise ValueError(f"shift_labels must hold one target per logit, shape {logits_shape}, got {got}.")
                shifted = kwargs["shift_labels"] = class_ids(shifted, self.config.vocab_size, "vocab_size",
                                                              "shift_labels", ignore_index)
            refuse_zero_count_with_labels(kwargs, shifted if shifted is not None else labels[:, 1:])
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


class SeqArchForSequenceClassification(SeqArchPreTrainedModel):
    """Pools one vector per sequence: the last real token (causal) or the masked mean (bidirectional)."""

    def __init__(self, config: SeqArchConfig):
        _refuse_other_configs(self, config)
        super().__init__(config)
        self.loss_type = "ForSequenceClassification"  # (see SeqArchForCausalLM)
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
        check_call(dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         inputs_embeds=inputs_embeds, labels=labels), kwargs)
        check_classification_inputs(self, self.score, input_ids, attention_mask, kwargs, pools_rows=True)
        tokens = batch_and_length(input_ids, inputs_embeds)
        if labels is not None and tokens is not None:  # before the layers run (which check the inputs themselves)
            labels = sequence_labels(labels, tokens[0], self.config, kwargs.get("ignore_index", -100))
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
        every_label_counts = sequence_problem(self.config, labels) in ("regression", "multi_label_classification")
        refuse_zero_count_with_labels(kwargs, labels, every_label_counts)
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


class SeqArchForTokenClassification(SeqArchPreTrainedModel):
    def __init__(self, config: SeqArchConfig):
        _refuse_other_configs(self, config)
        super().__init__(config)
        self.loss_type = "ForTokenClassification"  # (see SeqArchForCausalLM)
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
        check_call(dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         inputs_embeds=inputs_embeds, labels=labels), kwargs)
        check_classification_inputs(self, self.classifier, input_ids, attention_mask, kwargs)
        tokens = batch_and_length(input_ids, inputs_embeds)
        if labels is not None and self.num_labels == 1:  # (not regression, as for sequences: cross-entropy)
            raise ValueError("Token classification with num_labels=1 has nothing to learn: the cross-entropy over one "
                             "class is 0 for every token. Use num_labels >= 2 (one per tag; e.g. 2 for yes/no).")
        if labels is not None and tokens is not None:  # before the layers run (which check the inputs themselves)
            ignore_index = kwargs.get("ignore_index", -100)  # (the loss's)
            if tuple(labels.shape) not in (tokens, (tokens[0] * tokens[1],)):  # (transformers' loss flattens them)
                raise ValueError(f"Token classification takes one label per token: labels of shape {tokens} "
                                 f"(batch, length), {ignore_index} where ignored; got {tuple(labels.shape)}.")
            labels = class_ids(labels, self.num_labels, "num_labels", ignore_index=ignore_index)
            refuse_zero_count_with_labels(kwargs, labels)
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

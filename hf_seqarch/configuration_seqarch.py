"""SeqArchConfig: one token mixer per layer, chosen by name, plus the usual transformers fields."""

import difflib
import inspect
import math
from collections.abc import Iterable, Mapping, Set

import transformers
from transformers import PretrainedConfig
from transformers.activations import ACT2FN
from transformers.utils import logging

TRANSFORMERS_MAJOR = int(transformers.__version__.split(".")[0])  # (4.x and 5.x differ in a few APIs)

logger = logging.get_logger(__name__)

MIXER_TYPES = ("lstm", "gru", "attention", "sliding_attention", "mamba2", "linear_attention")
RECURRENT_MIXERS = ("lstm", "gru", "mamba2", "linear_attention")  # constant-size state per layer
ATTENTION_MIXERS = ("attention", "sliding_attention")  # keys/values per token
BOOL_FIELDS = ("bidirectional", "linear_attention_use_decay", "tie_word_embeddings", "use_cache")
DROPOUT_FIELDS = ("attention_dropout", "classifier_dropout")
PROBLEM_TYPES = (None, "regression", "single_label_classification", "multi_label_classification")  # as transformers'
FLOAT32_TINY = 1.1754943508222875e-38  # torch.finfo(torch.float32).tiny: smaller rounds to 0 in float32


DEFAULT_ROPE_THETA = 10000.0


def _plain_rope(rope_theta, rope_parameters=None, rope_scaling=None):
    """rope_theta from the arguments. transformers 5 configs carry RoPE settings in `rope_parameters` (4.x: a
    `rope_scaling` dict): their rope_theta is taken, and any other rope_type (linear, dynamic, yarn, llama3...) or
    setting (partial_rotary_factor, a scaling factor), which our attention does not implement, is refused rather than
    stored and silently ignored."""
    for name, params in (("rope_parameters", rope_parameters), ("rope_scaling", rope_scaling)):
        if params is None:
            continue
        if not isinstance(params, dict):
            raise ValueError(f"{name} must be a dict (or None), got {params!r}.")
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type != "default":
            raise ValueError(
                f"{name} asks for rope_type {rope_type!r}: hf_seqarch's attention uses plain rotary embeddings "
                "(rope_type 'default'), set by rope_theta alone. Remove the scaling (or use rope_type 'default')."
            )
        unused = {key: value for key, value in params.items() if key not in ("rope_type", "type", "rope_theta")}
        for key in ("partial_rotary_factor", "factor"):  # 1: rotary over the whole head, no scaling: ours
            if unused.get(key) == 1:
                del unused[key]
        unused.pop("original_max_position_embeddings", None)  # (read by scaling types only: not by 'default')
        if unused:
            raise ValueError(
                f"{name} sets {unused}, which hf_seqarch's attention does not implement: plain rotary embeddings over "
                "the whole head, set by rope_theta alone. Remove them."
            )
        theta = params.get("rope_theta")
        if theta is not None and rope_theta is not None and theta != rope_theta:
            raise ValueError(
                f"rope_theta={rope_theta!r} and {name}['rope_theta']={theta!r} disagree; give one. (hf_seqarch before "
                f"this check saved {name} without using it: such a checkpoint was trained with rope_theta.)"
            )
        rope_theta = theta if theta is not None else rope_theta
    return DEFAULT_ROPE_THETA if rope_theta is None else rope_theta


class SeqArchConfig(PretrainedConfig):
    r"""
    Configuration of a stack of pre-norm residual blocks, each a token mixer (chosen per layer by
    `mixer_types`) followed by an optional SwiGLU MLP.

    Args:
        vocab_size: number of token ids.
        hidden_size: width of the residual stream.
        mixer_types: one of `MIXER_TYPES` per layer; `num_hidden_layers` is its length.
        num_attention_heads / num_key_value_heads / head_dim: attention heads (grouped-query when
            `num_key_value_heads` < `num_attention_heads`).
        intermediate_size: MLP width; 0 means no MLP in the block.
        rope_theta: base of the rotary position embeddings (default 10000). Plain RoPE only: transformers'
            `rope_parameters` / `rope_scaling` are read for their `rope_theta`, and any scaling is refused.
        sliding_window: span of `"sliding_attention"` layers (the query itself included): a token sees the
            sliding_window - 1 tokens before it, and in an encoder (bidirectional) also as many after it.
        bidirectional: encoder mode for the classification heads (non-causal attention,
            bidirectional recurrences, forward+backward scans). Causal LMs refuse it. Fixed once a model is built.
        attention_dropout / classifier_dropout: dropout of the attention weights (training only), and before the
            token-classification head (None: 0); each in [0, 1).
        mamba_state_size / mamba_head_dim / mamba_expand / mamba_conv_kernel / mamba_chunk_size / mamba_n_groups:
            the Mamba-2 block's state size N (64), head dim P (64), inner width expand * hidden_size (2), causal conv
            width (4), scan chunk length (64), and groups of heads sharing B and C (1). Named as in transformers'
            `Mamba2Config` (whose defaults differ: state 128, 8 groups, chunk 256).
        linear_attention_num_heads / linear_attention_head_dim: heads and key/value size per head of
            `"linear_attention"` layers (None: num_attention_heads, and hidden_size / heads).
        linear_attention_feature_map: the positive feature map of queries and keys: "elu" (elu + 1, the default),
            "relu" or "identity".
        linear_attention_use_decay: a learned per-head decay of the state (True, the default; False: plain causal
            linear attention). linear_attention_chunk_size: the scan's chunk length (64).
    """

    model_type = "seqarch"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]

    def __init__(
        self,
        vocab_size=256,
        hidden_size=256,
        mixer_types=None,
        num_hidden_layers=None,
        num_attention_heads=4,
        num_key_value_heads=None,
        head_dim=None,
        intermediate_size=1024,
        hidden_act="silu",
        max_position_embeddings=8192,
        rope_theta=None,
        attention_dropout=0.0,
        sliding_window=128,
        bidirectional=False,
        rms_norm_eps=1e-5,
        initializer_range=0.02,
        classifier_dropout=0.0,
        use_cache=True,
        pad_token_id=None,
        bos_token_id=None,
        eos_token_id=None,
        tie_word_embeddings=True,
        mamba_state_size=64,
        mamba_head_dim=64,
        mamba_expand=2,
        mamba_conv_kernel=4,
        mamba_chunk_size=64,
        mamba_n_groups=1,
        linear_attention_num_heads=None,
        linear_attention_head_dim=None,
        linear_attention_feature_map="elu",
        linear_attention_use_decay=True,
        linear_attention_chunk_size=64,
        **kwargs,
    ):
        # Checked before transformers' __init__, which makes id2label from num_labels and (4.x) checks problem_type
        # with a message of its own.
        if "num_labels" in kwargs:
            kwargs["num_labels"] = _plain_scalar(kwargs["num_labels"])
            _check_num_labels(kwargs["num_labels"])
        _check_problem_type(kwargs.get("problem_type"))
        rope_theta = _plain_rope(rope_theta, kwargs.pop("rope_parameters", None), kwargs.pop("rope_scaling", None))
        if kwargs.get("partial_rotary_factor", 1) != 1:  # (transformers stores unknown keywords, unused)
            raise ValueError(
                f"partial_rotary_factor={kwargs['partial_rotary_factor']!r}: hf_seqarch's attention applies rotary "
                "embeddings over the whole head (1.0) only."
            )
        _refuse_other_models_fields(kwargs)
        _refuse_misspelt_fields(kwargs)
        num_hidden_layers = _plain_scalar(num_hidden_layers)
        if num_hidden_layers is not None and not _is_int(num_hidden_layers):
            raise ValueError(f"num_hidden_layers must be an integer (or None: one layer per entry of mixer_types), got "
                             f"{num_hidden_layers!r}.")
        if mixer_types is None:
            mixer_types = ["attention"] * (num_hidden_layers if num_hidden_layers is not None else 4)
        mixer_types = _mixer_list(mixer_types)
        if num_hidden_layers is not None and num_hidden_layers != len(mixer_types):
            raise ValueError(
                f"num_hidden_layers={num_hidden_layers} does not match len(mixer_types)={len(mixer_types)}; "
                "give mixer_types only (num_hidden_layers is derived from it)."
            )
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.mixer_types = mixer_types
        self.num_hidden_layers = len(mixer_types)
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_attention_heads if num_key_value_heads is None else num_key_value_heads
        self.head_dim = head_dim
        self.intermediate_size = intermediate_size
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.rope_theta = rope_theta
        self.attention_dropout = attention_dropout
        self.sliding_window = sliding_window
        self.bidirectional = bidirectional
        self.rms_norm_eps = rms_norm_eps
        self.initializer_range = initializer_range
        self.classifier_dropout = classifier_dropout  # None (transformers' "the model's dropout"): 0 here
        self.use_cache = use_cache
        self.mamba_state_size = mamba_state_size
        self.mamba_head_dim = mamba_head_dim
        self.mamba_expand = mamba_expand
        self.mamba_conv_kernel = mamba_conv_kernel
        self.mamba_chunk_size = mamba_chunk_size
        self.mamba_n_groups = mamba_n_groups
        self.linear_attention_num_heads = linear_attention_num_heads
        self.linear_attention_head_dim = linear_attention_head_dim
        self.linear_attention_feature_map = linear_attention_feature_map
        self.linear_attention_use_decay = linear_attention_use_decay
        self.linear_attention_chunk_size = linear_attention_chunk_size
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )
        # Set again after super(): some transformers releases reset these in the base __init__.
        self.pad_token_id, self.bos_token_id, self.eos_token_id = pad_token_id, bos_token_id, eos_token_id
        self.tie_word_embeddings = tie_word_embeddings
        self.validate_seqarch()

    def __setattr__(self, name, value):
        # num_hidden_layers follows mixer_types, also when a field is set after __init__ (as from_pretrained does
        # with its keyword overrides), so that the model built from this config has one layer per mixer.
        if name == "num_hidden_layers" and "mixer_types" in self.__dict__:
            value = _plain_scalar(value)
            if not _is_int(value):
                raise ValueError(f"num_hidden_layers must be an integer (len(mixer_types), here "
                                 f"{len(self.mixer_types)}), got {value!r}; set mixer_types instead (num_hidden_layers "
                                 "is derived from it).")
            if value != len(self.mixer_types):
                raise ValueError(
                    f"num_hidden_layers={value!r} does not match len(mixer_types)={len(self.mixer_types)}; "
                    "set mixer_types instead (num_hidden_layers is derived from it)."
                )
        if name in ("rope_parameters", "rope_scaling"):  # set after __init__ (Llama recipes set rope_scaling so)
            if value is not None:  # its rope_theta, if it has one, replaces ours; a scaling is refused
                theta_given = isinstance(value, dict) and value.get("rope_theta") is not None
                current = None if theta_given else self.__dict__.get("rope_theta")
                super().__setattr__("rope_theta", _plain_rope(current, **{name: value}))
            return  # not stored: rope_theta is the one field our attention reads
        value = _plain_scalar(value)
        if name == "num_labels":  # (from_pretrained's keyword): before transformers' setter makes id2label from it
            _check_num_labels(value)
        if name == "mixer_types":
            value = _mixer_list(value)
        if name in BOOL_FIELDS:
            value = _as_bool(value)  # 0 and 1, as older configs and command lines write them
            _check_bool(name, value)  # (here too: a field set after the model was built is read by its forward)
        if name in DROPOUT_FIELDS:
            _check_dropout(name, value)
        super().__setattr__(name, value)
        if name == "mixer_types":
            super().__setattr__("num_hidden_layers", len(value))

    @classmethod
    def from_json_file(cls, json_file):
        """transformers' reader of one config.json file, through from_dict (it called the constructor, which refuses
        the other models' fields that earlier versions kept)."""
        return cls.from_dict(cls._dict_from_json_file(json_file))

    @classmethod
    def from_dict(cls, config_dict, **kwargs):
        """As transformers' from_dict, which sets keyword overrides after __init__: validated again after them.
        It applies an override only where the config has the attribute, and rope_parameters / rope_scaling are never
        stored (see __setattr__): they were dropped (AutoConfig) or passed on to the model's __init__ (a TypeError),
        so they are set here."""
        _refuse_other_models_fields(kwargs)
        _refuse_misspelt_fields(kwargs)  # (transformers drops an override the config has no attribute for)
        config_dict = without_other_models_fields(config_dict, warn=True)
        rope_overrides = {name: kwargs.pop(name) for name in ("rope_parameters", "rope_scaling") if name in kwargs}
        # With mixer_types overridden too, num_hidden_layers is checked against the new list, whichever came first.
        layers = kwargs.pop("num_hidden_layers", None) if "mixer_types" in kwargs else None
        loaded = super().from_dict(config_dict, **kwargs)
        config = loaded[0] if isinstance(loaded, tuple) else loaded
        for name, value in rope_overrides.items():
            setattr(config, name, value)
        if layers is not None:
            config.num_hidden_layers = layers
        config.validate_seqarch()
        return loaded

    @property
    def attention_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_attention_heads

    @property
    def linear_attention_heads_in_use(self) -> int:
        """The linear-attention layers' head count: linear_attention_num_heads, else num_attention_heads."""
        return self.linear_attention_num_heads or self.num_attention_heads

    @property
    def linear_attention_head_dim_in_use(self) -> int:
        """Their key/value size per head: linear_attention_head_dim, else hidden_size / their head count."""
        return self.linear_attention_head_dim or self.hidden_size // self.linear_attention_heads_in_use

    @property
    def has_attention(self) -> bool:
        return any(m in ATTENTION_MIXERS for m in self.mixer_types)

    def validate_seqarch(self):
        """Raise a ValueError that names the bad field and what is allowed."""
        if not self.mixer_types:
            raise ValueError("mixer_types must name at least one layer, e.g. ['attention', 'lstm'].")
        if self.num_hidden_layers != len(self.mixer_types):  # the list changed in place (append), past __setattr__
            raise ValueError(
                f"mixer_types has {len(self.mixer_types)} entries but num_hidden_layers={self.num_hidden_layers}: "
                "mixer_types was changed in place. Assign a new list instead (config.mixer_types = [...]), which "
                "keeps num_hidden_layers in step."
            )
        unknown = [m for m in self.mixer_types if m not in MIXER_TYPES]
        if unknown:
            raise ValueError(
                f"Unknown mixer type(s) {unknown} in mixer_types; allowed: {list(MIXER_TYPES)}. If this config "
                "comes from a newer hf_seqarch release, upgrade it: pip install -U hf-seqarch."
            )
        positive = ["vocab_size", "hidden_size", "num_attention_heads", "num_key_value_heads"]
        if "mamba2" in self.mixer_types:
            positive += ["mamba_head_dim", "mamba_expand", "mamba_n_groups", "mamba_state_size", "mamba_chunk_size",
                         "mamba_conv_kernel"]
        if "linear_attention" in self.mixer_types:
            positive.append("linear_attention_chunk_size")
            positive += [name for name in ("linear_attention_num_heads", "linear_attention_head_dim")
                         if getattr(self, name) is not None]  # None: derived from the attention sizes
        for name in positive:
            if not _is_int(getattr(self, name)) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}.")
        pad = self.pad_token_id
        if pad is not None and (not _is_int(pad) or not 0 <= pad < self.vocab_size):
            raise ValueError(f"pad_token_id must be None or a token id in [0, vocab_size={self.vocab_size}), got {pad!r}.")
        for name in ("bos_token_id", "eos_token_id"):  # (generation could never stop on an eos it cannot produce)
            value = getattr(self, name)
            ids = value if isinstance(value, (list, tuple)) else [] if value is None else [value]
            if not all(_is_int(i) and 0 <= i < self.vocab_size for i in ids):
                raise ValueError(f"{name} must be None or token id(s) in [0, vocab_size={self.vocab_size}), got "
                                 f"{value!r}.")
        eps = self.rms_norm_eps
        # 0 would make the norm of a zero vector (a pad's output) NaN; so would an eps float32 rounds to 0
        if not _is_number(eps) or eps < FLOAT32_TINY:
            raise ValueError(f"rms_norm_eps must be a finite number > 0 (at least float32's smallest normal, 1.2e-38), "
                             f"got {eps!r}.")
        if not _is_number(self.initializer_range) or self.initializer_range < 0:
            raise ValueError(f"initializer_range must be a finite number >= 0 (the std of the initial weights), got "
                             f"{self.initializer_range!r}.")
        for name in DROPOUT_FIELDS:
            _check_dropout(name, getattr(self, name))
        for name in BOOL_FIELDS:
            _check_bool(name, getattr(self, name))
        _check_num_labels(self.num_labels)
        _check_problem_type(self.problem_type)
        if self.max_position_embeddings is not None and (
            not _is_int(self.max_position_embeddings) or self.max_position_embeddings < 1
        ):  # (no mixer reads it: it only records the longest trained length, as transformers' configs do)
            raise ValueError(f"max_position_embeddings must be None or a positive integer, got "
                             f"{self.max_position_embeddings!r}.")
        if self.intermediate_size and not (isinstance(self.hidden_act, str) and self.hidden_act in ACT2FN):
            raise ValueError(f"hidden_act={self.hidden_act!r} is not an activation transformers knows; e.g. 'silu', "
                             "'gelu', 'relu'.")
        if not _is_int(self.intermediate_size) or self.intermediate_size < 0:
            raise ValueError(f"intermediate_size must be an integer >= 0 (0 means no MLP), got {self.intermediate_size!r}.")
        if self.head_dim is not None and (not _is_int(self.head_dim) or self.head_dim < 2):
            raise ValueError(f"head_dim must be None (hidden_size / num_attention_heads) or an integer >= 2, got {self.head_dim!r}.")
        if self.has_attention:
            if self.head_dim is None and self.hidden_size % self.num_attention_heads != 0:
                raise ValueError(
                    f"num_attention_heads={self.num_attention_heads} does not divide hidden_size={self.hidden_size}; "
                    "pick a divisor or set head_dim explicitly."
                )
            if self.num_attention_heads % self.num_key_value_heads != 0:
                raise ValueError(
                    f"num_key_value_heads={self.num_key_value_heads} must divide "
                    f"num_attention_heads={self.num_attention_heads} (grouped-query attention)."
                )
            if not _is_number(self.rope_theta) or self.rope_theta <= 0:
                raise ValueError(f"rope_theta must be a finite number > 0 (the rotary embeddings' base), got {self.rope_theta!r}.")
            if self.attention_head_dim % 2 != 0:
                raise ValueError(f"The attention head dim must be even for rotary embeddings, got {self.attention_head_dim}.")
        if "sliding_attention" in self.mixer_types and (not _is_int(self.sliding_window) or self.sliding_window < 1):
            raise ValueError(f"sliding_window must be an integer >= 1 for 'sliding_attention', got {self.sliding_window!r}.")
        if self.bidirectional and any(m in ("lstm", "gru") for m in self.mixer_types) and self.hidden_size % 2:
            raise ValueError(
                f"A bidirectional LSTM/GRU splits hidden_size={self.hidden_size} between two directions: it must be even."
            )
        if "mamba2" in self.mixer_types:
            inner = self.mamba_expand * self.hidden_size
            if inner % self.mamba_head_dim != 0:
                raise ValueError(
                    f"mamba_expand * hidden_size = {inner} must be a multiple of mamba_head_dim={self.mamba_head_dim}."
                )
            if (inner // self.mamba_head_dim) % self.mamba_n_groups != 0:
                raise ValueError(
                    f"mamba_n_groups={self.mamba_n_groups} must divide the number of mamba heads "
                    f"({inner // self.mamba_head_dim})."
                )
        if "linear_attention" in self.mixer_types:
            heads = self.linear_attention_heads_in_use
            if self.linear_attention_head_dim is None and self.hidden_size % heads != 0:
                raise ValueError(
                    f"linear attention heads ({heads}) do not divide hidden_size={self.hidden_size}; set "
                    + ("linear_attention_num_heads to a divisor of it" if self.linear_attention_num_heads
                       else "linear_attention_num_heads") + " or set linear_attention_head_dim."
                )
            if self.linear_attention_feature_map not in ("elu", "relu", "identity"):
                raise ValueError(
                    f"linear_attention_feature_map={self.linear_attention_feature_map!r}; allowed: 'elu', 'relu', 'identity'."
                )


def _mixer_list(mixer_types) -> list:
    if isinstance(mixer_types, str):  # list("lstm") would be ['l', 's', 't', 'm']
        raise ValueError(f"mixer_types must be a list with one mixer name per layer, e.g. [{mixer_types!r}]; got the "
                         f"string {mixer_types!r}.")
    if isinstance(mixer_types, (bytes, Mapping, Set)) or not isinstance(mixer_types, Iterable):
        # (a dict or a set would give its keys, a set in no set order; any sequence is taken: a numpy array, Hydra's
        # ListConfig)
        raise ValueError(f"mixer_types must be a list with one mixer name per layer, e.g. ['attention', 'lstm']; got "
                         f"{type(mixer_types).__name__} {mixer_types!r}.")
    return list(mixer_types)


def near_miss(name: str, names) -> str | None:
    """The one of `names` that `name` looks like a misspelling of (a letter or two off: atention_mask, mixer_type), or
    None. Not a name that holds one of them or is held by one with more around it (encoder_attention_mask,
    use_sliding_window, hidden_states): another model's argument, not a typo of ours."""
    meant = difflib.get_close_matches(name, names, n=1, cutoff=0.75)
    if not meant:
        return None
    longer, shorter = sorted((name, meant[0]), key=len, reverse=True)
    return None if shorter in longer and len(longer) - len(shorter) > 2 else meant[0]


def _refuse_misspelt_fields(kwargs):
    """transformers keeps a keyword its config does not know as an attribute, unused: one a letter or two off a field
    of ours (mixer_type, bidirectonal) would build another model than asked, silently. Refused, naming the field meant.
    Token ids are left out: transformers' own (sep_token_id, forced_eos_token_id) are as close to ours."""
    for name in kwargs:
        if name.endswith("_token_id") or name in _TRANSFORMERS_FIELDS or name in _SEQARCH_FIELDS:
            continue
        meant = near_miss(name, _SEQARCH_FIELDS)
        if meant:
            raise ValueError(f"SeqArchConfig has no field {name!r}: did you mean {meant!r}? (An unknown keyword "
                             f"would be kept but never read.)")


# transformers' Mamba2Config options that ours has one way only (its defaults): another value was stored, unused.
_MAMBA2_CONFIG_FIXED = {
    "use_conv_bias": True, "use_bias": False, "norm_before_gate": False, "rms_norm": True,
    "time_step_limit": (0.0, math.inf), "time_step_min": 0.001, "time_step_max": 0.1, "time_step_floor": 1e-4,
}

# transformers' Mamba2Config names (and GPT-2's norm epsilon) for fields of ours: a config ported from there built the
# default sizes, silently.
_OTHER_MODELS_NAMES = {
    "state_size": "mamba2 layers take mamba_state_size",
    "n_groups": "mamba2 layers take mamba_n_groups",
    "chunk_size": "mamba2 layers take mamba_chunk_size (linear attention linear_attention_chunk_size)",
    "expand": "mamba2 layers take mamba_expand",
    "conv_kernel": "mamba2 layers take mamba_conv_kernel",
    "num_heads": "attention takes num_attention_heads; mamba2's heads are mamba_expand * hidden_size / mamba_head_dim",
    "layer_norm_epsilon": "the norms take rms_norm_eps",
}

# Other models' names for the layers (transformers' per-layer layer_types, GPT-2's n_layer, ...): kept as attributes
# and never read, they built a model of other layers than asked.
_OTHER_MODELS_LAYER_FIELDS = ("layer_types", "num_layers", "n_layer", "n_layers", "mixers")


def _other_models_fields(values: dict) -> dict[str, str]:
    """Of `values` (keyword arguments, or a saved config), the other models' fields set to something SeqArchConfig
    does not do, which transformers would keep and never read (or, as a load-time override, drop): name -> why."""
    found = {}
    for name in _OTHER_MODELS_LAYER_FIELDS:
        if values.get(name) is not None:
            found[name] = (f"SeqArchConfig takes its layers as mixer_types (one mixer name per layer, e.g. "
                           f"['attention', 'lstm']), not {name}={values[name]!r}, which it would never read.")
    for name, ours in _OTHER_MODELS_NAMES.items():
        if values.get(name) is not None:
            found[name] = (f"SeqArchConfig has no field {name!r} (another model's name): {ours}. (An unknown keyword "
                           "would be kept but never read.)")
    for name in ("attention_bias", "mlp_bias"):  # Llama's switches
        if values.get(name):
            found[name] = (f"{name}={values[name]!r}: hf_seqarch's attention and MLP projections have no bias (as "
                           "Llama's by default); leave it out or set it False.")
    for name, fixed in _MAMBA2_CONFIG_FIXED.items():
        value = values.get(name, fixed)
        if (tuple(value) if isinstance(value, list) else value) != fixed:  # (JSON's list as the tuple)
            found[name] = (f"{name}={value!r}: hf_seqarch's mamba2 layers have {name}={fixed!r} only (transformers' "
                           "Mamba2Config option); leave it out.")
    return found


def _refuse_other_models_fields(kwargs):
    found = _other_models_fields(kwargs)
    if found:
        raise ValueError(next(iter(found.values())))


def without_other_models_fields(config_dict: dict, warn: bool = False) -> dict:
    """A saved config without the fields of other models that earlier versions kept (the model was built from
    mixer_types and our own fields all the same), with a warning (warn=True) naming those set; null ones go quietly."""
    stray = list(_other_models_fields(config_dict))
    if warn and stray:
        logger.warning(f"This config holds {', '.join(stray)}: other models' fields, which SeqArchConfig never reads "
                       "(its layers are mixer_types, its mamba2 sizes the mamba_ fields): ignored.")
    null = [name for name in (*_OTHER_MODELS_LAYER_FIELDS, *_OTHER_MODELS_NAMES) if name in config_dict]
    return {name: value for name, value in config_dict.items() if name not in (*stray, *null)}


_TRANSFORMERS_FIELDS = frozenset(PretrainedConfig().to_dict())  # the base config's own fields, never refused
_SEQARCH_FIELDS = tuple(name for name in inspect.signature(SeqArchConfig.__init__).parameters
                        if name not in ("self", "kwargs"))


def _check_dropout(name, value):
    if name == "classifier_dropout" and value is None:  # (transformers' "the model's dropout": 0 here)
        return
    if not _is_number(value) or not 0 <= value < 1:  # (1 would zero every output, silently)
        raise ValueError(f"{name} must be a probability in [0, 1)" + (" or None" if name == "classifier_dropout"
                         else "") + f", got {value!r}.")


def _check_bool(name, value):
    # A string such as "false" (from a command line or a hand-edited config.json) would count as True.
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}.")


def _plain_scalar(value):
    """A numpy scalar (np.int64 from a sweep, np.float32) or a 0-d torch tensor as the Python number it holds, also
    inside a list (eos ids): what the checks accept and JSON can save (a tensor in a field the stack does not use was
    kept, and save_pretrained failed inside json). Anything else unchanged."""
    if _is_array_scalar(value):
        return value.item()
    if isinstance(value, (list, tuple)) and any(_is_array_scalar(item) for item in value):
        return type(value)(_plain_scalar(item) for item in value)
    return value


def _is_array_scalar(value) -> bool:
    return type(value).__module__ in ("numpy", "torch") and getattr(value, "ndim", None) == 0 and hasattr(value, "item")


def _check_problem_type(problem_type):
    if problem_type not in PROBLEM_TYPES:
        raise ValueError(f"problem_type must be None (inferred from num_labels and the labels) or one of "
                         f"{list(PROBLEM_TYPES[1:])}, got {problem_type!r}.")


def _check_num_labels(num_labels):
    if not _is_int(num_labels) or num_labels < 1:
        raise ValueError(f"num_labels must be a positive integer (1: regression), got {num_labels!r}.")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    """A finite Python int or float, not a bool (numpy scalars would pass here and then fail to save as JSON; NaN
    would pass every range check, as NaN < 0 is False)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float
        return False


def _as_bool(value):
    """0 and 1 as the bools they mean; anything else unchanged (validate_seqarch refuses what is not a bool)."""
    return bool(value) if type(value) is int and value in (0, 1) else value

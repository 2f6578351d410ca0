"""hf_seqarch: LSTM, GRU, attention, Mamba-2 and linear attention as HuggingFace models, alone or mixed per layer.

Importing the package registers the config and the four model classes with the transformers Auto classes.
"""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
)

from .cache_seqarch import SeqArchCache
from .configuration_seqarch import MIXER_TYPES, SeqArchConfig
from .modeling_seqarch import (
    SeqArchForCausalLM,
    SeqArchForSequenceClassification,
    SeqArchForTokenClassification,
    SeqArchModel,
    SeqArchPreTrainedModel,
)
from .tools.streaming import StreamingSession

__version__ = "0.1.0"

AutoConfig.register(SeqArchConfig.model_type, SeqArchConfig, exist_ok=True)
for _auto, _model in (
    (AutoModel, SeqArchModel),
    (AutoModelForCausalLM, SeqArchForCausalLM),
    (AutoModelForSequenceClassification, SeqArchForSequenceClassification),
    (AutoModelForTokenClassification, SeqArchForTokenClassification),
):
    _auto.register(SeqArchConfig, _model, exist_ok=True)

__all__ = [
    "MIXER_TYPES",
    "SeqArchCache",
    "SeqArchConfig",
    "SeqArchModel",
    "SeqArchPreTrainedModel",
    "SeqArchForCausalLM",
    "SeqArchForSequenceClassification",
    "SeqArchForTokenClassification",
    "StreamingSession",
]

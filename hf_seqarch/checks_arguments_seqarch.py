"""What the forwards check in their arguments before running a layer: tensors where tensors are due, misspelt or
unsupported keywords, packed sequences, a mask of the past that disagrees with the cache, logits_to_keep, and each
head's labels. A bad input gets a message naming what was wrong and what is allowed, not a failure inside torch."""

import math
import numbers
import operator

import torch

from .configuration_seqarch import near_miss
from .graph_capture import capturing_graph, values_readable


def refuse_past_mask_disagreeing(past_mask, past_real, length):
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


def is_integer(tensor) -> bool:
    """Integer dtype (any width), not bool."""
    return not (tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool)


def refuse_packed_sequences(position_ids, token_mask):
    """position_ids that go back (or stay) within a row, from one real token to a later one, mark several sequences
    packed into the row (transformers' DataCollatorWithFlattening, padding-free training; a sequence of one token then
    starts 0, 0, 1, ...). No mixer here separates them: recurrences would carry one sequence's state into the next
    and attention would see across them."""
    positions = position_ids.expand(token_mask.shape) if token_mask is not None else position_ids  # (B or 1, T)
    highest = positions  # so far, over the real tokens (pads may have any position: generate gives them 1)
    if token_mask is not None:
        lowest = -math.inf if positions.is_floating_point() else torch.iinfo(positions.dtype).min
        highest = torch.where(token_mask, positions, lowest)
    backwards = positions[:, 1:] <= highest.cummax(1).values[:, :-1]  # (B or 1, T - 1)
    if token_mask is not None:
        backwards &= token_mask[:, 1:]
    if bool(backwards.any()):
        raise ValueError(
            "position_ids go back (or repeat) within a row, as they do when several sequences are packed into one "
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


def check_call(tensors, kwargs):
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


def refuse_zero_count_with_labels(kwargs, labels, every_label_counts=False):
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
    """Packed sequences marked by their boundaries rather than by position_ids (`refuse_packed_sequences`)."""
    given = [name for name in PACKING_ARGUMENTS if kwargs.get(name) is not None]
    if given:
        raise ValueError(
            f"{', '.join(given)} mark several sequences packed into one row (DataCollatorWithFlattening, padding-free "
            "training): no mixer here keeps them apart, so each sequence would read the one before it. Pad the "
            "sequences instead (e.g. DataCollatorWithPadding / DataCollatorForLanguageModeling)."
        )


def check_classification_inputs(head, output_layer, input_ids, attention_mask, kwargs, pools_rows=False):
    """The classification heads run whole sequences: a cache passed to them would be silently ignored (refused), and
    pad ids without a mask are read as tokens, every output of an encoder seeing them (warned, as transformers does).
    config.num_labels (or id2label) changed after the head was built is refused: the labels would be checked against
    it and the loss would fail inside torch on the layer's other width, as it does in transformers' own heads. A
    sequence classifier (pools_rows) refuses a row without a real token (it would pool a pad, or zeros)."""
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
    if pools_rows and isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2 and values_readable(
        attention_mask
    ):
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


def class_ids(labels, num_classes, name, argument="labels", ignore_index=-100):
    """Class-id labels checked to be in [0, num_classes) or ignore_index (the loss's: -100 unless passed), as int64:
    what cross_entropy takes (int32, int16 or uint8 ids fail inside it). One device sync (a GPU waits for the work
    queued before it: the heads check before running their layers)."""
    if not isinstance(ignore_index, numbers.Integral) or isinstance(ignore_index, bool):
        raise ValueError(f"ignore_index must be an int (the label value the loss ignores), got {ignore_index!r}.")
    allowed = f"[0, {name}={num_classes}) or {ignore_index} (ignored)"
    if not is_integer(labels):
        raise ValueError(f"{argument} must be integer ids in {allowed}, got {labels.dtype}.")
    labels = labels.long()
    if not values_readable(labels) or not labels.numel():
        return labels  # no reading of values in a recorded graph (graph_capture)
    ignored = labels == ignore_index
    low, high = value_range(labels.masked_fill(ignored, 0))  # ignored ones read as class 0
    if low < 0 or high >= num_classes:
        valid = labels[~ignored]
        raise ValueError(f"{argument} must be in {allowed}; got values in [{int(valid.min())}, {int(valid.max())}].")
    return labels


def kept_count(keep, length):
    """How many of `length` positions `keep` (from `positions_to_keep`) leaves. Arithmetic on the slice, where
    len(range(length)[keep]) would make torch.compile specialize the graph to one length (a recompile for each)."""
    if isinstance(keep, slice):  # slice(-n, None): the last n, 0 keeping all
        return length if keep.start == 0 else min(-keep.start, length)
    return keep.shape[-1]


def positions_to_keep(logits_to_keep, length, with_labels):
    """logits_to_keep as an index of the positions (transformers' meaning): an int n >= 0, the last n (0: all), or a
    1-D tensor of positions. With labels, a tensor must name the positions an int would (the last n, in order): the
    loss pairs logits with labels by place."""
    if isinstance(logits_to_keep, torch.Tensor) and logits_to_keep.dim() == 0 and is_integer(logits_to_keep):
        logits_to_keep = int(logits_to_keep)
    if isinstance(logits_to_keep, numbers.Integral) and not isinstance(logits_to_keep, bool):  # numpy ints too
        if operator.index(logits_to_keep) < 0:
            raise ValueError(f"logits_to_keep must be >= 0 (the last n positions; 0 keeps all), got {logits_to_keep}.")
        return slice(-operator.index(logits_to_keep), None)
    if not isinstance(logits_to_keep, torch.Tensor) or logits_to_keep.dim() != 1 or not is_integer(logits_to_keep):
        raise ValueError("logits_to_keep must be an int (the last n positions; 0 keeps all) or a 1-D integer tensor "
                         f"of positions, got {logits_to_keep!r}.")
    keep = logits_to_keep.long()  # (a uint8 tensor would index as a boolean mask)
    if length is None or not values_readable(keep):
        return keep
    low, high = value_range(keep) if len(keep) else (0, 0)
    if low < -length or high >= length:
        raise ValueError(f"logits_to_keep holds positions in [{low}, {high}]; the input has {length} tokens.")
    if with_labels and not torch.equal(keep.remainder(length).cpu(), torch.arange(length - len(keep), length)):
        raise ValueError(
            "With labels, logits_to_keep must keep the last positions in order (the loss pairs each logit with the "
            "label at its place): pass labels (batch, length) for the whole input, without logits_to_keep."
        )
    return keep


def value_range(tensor) -> tuple:
    """(min, max) of a non-empty tensor as Python numbers: one pass, one device sync."""
    low, high = torch.stack(torch.aminmax(tensor)).tolist()
    return low, high


def batch_and_length(input_ids, inputs_embeds):
    """(B, T) of the inputs given, or None when they are not one (B, T) or (B, T, width) tensor (the model says so)."""
    inputs = input_ids if input_ids is not None else inputs_embeds
    return tuple(inputs.shape[:2]) if isinstance(inputs, torch.Tensor) and inputs.dim() >= 2 else None


def sequence_problem(config, labels) -> str:
    """The problem transformers' sequence-classification loss takes `labels` for: config.problem_type, else the one
    it infers (and then sets) as it does; integer labels of any width count as class ids (it would take int16 or
    uint8 ones for multi-label targets and fail inside BCE)."""
    if config.problem_type is not None:
        return config.problem_type
    if config.num_labels == 1:
        return "regression"
    return "single_label_classification" if is_integer(labels) else "multi_label_classification"


def sequence_labels(labels, batch, config, ignore_index=-100):
    """`labels` checked to have the shape (and kind) the problem takes, class ids as int64: transformers' losses would
    fail inside torch, or (MSE on other shapes) broadcast into a wrong loss. One per sequence, in any shape with
    `batch` elements, as transformers' loss flattens them; (batch, num_labels) where there are several."""
    problem, num_labels = sequence_problem(config, labels), config.num_labels
    if problem == "single_label_classification":
        if labels.numel() != batch:
            raise ValueError(f"{problem} takes one class id per sequence: labels of shape ({batch},), got "
                             f"{tuple(labels.shape)}.")
        return class_ids(labels, num_labels, "num_labels", ignore_index=ignore_index)
    one_each = problem == "regression" and num_labels == 1
    fits = labels.numel() == batch if one_each else tuple(labels.shape) == (batch, num_labels)
    if not fits or (problem == "multi_label_classification" and not labels.is_floating_point()):
        what = "one target per label" if problem == "regression" else "float 0/1 targets, one per label"
        shape = f"({batch},)" if one_each else str((batch, num_labels))
        raise ValueError(f"{problem} with num_labels={num_labels} takes {what}: labels of shape {shape}, got "
                         f"{tuple(labels.shape)} ({labels.dtype}).")
    if problem == "multi_label_classification" and labels.numel() and values_readable(labels):
        low, high = value_range(labels)  # (one device sync, as class ids take)
        if not (0 <= low and high <= 1):  # (NaN fails both)
            raise ValueError(f"multi_label_classification takes targets in [0, 1] (1: the label applies); got values "
                             f"in [{low}, {high}].")
    return labels

"""Offline text for examples and tests: the Python reference docs that every install carries.

`pydoc_data.topics` (the text behind `help("assert")`, ~470K characters in ~80 sections) needs no download,
so the examples run on a fresh machine without network. Two datasets are built from it, for any tokenizer:

- `lm_blocks`: the corpus cut into fixed-length blocks for causal-LM pretraining;
- `section_classification`: paragraphs labelled with the section they come from.

Both return plain lists of feature dicts: a list is a map-style dataset that the Trainer and a torch
DataLoader take as is, and the collators (DataCollatorForLanguageModeling / DataCollatorWithPadding) pad them.
"""

import numbers
import random

import pydoc_data.topics

# Four large sections, in a fixed order so that label ids never depend on the Python version's dict order.
DEFAULT_SECTIONS = ("specialnames", "compound", "types", "string-methods")


def corpus_text(max_chars: int | None = None) -> str:
    """All sections, sorted by name, separated by blank lines; the first `max_chars` characters if given."""
    text = "\n\n".join(body for _, body in sorted(pydoc_data.topics.topics.items()))
    return text if max_chars is None else text[:max_chars]


def lm_blocks(tokenizer, block_size: int, max_chars: int | None = None, eval_fraction: float = 0.05):
    """(train, eval) lists of {"input_ids": block_size ids}; the last `eval_fraction` of the text is held out.

    Blocks are contiguous and never cross the train/eval boundary, so no evaluated text is trained on.
    """
    if block_size < 2:
        raise ValueError(f"block_size must be >= 2 (an LM predicts each token from the previous ones), got {block_size}.")
    _check_eval_fraction(eval_fraction)
    ids = tokenizer(corpus_text(max_chars), add_special_tokens=False)["input_ids"]
    blocks = [ids[i : i + block_size] for i in range(0, len(ids) - block_size + 1, block_size)]
    num_eval = max(1, int(len(blocks) * eval_fraction)) if eval_fraction > 0 else 0
    if len(blocks) <= num_eval:
        held_out = f", {num_eval} of them held out for evaluation (eval_fraction={eval_fraction})" if blocks else ""
        raise ValueError(
            f"The corpus gives only {len(blocks)} block(s) of {block_size} tokens{held_out}, none left to train on: "
            "lower block_size or raise max_chars."
        )
    to_features = lambda chunk: [{"input_ids": block} for block in chunk]  # noqa: E731
    return to_features(blocks[: len(blocks) - num_eval]), to_features(blocks[len(blocks) - num_eval :])


def section_paragraphs(sections=DEFAULT_SECTIONS, min_chars: int = 80, per_section: int | None = None):
    """(texts, labels): the paragraphs (blank-line separated, at least `min_chars` long) of each section.

    Each section keeps `per_section` paragraphs (default: as many as the smallest section has), so classes are
    balanced and chance accuracy is 1/len(sections).
    """
    if per_section is not None and (
        not isinstance(per_section, numbers.Integral) or isinstance(per_section, bool) or per_section < 1
    ):
        raise ValueError(f"per_section must be an integer >= 1 (paragraphs per section), or None, got {per_section!r}.")
    unknown = [s for s in sections if s not in pydoc_data.topics.topics]
    if unknown:
        raise ValueError(f"Unknown section(s) {unknown}; available: {sorted(pydoc_data.topics.topics)}.")
    paragraphs = {
        section: [p.strip() for p in pydoc_data.topics.topics[section].split("\n\n") if len(p.strip()) >= min_chars]
        for section in sections
    }
    smallest = min(len(found) for found in paragraphs.values())
    per_section = smallest if per_section is None else per_section
    if per_section > smallest:
        raise ValueError(f"A section has only {smallest} paragraphs of >= {min_chars} characters; per_section={per_section}.")
    texts, labels = [], []
    for label, section in enumerate(sections):
        texts += paragraphs[section][:per_section]
        labels += [label] * per_section
    return texts, labels


def section_classification(
    tokenizer, sections=DEFAULT_SECTIONS, max_length: int = 256, per_section=None, eval_fraction=0.2, seed=0
):
    """(train, eval) lists of {"input_ids", "label"}: which section does a paragraph come from?

    Paragraphs are truncated to `max_length` tokens, shuffled with `seed` and split class by class, so that both
    sets are balanced (chance is 1 / len(sections) in each).
    """
    _check_eval_fraction(eval_fraction)
    texts, labels = section_paragraphs(sections, per_section=per_section)
    encoded = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
    rng, train, held_out = random.Random(seed), [], []
    for label in range(len(sections)):
        of_class = [{"input_ids": ids, "label": label} for ids, y in zip(encoded, labels) if y == label]
        rng.shuffle(of_class)
        num_eval = max(1, int(len(of_class) * eval_fraction)) if len(of_class) > 1 and eval_fraction > 0 else 0
        held_out += of_class[:num_eval]
        train += of_class[num_eval:]
    rng.shuffle(train)
    rng.shuffle(held_out)
    return train, held_out


def _check_eval_fraction(eval_fraction):
    """The share of the data held out for evaluation: 0 (none) up to, not including, 1 (some must be trained on)."""
    if isinstance(eval_fraction, bool) or not isinstance(eval_fraction, numbers.Real) or not 0 <= eval_fraction < 1:
        raise ValueError(f"eval_fraction must be a number in [0, 1) (the share held out for evaluation), got "
                         f"{eval_fraction!r}.")

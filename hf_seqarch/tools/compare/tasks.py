"""The data every architecture is trained and scored on: MQAR, selective copying, held-out text.

Labels follow the transformers convention (aligned with input_ids, -100 = not scored; the model's
loss shifts them, so `labels[t]` is what the logits at t-1 must predict). Every batch is a pure
function of (seed, task, index): all architectures see exactly the same data in the same order.
"""

import itertools

import numpy as np
import torch

from ..text_data import corpus_text

IGNORE = -100


def chance_levels(preset: dict) -> tuple[dict[int, float], float]:
    """What a model that recalls nothing scores: for MQAR at each length, a guess among the values its sequence showed
    (1 / pairs: any value seen earlier, where a uniform guess over the vocabulary's values would be far lower); for
    selective copying, a uniform guess of a copied token (the alphabet without the noise and marker tokens)."""
    return {length: 1 / pairs for length, pairs in preset["mqar"]}, 1 / (preset["copy_alphabet"] - 2)


def generator(seed: int, *stream: int) -> torch.Generator:
    """A torch generator for one batch: independent streams for (seed, task, batch index) without collisions."""
    # (the count first: SeedSequence pads its entropy with zeros, so (seed, 3) and (seed, 3, 0) would be one stream)
    state = np.random.SeedSequence([seed, len(stream), *stream]).generate_state(2)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


# -- MQAR -------------------------------------------------------------------------------------------
def check_mqar(length: int, num_pairs: int, vocab_size: int):
    if num_pairs < 1 or 4 * num_pairs > length or length % 2:
        raise ValueError(f"MQAR needs an even length >= 4 * pairs; got length {length} with {num_pairs} pairs.")
    if vocab_size // 2 - 1 < num_pairs:
        raise ValueError(f"MQAR with {num_pairs} pairs needs vocab_size >= {2 * num_pairs + 2}, got {vocab_size}.")


def mqar_batch(num_examples, length, num_pairs, vocab_size, gen, power_a=0.01):
    """Multi-query associative recall as defined by Zoology (Arora et al., 2023).

    The sequence opens with `num_pairs` key-value pairs (distinct keys from [1, V/2), values from
    [V/2, V)); each key is then queried once, at a gap from the context drawn from a power law
    (p(gap) ~ gap^(power_a - 1), so most queries are near, a few far). After each query the model
    must emit that key's value. Every other position holds a random token (distractors).
    Returns input_ids and labels, both (num_examples, length).
    """
    check_mqar(length, num_pairs, vocab_size)
    n, half, context = num_examples, vocab_size // 2, 2 * num_pairs
    # Distinct keys and values per row: the first num_pairs of a random permutation.
    keys = torch.argsort(torch.rand(n, half - 1, generator=gen), dim=1)[:, :num_pairs] + 1
    values = torch.argsort(torch.rand(n, vocab_size - half, generator=gen), dim=1)[:, :num_pairs] + half
    space = (length - context) // 2  # query slots: every other position after the context
    weights = power_a * torch.arange(1, space + 1, dtype=torch.float64) ** (power_a - 1)
    gaps = torch.multinomial(weights.expand(n, space), num_pairs, replacement=False, generator=gen)
    query_positions = context + 2 * gaps  # (n, pairs), at most length - 2

    inputs = torch.zeros(n, length, dtype=torch.long)
    inputs[:, 0:context:2], inputs[:, 1:context:2] = keys, values
    inputs.scatter_(1, query_positions, keys)
    labels = torch.full((n, length), IGNORE, dtype=torch.long)
    labels.scatter_(1, query_positions + 1, values)  # predicted by the logits at the query
    filler = inputs == 0  # position 0 is always a key (>= 1), so 0 marks exactly the free slots
    inputs[filler] = torch.randint(vocab_size, (n, length), generator=gen)[filler]
    return inputs, labels


# -- Selective copying --------------------------------------------------------------------------------
def check_copying(length: int, num_tokens: int, alphabet: int, vocab_size: int):
    if alphabet < 3 or alphabet > vocab_size:
        raise ValueError(f"Selective copying needs 3 <= alphabet <= vocab_size, got alphabet {alphabet}.")
    if length < 3 * num_tokens + 1:
        raise ValueError(f"Selective copying of {num_tokens} tokens needs length >= {3 * num_tokens + 1}, got {length}.")


def copying_batch(num_examples, length, num_tokens, alphabet, gen):
    """Selective copying (Gu & Dao, 2023): tokens scattered among noise, to be copied in order after markers.

    Layout: a region of `length - num_tokens - 1` positions holding `num_tokens` tokens from
    [1, alphabet - 1) at random positions (noise 0 elsewhere), then `num_tokens + 1` markers
    (alphabet - 1). At the j-th marker the model must emit the j-th token; the last marker only
    gives the shifted loss a position to score the last token at.
    """
    n, region = num_examples, length - num_tokens - 1
    tokens = torch.randint(1, alphabet - 1, (n, num_tokens), generator=gen)
    positions = torch.argsort(torch.rand(n, region, generator=gen), dim=1)[:, :num_tokens].sort(dim=1).values
    inputs = torch.zeros(n, length, dtype=torch.long)
    inputs.scatter_(1, positions, tokens)
    inputs[:, region:] = alphabet - 1
    labels = torch.full((n, length), IGNORE, dtype=torch.long)
    labels[:, region + 1 :] = tokens
    return inputs, labels


# -- Held-out text -----------------------------------------------------------------------------------
class ByteText:
    """pydoc_data.topics as UTF-8 bytes (token = byte), the last `eval_fraction` held out."""

    def __init__(self, eval_fraction: float = 0.1):
        data = torch.tensor(list(corpus_text().encode("utf-8")), dtype=torch.long)
        split = int(len(data) * (1 - eval_fraction))
        self.train, self.held_out = data[:split], data[split:]

    def train_batch(self, batch_size, length, gen):
        starts = torch.randint(0, len(self.train) - length, (batch_size,), generator=gen)
        inputs = torch.stack([self.train[s : s + length] for s in starts.tolist()])
        return inputs, inputs.clone()

    def eval_windows(self, length, max_windows):
        """The first `max_windows` non-overlapping held-out windows (every byte of a window but its first is scored)
        that do not also occur verbatim in the training text: the corpus repeats some passages, which a model that
        memorised them would score on as if it had learned the language."""
        train_bytes = bytes(self.train.tolist())
        candidates = self.held_out[: len(self.held_out) // length * length].view(-1, length)  # (windows, length)
        windows = list(itertools.islice((w for w in candidates if bytes(w.tolist()) not in train_bytes), max_windows))
        if not windows:
            raise ValueError(f"The held-out text has {len(self.held_out)} bytes: no window of {length} that the "
                             "training text does not hold.")
        inputs = torch.stack(windows)  # (count, length)
        return inputs, inputs.clone()


# -- Trainer datasets ----------------------------------------------------------------------------------
class BatchDataset(torch.utils.data.Dataset):
    """Item i is the whole batch i (a dict of (B, T) tensors), made on demand by `make_batch(i)`.

    Whole batches as items let a batch hold one sequence length (MQAR mixes lengths across batches,
    as Zoology does, without padding) and make the data a function of the index alone. Use it with
    per_device_train_batch_size=1 and `unwrap_batch` as the collator.
    """

    def __init__(self, make_batch, num_batches: int):
        self.make_batch, self.num_batches = make_batch, num_batches

    def __len__(self):
        return self.num_batches

    def __getitem__(self, index):
        inputs, labels = self.make_batch(index)
        return {"input_ids": inputs, "labels": labels}


def unwrap_batch(items):
    (batch,) = items
    return batch


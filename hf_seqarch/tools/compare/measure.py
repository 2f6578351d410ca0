"""Speed and memory, measured the same way for every architecture.

Training: a full step (forward, backward, AdamW update) at a fixed number of tokens per step, warm-up
steps first, then the median of timed repeats, the lengths' repeats interleaved. Peak memory: on CUDA,
torch.cuda.max_memory_allocated above what was allocated before the step; on CPU, where torch keeps no
allocator statistics, the peak of the bytes held by tensors created during the step, tracked op by op
(`TensorMemoryTracker`).
Both leave out the weights and optimiser state that live across steps.
Decoding: batch 1, a prompt of each context length prefilled, then single-token steps from the cache.
"""

import statistics
import time
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

from ...modeling_seqarch import CACHE_FIELD, SeqArchForCausalLM

CPU_MEMORY_METHOD = (
    "peak bytes of the tensors created during one training step (activations, gradients, temporaries), "
    "tracked per operator with a TorchDispatchMode; weights and optimiser state that live across steps, "
    "and scratch memory that kernels allocate without returning it as a tensor, are not included"
)
CUDA_MEMORY_METHOD = "torch.cuda.max_memory_allocated() during one training step minus the bytes allocated before it"


class TensorMemoryTracker(TorchDispatchMode):
    """Counts the bytes of every tensor storage that an operator creates while active, until it is freed.

    Storages are seen once (views share them) and freed through a weakref finalizer, which fires when
    the last reference (autograd's saved tensors included) goes away; `peak` is the high-water mark.
    """

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._seen = WeakIdKeyDictionary()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for tensor in tree_flatten(out)[0]:
            # A view or an in-place result shares an input's storage: counted where it was made, or made before the
            # step (weights, optimiser state), which is not counted (weight.t() in a linear layer is such a view).
            if isinstance(tensor, torch.Tensor) and tensor.untyped_storage().data_ptr() not in inputs:
                self._track(tensor.untyped_storage())
        return out

    def _track(self, storage):
        if storage in self._seen:
            return
        size = storage.nbytes()
        self._seen[storage] = True
        self.live += size
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, size)

    def _free(self, size):
        self.live -= size


def synchronize(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def memory_method(device: torch.device) -> str:
    return CUDA_MEMORY_METHOD if device.type == "cuda" else CPU_MEMORY_METHOD


def step_peak_memory(step, device: torch.device) -> int:
    """Bytes allocated at the peak of one call of `step`, above what was allocated before it."""
    if device.type == "cuda":
        synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    tracker = TensorMemoryTracker()
    with tracker:
        step()
    return tracker.peak


def timed(fn, device: torch.device, warmup: int, repeats: int) -> list[float]:
    """Seconds per call of `fn` for `repeats` calls after `warmup` untimed ones (synchronised on GPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def training_step_costs(config, device, seq_lens, tokens_per_step, warmup, repeats, seed=0) -> list[dict]:
    """Per sequence length: tokens/s (median over repeats) and peak memory of a training step.

    One model for all lengths, and their timed steps interleaved: each round times every length once, in turn, the
    order reversed every other round. A slow spell of a shared machine then slows every length alike, where timing
    each length's repeats back to back put it into one length's cell (and bent the growth exponent: once n^0.3)."""
    torch.manual_seed(seed)
    model = SeqArchForCausalLM(config).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batches, steps = {}, {}
    for seq_len in seq_lens:
        batches[seq_len] = max(1, tokens_per_step // seq_len)
        generator = torch.Generator().manual_seed(seed)
        ids = torch.randint(config.vocab_size, (batches[seq_len], seq_len), generator=generator)
        steps[seq_len] = _training_step(model, optimizer, ids.to(device))
    for seq_len in seq_lens:
        for _ in range(warmup):
            steps[seq_len]()
    times = {seq_len: [] for seq_len in seq_lens}
    for round_index in range(repeats):
        for seq_len in seq_lens if round_index % 2 == 0 else seq_lens[::-1]:
            times[seq_len] += timed(steps[seq_len], device, warmup=0, repeats=1)
    rows = []
    for seq_len in seq_lens:
        batch, median = batches[seq_len], statistics.median(times[seq_len])
        rows.append(dict(seq_len=seq_len, batch_size=batch, tokens=batch * seq_len, step_seconds=times[seq_len],
                         median_step_seconds=median, tokens_per_second=batch * seq_len / median,
                         peak_memory_bytes=step_peak_memory(steps[seq_len], device)))
    return rows


def _training_step(model, optimizer, ids):
    """One full training step on `ids` (forward, backward, AdamW update), as a function of no arguments."""

    def step():
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


@torch.no_grad()
def decode_costs(config, device, contexts, repeats, warmup=2, seed=0) -> list[dict]:
    """Per context length: median milliseconds per generated token and the bytes the cache holds after the prompt."""
    torch.manual_seed(seed)
    model = SeqArchForCausalLM(config).to(device).eval()
    rows = []
    for context in contexts:
        prompt = torch.randint(config.vocab_size, (1, context), generator=torch.Generator().manual_seed(seed))
        out = model(input_ids=prompt.to(device), use_cache=True)
        cache = getattr(out, CACHE_FIELD)
        cache_bytes = cache.get_memory_footprint()
        state = {"token": out.logits[:, -1:].argmax(-1)}

        def decode_one():
            step = model(input_ids=state["token"], cache=cache, use_cache=True)
            state["token"] = step.logits[:, -1:].argmax(-1)  # greedy: the next input, as generate() would

        times = timed(decode_one, device, warmup, repeats)
        rows.append(dict(context=context, cache_bytes=cache_bytes, step_seconds=times,
                         ms_per_token=1e3 * statistics.median(times)))
    return rows

"""The GPU paths against the CPU ones, on the same weights and inputs: cuDNN's LSTM/GRU (packed sequences for
padding), the exact chunked scan (the factorised one is CPU-only), sdpa's and flex's CUDA kernels, the cache on
the device. Marked `cuda`: skipped without a GPU; benchmarks/gpu_check.sh runs them.

TF32 is turned off for these tests: with it, CUDA float32 matmuls (cuDNN's RNNs included) round to 10 mantissa
bits and could not be held to the CPU's float32. For the same reason mamba2 runs its PyTorch path here (mamba_ssm's
Triton matmuls use TF32 whatever torch's setting), except in the one test of its kernels, held to a TF32 tolerance
(test_mixers_linear_time holds each kernel to the PyTorch path the same way)."""

import copy

import pytest
import torch

from hf_seqarch import SeqArchForCausalLM, SeqArchForSequenceClassification, kernels_mamba2
from hf_seqarch.ops_chunked_scan import chunked_scan, scan_reference
from tester import STACKS, random_ids, tiny_model

pytestmark = pytest.mark.cuda


MAMBA2_KERNELS = {"mamba_chunk_scan_combined": kernels_mamba2.mamba_chunk_scan_combined,
                  "causal_conv1d_fn": kernels_mamba2.causal_conv1d_fn}  # None where not installed


@pytest.fixture(autouse=True)
def full_float32_precision(monkeypatch):
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    for name in MAMBA2_KERNELS:
        monkeypatch.setattr(kernels_mamba2, name, None)
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def padded_batch():
    """ids (3, 11) with left padding in row 0 and right padding in row 1, their mask, and labels (-100 at pads)."""
    ids = random_ids(3, 11)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    mask[1, 7:] = 0
    return ids, mask, ids.masked_fill(mask == 0, -100)


def step_on(model, device, inputs):
    """A training step's forward and backward on `device`: (outputs at the real tokens, loss, parameter grads), on
    the CPU."""
    model = model.to(device).train()
    inputs = {name: value.to(device) for name, value in inputs.items()}
    output = model(**inputs)
    output.loss.backward()
    real = inputs.get("attention_mask", torch.ones_like(inputs["input_ids"])).bool()
    logits = output.logits[real] if output.logits.dim() == 3 else output.logits
    grads = {name: p.grad.cpu() for name, p in model.named_parameters()}
    return logits.detach().cpu(), output.loss.detach().cpu(), grads


def assert_same_step(cpu, cuda):
    (cpu_logits, cpu_loss, cpu_grads), (cuda_logits, cuda_loss, cuda_grads) = cpu, cuda
    torch.testing.assert_close(cuda_logits, cpu_logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(cuda_loss, cpu_loss, rtol=1e-4, atol=1e-6)
    assert cuda_grads.keys() == cpu_grads.keys()
    for name, grad in cpu_grads.items():
        torch.testing.assert_close(cuda_grads[name], grad, rtol=1e-3, atol=1e-5, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("stack", STACKS)
def test_causal_lm_step_on_cuda_matches_cpu(stack):
    """Logits at the real tokens, loss and every gradient of a padded batch: the CUDA step gives the CPU's."""
    ids, mask, labels = padded_batch()
    model = tiny_model(SeqArchForCausalLM, STACKS[stack])
    inputs = dict(input_ids=ids, attention_mask=mask, labels=labels)
    assert_same_step(step_on(copy.deepcopy(model), "cpu", inputs), step_on(model, "cuda", inputs))


@pytest.mark.parametrize("padded", [False, True], ids=["whole", "padded"])  # (the conv kernel takes whole rows only)
def test_causal_lm_step_with_the_mamba2_kernels_matches_cpu(monkeypatch, padded):
    """The same step through mamba_ssm's scan and causal_conv1d's conv, those installed: relative errors within TF32's
    (their Triton matmuls use it whatever torch's setting)."""
    installed = {name: kernel for name, kernel in MAMBA2_KERNELS.items() if kernel is not None}
    if not installed:
        pytest.skip("neither mamba_ssm nor causal_conv1d is installed")
    for name, kernel in installed.items():
        monkeypatch.setattr(kernels_mamba2, name, kernel)
    ids, mask, labels = padded_batch()
    inputs = dict(input_ids=ids, attention_mask=mask, labels=labels) if padded else dict(input_ids=ids, labels=ids)
    # test_mixers_linear_time's kernel test's sizes: mamba_ssm's Triton kernels autotune once per (chunk, head dim,
    # state size) and dtype, minutes on a cold GPU, so the two tests share one autotuning.
    model = tiny_model(SeqArchForCausalLM, STACKS["mamba2+attention"], hidden_size=64, mamba_head_dim=16,
                       mamba_state_size=16, mamba_chunk_size=16)
    cpu, cuda = step_on(copy.deepcopy(model), "cpu", inputs), step_on(model, "cuda", inputs)

    def relative_error(a, b):
        return float((a - b).norm() / b.norm().clamp(min=1e-12))

    assert relative_error(cuda[0], cpu[0]) < 1e-3 and relative_error(cuda[1], cpu[1]) < 1e-3
    for name, grad in cpu[2].items():
        assert relative_error(cuda[2][name], grad) < 1e-2, name


@pytest.mark.parametrize("stack", ["lstm", "gru+sliding+attention", "mamba2+attention", "lstm+linear+sliding"])
def test_bidirectional_classifier_step_on_cuda_matches_cpu(stack):
    """Encoders: bidirectional cuDNN RNNs, both scans' directions, non-causal attention, the masked mean."""
    ids, mask, _ = padded_batch()
    model = tiny_model(SeqArchForSequenceClassification, STACKS[stack], bidirectional=True)
    inputs = dict(input_ids=ids, attention_mask=mask, labels=torch.tensor([0, 2, 1]))
    assert_same_step(step_on(copy.deepcopy(model), "cpu", inputs), step_on(model, "cuda", inputs))


@pytest.mark.parametrize("stack", STACKS)
def test_generate_on_cuda_matches_cpu(stack):
    """Greedy generation from a left-padded batch, cache on the device: the same tokens and step scores as on the CPU
    (float64, so that no near-tie between two tokens can go either way)."""
    ids, mask, _ = padded_batch()
    model = tiny_model(SeqArchForCausalLM, STACKS[stack], initializer_range=0.3).double()
    rows, results = [0, 2], {}  # a left-padded prompt and a whole one (row 1 is right-padded: not for generation)
    for device, copy_of_model in (("cpu", copy.deepcopy(model)), ("cuda", model.cuda())):
        out = copy_of_model.generate(ids[rows].to(device), attention_mask=mask[rows].to(device), max_new_tokens=6,
                                     min_new_tokens=6, do_sample=False, pad_token_id=0, output_scores=True,
                                     return_dict_in_generate=True)
        results[device] = out.sequences.cpu(), torch.stack(out.scores).cpu()
    torch.testing.assert_close(results["cuda"][0], results["cpu"][0], rtol=0, atol=0)
    # Not to float64's last bits where attention is: the CPU's and CUDA's sin and cos (RoPE's tables) differ there,
    # and each step's scores go through a softmax and a log.
    torch.testing.assert_close(results["cuda"][1], results["cpu"][1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("log_decay_scale", [0.5, 30.0], ids=["gentle", "strong"])
def test_chunked_scan_on_cuda_matches_reference(log_decay_scale):
    """The exact chunked scan (the one GPUs run) against the loop over time on the GPU: outputs, final state and the
    gradients of every input, q and k shared by groups of 2 heads, a length that is not a multiple of the chunk."""
    generator = torch.Generator().manual_seed(0)
    batch, length, groups, heads, size = 2, 37, 2, 4, 8
    leaves = [torch.randn(*shape, generator=generator) for shape in
              ((batch, length, groups, size), (batch, length, groups, size), (batch, length, heads, size))]
    leaves.append(-torch.rand(batch, length, heads, generator=generator) * log_decay_scale)
    leaves.append(torch.randn(batch, heads, size, size, generator=generator))  # the initial state
    dy, dstate = torch.randn(batch, length, heads, size).cuda(), torch.randn(batch, heads, size, size).cuda()
    results = []
    for scan in (lambda q, k, v, a, s: chunked_scan(q, k, v, a, chunk_size=16, initial_state=s), scan_reference):
        inputs = [leaf.cuda().requires_grad_() for leaf in leaves]
        y, state = scan(*inputs)
        torch.autograd.backward((y, state), (dy, dstate))
        results.append([y, state, *(x.grad for x in inputs)])
    for chunked, reference in zip(*results):
        torch.testing.assert_close(chunked, reference, rtol=1e-4, atol=1e-4)


def test_flex_attention_trains_on_cuda_like_sdpa():
    """flex_attention's CUDA kernels (forward and backward; the CPU has no backward) with padding and a window."""
    ids, mask, labels = padded_batch()
    steps = {}
    for implementation in ("sdpa", "flex_attention"):
        model = tiny_model(SeqArchForCausalLM, ["attention", "sliding_attention"], hidden_size=64,
                           attn_implementation=implementation)  # head size 16: flex's kernels want >= 16
        steps[implementation] = step_on(model, "cuda", dict(input_ids=ids, attention_mask=mask, labels=labels))
    assert_same_step(steps["sdpa"], steps["flex_attention"])

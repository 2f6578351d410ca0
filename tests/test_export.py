"""Graphs recorded from the model (torch.jit.trace, torch.export) replay right for inputs they never saw (masks, and
lengths where torch generalises them): a recorded graph keeps the Python branches taken while recording, so no branch
may depend on the example's values."""

import warnings

import pytest
import torch
from torch.export import Dim

from hf_seqarch import SeqArchForCausalLM, SeqArchForSequenceClassification
from hf_seqarch.mixer_context import real_tokens_first
from tester import random_ids, tiny_model

ALL_KINDS = ["lstm", "gru", "attention", "sliding_attention", "mamba2", "linear_attention"]


def left_padded(ids, pads=(2, 0)):
    mask = torch.ones_like(ids)
    for row, count in enumerate(pads):
        mask[row, :count] = 0
    return mask


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_jit_trace_with_an_all_ones_mask_honours_padding_later(kind):
    """Traced with a mask of ones, the graph kept "no padding" (the model reads an all-ones mask as none) and ignored
    every mask after; mamba2 and linear attention did not trace at all (the scan's set sizes took traced sizes),
    nor did sliding attention past twice its window (sdpa's enable_gqa got a traced bool)."""
    model = tiny_model(SeqArchForCausalLM, [kind], return_dict=False, use_cache=False, sliding_window=2)
    ids = random_ids(2, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (the tracer's warnings on Python values it records as constants)
        traced = torch.jit.trace(model, (ids, torch.ones_like(ids)), strict=False)
    padded = left_padded(ids)
    got, want = traced(ids, padded)[0], model(ids, attention_mask=padded)[0]
    real = padded.bool()
    torch.testing.assert_close(got[real], want[real], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(traced(ids, torch.ones_like(ids))[0], model(ids)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind,example_length", [("sliding_attention", 3), ("attention", 1)])
def test_jit_trace_on_a_short_example_keeps_the_window_and_causality(kind, example_length):
    """sdpa without a mask takes is_causal and no mask where the keys fit the window: traced on such an example (the
    default window is 128), the graph replayed that choice for longer inputs and attended past the window; traced on
    one token (where transformers' sdpa drops is_causal), it attended to the future. (With grouped-query heads a
    one-token trace records transformers' single-query head packing, which fails loudly on longer inputs.)"""
    model = tiny_model(SeqArchForCausalLM, [kind], return_dict=False, use_cache=False, sliding_window=4,
                       attn_implementation="sdpa", num_key_value_heads=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, (random_ids(1, example_length),), strict=False)
    ids = random_ids(2, 12)
    torch.testing.assert_close(traced(ids)[0], model(ids)[0], rtol=1e-5, atol=1e-5)


def test_jit_trace_records_no_op_the_legacy_onnx_exporter_lacks():
    """The legacy ONNX exporter (torch.onnx.export(dynamo=False)) works from a jit trace and has no rms_norm and no
    in-place and (the attention mask's): while tracing, every norm (the blocks', the final one, mamba2's gated one) is
    the formula written out, and the mask is built out of place. Nor has it autograd.Functions (Python ops to it):
    mamba2's and linear attention's chunked scan and mamba2's conv record plain ops."""
    model = tiny_model(SeqArchForCausalLM, ["mamba2", "attention", "linear_attention"], return_dict=False,
                       use_cache=False)
    ids = random_ids(2, 8)
    padded = left_padded(ids)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, (ids, padded), strict=False)
    ops = {node.kind() for node in traced.inlined_graph.nodes()}
    assert not ops & {"aten::rms_norm", "aten::__iand__", "prim::PythonOp"}
    # nor a cumsum over booleans (the positions from the mask): ONNX's CumSum takes numbers only
    cumsum_inputs = [next(node.inputs()).type() for node in traced.inlined_graph.nodes()
                     if node.kind() == "aten::cumsum"]
    assert cumsum_inputs and all(t.scalarType() != "Bool" for t in cumsum_inputs), cumsum_inputs
    torch.testing.assert_close(traced(ids, padded)[0], model(ids, attention_mask=padded)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_export_of_recurrent_layers_with_padding(kind, bidirectional):
    """torch.export cannot record packed sequences, which the LSTM / GRU mixers use for padded batches: it failed
    inside torch. While exporting they step their cells instead, and the program honours other masks."""
    model_class = SeqArchForSequenceClassification if bidirectional else SeqArchForCausalLM
    model = tiny_model(model_class, [kind, kind], bidirectional=bidirectional, use_cache=False)
    ids = random_ids(2, 7)
    program = torch.export.export(model, (ids,), {"attention_mask": left_padded(ids)}, strict=False)
    holed = torch.ones_like(ids)
    holed[0, 3], holed[1, 5:] = 0, 0  # a hole, and right padding: not the example's mask
    got = program.module()(ids, attention_mask=holed).logits
    torch.testing.assert_close(got, model(ids, attention_mask=holed).logits, rtol=1e-5, atol=1e-5)


def test_export_with_a_mask_records_no_stable_sort():
    """The recurrent mixers put each row's real tokens first with an argsort; a stable one has no ONNX function
    (torch.onnx.export failed for every padded mamba2 model). The keys are made distinct instead."""
    model = tiny_model(SeqArchForCausalLM, ["mamba2"], use_cache=False)
    ids = random_ids(2, 8)
    program = torch.export.export(model, (ids,), {"attention_mask": left_padded(ids)}, strict=False)
    assert "sort.stable" not in str(program.graph)
    holed = torch.ones_like(ids)
    holed[0, 2:4] = 0
    got = program.module()(ids, attention_mask=holed).logits
    real = holed.bool()
    torch.testing.assert_close(got[real], model(ids, attention_mask=holed).logits[real], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["mamba2", "linear_attention"])
def test_gradients_flow_through_an_exported_program(kind):
    """The chunked scan's hand-written backward cannot be recorded: an exported program raised at every call with grad
    enabled (its out= products), and once the scan's inputs were detached for that, passed no gradient through it.
    While recording, the scan (and mamba2's conv) run in plain differentiable ops: the program's gradients are the
    model's."""
    model = tiny_model(SeqArchForCausalLM, [kind, "attention"], use_cache=False)
    ids = random_ids(2, 8)
    mask = left_padded(ids)
    program = torch.export.export(model, (ids,), {"attention_mask": mask, "labels": ids}, strict=False).module()

    def gradients(module):
        loss = module(ids, attention_mask=mask, labels=ids).loss
        return dict(zip([name for name, _ in module.named_parameters()],
                        torch.autograd.grad(loss, list(module.parameters()))))

    got, want = gradients(program), gradients(model)
    assert got.keys() == want.keys()
    for name, gradient in want.items():
        torch.testing.assert_close(got[name], gradient, rtol=1e-4, atol=1e-6, msg=name)


def test_a_model_records_without_a_cache_by_default():
    """use_cache defaults to True (for generate): the README's torch.export line failed inside torch on the
    SeqArchCache it returned (not a tensor), and jit.trace needed use_cache=False in the config. While recording, no
    cache is made unless asked for, which is refused with the reason."""
    model = tiny_model(SeqArchForCausalLM, ["attention", "lstm"])
    assert model.config.use_cache
    ids = random_ids(2, 6)
    mask = left_padded(ids)
    program = torch.export.export(model, (ids,), {"attention_mask": mask}, strict=False)
    torch.testing.assert_close(program.module()(ids, attention_mask=mask).logits,
                               model(ids, attention_mask=mask).logits, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="cannot read or return a SeqArchCache"):
        torch.export.export(model, (ids,), {"attention_mask": mask, "use_cache": True}, strict=False)


def test_real_tokens_first_keeps_each_rows_order():
    generator = torch.Generator().manual_seed(0)
    mask = torch.rand(64, 11, generator=generator) < 0.6
    order = real_tokens_first(mask)
    assert torch.equal(order, torch.argsort((~mask).to(torch.int8), dim=1, stable=True))


def test_export_of_sliding_attention_with_a_dynamic_length():
    """Sliding-window attention runs long sequences in blocks of the window, chosen by the length: an exported program
    (one graph for every length) failed to export with a dynamic length. While exporting it takes the masked kernel,
    and compares no length with the window (which bounded the exported lengths to above it)."""
    model = tiny_model(SeqArchForCausalLM, ["sliding_attention"], use_cache=False, sliding_window=3)
    length = Dim("length", min=2, max=64)
    program = torch.export.export(model, (random_ids(2, 9),), dynamic_shapes=({1: length},), strict=False)
    for size in (2, 3, 4, 9, 40):
        ids = random_ids(2, size, seed=size)
        torch.testing.assert_close(program.module()(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)


def test_torch_func_inside_torch_compile_gives_autograds_gradients():
    """torch.compile traces a torch.func transform too: there the plain ops must run as under torch.func alone (a
    change that ran the hand-written conv backward there gave mamba2's conv bias a gradient 0.34 off, silently)."""
    model = tiny_model(SeqArchForCausalLM, ["mamba2", "linear_attention"])
    params = {name: p.detach() for name, p in model.named_parameters()}
    ids = random_ids(1, 8)
    model(input_ids=ids, labels=ids).loss.backward()

    def loss(p):
        return torch.func.functional_call(model, p, (ids,), dict(labels=ids)).loss

    torch._dynamo.reset()
    got = torch.compile(torch.func.grad(loss), backend="eager")(params)
    for name, p in model.named_parameters():
        torch.testing.assert_close(got[name], p.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_torch_compile_alone_runs_the_hand_written_paths(monkeypatch):
    """Only a torch.func transform needs the plain ops: compiled alone (functorch's interpreter stack is not empty while
    torch.compile traces, which was taken for one), the chunked scan ran its slower plain-ops form."""
    from hf_seqarch import ops_chunked_scan

    calls, recordable_scan = [], ops_chunked_scan._recordable_scan

    def spy(*args, **kwargs):  # (recorded, not raised: an error while tracing sends torch.compile back to eager)
        calls.append(args)
        return recordable_scan(*args, **kwargs)

    monkeypatch.setattr(ops_chunked_scan, "_recordable_scan", spy)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 16, 2, 4, generator=g, requires_grad=True) for _ in range(3))
    log_decay = (-torch.rand(2, 16, 2, generator=g)).requires_grad_()
    torch._dynamo.reset()
    compiled = torch.compile(lambda *x: ops_chunked_scan.chunked_scan(*x, chunk_size=4)[0].sum(), backend="aot_eager")
    compiled(q, k, v, log_decay).backward()
    assert not calls and q.grad is not None and log_decay.grad is not None

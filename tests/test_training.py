"""Training under the real Trainer: exact gradient accumulation, checkpointing, bf16, dtype on load,
a run killed with SIGKILL and resumed, and checkpoints with missing or truncated files.

All runs are tiny CPU runs on made-up token ids; SGD (the update is -lr * gradient) where weights are
compared, so that equal weights mean equal gradients, and no gradient clipping, which would hide a
wrongly scaled gradient.
"""

import math
import os
import shutil
import signal
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from transformers import (
    ByT5Tokenizer,
    DataCollatorForLanguageModeling,
    DataCollatorWithPadding,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)
from transformers.trainer_pt_utils import LabelSmoother

from hf_seqarch import SeqArchForCausalLM, SeqArchForSequenceClassification
from hf_seqarch.modeling_seqarch import MIXER_CLASSES
from hf_seqarch.tools.checkpoints import CheckpointError, check_before_training, check_resume_checkpoint
from tester import VOCAB, tiny_config

TESTS = os.path.dirname(os.path.abspath(__file__))
# transformers 5.x renamed gradient_checkpointing to activation_checkpointing (the old name is a deprecated alias).
CHECKPOINTING = next(
    name for name in ("activation_checkpointing", "gradient_checkpointing") if name in TrainingArguments.__dataclass_fields__
)
ALL_MIXERS = sorted(set(MIXER_CLASSES))
# The stacks the issue names for gradient accumulation, and their hybrid.
GA_STACKS = {"attention": ["attention"], "lstm": ["lstm"], "mamba2": ["mamba2"], "hybrid": ["lstm", "mamba2", "attention"]}


def token_examples(count, seed=0, min_len=3, max_len=13):
    """Variable-length sequences of ids in [3, VOCAB): ids 0-2 are the byte tokenizer's pad/eos/unk."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_len, max_len, (count,), generator=generator)
    return [{"input_ids": torch.randint(3, VOCAB, (int(n),), generator=generator).tolist()} for n in lengths]


def lm_collator():
    # Pads on the right with id 0 and sets labels = input_ids with -100 at the padding.
    return DataCollatorForLanguageModeling(ByT5Tokenizer(), mlm=False)


def training_args(output_dir, **overrides):
    settings = dict(
        output_dir=str(output_dir),
        use_cpu=True,
        report_to="none",
        disable_tqdm=True,
        save_strategy="no",
        logging_strategy="no",
        dataloader_pin_memory=False,
        seed=0,
    )
    settings.update(overrides)
    return TrainingArguments(**settings)


def sgd_step(model, examples, output_dir, collator=None, **overrides):
    """One optimizer step of plain SGD over `examples`; returns {name: weight change}."""
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    args = training_args(
        output_dir, max_steps=1, optim="sgd", learning_rate=0.5, lr_scheduler_type="constant", max_grad_norm=0.0,
        weight_decay=0.0, **overrides,
    )
    Trainer(model=model, args=args, train_dataset=examples, data_collator=collator or lm_collator()).train()
    return {name: p.detach() - before[name] for name, p in model.named_parameters()}


def largest_difference(updates_a, updates_b):
    """max |a - b| over all parameters, relative to the largest update."""
    scale = max(u.abs().max() for u in updates_a.values())
    return max((updates_a[n] - updates_b[n]).abs().max() for n in updates_a) / scale


class MeanLossLM(SeqArchForCausalLM):
    """A deliberately wrong model: it drops num_items_in_batch, so each micro-batch's loss is its own mean."""

    def forward(self, input_ids=None, attention_mask=None, labels=None, num_items_in_batch=None, **kwargs):
        return super().forward(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs)


def test_label_smoothing_trains_next_token_targets(tmp_path):
    """With label_smoothing_factor > 0 the Trainer computes the loss itself, and shifts the labels to next-token
    targets only for the causal LMs in transformers' table of them: ours must be there, or each position would be
    trained to predict its own token."""
    torch.manual_seed(0)
    model = SeqArchForCausalLM(tiny_config(["lstm"]))
    trainer = Trainer(model=model, args=training_args(tmp_path, label_smoothing_factor=0.1), data_collator=lm_collator())
    batch = lm_collator()(token_examples(4, seed=5))
    loss = trainer.compute_loss(model, dict(batch))
    outputs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    smoothed = LabelSmoother(epsilon=0.1)
    torch.testing.assert_close(loss, smoothed(outputs, batch["labels"], shift_labels=True))
    assert (loss - smoothed(outputs, batch["labels"])).abs() > 1e-3  # the unshifted targets give another loss


# ---------------------------------------------------------------------------- gradient accumulation


def accumulation_difference(build_model, examples, tmp_path, collator=None):
    """Relative difference between one step of batch 8 and one step of batch 2 x 4 accumulation steps."""
    updates = []
    for batch, steps in ((8, 1), (2, 4)):
        torch.manual_seed(0)
        updates.append(sgd_step(build_model(), examples, tmp_path / str(batch), collator,
                                per_device_train_batch_size=batch, gradient_accumulation_steps=steps))
    return largest_difference(*updates)


@pytest.mark.parametrize("stack", list(GA_STACKS), ids=list(GA_STACKS))
def test_gradient_accumulation_is_exact(stack, tmp_path):
    """Same 8 examples of lengths 3-12, right-padded per batch: the same update to float32 rounding."""
    build = lambda: SeqArchForCausalLM(tiny_config(GA_STACKS[stack]))  # noqa: E731
    assert accumulation_difference(build, token_examples(8), tmp_path) < 1e-5


CLASSIFICATION_LABELS = {  # labels of example i, for 3 outputs
    "single_label_classification": lambda i: i % 3,
    "multi_label_classification": lambda i: [float(i % 2), 1.0, float(i % 3 == 0)],
    "regression": lambda i: [float(i % 3), 0.5, -1.0],
}


@pytest.mark.parametrize("problem_type", list(CLASSIFICATION_LABELS))
def test_gradient_accumulation_is_exact_for_sequence_classification(problem_type, tmp_path):
    examples = [dict(e, labels=CLASSIFICATION_LABELS[problem_type](i)) for i, e in enumerate(token_examples(8, seed=1))]
    build = lambda: SeqArchForSequenceClassification(tiny_config(["lstm", "attention"], problem_type=problem_type))  # noqa: E731
    assert accumulation_difference(build, examples, tmp_path, DataCollatorWithPadding(ByT5Tokenizer())) < 1e-5


def test_gradient_accumulation_check_catches_a_per_micro_batch_mean(tmp_path):
    """The comparison above has teeth: a loss that ignores num_items_in_batch fails it by far."""
    build = lambda: MeanLossLM(tiny_config(["lstm"]))  # noqa: E731
    assert accumulation_difference(build, token_examples(8), tmp_path) > 0.5


# ---------------------------------------------------------------------------- checkpointing, bf16, dtype


@pytest.mark.parametrize("mixer", ALL_MIXERS)
def test_trainer_gradient_checkpointing_gives_the_same_step(mixer, tmp_path):
    examples = token_examples(4, seed=2)
    updates = {}
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = SeqArchForCausalLM(tiny_config([mixer, mixer]))
        updates[checkpointing] = sgd_step(
            model, examples, tmp_path / str(checkpointing), per_device_train_batch_size=4, **{CHECKPOINTING: checkpointing}
        )
        assert all(block.gradient_checkpointing == checkpointing for block in model.model.layers)
    assert largest_difference(updates[False], updates[True]) < 1e-5


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("mixer", ALL_MIXERS)
def test_bf16_autocast_training_has_finite_losses(mixer, device, tmp_path):
    torch.manual_seed(0)
    model = SeqArchForCausalLM(tiny_config([mixer, mixer]))
    logits_dtypes = []
    model.lm_head.register_forward_hook(lambda module, inputs, output: logits_dtypes.append(output.dtype))
    args = training_args(tmp_path, bf16=True, use_cpu=device == "cpu", max_steps=4, per_device_train_batch_size=4,
                         logging_steps=1, logging_strategy="steps", learning_rate=1e-2)
    trainer = Trainer(model=model, args=args, train_dataset=token_examples(16, seed=3), data_collator=lm_collator())
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 4 and all(math.isfinite(loss) for loss in losses)
    assert set(logits_dtypes) == {torch.bfloat16}  # autocast really ran the matmuls in bf16
    assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights stay fp32


def test_from_pretrained_honours_dtype(tmp_path):
    torch.manual_seed(0)
    model = SeqArchForCausalLM(tiny_config(ALL_MIXERS)).eval()
    model.save_pretrained(tmp_path)
    loaded = SeqArchForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    lstm = next(module for module in loaded.modules() if isinstance(module, torch.nn.LSTM))
    assert all(w.dtype == torch.bfloat16 for w in lstm._flat_weights)  # the weights nn.LSTM really runs with
    ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    logits = loaded(input_ids=ids).logits
    assert logits.dtype == torch.bfloat16
    torch.testing.assert_close(logits, model.to(torch.bfloat16)(input_ids=ids).logits, rtol=0, atol=0)


# ---------------------------------------------------------------------------- kill, resume, broken checkpoints

RESUME_STACK = ["lstm", "mamba2", "attention"]


class KillAfterSave(TrainerCallback):
    """SIGKILL this process once the checkpoint of `step` is completely written (on_save comes after it)."""

    def __init__(self, step):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def resumable_run(output_dir, kill_after_save_at=None, resume_from=None):
    """6 AdamW steps with warmup and a decaying rate, checkpoints every 3: optimizer and schedule state matter.

    16 examples in batches of 4 make the run cross an epoch boundary, so resuming must also restore the data order.
    """
    torch.manual_seed(0)
    model = SeqArchForCausalLM(tiny_config(RESUME_STACK))
    args = training_args(
        output_dir, max_steps=6, per_device_train_batch_size=4, learning_rate=1e-2, warmup_steps=2,
        save_strategy="steps", save_steps=3, logging_strategy="steps", logging_steps=1,
    )
    callbacks = [KillAfterSave(kill_after_save_at)] if kill_after_save_at else []
    trainer = Trainer(model=model, args=args, train_dataset=token_examples(16, seed=4), data_collator=lm_collator(),
                      callbacks=callbacks)
    trainer.train(resume_from_checkpoint=resume_from)
    return trainer


@pytest.fixture(scope="module")
def uninterrupted_run(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("uninterrupted")
    return output_dir, resumable_run(output_dir)


def test_sigkill_after_checkpoint_then_resume_gives_the_same_weights(uninterrupted_run, tmp_path):
    output_dir = tmp_path / "killed"
    # Same thread count as this process: float sums may split differently with another, and the weights are
    # compared bit for bit.
    child = (f"import sys, torch; torch.set_num_threads({torch.get_num_threads()}); sys.path.insert(0, {TESTS!r}); "
             f"import test_training; test_training.resumable_run({str(output_dir)!r}, 3)")
    killed = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert (output_dir / "checkpoint-3").is_dir() and not (output_dir / "checkpoint-6").exists()

    checkpoint = check_resume_checkpoint(output_dir / "checkpoint-3")
    resumed = resumable_run(output_dir, resume_from=str(checkpoint))
    _, reference = uninterrupted_run
    assert resumed.state.global_step == reference.state.global_step == 6
    at_kill = SeqArchForCausalLM.from_pretrained(checkpoint).state_dict()
    for name, weight in reference.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[name], weight, rtol=0, atol=0, msg=name)
    assert any(not torch.equal(at_kill[name], weight) for name, weight in reference.model.state_dict().items())
    # The resumed half logs the same losses as the uninterrupted run's second half.
    losses = lambda trainer: {e["step"]: e["loss"] for e in trainer.state.log_history if "loss" in e}  # noqa: E731
    assert {s: l for s, l in losses(reference).items() if s > 3} == {s: l for s, l in losses(resumed).items() if s > 3}


def damage(path, how):
    if how == "missing":
        path.unlink()
    elif how == "truncated":  # as a run killed while writing it leaves it
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:  # a byte of torch's largest stored tensor or pickle changed: torch.load would read it silently
        import struct
        import zipfile

        with zipfile.ZipFile(path) as archive:
            entry = max(archive.infolist(), key=lambda info: info.file_size)
        data = bytearray(path.read_bytes())
        name_length, extra_length = struct.unpack("<HH", data[entry.header_offset + 26 : entry.header_offset + 30])
        data[entry.header_offset + 30 + name_length + extra_length + entry.file_size // 2] ^= 0xFF  # (its local header)
        path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "stack,overrides,field",
    [
        (["attention", "mamba2", "lstm"], {}, "mixer_types"),  # once a segfault in fused Adam
        (RESUME_STACK, dict(num_attention_heads=2, num_key_value_heads=2), "num_attention_heads"),  # resumed silently
        (RESUME_STACK, dict(intermediate_size=128), "intermediate_size"),  # a size mismatch naming no cause
        (RESUME_STACK, dict(id2label={0: "LABEL_1", 1: "LABEL_0", 2: "LABEL_2"}), "id2label"),  # rows renamed: silently
    ],
)
def test_resuming_a_checkpoint_of_another_model_is_a_clear_error(uninterrupted_run, stack, overrides, field):
    source, trainer = uninterrupted_run
    checkpoint = source / "checkpoint-3"
    check_resume_checkpoint(checkpoint, trainer.model.config)  # the same model, and chunk sizes may change:
    check_resume_checkpoint(checkpoint, tiny_config(RESUME_STACK, mamba_chunk_size=8))
    with pytest.raises(CheckpointError, match=f"it holds another model \\({field}: .* in the checkpoint"):
        check_resume_checkpoint(checkpoint, tiny_config(stack, **overrides))


def test_resume_true_takes_the_last_checkpoint_of_the_output_dir(uninterrupted_run, tmp_path):
    """The Trainer's resume_from_checkpoint=True, which the command line passes as the string "True" (the examples
    once looked for a folder named True)."""
    source, trainer = uninterrupted_run
    arguments = SimpleNamespace(resume_from_checkpoint="True", output_dir=str(source))
    check_before_training(arguments, trainer.model.config)
    assert arguments.resume_from_checkpoint == str(source / "checkpoint-6")
    with pytest.raises(SystemExit, match="holds no checkpoint-N folder to resume from"):
        check_before_training(SimpleNamespace(resume_from_checkpoint="true", output_dir=str(tmp_path)), trainer.model.config)

# Every file a resume reads, missing or cut in half, and torch's files with a byte changed (their zip CRCs; safetensors
# and JSON hold no checksum); a missing RNG state only loses dropout's random stream (the Trainer warns about it
# itself), so it is the one damage that passes.
DAMAGES = [
    (name, how)
    for name in ("model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json", "config.json", "rng_state.pth")
    for how in ("missing", "truncated", "changed")
    if (name, how) != ("rng_state.pth", "missing") and (how != "changed" or name.endswith((".pt", ".pth")))
]


@pytest.mark.parametrize("name,how", DAMAGES)
def test_resuming_from_a_damaged_checkpoint_is_a_clear_error(uninterrupted_run, name, how, tmp_path):
    source, _ = uninterrupted_run
    checkpoint = shutil.copytree(source / "checkpoint-3", tmp_path / "checkpoint-3")
    check_resume_checkpoint(checkpoint)  # whole, it passes
    damage(checkpoint / name, how)
    with pytest.raises(CheckpointError) as error:
        check_resume_checkpoint(checkpoint)
    expected = "no file holds" if how == "missing" else "truncated or corrupted"
    assert name in str(error.value) and expected in str(error.value)


@pytest.mark.parametrize("how", ["missing", "truncated"])
def test_loading_a_model_with_damaged_weights_is_a_clear_error(uninterrupted_run, how, tmp_path):
    source, _ = uninterrupted_run
    folder = shutil.copytree(source / "checkpoint-3", tmp_path / "model")
    damage(folder / "model.safetensors", how)
    with pytest.raises(OSError, match="model.safetensors" if how == "missing" else "truncated or corrupted"):
        SeqArchForCausalLM.from_pretrained(folder)


def test_a_sharded_checkpoint_missing_a_shard_is_a_clear_error(uninterrupted_run, tmp_path):
    """The index counted as the weights, so a shard lost from it passed the check (and failed later, in the load)."""
    source, _ = uninterrupted_run
    checkpoint = shutil.copytree(source / "checkpoint-3", tmp_path / "checkpoint-3")
    (checkpoint / "model.safetensors").unlink()
    SeqArchForCausalLM.from_pretrained(source / "checkpoint-3").save_pretrained(checkpoint, max_shard_size="20KB")
    shards = sorted(checkpoint.glob("model-*.safetensors"))
    assert len(shards) > 1
    check_resume_checkpoint(checkpoint)  # whole, it passes
    shards[1].unlink()
    with pytest.raises(CheckpointError, match=f"model.safetensors.index.json lists {len(shards)} shard.*{shards[1].name} is missing"):
        check_resume_checkpoint(checkpoint)


def test_an_fsdp_full_state_dict_checkpoint_passes_the_check(uninterrupted_run, tmp_path):
    """Under FSDP with FULL_STATE_DICT (configs/accelerate/fsdp.yaml) accelerate names the optimizer state
    optimizer.bin, which the Trainer's own resume reads; the check refused every such checkpoint as cut short."""
    source, _ = uninterrupted_run
    checkpoint = shutil.copytree(source / "checkpoint-3", tmp_path / "checkpoint-3")
    (checkpoint / "optimizer.pt").rename(checkpoint / "optimizer.bin")
    check_resume_checkpoint(checkpoint)
    damage(checkpoint / "optimizer.bin", "truncated")
    with pytest.raises(CheckpointError, match="optimizer.bin.*truncated or corrupted"):
        check_resume_checkpoint(checkpoint)


def test_torch_files_saved_without_crcs_pass_the_check(tmp_path):
    """torch writes CRC 0 after set_crc32_options(False): such files load fine and were refused as corrupted."""
    from hf_seqarch.tools.checkpoints import _unreadable

    torch.serialization.set_crc32_options(False)
    try:
        torch.save({"step": torch.arange(1000)}, tmp_path / "optimizer.pt")
    finally:
        torch.serialization.set_crc32_options(True)
    assert _unreadable(tmp_path / "optimizer.pt") is None

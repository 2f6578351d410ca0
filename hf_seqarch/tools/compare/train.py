"""The training budget, through transformers' Trainer, and the scores after it.

Within a task every architecture gets the same budget: the same number of optimiser steps on the same
batches (made by tasks.py from the seed), AdamW at the same learning rate with warm-up and cosine
decay, gradient clipping at 1, float32, the same initialisation seed. Nothing is tuned per architecture.
"""

import math
import tempfile
import time

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from ...modeling_seqarch import SeqArchForCausalLM
from .tasks import IGNORE, BatchDataset, unwrap_batch

EVAL_BATCH = 32


class StepReporter(TrainerCallback):
    """Hands (step, total) to `report` about twenty times per run, for the caller's progress bar."""

    def __init__(self, report, total):
        self.report, self.every = report, max(1, total // 20)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every == 0 or state.global_step == state.max_steps:
            self.report(state.global_step, state.max_steps)


def train(config, make_batch, steps: int, preset, device: torch.device, progress=None) -> tuple[SeqArchForCausalLM, dict]:
    """A fresh model trained on the batches `make_batch(0 .. steps-1)`, in the order of the Trainer's seeded shuffle (the
    same for every architecture); returns it (in eval mode) and a summary."""
    seed = preset.seed
    torch.manual_seed(seed)
    model = SeqArchForCausalLM(config)
    with tempfile.TemporaryDirectory() as scratch:
        args = TrainingArguments(
            output_dir=scratch,
            max_steps=steps,
            per_device_train_batch_size=1,  # one item = one whole batch (see BatchDataset)
            learning_rate=preset.learning_rate,
            weight_decay=preset.weight_decay,
            warmup_steps=max(1, round(preset.warmup_ratio * steps)),
            lr_scheduler_type="cosine",
            max_grad_norm=1.0,
            logging_steps=max(1, steps // 10),
            save_strategy="no",
            report_to="none",
            disable_tqdm=True,  # compare draws its own progress bar
            use_cpu=device.type == "cpu",
            seed=seed,
            dataloader_num_workers=0,
            dataloader_pin_memory=device.type == "cuda",
        )
        if args.n_gpu > 1:
            # One process sees several GPUs: the Trainer would spread each step over all of them (nn.DataParallel,
            # a batch of n_gpu items, where one item is a whole batch here). compare measures one device.
            args._n_gpu = 1
        trainer = Trainer(model=model, args=args, train_dataset=BatchDataset(make_batch, steps),
                          data_collator=unwrap_batch)
        for callback in (PrinterCallback, ProgressCallback):
            trainer.remove_callback(callback)
        if progress is not None:
            trainer.add_callback(StepReporter(progress, steps))
        start = time.perf_counter()
        output = trainer.train()
        wall = time.perf_counter() - start
    # The Trainer sets config.use_cache to its own use_cache argument (False): saved so, the checkpoint would generate
    # without a cache, reading the whole sequence again at every step.
    model.config.use_cache = True
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    summary = dict(steps=trainer.state.global_step, wall_seconds=wall, mean_train_loss=output.training_loss,
                   final_logged_loss=losses[-1] if losses else None)
    return model.to(device).eval(), summary


@torch.no_grad()
def token_accuracy(model, inputs, labels, device) -> float:
    """Share of scored positions (labels != -100) where the greedy prediction is the label."""
    correct = total = 0
    for start in range(0, len(inputs), EVAL_BATCH):
        ids, target = inputs[start : start + EVAL_BATCH].to(device), labels[start : start + EVAL_BATCH].to(device)
        predicted = model(input_ids=ids, use_cache=False).logits[:, :-1].argmax(-1)  # (B, T-1): predicts t+1
        target = target[:, 1:]
        scored = target != IGNORE
        correct += int((predicted == target)[scored].sum())
        total += int(scored.sum())
    return correct / total


@torch.no_grad()
def bits_per_byte(model, inputs, device) -> float:
    """Mean negative log2-likelihood of every held-out byte after the first of each window."""
    nats = count = 0
    for start in range(0, len(inputs), EVAL_BATCH):
        ids = inputs[start : start + EVAL_BATCH].to(device)
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
        nats += float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="sum"))
        count += ids[:, 1:].numel()
    return nats / (count * math.log(2))

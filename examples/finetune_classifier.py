"""Fine-tune a saved checkpoint for sequence classification with the Trainer, and report accuracy.

The task is built from the same offline text as examples/pretrain_lm.py: which section of the Python
reference docs does a paragraph come from ("specialnames", "compound", "types", "string-methods")?
Classes are balanced, so chance is 25%.

    python examples/pretrain_lm.py --output_dir outputs/pretrain_lm
    python examples/finetune_classifier.py --model_name_or_path outputs/pretrain_lm --output_dir outputs/classifier
    # the same on two processes
    accelerate launch --multi_gpu --num_processes 2 examples/finetune_classifier.py --model_name_or_path outputs/pretrain_lm

The causal LM's body is kept and a new classification layer (`score`) is trained on top of it; the
model reads each paragraph left to right and classifies from its last real token.
"""

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    HfArgumentParser,
    Trainer,
    TrainingArguments,
    set_seed,
)

import hf_seqarch  # noqa: F401  (registers the "seqarch" model type with the Auto classes)
from hf_seqarch.tools.checkpoints import check_before_training
from hf_seqarch.tools.distributed import finish_distributed_run, use_cpu_ddp_if_no_accelerator, whole_global_batches
from hf_seqarch.tools.text_data import DEFAULT_SECTIONS, section_classification


@dataclass
class ScriptArguments:
    model_name_or_path: str = field(
        default="outputs/pretrain_lm", metadata={"help": "A checkpoint folder saved with its tokenizer (pretrain_lm.py)."}
    )
    sections: str = field(default=",".join(DEFAULT_SECTIONS), metadata={"help": "Comma-separated section names."})
    max_length: int = field(default=256, metadata={"help": "Paragraphs are cut to this many tokens."})
    ignore_mismatched_sizes: bool = field(
        default=False,
        metadata={"help": "Start a new classification layer when the checkpoint's has another number of labels."},
    )


def sections_of_checkpoint(checkpoint: str, sections: list[str], announce: bool) -> tuple[list[str], bool]:
    """(the sections in the order to train them, whether the checkpoint's classification layer must start anew). A
    sequence classifier's checkpoint keeps the trained rows of that layer, one per label, which load as they are:
    given its sections in another order, the run takes the checkpoint's order; given other sections, each row would
    stand for another section than it was trained on, so the layer starts anew."""
    try:
        saved = AutoConfig.from_pretrained(checkpoint)
    except (OSError, ValueError):
        return sections, False  # (from_pretrained below says what is wrong)
    if not any(name.endswith("ForSequenceClassification") for name in saved.architectures or []):
        return sections, False  # a language model: from_pretrained makes a new classification layer
    saved_sections = [saved.id2label[i] for i in range(saved.num_labels)]
    if saved_sections == sections:
        return sections, False
    same = sorted(saved_sections) == sorted(sections)
    if announce:
        print(f"{checkpoint!r} was trained to classify {saved_sections}: "
              + ("its order is kept." if same else f"a new classification layer is trained for {sections}."))
    return (saved_sections, False) if same else (sections, True)


def accuracy(eval_prediction):
    logits, labels = eval_prediction
    return {"accuracy": float((np.argmax(logits, axis=-1) == labels).mean())}


def main():
    use_cpu_ddp_if_no_accelerator()  # so that `accelerate launch --multi_gpu` is one DDP job on CPU too
    parser = HfArgumentParser((ScriptArguments, TrainingArguments))
    parser.set_defaults(
        output_dir="outputs/classifier",
        num_train_epochs=8,
        per_device_train_batch_size=16,
        per_device_eval_batch_size=32,
        learning_rate=1e-3,
        warmup_steps=10,
        logging_steps=5,
        eval_strategy="epoch",
        save_strategy="epoch",
        save_total_limit=1,
        report_to="none",
        dataloader_pin_memory=torch.cuda.is_available(),  # pinning is for host-to-GPU copies
        ddp_find_unused_parameters=False,  # every parameter gets a gradient: skip DDP's extra graph walk
    )
    script_args, training_args = parser.parse_args_into_dataclasses()
    # The accuracy before fine-tuning, measured inside train() (its step-0 log entry), whatever --eval_on_start says:
    # a trainer.evaluate() before train() would leave the model unwrapped by DDP for the training itself (accelerate
    # takes it as prepared), and two processes would each train their own copy, never averaging their gradients.
    training_args.eval_on_start = True
    sections = [name.strip() for name in script_args.sections.split(",")]
    if len(set(sections)) != len(sections) or len(sections) < 2:
        parser.error(f"--sections needs two or more different sections, got {sections}.")
    if script_args.max_length < 1:  # the tokenizer would take 0 as "no truncation"
        parser.error(f"--max_length must be >= 1, got {script_args.max_length}.")

    try:
        tokenizer = AutoTokenizer.from_pretrained(script_args.model_name_or_path)
    except (OSError, ValueError) as error:
        raise SystemExit(
            f"Could not load a tokenizer from {script_args.model_name_or_path!r} ({error}). Give a checkpoint saved "
            "with its tokenizer, e.g. the output_dir of examples/pretrain_lm.py."
        ) from None
    sections, new_classification_layer = sections_of_checkpoint(
        script_args.model_name_or_path, sections, training_args.process_index == 0
    )
    try:
        train_examples, eval_examples = section_classification(tokenizer, sections, max_length=script_args.max_length)
    except ValueError as error:  # an unknown section
        parser.error(str(error))
    train_examples = whole_global_batches(train_examples, training_args)  # the same in one process or several
    set_seed(training_args.seed)  # the new classification layer starts the same for the same --seed
    model = AutoModelForSequenceClassification.from_pretrained(
        script_args.model_name_or_path,
        num_labels=len(sections),
        id2label=dict(enumerate(sections)),
        label2id={name: i for i, name in enumerate(sections)},
        pad_token_id=tokenizer.pad_token_id,
        ignore_mismatched_sizes=script_args.ignore_mismatched_sizes,
    )
    if new_classification_layer:  # (its trained rows loaded, as they fit: each stands for another section here)
        torch.nn.init.normal_(model.score.weight, std=model.config.initializer_range)
    check_before_training(training_args, model.config)  # the checkpoint to resume, or a free output_dir
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train_examples,
        eval_dataset=eval_examples,
        data_collator=DataCollatorWithPadding(tokenizer),  # pads each batch to its longest paragraph
        processing_class=tokenizer,
        compute_metrics=accuracy,
    )
    # With --push_to_hub, Trainer.push_to_hub writes its generic model card over the one save_pretrained wrote (the
    # mixers, parameter count and how to load it without hf_seqarch): keep ours.
    trainer.create_model_card = lambda *args, **kwargs: None
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    # (a run resumed from a checkpoint of an older script may have none)
    before = next((e["eval_accuracy"] for e in trainer.state.log_history if "eval_accuracy" in e and e["step"] == 0), None)
    metrics = trainer.evaluate()
    trainer.log_metrics("eval", metrics)
    trainer.save_metrics("eval", metrics)
    trainer.save_state()
    trainer.save_model()  # weights, config (with the label names), tokenizer and our model card in output_dir

    if trainer.is_world_process_zero():
        print(f"\naccuracy on {len(eval_examples)} held-out paragraphs: {metrics['eval_accuracy']:.1%} "
              f"(before fine-tuning {'n/a' if before is None else f'{before:.1%}'}, chance {1 / len(sections):.1%})")
        print(f"classifier, config and tokenizer: {training_args.output_dir} "
              "(AutoModelForSequenceClassification.from_pretrained)")
        print(f"metrics: {Path(training_args.output_dir) / 'eval_results.json'}")
    finish_distributed_run(trainer)  # all processes leave the process group together


if __name__ == "__main__":
    main()

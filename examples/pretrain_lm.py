"""Pretrain a small causal LM with the Trainer on text every Python install carries, offline.

The corpus is the standard library's `pydoc_data.topics` (the Python reference docs behind `help()`), the
tokenizer is byte-level (ByT5Tokenizer needs no files), so this runs on a fresh machine without network.

    # one process (CPU, or one GPU)
    python examples/pretrain_lm.py --preset transformer-tiny --output_dir outputs/pretrain_lm
    # two data-parallel processes (DDP; over gloo on a machine without GPUs)
    accelerate launch --multi_gpu --num_processes 2 examples/pretrain_lm.py --preset lstm-tiny

--preset is a folder name in configs/ or a path to any folder with a config.json. Every TrainingArguments
flag works too: --max_steps, --per_device_train_batch_size, --gradient_accumulation_steps, --bf16,
--gradient_checkpointing (--activation_checkpointing from transformers 5.24), --resume_from_checkpoint
outputs/pretrain_lm/checkpoint-200, ...
"""

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    ByT5Tokenizer,
    DataCollatorForLanguageModeling,
    HfArgumentParser,
    Trainer,
    TrainingArguments,
    set_seed,
)

import hf_seqarch  # noqa: F401  (registers the "seqarch" model type with the Auto classes)
from hf_seqarch.tools.checkpoints import check_before_training
from hf_seqarch.tools.distributed import (
    finish_distributed_run, global_batch_size, use_cpu_ddp_if_no_accelerator, whole_global_batches,
)
from hf_seqarch.tools.text_data import lm_blocks

PRESETS = Path(__file__).resolve().parent.parent / "configs"


@dataclass
class ScriptArguments:
    preset: str = field(
        default="transformer-tiny", metadata={"help": "A folder name in configs/, or a path to a folder with config.json."}
    )
    config_overrides: str | None = field(
        default=None, metadata={"help": 'Config fields to change, e.g. "hidden_size=128,intermediate_size=512" (not '
                                        'vocab_size and the pad / eos ids: the byte tokenizer sets them; the model '
                                        'is saved with use_cache true).'}
    )
    block_size: int = field(default=256, metadata={"help": "Tokens (bytes) per training sequence."})
    max_chars: int | None = field(default=None, metadata={"help": "Use only the first N characters of the corpus."})
    sample_prompt: str = field(default='The "while" statement', metadata={"help": "Prompt of the final sample."})
    sample_tokens: int = field(default=120, metadata={"help": "Bytes to generate for the final sample."})


# Fields the byte tokenizer decides (load_config sets them from it): an override of one would be dropped.
TOKENIZER_FIELDS = ("vocab_size", "pad_token_id", "eos_token_id")


def apply_overrides(config, overrides: str):
    """transformers' update_from_string ("a=1,b=x"), which types each value by the field's current one and so cannot
    set a field that is None by default (head_dim): those take the value as JSON (8, 2.5, true), else as a string."""
    for pair in overrides.split(","):
        name, _, value = pair.partition("=")
        name, value = name.strip(), value.strip()  # ("a=1, b=2")
        if name in TOKENIZER_FIELDS:
            raise ValueError(f"{name} comes from the byte tokenizer ({', '.join(TOKENIZER_FIELDS)} are set from "
                             "it), not from --config_overrides.")
        if hasattr(config, name) and getattr(config, name) is None:
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                pass  # a string
            setattr(config, name, value)
        else:
            config.update_from_string(f"{name}={value}")


def load_config(preset: str, overrides: str | None, tokenizer):
    folder = Path(preset) if Path(preset).is_dir() else PRESETS / preset
    if not (folder / "config.json").is_file():
        known = sorted(p.name for p in PRESETS.iterdir() if (p / "config.json").is_file())
        raise SystemExit(f"No preset {preset!r}: give a folder with a config.json, or one of {known}.")
    config = AutoConfig.from_pretrained(folder)
    if overrides:
        try:
            apply_overrides(config, overrides)
        except (ValueError, TypeError) as error:  # an unknown field, or a value of the wrong type
            raise SystemExit(f"--config_overrides {overrides!r}: {error}") from None
    # The byte tokenizer has 384 ids (pad, eos, unk, the 256 bytes, 125 sentinel ids): the presets' 256 are too few,
    # so parameter counts printed here exceed the configs/ table's by (384 - 256) x hidden_size.
    config.vocab_size = len(tokenizer)
    config.pad_token_id, config.eos_token_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    try:
        config.validate_seqarch()
    except ValueError as error:
        raise SystemExit(f"The config from {preset!r} with --config_overrides {overrides!r}: {error}") from None
    if config.bidirectional:
        raise SystemExit(f"The config from {preset!r} with --config_overrides {overrides!r} is bidirectional (an "
                         "encoder): a causal language model must not see the tokens it predicts. Pretrain it causal; a "
                         "classifier can load the checkpoint as an encoder, from_pretrained(..., bidirectional=True), "
                         "where its layers are attention, mamba2 or linear attention (an LSTM/GRU's direction is fixed "
                         "in its weights).")
    return config


def main():
    use_cpu_ddp_if_no_accelerator()  # so that `accelerate launch --multi_gpu` is one DDP job on CPU too
    parser = HfArgumentParser((ScriptArguments, TrainingArguments))
    # Defaults for a run of a few minutes on a laptop CPU; every one can be changed on the command line.
    parser.set_defaults(
        output_dir="outputs/pretrain_lm",
        max_steps=300,
        per_device_train_batch_size=16,
        learning_rate=2e-3,
        lr_scheduler_type="cosine",
        warmup_steps=30,
        logging_steps=10,
        eval_strategy="steps",
        eval_steps=100,
        save_steps=100,
        save_total_limit=2,
        report_to="none",
        dataloader_pin_memory=torch.cuda.is_available(),  # pinning is for host-to-GPU copies
        ddp_find_unused_parameters=False,  # every parameter gets a gradient: skip DDP's extra graph walk
    )
    script_args, training_args = parser.parse_args_into_dataclasses()
    if script_args.sample_tokens < 1:  # checked now, not after the training
        parser.error(f"--sample_tokens must be >= 1, got {script_args.sample_tokens}.")
    if script_args.block_size < 2:  # an LM predicts each token from the ones before it
        parser.error(f"--block_size must be >= 2, got {script_args.block_size}.")
    if script_args.max_chars is not None and script_args.max_chars < 1:  # 0 would read as "the whole corpus"
        parser.error(f"--max_chars must be >= 1 (leave it out for the whole corpus), got {script_args.max_chars}.")

    tokenizer = ByT5Tokenizer()
    try:
        train_blocks, eval_blocks = lm_blocks(tokenizer, script_args.block_size, script_args.max_chars)
    except ValueError as error:  # too little text for one training and one evaluation block
        parser.error(str(error))
    train_blocks = whole_global_batches(train_blocks, training_args)  # the same blocks in one process or several
    config = load_config(script_args.preset, script_args.config_overrides, tokenizer)
    set_seed(training_args.seed)  # before building the model: the same --seed gives the same initial weights
    model = AutoModelForCausalLM.from_config(config)
    check_before_training(training_args, model.config)  # the checkpoint to resume, or a free output_dir
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train_blocks,
        eval_dataset=eval_blocks,
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),  # labels = inputs; the model shifts
        processing_class=tokenizer,  # saved beside the weights, so the folder loads with AutoTokenizer
    )
    # With --push_to_hub, Trainer.push_to_hub writes its generic model card over the one save_pretrained wrote (the
    # mixers, parameter count and how to load it without hf_seqarch): keep ours.
    trainer.create_model_card = lambda *args, **kwargs: None
    if trainer.is_world_process_zero():
        print(f"{script_args.preset}: {model.num_parameters():,} parameters, mixers {config.mixer_types}; "
              f"{training_args.world_size} process(es) on {training_args.device.type}, global batch "
              f"{global_batch_size(training_args)} x {script_args.block_size} bytes, {len(train_blocks)} training blocks")

    train_metrics = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint).metrics
    # Every block has block_size tokens; samples/s counts all processes, over this session's wall time
    # (evaluation and checkpoint writing included: pass --eval_strategy no --save_strategy no to time training alone).
    train_metrics["train_tokens_per_second"] = round(train_metrics["train_samples_per_second"] * script_args.block_size)
    eval_metrics = trainer.evaluate()
    trainer.log_metrics("train", train_metrics)
    trainer.log_metrics("eval", eval_metrics)
    trainer.save_metrics("all", {**train_metrics, **eval_metrics})
    trainer.save_state()  # trainer_state.json: the loss curve (log_history)
    # The Trainer set config.use_cache to TrainingArguments.use_cache (False): saved so, the model would generate
    # without a cache, reading the whole sequence again at every step. (Its checkpoint-N/ folders keep False.)
    model.config.use_cache = True
    trainer.save_model()  # weights, config and tokenizer in output_dir

    if trainer.is_world_process_zero():
        # Sample from the saved folder: it proves the checkpoint loads, and works whatever wraps the trained
        # model (an FSDP-sharded model could not generate on one process alone).
        saved = AutoModelForCausalLM.from_pretrained(training_args.output_dir).to(training_args.device).eval()
        torch.manual_seed(training_args.seed)
        prompt = tokenizer(script_args.sample_prompt, add_special_tokens=False, return_tensors="pt").input_ids
        generated = saved.generate(
            prompt.to(saved.device), max_new_tokens=script_args.sample_tokens, do_sample=True, top_k=20
        )
        print(f"\nsample: {tokenizer.decode(generated[0], skip_special_tokens=True)!r}\n")
        print(f"model, config and tokenizer: {training_args.output_dir} (AutoModelForCausalLM.from_pretrained)")
        print(f"loss curve: {Path(training_args.output_dir) / 'trainer_state.json'} (log_history)")
        print(f"metrics: {Path(training_args.output_dir) / 'all_results.json'}")
    finish_distributed_run(trainer)  # the other processes wait while process 0 samples, then all leave together


if __name__ == "__main__":
    main()

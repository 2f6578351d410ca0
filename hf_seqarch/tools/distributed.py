"""Make `accelerate launch --multi_gpu --num_processes N script.py` run real DDP on a machine without GPUs.

Why: on a CPU-only machine that command starts N processes, but TrainingArguments then sets each one up as
a lone, non-distributed run (it looks for GPUs, finds none, and ignores the process group), so N copies
train the same model independently and nothing says so. The Trainer's `--use_cpu` flag (or the environment
variable ACCELERATE_USE_CPU=true) makes them one DDP job over gloo; this turns it on when it is needed.
Also here: what the examples need around a multi-process run (batch sizes, whole batches, a clean exit).
"""

import gc
import os
import sys
import weakref

import torch


def launched_processes() -> int:
    """How many processes this one was started among (WORLD_SIZE, set by accelerate launch and torchrun); 1 alone."""
    return int(os.environ.get("WORLD_SIZE") or 1)


def use_cpu_ddp_if_no_accelerator() -> bool:
    """Call before TrainingArguments is built. True when it switched a multi-process CPU launch to gloo DDP."""
    processes = launched_processes()
    has_accelerator = torch.accelerator.is_available() if hasattr(torch, "accelerator") else torch.cuda.is_available()
    if processes > 1 and not has_accelerator and "ACCELERATE_USE_CPU" not in os.environ:
        os.environ["ACCELERATE_USE_CPU"] = "true"
        if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true" and os.environ.get("RANK", "0") == "0":
            # (the Trainer shards only on GPUs: say so, rather than let an FSDP config run unsharded unannounced)
            print(f"FSDP was asked for, but this machine has no GPU: the {processes} processes train as plain "
                  "DDP over gloo (the same result, each holding the whole model).", file=sys.stderr)
        return True
    return False


def global_batch_size(training_args) -> int:
    """Examples per optimizer step, over all processes: per device x processes x accumulation."""
    return training_args.train_batch_size * training_args.world_size * training_args.gradient_accumulation_steps


def whole_global_batches(examples: list, training_args) -> list:
    """The first examples that fill whole global batches, or all of them when there are fewer than one batch.
    Why: an epoch's last, short batch is, under several processes, filled by accelerate with examples from the
    epoch's start (trained twice), and the run stops matching a one-process run there."""
    global_batch = global_batch_size(training_args)
    if len(examples) < global_batch:
        return examples
    return examples[: len(examples) - len(examples) % global_batch]


def finish_distributed_run(trainer) -> None:
    """End of a script: wait for every process, then leave the process group (a no-op in one process).

    Why not just `accelerator.wait_for_everyone(); accelerator.end_training()`: DDP's reducer holds the process
    group, and when it holds the last reference (the wrapped model freed as the script's main() returns) the gloo
    group's destructor runs with the GIL held and joins its worker threads, one of which may still be releasing
    the final barrier's tensors and need the GIL for it: a deadlock, in about 1 run in 40 of the examples on two
    busy cores (one process hung at exit for ever). So the wrapped model is freed first, while torch.distributed
    still holds the group; destroy_process_group then drops the group's last reference from Python, whose binding
    releases the GIL before the destructor runs."""
    accelerator = trainer.accelerator
    accelerator.wait_for_everyone()
    wrapped = trainer.model_wrapped
    if wrapped is not None and wrapped is not trainer.model:
        wrapper = weakref.ref(wrapped)
        trainer.model_wrapped = trainer.model
        del wrapped
        accelerator.free_memory()  # drops the accelerator's references to the prepared objects
        gc.collect()  # (free_memory collects before it drops them: the wrapper's reference cycles go now)
        if wrapper() is not None:
            print(f"warning: the {type(wrapper()).__name__} wrapper is still referenced when the process group ends; "
                  "its exit may hang (see hf_seqarch.tools.distributed.finish_distributed_run)", file=sys.stderr)
    accelerator.end_training()

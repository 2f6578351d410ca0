"""Check a Trainer checkpoint folder before resuming from it (and, for a new run, that its output_dir holds none).

Why: the Trainer resumes *silently* without optimizer.pt or scheduler.pt (a fresh Adam and schedule, so the
run is no longer the one that was checkpointed), and a truncated file surfaces as an unclear low-level error
(`OSError: [Errno 22] Invalid argument`, `JSONDecodeError`, a zip "central directory" message) that names no
file. A run killed while writing its checkpoint leaves exactly such a folder. This names the file and says
what to do instead.
"""

import json
import zipfile
from pathlib import Path

from transformers.trainer_utils import get_last_checkpoint

from ..configuration_seqarch import without_other_models_fields

# What a resumable checkpoint needs; each entry lists the names the file may have (plain, sharded, FSDP).
REQUIRED = {
    "the model config": ("config.json",),
    "the model weights": (
        "model.safetensors",
        "model.safetensors.index.json",
        "pytorch_model.bin",
        "pytorch_model.bin.index.json",
        "pytorch_model_fsdp_0",
    ),
    "the optimizer state": ("optimizer.pt", "optimizer.bin", "optimizer_0"),
    "the learning-rate schedule": ("scheduler.pt",),
    "the step count and loss history": ("trainer_state.json",),
}


# The config fields that decide what the saved weights mean: resuming a model built otherwise either fails deep in
# torch (another shape, or the optimizer's parameter groups) or, worse, silently reads the weights as another model
# (num_attention_heads 2 for 4: the same shapes; a classifier's labels in another order: the same rows, renamed).
# Dropout, chunk sizes and token ids may change on resume.
MODEL_FIELDS = (
    "vocab_size", "hidden_size", "mixer_types", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "head_dim", "intermediate_size", "hidden_act", "rope_theta", "sliding_window", "bidirectional", "rms_norm_eps",
    "tie_word_embeddings", "num_labels", "mamba_state_size", "mamba_head_dim", "mamba_expand", "mamba_conv_kernel",
    "mamba_n_groups", "linear_attention_num_heads", "linear_attention_head_dim", "linear_attention_feature_map",
    "linear_attention_use_decay", "id2label",
)


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be resumed from: a file is missing or unreadable, or holds another model."""


def check_resume_checkpoint(folder, config=None) -> Path:
    """Raise CheckpointError naming the missing or truncated file, or (given the `config` of the model the run
    built) the MODEL_FIELDS in which the checkpoint's model differs; return the folder's Path when it looks whole.

    Reads file headers (JSON parses, safetensors headers) and torch's zip files whole (their CRCs), not safetensors'
    tensors.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"Cannot resume from {str(folder)!r}: no such folder.{_siblings(folder)}")
    for what, names in REQUIRED.items():
        if not any((folder / name).exists() for name in names):
            raise CheckpointError(
                f"Cannot resume from {str(folder)!r}: no file holds {what} (looked for {' or '.join(names)}), so the run "
                f"would not continue where it stopped; the checkpoint was probably cut short while being written."
                f"{_siblings(folder)}"
            )
    for index in sorted(folder.glob("*.index.json")):  # a sharded file: every shard it lists must be there
        if _unreadable(index):
            continue  # reported below as truncated
        weight_map = json.loads(index.read_text())
        weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"Cannot resume from {str(folder)!r}: {index.name} has no weight_map naming the shards."
                                  f"{_siblings(folder)}")
        shards = sorted(set(weight_map.values()))
        absent = [name for name in shards if not (folder / name).exists()]
        if absent:
            raise CheckpointError(
                f"Cannot resume from {str(folder)!r}: {index.name} lists {len(shards)} shard(s), and {', '.join(absent)} "
                f"{'is' if len(absent) == 1 else 'are'} missing.{_siblings(folder)}"
            )
    for path in sorted(folder.iterdir()):
        problem = _unreadable(path)
        if problem:
            raise CheckpointError(
                f"Cannot resume from {str(folder)!r}: {path.name} is truncated or corrupted ({problem}).{_siblings(folder)}"
            )
    if config is not None:
        _check_same_model(folder, config)
    return folder


def _check_same_model(folder: Path, config):
    saved = json.loads((folder / "config.json").read_text())
    saved = type(config).from_dict(without_other_models_fields(saved))  # with the class defaults the file leaves out
    differing = [
        f"{name}: {getattr(saved, name)!r} in the checkpoint, {getattr(config, name)!r} in this run"
        for name in MODEL_FIELDS
        if hasattr(config, name) and getattr(saved, name, None) != getattr(config, name)
    ]
    if differing:
        raise CheckpointError(
            f"Cannot resume from {str(folder)!r}: it holds another model ({'; '.join(differing)}). Resume with the "
            "settings the checkpoint was trained with (the same --preset and --config_overrides), or start afresh."
        )


def check_before_training(training_args, config):
    """What the example scripts check before training: the checkpoint to resume from (whole, and of this model), or
    else an output_dir free of another run's checkpoints. SystemExit with the message, as for a bad argument.

    `--resume_from_checkpoint True` (the Trainer's "the last checkpoint in output_dir", which the command line can
    only pass as a string) is set to that folder here."""
    try:
        if str(training_args.resume_from_checkpoint).lower() == "true":
            training_args.resume_from_checkpoint = _last_checkpoint(training_args.output_dir)
        if training_args.resume_from_checkpoint:
            check_resume_checkpoint(training_args.resume_from_checkpoint, config)
        else:
            check_fresh_output_dir(training_args.output_dir)
    except CheckpointError as error:
        raise SystemExit(str(error)) from None


def _last_checkpoint(output_dir) -> str:
    last = get_last_checkpoint(output_dir) if Path(output_dir).is_dir() else None  # what the Trainer's True reads
    if last is None:
        raise CheckpointError(f"--resume_from_checkpoint True: {str(output_dir)!r} holds no checkpoint-N folder to "
                              "resume from. Give the checkpoint's folder, or the --output_dir of the run to continue.")
    return last


def check_fresh_output_dir(output_dir):
    """Raise CheckpointError if `output_dir` holds another run's checkpoints: a new run there deletes them as it rotates
    its own (save_total_limit counts theirs too) and saves its model over that run's."""
    folder = Path(output_dir)
    others = _by_step(p for p in folder.glob("checkpoint-*") if p.is_dir()) if folder.is_dir() else []
    if others:
        raise CheckpointError(
            f"{str(folder)!r} holds the checkpoints of another run ({', '.join(p.name for p in others)}): a new run "
            f"there would delete them and save over its model. Continue it with --resume_from_checkpoint "
            f"{str(others[-1])!r}, or give another --output_dir (or delete that folder)."
        )


def _unreadable(path: Path) -> str | None:
    """Why the file cannot be read, or None. JSON parsed, safetensors headers read; torch's zip files are read
    whole, for their CRCs (the optimizer state: about twice the weights' size, by each process at a resume)."""
    try:
        if path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(path, framework="pt"):  # parses the header and checks the file covers it
                pass
        elif path.suffix in (".pt", ".pth", ".bin"):
            # torch.save writes a zip: a cut file loses its directory at the end, and a changed byte inside fails its
            # entry's CRC (torch.load itself would load the changed value silently).
            with zipfile.ZipFile(path) as archive:
                _read_checking_crcs(archive)
    except Exception as error:  # noqa: BLE001 - any failure to parse is the answer we want to report
        return f"{type(error).__name__}: {error}"
    return None


def _read_checking_crcs(archive: zipfile.ZipFile):
    """Read every entry: zipfile raises BadZipFile at the end of one whose data does not match its CRC. Entries with
    CRC 0 are skipped: torch writes 0 there after torch.serialization.set_crc32_options(False)."""
    for entry in archive.infolist():
        if entry.CRC != 0:
            with archive.open(entry) as data:
                while data.read(1 << 20):
                    pass


def _by_step(checkpoints) -> list[Path]:
    """checkpoint-N folders in step order (checkpoint-10 after checkpoint-9)."""
    return sorted(checkpoints, key=lambda p: int(p.name.split("-")[-1]) if p.name.split("-")[-1].isdigit() else -1)


def _siblings(folder: Path) -> str:
    others = _by_step(p for p in folder.parent.glob("checkpoint-*") if p != folder and p.is_dir())
    if not others:
        return " Start the run afresh (without resume_from_checkpoint)."
    return f" Resume from another checkpoint instead, e.g. {str(others[-1])!r}, or start afresh."

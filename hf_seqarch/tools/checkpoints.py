"""Check a Trainer checkpoint folder before resuming from it.

Why: the Trainer resumes *silently* without optimizer.pt or scheduler.pt (a fresh Adam and schedule, so the
run is no longer the one that was checkpointed), and a truncated file surfaces as an unclear low-level error
(`OSError: [Errno 22] Invalid argument`, `JSONDecodeError`, a zip "central directory" message) that names no
file. A run killed while writing its checkpoint leaves exactly such a folder. This names the file and says
what to do instead.
"""

import json
import zipfile
from pathlib import Path

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
    "the optimizer state": ("optimizer.pt", "optimizer_0"),
    "the learning-rate schedule": ("scheduler.pt",),
    "the step count and loss history": ("trainer_state.json",),
}


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be resumed from: a file is missing or unreadable."""


def check_resume_checkpoint(folder) -> Path:
    """Raise CheckpointError naming the missing or truncated file; return the folder's Path when it looks whole.

    Reads only file headers (JSON parses, safetensors headers, torch zip directories), not the tensors.
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
    return folder


def _unreadable(path: Path) -> str | None:
    """Why the file cannot be read, or None. Cheap: headers and zip directories only."""
    try:
        if path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(path, framework="pt"):  # parses the header and checks the file covers it
                pass
        elif path.suffix in (".pt", ".pth", ".bin"):
            with zipfile.ZipFile(path):  # torch.save writes a zip; a cut file loses its directory at the end
                pass
    except Exception as error:  # noqa: BLE001 - any failure to parse is the answer we want to report
        return f"{type(error).__name__}: {error}"
    return None


def _siblings(folder: Path) -> str:
    others = sorted(
        (p for p in folder.parent.glob("checkpoint-*") if p != folder and p.is_dir()),
        key=lambda p: int(p.name.split("-")[-1]) if p.name.split("-")[-1].isdigit() else -1,
    )
    if not others:
        return " Start the run afresh (without resume_from_checkpoint)."
    return f" Resume from another checkpoint instead, e.g. {str(others[-1])!r}, or start afresh."

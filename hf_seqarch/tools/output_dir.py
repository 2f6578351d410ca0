"""The output directory of a command (demo, compare), made and checked before any work starts."""

import os


def prepare_output_dir(path: str) -> str:
    """Make `path` (parents too) and check it can be written; returns its absolute path. ValueError, saying why, if
    not."""
    if not str(path).strip():  # abspath("") is the current directory: every output would land there
        raise ValueError("The output directory (--output-dir) is empty: name a folder, e.g. outputs/run.")
    path = os.path.abspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"Cannot write to output directory {path!r}: it is a file, not a directory.")
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, ".write-test")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as err:
        raise ValueError(f"Cannot write to output directory {path!r}: {err.strerror or err}.") from None
    return path

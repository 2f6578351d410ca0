"""glibc malloc settings for CPU benchmarks.

glibc returns large freed blocks to the OS (any block over 32 MiB, and the top of the heap once more than
twice the largest recent block is free), so a tensor that size is page-faulted in again at every step:
kernel time that on the 2-core CPU machine this project is measured on was up to a third of an op's time. PyTorch's CPU
performance guide recommends jemalloc or tcmalloc for this reason; these glibc tunables have the same
effect (malloc keeps what it freed). They must be set before the process starts.
"""

import os
import sys

KEEP_FREED_MEMORY = "glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=17179869184"


def keeps_freed_memory() -> bool:
    return os.environ.get("GLIBC_TUNABLES") == KEEP_FREED_MEMORY


def env_keeping_freed_memory() -> dict:
    return dict(os.environ, GLIBC_TUNABLES=KEEP_FREED_MEMORY)


def restart_keeping_freed_memory():
    """Re-run this script (same arguments) in a process whose malloc keeps freed memory; returns if it already does."""
    if not keeps_freed_memory():
        sys.stdout.flush()
        os.execve(sys.executable, [sys.executable, *sys.argv], env_keeping_freed_memory())

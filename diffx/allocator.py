"""Host memory reuse for training on a CPU (``train.keep_freed_memory``).

A training step allocates and frees the same activations every step. glibc's malloc serves blocks above
its mmap threshold (at most 32 MiB; a DiT's MLP activations are larger) with a fresh ``mmap`` and gives
them back with ``munmap`` when freed, and trims the top of its heap above the trim threshold: every step
then faults in and zero-fills the same hundreds of megabytes again. Measured on an MMDiT step (30.8 M
parameters, batch 32, 32x32 latents): 50,000-145,000 page faults and 0.2-0.8 s of system time per
~3 s step, varying from step to step (README, "Training speed against diffusers").

``keep_freed_memory()`` sets ``M_MMAP_MAX = 0`` (every block from the heap, which glibc still grows with
``mmap`` if ``brk`` fails) and ``M_TRIM_THRESHOLD = SIZE_MAX`` (never trim), the settings PyTorch's CPU
performance guide reaches with jemalloc or tcmalloc: after the first steps no page fault remains. The
price: the process keeps its peak host memory until it exits, as PyTorch's CUDA caching allocator does
with device memory, and glibc's heap can fragment where a page-aligned request does not fit a freed block
of the same size (a toy loop of 64 MiB activations grew to 1.5x the default's peak). Off by default: on
two 30-step CPU runs of a 256-wide MMDiT each way it halved the system time (6.0, 5.6 -> 3.1, 2.7 s) and
the page faults (2.2, 1.9 M -> 0.41, 0.44 M), but saved only ~2.5% of the CPU time in all (user + system
61.3, 62.9 -> 59.8, 61.4 s) and raised the peak memory (1.76, 1.81 -> 1.81, 1.94 GB). Other C libraries
(musl, macOS, Windows) are left as they are.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_TRIM_THRESHOLD = -1  # <malloc.h>
M_MMAP_MAX = -4


def keep_freed_memory() -> bool:
    """Keep freed host memory in the process for reuse (glibc only); returns whether it was applied."""
    libc = _glibc()
    if libc is None:
        return False
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    # mallopt returns 1 on success; -1 as the trim threshold is SIZE_MAX (glibc converts it to size_t).
    return libc.mallopt(M_MMAP_MAX, 0) == 1 and libc.mallopt(M_TRIM_THRESHOLD, -1) == 1


def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # glibc's own symbol: absent from musl, whose mallopt does nothing
        libc.mallopt
    except (OSError, AttributeError):
        return None
    return libc

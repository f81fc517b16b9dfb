"""Keep freed CPU memory in the process from one training step to the next (glibc ``mallopt``).

A training step allocates and frees the same large tensors every time: activations, the inputs saved for
backward, the logits (100 MB for 8 × 64 tokens over SmolLM2's 49,152-token vocabulary). glibc's malloc serves
blocks above its mmap threshold (128 KiB, adapting up to 32 MiB) with fresh ``mmap`` calls and gives freed
memory back to the kernel, so each step faults all of those pages in again and the kernel zeroes them: about
98,000 minor page faults (≈ 384 MB) per step of SmolLM2-135M at batch 8 × 64 on this project's machines.

:func:`keep_freed_memory` raises the mmap threshold and the trim threshold, so large blocks come from the heap
and stay there once freed; the next step reuses them without a fault. Measured with
``python benchmarks/bench_allocator.py`` (fresh processes, glibc as it comes vs kept, in turn): page faults per
step 98,308 -> 0 and steps 0.79x as long for lorakit (0.81x for the frozen base, 0.80x for PEFT). The price:
the process keeps its peak resident memory instead of shrinking between steps (a training loop returns to that
peak every step anyway).

``lorakit train`` calls it on CPU runs (``--no-keep-freed-memory`` turns it off); call it yourself at the top of
a script that trains with the HF ``Trainer`` or your own loop. It only exists for glibc (Linux); elsewhere
it does nothing and says so. CUDA memory has its own caching allocator and is not affected.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3

#: Blocks up to this size come from the heap (larger ones, rare in a step, are still mmapped).
MMAP_THRESHOLD = 1 << 30
#: Freed memory at the top of the heap is kept up to this size.
TRIM_THRESHOLD = 1 << 30


def keep_freed_memory() -> bool:
    """Tell glibc's malloc to keep large freed blocks for reuse; True if it took effect, False where it cannot
    (not glibc, or ``mallopt`` refused): the process is then unchanged. Safe to call more than once."""
    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))

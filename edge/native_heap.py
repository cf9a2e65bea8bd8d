"""Return the memory of swapped-out heads to the kernel.

Every pushed head is loaded into a new LiteRT interpreter, whose weights
and tensor buffers are blocks of hundreds of KiB (173 x 1024 float32
weights take 692 KiB). glibc's malloc serves blocks from 128 KiB
up with mmap at first, but the first time such a block is freed it raises
its mmap threshold to that block's size (up to 32 MiB on 64-bit systems).
Later interpreters then come from the heaps of the threads' arenas, and
the holes that a freed interpreter leaves there stay resident. In one
process of 10 recorders on replayed embeddings
(``benchmarks/head_swap_memory.py``, glibc 2.36), the resident set grew
by 55 MiB over the first 10 heads and by 10 MiB over the next 90.

``release_free_memory`` calls glibc's ``malloc_trim(0)``, which returns
the free pages of every arena to the kernel. The recorder calls it after
each head swap, once the old head is released.

Fixing the mmap threshold at 128 KiB (``MALLOC_MMAP_THRESHOLD_=131072``)
would keep interpreters out of the heaps altogether. But it also maps and
unmaps every window's audio, which cost the edge pipeline about 4% of its
throughput (docs/benchmarks.md, "Head swaps and the native heap").
"""

from __future__ import annotations

import ctypes
import functools
import os


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """Return glibc loaded with ctypes, or None where the C library is another one (musl, macOS)."""
    try:
        version = os.confstr("CS_GNU_LIBC_VERSION")
    except (AttributeError, ValueError, OSError):
        return None
    if not version or not version.startswith("glibc"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    libc.malloc_trim.argtypes = [ctypes.c_size_t]
    libc.malloc_trim.restype = ctypes.c_int
    return libc


def release_free_memory() -> bool:
    """Return the free pages of glibc's heaps to the kernel, and whether any were released.

    Does nothing, and returns False, where the C library is not glibc.
    """
    libc = _glibc()
    return libc is not None and libc.malloc_trim(0) == 1

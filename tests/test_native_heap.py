"""Release of free heap pages after a head swap (edge/native_heap.py)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from dawnchorus.edge import native_heap

# Fills 32 MiB of heap with 4 KiB blocks through glibc's own malloc and frees
# all but the last. The last block keeps the heap's top in use, so free()
# cannot shrink the heap. Reports the resident set before and after the release.
_FRAGMENTED_HEAP = textwrap.dedent("""
    import ctypes, json

    from dawnchorus.edge.native_heap import release_free_memory

    def resident_bytes():
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * 4096

    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]

    blocks = [libc.malloc(4096) for _ in range(8192)]
    for block in blocks:
        libc.memset(block, 1, 4096)
    for block in blocks[:-1]:
        libc.free(block)
    before = resident_bytes()
    released = release_free_memory()
    print(json.dumps({"released": released, "freed_bytes": before - resident_bytes()}))
""")


@pytest.mark.skipif(native_heap._glibc() is None, reason="the C library is not glibc")
def test_release_returns_free_pages():
    # A fresh interpreter, so that no other heap state of the test process blurs the resident set.
    result = subprocess.run([sys.executable, "-c", _FRAGMENTED_HEAP], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["released"] is True
    assert report["freed_bytes"] >= 16 << 20

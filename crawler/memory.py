"""Keep the process's resident memory flat over long runs (glibc only; a no-op elsewhere).

glibc raises its mmap threshold after large (about 1 MB) response buffers are freed and then
serves later large buffers from the heap, which it seldom returns: RSS then grows with the
length of a run although the Python heap stays flat. A fixed threshold keeps large buffers in
mmap (returned to the system when freed), and two malloc arenas stop every worker thread from
growing its own.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8


def tame_malloc(mmap_threshold: int = 256 * 1024, arenas: int = 2) -> bool:
    """Apply the settings; False when this is not glibc."""
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(M_ARENA_MAX, arenas))

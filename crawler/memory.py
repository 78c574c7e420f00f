"""Process-wide tuning for long runs: the CLI applies it around sync and audit; a library caller
(an Airflow task, a notebook) chooses for itself, since it changes the whole process.

Memory (glibc only; a no-op elsewhere): glibc raises its mmap threshold after large (about 1 MB)
response buffers are freed and then serves later large buffers from the heap, which it seldom
returns: RSS then grows with the length of a run although the Python heap stays flat. A fixed
threshold keeps large buffers in mmap (returned to the system when freed), and two malloc arenas
stop every worker thread from growing its own.

Garbage collection: a run allocates millions of short-lived dicts (parsed answers, resources); the
default collection thresholds spend a quarter of the crawler's CPU scanning them.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
from collections.abc import Iterator
from contextlib import contextmanager

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


@contextmanager
def tuned_for_bulk() -> Iterator[None]:
    """Inside: the malloc settings above, the objects alive at entry frozen out of collection and
    collection thresholds raised for a bulk run. The GC settings are restored on exit; the malloc
    settings stay (glibc cannot take them back, and they cost nothing later)."""
    tame_malloc()
    thresholds = gc.get_threshold()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)
    try:
        yield
    finally:
        gc.set_threshold(*thresholds)
        gc.unfreeze()

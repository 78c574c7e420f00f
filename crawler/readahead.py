"""Running an iterator ahead of its consumer, in a thread of its own.

The listing is requests one after another, and its consumer (the coordinator handing studies
to the crawl threads) holds it back so that memory stays bounded. Run in step, a listing that
must pause (the silent-cap check lists the first window a second time once its last page is
in) left the crawl threads idle at the end of a run: half a second to a second in a
few-thousand-study sync. Read ahead by a bounded number of items, the listing's pauses fall
while the crawl still has work queued.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class _End(Generic[T]):
    __slots__ = ("error",)

    def __init__(self, error: BaseException | None) -> None:
        self.error = error


def read_ahead(items: Iterator[T], size: int, name: str = "read-ahead") -> Iterator[T]:
    """The items of ``items``, produced by a daemon thread at most ``size`` items ahead. An
    exception the iterator raises is raised here after the items it produced before it. When
    the consumer stops early (closes this generator, or raises), the producer stops at its next
    item."""
    ahead: queue.Queue[T | _End[T]] = queue.Queue(maxsize=max(size, 1))
    stop = threading.Event()

    def put(entry: T | _End[T]) -> bool:
        while not stop.is_set():
            try:
                ahead.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(item):
                    return
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, raised there
            put(_End(exc))
        else:
            put(_End(None))

    thread = threading.Thread(target=produce, name=name, daemon=True)
    thread.start()
    try:
        while True:
            entry = ahead.get()
            if isinstance(entry, _End):
                if entry.error is not None:
                    raise entry.error
                return
            yield entry
    finally:
        stop.set()

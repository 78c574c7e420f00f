"""Running an iterator ahead of its consumer, in a thread of its own.

The listing is requests one after another, and its consumer (the coordinator handing studies
to the crawl threads) holds it back so that memory stays bounded. Run in step, a listing that
must pause (the silent-cap check lists the first window a second time once its last page is
in) left the crawl threads idle at the end of a run: half a second to a second in a
few-thousand-study sync. Read ahead by a bounded number of items, the listing's pauses fall
while the crawl still has work queued.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class _End(Generic[T]):
    __slots__ = ("error",)

    def __init__(self, error: BaseException | None) -> None:
        self.error = error


def read_ahead(items: Iterator[T], size: int, name: str = "read-ahead", weight: Callable[[T], int] = lambda item: 1) -> Iterator[T]:
    """The items of ``items``, produced by a daemon thread while fewer than ``size`` (counted by
    ``weight``: a page of studies weighs its length) wait for the consumer. An exception the
    iterator raises is raised here after the items it produced before it. When the consumer
    stops early (closes this generator, or raises), the producer stops at its next item; one
    busy in a request ends with it (the run closes its client, whose requests then fail at
    once), and is waited for a moment here."""
    ahead: deque[T | _End[T]] = deque()
    waiting = 0
    ready = threading.Condition()
    stop = threading.Event()

    def put(entry: T | _End[T], load: int) -> bool:
        nonlocal waiting
        with ready:
            while waiting >= size and not stop.is_set():
                ready.wait(0.1)
            if stop.is_set():
                return False
            ahead.append(entry)
            waiting += load
            ready.notify_all()
            return True

    def produce() -> None:
        try:
            for item in items:
                if not put(item, weight(item)):
                    return
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, raised there
            put(_End(exc), 0)
        else:
            put(_End(None), 0)

    thread = threading.Thread(target=produce, name=name, daemon=True)
    thread.start()
    try:
        while True:
            with ready:
                while not ahead:
                    ready.wait()
                entry = ahead.popleft()
                if not isinstance(entry, _End):
                    waiting -= weight(entry)
                ready.notify_all()
            if isinstance(entry, _End):
                if entry.error is not None:
                    raise entry.error
                return
            yield entry
    finally:
        stop.set()
        with ready:
            ready.notify_all()
        thread.join(1.0)

"""read_ahead: the same items in the same order, the producer's error where it happened, never
more than the bound ahead, and a producer that stops when the consumer does."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from crawler.readahead import read_ahead


def test_same_items_in_order():
    assert list(read_ahead(iter(range(1000)), 7)) == list(range(1000))
    assert list(read_ahead(iter([]), 3)) == []


def test_an_error_comes_after_the_items_before_it():
    def items() -> Iterator[int]:
        yield 1
        yield 2
        raise LookupError("listing stopped")

    got = []
    with pytest.raises(LookupError, match="listing stopped"):
        for item in read_ahead(items(), 10):
            got.append(item)
    assert got == [1, 2]


def test_the_producer_stays_within_the_bound():
    produced = []

    def items() -> Iterator[int]:
        for n in range(100):
            produced.append(n)
            yield n

    consumer = read_ahead(items(), 5)
    assert next(consumer) == 0
    time.sleep(0.3)
    # one taken, five queued, one waiting to be queued
    assert len(produced) <= 1 + 5 + 1
    assert list(consumer) == list(range(1, 100))


def test_the_producer_stops_when_the_consumer_does():
    produced = []
    finished = threading.Event()

    def items() -> Iterator[int]:
        try:
            for n in range(10_000):
                produced.append(n)
                yield n
        finally:
            finished.set()

    consumer = read_ahead(items(), 2)
    assert next(consumer) == 0
    consumer.close()
    assert finished.wait(2), "the producer did not stop"
    assert len(produced) < 10


def test_pages_are_counted_by_their_items():
    produced = []

    def pages() -> Iterator[list[int]]:
        for n in range(50):
            produced.append(n)
            yield list(range(10))

    consumer = read_ahead(pages(), 25, weight=len)
    assert next(consumer) == list(range(10))
    time.sleep(0.3)
    # one page taken; fewer than 25 items waiting admit one more page: at most 3 pages waiting, one more in hand
    assert len(produced) <= 1 + 3 + 1
    assert sum(len(page) for page in consumer) == 490


def test_a_producer_busy_in_a_request_is_waited_for_a_moment_only():
    release = threading.Event()

    def items() -> Iterator[int]:
        yield 1
        release.wait(10)  # a request that takes long
        yield 2

    consumer = read_ahead(items(), 5)
    assert next(consumer) == 1
    started = time.monotonic()
    consumer.close()
    assert time.monotonic() - started < 8  # not the 10 s the producer's request takes
    release.set()

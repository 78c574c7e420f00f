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

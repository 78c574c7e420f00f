"""Warnings bounded per run: the first few of a kind are logged, the rest only counted.

A hostile or broken server can make the same problem recur for every study or every window;
one line each made megabytes of stderr that hid the one line that mattered. ``Notices`` logs
the first ``limit`` messages of each kind, counts the rest, and says once, at the end, how many
more there were.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter

LIMIT = 20


class Notices:
    """Thread-safe: the listing logs from its own thread while the run logs from another."""

    def __init__(self, logger: logging.Logger, limit: int = LIMIT) -> None:
        self.log = logger
        self.limit = limit
        self.seen: Counter[str] = Counter()
        self._lock = threading.Lock()

    def emit(self, kind: str, message: str, level: int = logging.WARNING) -> bool:
        """Log ``message`` unless ``limit`` messages of ``kind`` were logged already; True when logged."""
        with self._lock:
            self.seen[kind] += 1
            shown = self.seen[kind] <= self.limit
        if shown:
            self.log.log(level, "%s", message)
        return shown

    @property
    def omitted(self) -> int:
        """Messages counted but not logged, over every kind."""
        with self._lock:
            return sum(max(0, count - self.limit) for count in self.seen.values())

    def close(self, level: int = logging.WARNING) -> int:
        """Log one line per kind that went over the limit; the number of messages not logged."""
        with self._lock:
            over = {kind: count - self.limit for kind, count in self.seen.items() if count > self.limit}
        for kind, more in sorted(over.items()):
            self.log.log(level, "%d more %s (not shown; counted)", more, kind)
        return sum(over.values())

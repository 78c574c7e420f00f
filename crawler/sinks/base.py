"""The small protocol every sink follows."""

from __future__ import annotations

from typing import Protocol


class Sink(Protocol):
    def write(self, resource_type: str, body: bytes) -> None:
        """Accept one resource (serialised JSON, no newline)."""

    def error(self, body: bytes) -> None:
        """Record one OperationOutcome for something that could not be sent."""

    def finish(self) -> str | None:
        """Make everything written visible at once; returns where it went (None if nowhere)."""

    def abort(self) -> None:
        """Give up: leave nothing that looks complete."""

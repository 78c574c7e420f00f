"""The small protocol every sink follows.

The sync hands each sink one study's changed resources at a time (``add``) and deletions
(``delete``). Before it commits the state it calls ``flush``: the sink makes everything added
so far durable (NDJSON: written and synced to disk) or accepted (FHIR server: transaction
answered), and names the studies it could not take, which are then not recorded as synced.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

Resource = tuple[str, str, bytes]
"""(resource type, id, serialised JSON without a newline)."""


class Sink(Protocol):
    def add(self, key: str, resources: Sequence[Resource]) -> None:
        """Queue one study's changed resources; ``key`` names the study (its Study Instance UID)
        in what ``flush`` returns. Shared resources (Endpoint, Patient) come before the study's
        own and only when they changed."""

    def delete(self, key: str, resource_type: str, resource_id: str) -> None:
        """Queue the deletion of a resource that the PACS no longer holds."""

    def error(self, body: bytes) -> None:
        """Record one OperationOutcome (JSON) for a study that could not be sent."""

    def flush(self) -> dict[str, str]:
        """Send or persist everything queued; return {key: one-line reason} for the studies
        (or deletions) that were refused. Raises SinkError when the sink cannot be reached at all."""

    def finish(self) -> str | None:
        """After a last flush: make the run's output visible; returns where it went, if anywhere."""

    def abort(self) -> None:
        """Give up without making anything look complete."""

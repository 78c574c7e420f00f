"""The small protocol every sink follows.

The sync hands each sink one study's changed resources at a time (``add``) and deletions
(``delete``). Before it commits the state it calls ``flush``: the sink makes everything added
so far durable (NDJSON: written and synced to disk) or accepted (FHIR server: transaction
answered), and names the studies it could not take, which are then not recorded as synced.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol, TypeGuard

if TYPE_CHECKING:
    from ..tables.tags import TagValues

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


class LearnsMaxEntries(Sink, Protocol):
    """A sink that learns from its server's refusals how many entries one request may carry (the
    FHIR server); the state keeps that for the server's next run."""

    base_url: str
    max_entries: int
    learned_max_entries: int | None


class ServerIds(Sink, Protocol):
    """A sink that can write under ids its server assigns (the FHIR server): the state keeps them."""

    base_url: str
    ids: str
    server_id_lookup: Callable[[str, str], str | None]

    def take_server_ids(self) -> dict[tuple[str, str], str]:
        """The server ids learned since the last call, by (resource type, our id)."""

    def unknown_to_server(self, resource_type: str, resource_id: str) -> bool:
        """Whether the server holds the resource under no id the state knows."""


class TakesTags(Sink, Protocol):
    """A sink with a column per ``--include-tag`` (the tables): the values of a study's tags are
    handed to it just before the study's resources (``add`` with the same key)."""

    def add_tags(self, key: str, tags: TagValues) -> None:
        """Keep ``tags`` for the next ``add`` of ``key``."""


def takes_tags(sink: Sink) -> TypeGuard[TakesTags]:
    return hasattr(sink, "add_tags")


def learns_max_entries(sink: Sink) -> TypeGuard[LearnsMaxEntries]:
    return hasattr(sink, "learned_max_entries")


def learns_server_ids(sink: Sink) -> TypeGuard[ServerIds]:
    return hasattr(sink, "take_server_ids")


def uses_server_ids(sink: Sink) -> TypeGuard[ServerIds]:
    """Whether ``sink`` writes under its server's ids (``ids="server"``), not ours."""
    return getattr(sink, "ids", None) == "server"

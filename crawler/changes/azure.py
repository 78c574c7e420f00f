"""The Azure DICOM service's change feed (API v2) as a change source (see the package's docstring)."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any
from urllib.parse import quote

from ..qido import QidoClient
from ..uids import valid_uid
from .model import Change, ChangesRead, get_json, malformed

AZURE_PAGE = 200
"""The largest ``limit`` the Azure change feed v2 takes."""


def _azure_cursor(entry: dict[str, Any]) -> tuple[str, int] | None:
    sequence, timestamp = entry.get("Sequence"), entry.get("Timestamp")
    if type(sequence) is not int or sequence < 0 or not isinstance(timestamp, str) or not timestamp.strip():
        return None
    return timestamp.strip(), sequence


def feed_time(moment: datetime) -> str:
    """A ``startTime``/``endTime`` value: UTC, ISO 8601 with ``Z``."""
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _entry_time(text: str) -> datetime | None:
    """An entry's Timestamp (fractions of a second past microseconds cut off); None if it is none."""
    value = text.strip().replace("Z", "+00:00")
    head, dot, rest = value.partition(".")
    if dot:
        digits = len(rest) - len(rest.lstrip("0123456789"))
        value = f"{head}.{rest[:digits][:6].ljust(6, '0')}{rest[digits:]}"
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def azure_changes(client: QidoClient, base: str, cursor: str | None, end: datetime | None = None) -> ChangesRead:
    """The Azure change feed v2 since ``cursor`` (``<Timestamp>|<Sequence>``; None: where the feed
    stands now, from ``/changefeed/latest``). Entries that are not well-formed are passed over; an
    answer that is no feed is a FatalQidoError. ``end``: only entries made before it (the feed's
    ``endTime``, exclusive): a later one is read by a later call, the cursor never passes it."""
    base = base.rstrip("/")
    if cursor is None:
        url = f"{base}/changefeed/latest?includeMetadata=false"
        latest = get_json(client, url)
        if latest == {}:
            return ChangesRead((), "|0")
        if not isinstance(latest, dict) or (found := _azure_cursor(latest)) is None:
            raise malformed(url, "not a change feed entry")
        return ChangesRead((), f"{found[0]}|{found[1]}")
    start, _, last = cursor.rpartition("|")
    read = int(last) if last.isdigit() else -1
    newest = (start, max(read, 0))
    changes: dict[str, bool] = {}
    offset = 0
    while True:
        query = f"offset={offset}&limit={AZURE_PAGE}&includeMetadata=false" + (f"&startTime={quote(start, safe='')}" if start else "")
        if end is not None:
            query += f"&endTime={quote(feed_time(end), safe='')}"
        url = f"{base}/changefeed?{query}"
        page = get_json(client, url)
        if page == {}:
            page = []
        if not isinstance(page, list):
            raise malformed(url, "not a JSON array")
        for entry in page:
            found = _azure_cursor(entry) if isinstance(entry, dict) else None
            if found is None or found[1] <= read:
                continue
            uid = entry.get("StudyInstanceUid")
            if isinstance(uid, str) and valid_uid(uid.strip()):
                changes[uid.strip()] = changes.get(uid.strip(), False) or entry.get("Action") == "delete"
            if found[1] > newest[1]:
                newest = found
        if len(page) < AZURE_PAGE:
            break
        offset += len(page)
    return ChangesRead(tuple(Change(uid, deleted) for uid, deleted in changes.items()), f"{newest[0]}|{newest[1]}",
                       newest=_entry_time(newest[0]) if newest[0] else None)

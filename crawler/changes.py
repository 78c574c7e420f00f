"""Change sources: the studies a server says changed since a cursor, beyond the StudyDate window.

StudyDate says when a study was made, not when it arrived; a study that reaches the PACS late
with an old StudyDate, or an old study that changes, falls outside an incremental window. A
change source names the studies created, changed or deleted since the cursor the state keeps for
the source (one model, ``read_changes``); the run asks for each by UID (a study the server no
longer has is gone), and the cursor moves only at the end of a run whose listing was complete.

- ``orthanc``: Orthanc's ``/changes`` log (``since`` exclusive; ``Last`` the newest position).
  Study changes (``NewStudy``, ``StableStudy``, ``ModifiedStudy``, ``UpdatedAttachment``,
  ``UpdatedMetadata``) name their study; series changes (``NewSeries``, ``ModifiedSeries``) and
  ``ModifiedInstance`` are resolved to their study, one request per changed resource. New
  instances of an existing study are seen through the ``StableStudy`` that follows them.
  Orthanc logs no deletions (the run's reconciliation finds those), and ``DELETE /changes``
  empties the log: a ``Last`` lower than the cursor means the log was reset (``reset``: the run
  then lists everything once).
- ``azure``: the Azure DICOM service change feed, API v2: ``GET {base}/changefeed?startTime=&
  offset=&limit=&includeMetadata=false`` (startTime inclusive; ``limit`` at most 200; pages until
  one holds fewer than ``limit``), entries ``{Sequence, StudyInstanceUid, SeriesInstanceUid,
  SopInstanceUid, Action: create|update|delete, Timestamp, State}``, and ``GET
  {base}/changefeed/latest``. The cursor is the Timestamp and Sequence of the newest entry read:
  the next read starts at that Timestamp (inclusive) and passes over entries up to that Sequence,
  so entries sharing a Timestamp are neither lost nor read twice, and a gap in the sequence
  numbers, or an empty page while ``latest`` is ahead, never moves the cursor past an entry that
  was not read.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import orjson
import requests
import urllib3

from .errors import FatalQidoError, RetriableQidoError
from .http import redact
from .kinds import ChangeSource
from .qido import QidoClient, transport_failure
from .uids import valid_uid

STUDY_CHANGES = frozenset({"NewStudy", "StableStudy", "ModifiedStudy", "UpdatedAttachment", "UpdatedMetadata"})
RESOLVED_CHANGES = {("Series", "NewSeries"), ("Series", "ModifiedSeries"), ("Instance", "ModifiedInstance")}
"""Changes of a series or an instance, resolved to their study (``/series/{id}/study``)."""
AZURE_PAGE = 200
"""The largest ``limit`` the Azure change feed v2 takes."""
ORTHANC_ID = re.compile(r"[0-9a-f]{8}(?:-[0-9a-f]{8}){4}")
"""Orthanc's resource ids (a SHA-1 in five groups): the only ids put into a request path."""


@dataclass(frozen=True)
class Changes:
    study_uids: tuple[str, ...]
    last: int


@dataclass(frozen=True)
class Change:
    """A study the source names as changed; ``deleted`` when the source said something of it was
    deleted (a deleted instance: the study may remain, so the run asks)."""

    study_uid: str
    deleted: bool = False


@dataclass(frozen=True)
class ChangesRead:
    """One read of a change source: the studies named, and the cursor to store once they are
    recorded. ``reset``: the source lost its log since the cursor (list everything once)."""

    changes: tuple[Change, ...]
    cursor: str
    reset: bool = False


def read_changes(kind: ChangeSource, client: QidoClient, base: str, cursor: str | None) -> ChangesRead:
    """The changes ``kind`` names since ``cursor`` (None: a first read, which only finds where the
    source stands now). ``base`` is Orthanc's REST base, or the Azure service's DICOMweb base."""
    if kind == ChangeSource.ORTHANC:
        since = int(cursor) if cursor is not None and cursor.isdigit() else None
        found = orthanc_changes(client, base, since)
        if since is not None and found.last < since:
            return ChangesRead((), str(found.last), reset=True)
        return ChangesRead(tuple(Change(uid) for uid in found.study_uids), str(found.last))
    if kind == ChangeSource.AZURE:
        return azure_changes(client, base, cursor)
    raise ValueError(f"no change source {kind!r}")


def orthanc_base(dicomweb_url: str) -> str:
    """Orthanc's REST base from its DICOMweb base (``.../dicom-web`` -> ``...``)."""
    return dicomweb_url.rstrip("/").removesuffix("/dicom-web")


def _get(client: QidoClient, url: str) -> object:
    """The JSON answer at ``url``, of whatever shape the server chose; ``{}`` for a 404."""
    client.counts.add("changes")
    try:  # through the client's fetch: its deadline, size cap and same-origin redirects apply
        response = client.fetch(url, accept="application/json")
    except (requests.exceptions.RequestException, urllib3.exceptions.HTTPError) as exc:
        raise transport_failure(exc, redact(url)) from None
    except Exception as exc:  # noqa: BLE001 - anything else also means "not reached"
        raise RetriableQidoError(f"cannot read {redact(url)}: {type(exc).__name__}", url=redact(url)) from None
    if response.status == 404:
        return {}
    if response.status >= 400:
        raise FatalQidoError(f"HTTP {response.status} from {redact(url)}", url=redact(url), status=response.status)
    try:
        answer: object = orjson.loads(response.body)
    except ValueError:
        raise FatalQidoError(f"malformed JSON from {redact(url)}", url=redact(url)) from None
    return answer


def _malformed(url: str, what: str) -> FatalQidoError:
    return FatalQidoError(f"answer from {redact(url)}: {what}", url=redact(url))


def _position(answer: dict[str, Any], default: int, url: str) -> int:
    value = answer.get("Last", default)
    if type(value) is not int or value < 0:
        raise _malformed(url, "Last is not a feed position")
    return value


def _feed(client: QidoClient, url: str) -> dict[str, Any]:
    answer = _get(client, url)
    if not isinstance(answer, dict):
        raise _malformed(url, "not a JSON object")
    if not isinstance(answer.get("Changes", []), list):
        raise _malformed(url, "Changes is not a list")
    return answer


def orthanc_changes(client: QidoClient, rest_base: str, since: int | None, page: int = 1000) -> Changes:
    """Study UIDs created or changed after feed position ``since``; ``since=None`` only reads the
    current position (a first run lists everything anyway). Entries that are no study change of
    a well-formed Orthanc id are passed over; an answer that is no feed is a FatalQidoError."""
    if since is None:
        url = f"{rest_base}/changes?last"
        return Changes((), _position(_feed(client, url), 0, url))
    study_ids: dict[str, None] = {}
    position = since
    while True:
        url = f"{rest_base}/changes?since={position}&limit={page}"
        answer = _feed(client, url)
        for change in answer.get("Changes", []):
            if not isinstance(change, dict):
                continue
            resource_id, kind = change.get("ID"), (change.get("ResourceType"), change.get("ChangeType"))
            if not isinstance(resource_id, str) or not ORTHANC_ID.fullmatch(resource_id):
                continue
            if kind[0] == "Study" and kind[1] in STUDY_CHANGES:
                study_ids[f"studies/{resource_id}"] = None
            elif kind in RESOLVED_CHANGES:
                study_ids[f"{'series' if kind[0] == 'Series' else 'instances'}/{resource_id}/study"] = None
        position = _position(answer, position, url)
        if answer.get("Done", True) or not answer.get("Changes"):
            break
    uids: dict[str, None] = {}
    for path in study_ids:
        study = _get(client, f"{rest_base}/{path}")
        tags = study.get("MainDicomTags") if isinstance(study, dict) else None
        uid = tags.get("StudyInstanceUID") if isinstance(tags, dict) else None
        if isinstance(uid, str) and uid.strip():
            uids[uid.strip()] = None
    return Changes(tuple(uids), position)


def _azure_cursor(entry: dict[str, Any]) -> tuple[str, int] | None:
    sequence, timestamp = entry.get("Sequence"), entry.get("Timestamp")
    if type(sequence) is not int or sequence < 0 or not isinstance(timestamp, str) or not timestamp.strip():
        return None
    return timestamp.strip(), sequence


def azure_changes(client: QidoClient, base: str, cursor: str | None) -> ChangesRead:
    """The Azure change feed v2 since ``cursor`` (``<Timestamp>|<Sequence>``; None: where the feed
    stands now, from ``/changefeed/latest``). Entries that are not well-formed are passed over; an
    answer that is no feed is a FatalQidoError."""
    base = base.rstrip("/")
    if cursor is None:
        url = f"{base}/changefeed/latest?includeMetadata=false"
        latest = _get(client, url)
        if latest == {}:
            return ChangesRead((), "|0")
        if not isinstance(latest, dict) or (found := _azure_cursor(latest)) is None:
            raise _malformed(url, "not a change feed entry")
        return ChangesRead((), f"{found[0]}|{found[1]}")
    start, _, last = cursor.rpartition("|")
    read = int(last) if last.isdigit() else -1
    newest = (start, max(read, 0))
    changes: dict[str, bool] = {}
    offset = 0
    while True:
        query = f"offset={offset}&limit={AZURE_PAGE}&includeMetadata=false" + (f"&startTime={quote(start, safe='')}" if start else "")
        url = f"{base}/changefeed?{query}"
        page = _get(client, url)
        if page == {}:
            page = []
        if not isinstance(page, list):
            raise _malformed(url, "not a JSON array")
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
    return ChangesRead(tuple(Change(uid, deleted) for uid, deleted in changes.items()), f"{newest[0]}|{newest[1]}")



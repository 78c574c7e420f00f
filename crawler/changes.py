"""Opt-in sources of changed studies beyond the StudyDate window: Orthanc's ``/changes`` feed.

StudyDate says when a study was made, not when it arrived; a study that reaches the PACS late
with an old StudyDate falls outside an incremental window. Orthanc logs every new or modified
study in its ``/changes`` feed (``NewStudy``, and ``StableStudy`` once a study has stopped
changing), so an incremental run can ask for exactly the studies that changed since the last
run's position in that feed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import orjson
import requests
import urllib3

from .errors import FatalQidoError, RetriableQidoError
from .http import redact
from .qido import QidoClient, transport_failure

STUDY_CHANGES = frozenset({"NewStudy", "StableStudy"})
ORTHANC_ID = re.compile(r"[0-9a-f]{8}(?:-[0-9a-f]{8}){4}")
"""Orthanc's resource ids (a SHA-1 in five groups): the only ids put into a request path."""


@dataclass(frozen=True)
class Changes:
    study_uids: tuple[str, ...]
    last: int


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
            if not isinstance(change, dict) or change.get("ResourceType") != "Study" or change.get("ChangeType") not in STUDY_CHANGES:
                continue
            study_id = change.get("ID")
            if isinstance(study_id, str) and ORTHANC_ID.fullmatch(study_id):
                study_ids[study_id] = None
        position = _position(answer, position, url)
        if answer.get("Done", True) or not answer.get("Changes"):
            break
    uids = []
    for study_id in study_ids:
        study = _get(client, f"{rest_base}/studies/{study_id}")
        tags = study.get("MainDicomTags") if isinstance(study, dict) else None
        uid = tags.get("StudyInstanceUID") if isinstance(tags, dict) else None
        if isinstance(uid, str) and uid.strip():
            uids.append(uid.strip())
    return Changes(tuple(uids), position)



"""Orthanc's ``/changes`` log as a change source (see the package's docstring)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from ..qido import QidoClient
from .model import get_json, malformed

STUDY_CHANGES = frozenset({"NewStudy", "StableStudy", "ModifiedStudy", "UpdatedAttachment", "UpdatedMetadata"})
RESOLVED_CHANGES = {("Series", "NewSeries"), ("Series", "ModifiedSeries"), ("Instance", "ModifiedInstance")}
"""Changes of a series or an instance, resolved to their study (``/series/{id}/study``)."""
ORTHANC_ID = re.compile(r"[0-9a-f]{8}(?:-[0-9a-f]{8}){4}")
"""Orthanc's resource ids (a SHA-1 in five groups): the only ids put into a request path."""


@dataclass(frozen=True)
class Changes:
    study_uids: tuple[str, ...]
    last: int
    newest: datetime | None = None
    held: bool = False


def change_date(text: object) -> datetime | None:
    """A change's ``Date`` (Orthanc writes UTC as ``YYYYMMDDTHHMMSS``); None if it is not one."""
    if not isinstance(text, str):
        return None
    try:
        return datetime.strptime(text.strip(), "%Y%m%dT%H%M%S").replace(tzinfo=timezone.utc)
    except ValueError:
        return None


def orthanc_base(dicomweb_url: str) -> str:
    """Orthanc's REST base from its DICOMweb base (``.../dicom-web`` -> ``...``)."""
    return dicomweb_url.rstrip("/").removesuffix("/dicom-web")


def _position(answer: dict[str, Any], default: int, url: str) -> int:
    value = answer.get("Last", default)
    if type(value) is not int or value < 0:
        raise malformed(url, "Last is not a feed position")
    return value


def _feed(client: QidoClient, url: str) -> dict[str, Any]:
    answer = get_json(client, url)
    if not isinstance(answer, dict):
        raise malformed(url, "not a JSON object")
    if not isinstance(answer.get("Changes", []), list):
        raise malformed(url, "Changes is not a list")
    return answer


def orthanc_changes(client: QidoClient, rest_base: str, since: int | None, page: int = 1000,
                    stable_before: datetime | None = None) -> Changes:
    """Study UIDs created or changed after feed position ``since``; ``since=None`` only reads the
    current position (a first run lists everything anyway). Entries that are no study change of
    a well-formed Orthanc id are passed over; an answer that is no feed is a FatalQidoError.

    ``stable_before``: the read stops at the first change dated after it (changes come in the
    order they were made): the position returned is the one before it, so that it and every
    later change are read again (``held``) once they are that old."""
    if since is None:
        url = f"{rest_base}/changes?last"
        return Changes((), _position(_feed(client, url), 0, url))
    study_ids: dict[str, None] = {}
    position = since
    newest: datetime | None = None
    held = False
    while True:
        url = f"{rest_base}/changes?since={position}&limit={page}"
        answer = _feed(client, url)
        walked = position
        for change in answer.get("Changes", []):
            if not isinstance(change, dict):
                continue
            when = change_date(change.get("Date"))
            if stable_before is not None and when is not None and when > stable_before:
                held = True
                break
            seq = change.get("Seq")
            if type(seq) is int and seq > walked:
                walked = seq
            if when is not None and (newest is None or when > newest):
                newest = when
            resource_id, kind = change.get("ID"), (change.get("ResourceType"), change.get("ChangeType"))
            if not isinstance(resource_id, str) or not ORTHANC_ID.fullmatch(resource_id):
                continue
            if kind[0] == "Study" and kind[1] in STUDY_CHANGES:
                study_ids[f"studies/{resource_id}"] = None
            elif kind in RESOLVED_CHANGES:
                study_ids[f"{'series' if kind[0] == 'Series' else 'instances'}/{resource_id}/study"] = None
        if held:
            position = walked
            break
        position = _position(answer, position, url)
        if answer.get("Done", True) or not answer.get("Changes"):
            break
    uids: dict[str, None] = {}
    for path in study_ids:
        study = get_json(client, f"{rest_base}/{path}")
        tags = study.get("MainDicomTags") if isinstance(study, dict) else None
        uid = tags.get("StudyInstanceUID") if isinstance(tags, dict) else None
        if isinstance(uid, str) and uid.strip():
            uids[uid.strip()] = None
    return Changes(tuple(uids), position, newest, held)

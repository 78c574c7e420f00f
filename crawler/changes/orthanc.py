"""Orthanc's ``/changes`` log as a change source (see the package's docstring)."""

from __future__ import annotations

import re
from dataclasses import dataclass
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
        study = get_json(client, f"{rest_base}/{path}")
        tags = study.get("MainDicomTags") if isinstance(study, dict) else None
        uid = tags.get("StudyInstanceUID") if isinstance(tags, dict) else None
        if isinstance(uid, str) and uid.strip():
            uids[uid.strip()] = None
    return Changes(tuple(uids), position)

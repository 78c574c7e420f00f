"""Opt-in sources of changed studies beyond the StudyDate window: Orthanc's ``/changes`` feed.

StudyDate says when a study was made, not when it arrived; a study that reaches the PACS late
with an old StudyDate falls outside an incremental window. Orthanc logs every new or modified
study in its ``/changes`` feed (``NewStudy``, and ``StableStudy`` once a study has stopped
changing), so an incremental run can ask for exactly the studies that changed since the last
run's position in that feed.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import FatalQidoError, RetriableQidoError
from .qido import QidoClient, redact

STUDY_CHANGES = frozenset({"NewStudy", "StableStudy"})


@dataclass(frozen=True)
class Changes:
    study_uids: tuple[str, ...]
    last: int


def orthanc_base(dicomweb_url: str) -> str:
    """Orthanc's REST base from its DICOMweb base (``.../dicom-web`` -> ``...``)."""
    return dicomweb_url.rstrip("/").removesuffix("/dicom-web")


def _get(client: QidoClient, url: str) -> dict:
    client.counts.add("changes")
    try:
        response = client.session.get(url, timeout=client.timeout, headers={"Accept": "application/json"})
    except Exception as exc:  # noqa: BLE001 - requests raises many kinds; all mean "not reached"
        raise RetriableQidoError(f"cannot read {redact(url)}: {type(exc).__name__}", url=redact(url)) from None
    if response.status_code == 404:
        return {}
    if response.status_code >= 400:
        raise FatalQidoError(f"HTTP {response.status_code} from {redact(url)}", url=redact(url), status=response.status_code)
    try:
        return response.json()
    except ValueError:
        raise FatalQidoError(f"malformed JSON from {redact(url)}", url=redact(url)) from None


def orthanc_changes(client: QidoClient, rest_base: str, since: int | None, page: int = 1000) -> Changes:
    """Study UIDs created or changed after feed position ``since``; ``since=None`` only reads the
    current position (a first run lists everything anyway)."""
    if since is None:
        return Changes((), int(_get(client, f"{rest_base}/changes?last").get("Last", 0)))
    study_ids: dict[str, None] = {}
    position = since
    while True:
        answer = _get(client, f"{rest_base}/changes?since={position}&limit={page}")
        for change in answer.get("Changes", []):
            if change.get("ResourceType") == "Study" and change.get("ChangeType") in STUDY_CHANGES:
                study_ids[change["ID"]] = None
        position = int(answer.get("Last", position))
        if answer.get("Done", True) or not answer.get("Changes"):
            break
    uids = []
    for study_id in study_ids:
        tags = _get(client, f"{rest_base}/studies/{study_id}").get("MainDicomTags", {})
        if tags.get("StudyInstanceUID"):
            uids.append(tags["StudyInstanceUID"])
    return Changes(tuple(uids), position)



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
- ``dcm4chee``: dcm4chee-arc's study search on the receive time (``StudyReceiveDateTime=<cursor
  less an overlap>-``, a query parameter of its own, matched against the time the study's first
  instance was stored); the cursor is the newest receive time seen. It sees new studies, not
  changes to studies received before, nor deletions (see ``dcm4chee``).
"""

from __future__ import annotations

from datetime import datetime

from ..kinds import ChangeSource
from ..qido import QidoClient
from .azure import azure_changes
from .dcm4chee import dcm4chee_changes
from .model import Change, ChangesRead
from .orthanc import Changes, orthanc_base, orthanc_changes

__all__ = ["Change", "Changes", "ChangesRead", "azure_changes", "dcm4chee_changes", "orthanc_base", "orthanc_changes", "read_changes"]


def read_changes(kind: ChangeSource, client: QidoClient, base: str, cursor: str | None, stable_before: datetime | None = None) -> ChangesRead:
    """The changes ``kind`` names since ``cursor`` (None: a first read, which only finds where the
    source stands now). ``base`` is Orthanc's REST base, or the Azure service's DICOMweb base.
    ``stable_before``: only changes made before that moment (the rest, and the cursor, wait)."""
    if kind == ChangeSource.ORTHANC:
        since = int(cursor) if cursor is not None and cursor.isdigit() else None
        found = orthanc_changes(client, base, since) if stable_before is None else orthanc_changes(client, base, since, stable_before=stable_before)
        if since is not None and found.last < since:
            return ChangesRead((), str(found.last), reset=True)
        return ChangesRead(tuple(Change(uid) for uid in found.study_uids), str(found.last), newest=found.newest, held=found.held)
    if kind == ChangeSource.AZURE:
        return azure_changes(client, base, cursor) if stable_before is None else azure_changes(client, base, cursor, end=stable_before)
    if kind == ChangeSource.DCM4CHEE:
        return dcm4chee_changes(client, base, cursor)
    raise ValueError(f"no change source {kind!r}")

"""The walk over the PACS: list studies, then fetch each study's instances and check the counts."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from . import dicomjson as dj
from .dicomjson import Dataset, Tag
from .mapping import StudyInput
from .planner import Window
from .qido import QidoClient

STUDY_FIELDS = (
    Tag.StudyDate, Tag.StudyTime, Tag.AccessionNumber, Tag.IssuerOfAccessionNumberSequence,
    Tag.ModalitiesInStudy, Tag.ReferringPhysicianName, Tag.ReferringPhysicianIdentificationSequence,
    Tag.TimezoneOffsetFromUTC, Tag.StudyDescription, Tag.ProcedureCodeSequence,
    Tag.InstitutionalDepartmentName, Tag.InstitutionalDepartmentTypeCodeSequence, Tag.PatientName,
    Tag.PatientID, Tag.IssuerOfPatientID, Tag.IssuerOfPatientIDQualifiersSequence, Tag.StudyID,
    Tag.NumberOfStudyRelatedSeries, Tag.NumberOfStudyRelatedInstances,
    Tag.ReasonForTheRequestedProcedure, Tag.ReasonForRequestedProcedureCodeSequence,
)
INSTANCE_FIELDS = (
    Tag.ImageType, Tag.SOPClassUID, Tag.SOPInstanceUID, Tag.SeriesDate, Tag.SeriesTime, Tag.Modality,
    Tag.Manufacturer, Tag.InstitutionName, Tag.SeriesDescription, Tag.PerformingPhysicianName,
    Tag.PerformingPhysicianIdentificationSequence, Tag.OperatorsName, Tag.OperatorIdentificationSequence,
    Tag.ManufacturerModelName, Tag.AnatomicRegionSequence, Tag.BodyPartExamined, Tag.SeriesInstanceUID,
    Tag.SeriesNumber, Tag.InstanceNumber, Tag.Laterality, Tag.SpecimenDescriptionSequence, Tag.DocumentTitle,
)
VOLATILE = frozenset({Tag.RetrieveURL, Tag.InstanceAvailability, Tag.RetrieveAETitle})


def includefields(tags: tuple[str, ...]) -> list[tuple[str, str]]:
    return [("includefield", tag) for tag in tags]


@dataclass(frozen=True)
class StudySummary:
    """One study as the listing shows it: its UID, reported counts and study-level attributes."""

    uid: str
    n_series: int | None
    n_instances: int | None
    attributes: Dataset


def summarise(item: Dataset) -> StudySummary:
    """Raises ValueError (naming the attribute) when the listing entry is unusable."""
    try:
        uid = dj.string(item, Tag.StudyInstanceUID)
    except ValueError as exc:
        raise ValueError(f"{dj.keyword(Tag.StudyInstanceUID)}: {exc}") from None
    if not uid:
        raise ValueError(f"{dj.keyword(Tag.StudyInstanceUID)}: missing")
    counts = []
    for tag in (Tag.NumberOfStudyRelatedSeries, Tag.NumberOfStudyRelatedInstances):
        try:
            counts.append(dj.integer(item, tag))
        except ValueError:
            counts.append(None)
    return StudySummary(uid, counts[0], counts[1], item)


def iter_listing(client: QidoClient, window: Window, page_size: int) -> Iterator[dict[str, Any]]:
    """Raw study-level results of one window, page by page."""
    for page in client.iter_pages("studies", "studies", [*window.params(), *includefields(STUDY_FIELDS)], page_size):
        yield from page.items


@dataclass(frozen=True)
class Fetched:
    data: StudyInput
    enumerated: int
    consistent: bool


def fetch_instances(client: QidoClient, study_uid: str, page_size: int) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    path = f"studies/{study_uid}/instances"
    for page in client.iter_pages("instances", path, includefields(INSTANCE_FIELDS), page_size):
        items.extend(page.items)
    return items


def fetch_study(client: QidoClient, summary: StudySummary, page_size: int) -> Fetched:
    """A study's instances, asked again once when their number differs from the reported count."""
    for attempt in range(2):
        instances = fetch_instances(client, summary.uid, page_size)
        unique = len({dj.string(i, Tag.SOPInstanceUID) for i in instances})
        if summary.n_instances is None or unique == summary.n_instances:
            return Fetched(StudyInput(summary.attributes, instances), unique, True)
    return Fetched(StudyInput(summary.attributes, instances), unique, False)

"""The walk over the PACS: list studies, then fetch each study's instances and check the counts."""

from __future__ import annotations

import enum
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from . import dicomjson as dj
from .dicomjson import Dataset, Tag
from .mapping import StudyInput
from .leanjson import Selection
from .mapping.tags import INSTANCE_TAGS, READ_TAGS
from .qido import Page, QidoClient

STUDY_FIELDS = (
    Tag.StudyDate, Tag.StudyTime, Tag.AccessionNumber, Tag.IssuerOfAccessionNumberSequence,
    Tag.ModalitiesInStudy, Tag.ReferringPhysicianName, Tag.ReferringPhysicianIdentificationSequence,
    Tag.TimezoneOffsetFromUTC, Tag.StudyDescription, Tag.ProcedureCodeSequence,
    Tag.InstitutionalDepartmentName, Tag.InstitutionalDepartmentTypeCodeSequence, Tag.PatientName,
    Tag.PatientID, Tag.PatientBirthDate, Tag.PatientSex, Tag.IssuerOfPatientID, Tag.IssuerOfPatientIDQualifiersSequence, Tag.StudyID,
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
SERIES_FIELDS = (
    Tag.SeriesDate, Tag.SeriesTime, Tag.Modality, Tag.Manufacturer, Tag.InstitutionName, Tag.SeriesDescription,
    Tag.PerformingPhysicianName, Tag.PerformingPhysicianIdentificationSequence, Tag.OperatorsName,
    Tag.OperatorIdentificationSequence, Tag.ManufacturerModelName, Tag.AnatomicRegionSequence, Tag.BodyPartExamined,
    Tag.SeriesInstanceUID, Tag.SeriesNumber, Tag.Laterality, Tag.NumberOfSeriesRelatedInstances,
)
VOLATILE = frozenset({Tag.RetrieveURL, Tag.InstanceAvailability, Tag.RetrieveAETitle})
METADATA = Selection(READ_TAGS, Tag.SeriesInstanceUID, INSTANCE_TAGS)
"""What the crawler keeps of WADO-RS metadata (see leanjson and mapping.tags)."""


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


STUDY_SEQUENCES = (
    Tag.IssuerOfAccessionNumberSequence, Tag.ReferringPhysicianIdentificationSequence, Tag.ProcedureCodeSequence,
    Tag.InstitutionalDepartmentTypeCodeSequence, Tag.IssuerOfPatientIDQualifiersSequence,
    Tag.ReasonForRequestedProcedureCodeSequence,
)
INSTANCE_SEQUENCES = (
    Tag.PerformingPhysicianIdentificationSequence, Tag.OperatorIdentificationSequence, Tag.AnatomicRegionSequence,
    Tag.SpecimenDescriptionSequence,
)


class MetadataMode(str, enum.Enum):
    """When to read WADO-RS metadata: ``auto`` when QIDO leaves out the sequences the mapping needs."""

    AUTO = "auto"
    NEVER = "never"
    ALWAYS = "always"


@dataclass
class Learned:
    """What the crawl learns about the server during a run (shared by the worker threads).

    The first study decides whether QIDO leaves sequences out; ``deciding`` makes the other
    workers wait for that answer instead of all asking QIDO first.
    """

    qido_lacks_sequences: bool | None = None
    deciding: threading.Lock = field(default_factory=threading.Lock, repr=False)


@dataclass(frozen=True)
class CrawlOptions:
    instance_page_size: int = 1000
    metadata: MetadataMode = MetadataMode.AUTO
    metadata_max_instances: int = 1000


@dataclass(frozen=True)
class Fetched:
    data: StudyInput
    enumerated: int
    consistent: bool
    path: str


def lacks_sequences(study: Dataset, instances: list[dict[str, Any]]) -> bool:
    """True when the answers leave out (not: leave empty) sequences that were asked for."""
    first_instance = instances[0] if instances else {}
    return any(tag not in study and tag not in first_instance for tag in STUDY_SEQUENCES) or (
        bool(instances) and any(tag not in first_instance for tag in INSTANCE_SEQUENCES)
    )


def _gather(pages: Iterator[Page]) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    for page in pages:
        items.extend(page.items)
    return items


def fetch_instances(client: QidoClient, study_uid: str, page_size: int) -> list[dict[str, Any]]:
    """Instance-level results of a study, with series attributes where the server gives them.

    When instance results carry no series attributes (no Modality), one series-level query fills
    them in; when they do not even carry the Series Instance UID, the series are listed and their
    instances asked for series by series.
    """
    path = f"studies/{study_uid}/instances"
    items = _gather(client.iter_pages("instances", path, includefields(INSTANCE_FIELDS), page_size))
    if not items or all(Tag.Modality in item for item in items):
        return items
    series = _gather(client.iter_pages("series", f"studies/{study_uid}/series", includefields(SERIES_FIELDS), page_size))
    by_uid = {dj.string(s, Tag.SeriesInstanceUID): s for s in series}
    if all(Tag.SeriesInstanceUID in item for item in items):
        return [{**by_uid.get(dj.string(item, Tag.SeriesInstanceUID), {}), **item} for item in items]
    merged = []
    for series_uid, series_item in by_uid.items():
        series_path = f"studies/{study_uid}/series/{series_uid}/instances"
        for item in _gather(client.iter_pages("instances", series_path, includefields(INSTANCE_FIELDS), page_size)):
            merged.append({**series_item, **item})
    return merged


def fetch_study_metadata(client: QidoClient, study_uid: str) -> list[dict[str, Any]]:
    """The study's instances with the attributes the mapping reads (of the whole metadata)."""
    return client.get("metadata", f"studies/{study_uid}/metadata", keep=METADATA).items


def fetch_series_metadata(client: QidoClient, study_uid: str, instances: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One instance's metadata per series: the series-level sequences at one request per series."""
    chosen: dict[str, str] = {}
    for item in instances:
        series_uid = dj.string(item, Tag.SeriesInstanceUID)
        instance_uid = dj.string(item, Tag.SOPInstanceUID)
        if series_uid and instance_uid:
            chosen.setdefault(series_uid, instance_uid)
    out = []
    for series_uid, instance_uid in chosen.items():
        out.extend(client.get("metadata", f"studies/{study_uid}/series/{series_uid}/instances/{instance_uid}/metadata", keep=METADATA).items[:1])
    return out


def _count(instances: list[dict[str, Any]]) -> int:
    """Distinct SOP Instance UIDs (read by ``dj.string`` unless the first value is a plain string)."""
    uids = set()
    for item in instances:
        element = item.get(Tag.SOPInstanceUID)
        value = element.get("Value") if type(element) is dict else None
        first = value[0] if type(value) is list and value else None
        if type(first) is str and first and first == first.strip():
            uids.add(first)
        elif uid := dj.string(item, Tag.SOPInstanceUID):
            uids.add(uid)
    return len(uids)


def _fetch_once(client: QidoClient, summary: StudySummary, options: CrawlOptions, learned: Learned) -> tuple[StudyInput, int, str]:
    if options.metadata is MetadataMode.AUTO and learned.qido_lacks_sequences is None:
        with learned.deciding:
            if learned.qido_lacks_sequences is None:
                return _fetch_path(client, summary, options, learned)
    return _fetch_path(client, summary, options, learned)


def _fetch_path(client: QidoClient, summary: StudySummary, options: CrawlOptions, learned: Learned) -> tuple[StudyInput, int, str]:
    small = summary.n_instances is not None and summary.n_instances <= options.metadata_max_instances
    wants_metadata = options.metadata is MetadataMode.ALWAYS or (
        options.metadata is MetadataMode.AUTO and learned.qido_lacks_sequences
    )
    if wants_metadata and small:
        metadata = fetch_study_metadata(client, summary.uid)
        return StudyInput(summary.attributes, metadata), _count(metadata), "metadata"
    instances = fetch_instances(client, summary.uid, options.instance_page_size)
    if options.metadata is MetadataMode.NEVER:
        return StudyInput(summary.attributes, instances), _count(instances), "qido"
    if options.metadata is MetadataMode.AUTO and not wants_metadata:
        lacking = lacks_sequences(summary.attributes, instances)
        if learned.qido_lacks_sequences is None or lacking:
            learned.qido_lacks_sequences = lacking
        if not lacking:
            return StudyInput(summary.attributes, instances), _count(instances), "qido"
    if small:
        metadata = fetch_study_metadata(client, summary.uid)
        return StudyInput(summary.attributes, metadata), _count(metadata), "qido+metadata"
    series_metadata = fetch_series_metadata(client, summary.uid, instances)
    return StudyInput(summary.attributes, instances, series_metadata), _count(instances), "qido+series-metadata"


def fetch_study(client: QidoClient, summary: StudySummary, options: CrawlOptions, learned: Learned) -> Fetched:
    """A study's instances (and metadata where needed), asked again once when their number differs
    from the count the listing reported."""
    for _ in range(2):
        data, enumerated, path = _fetch_once(client, summary, options, learned)
        if summary.n_instances is None or enumerated == summary.n_instances:
            return Fetched(data, enumerated, True, path)
    return Fetched(data, enumerated, False, path)

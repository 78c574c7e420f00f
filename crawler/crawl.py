"""The walk over the PACS: list studies, then fetch each study's instances and check the counts.

Everything read from a server's answers before the mapping's tolerant readers is read here
through ``_read_uid``/``_path`` (a wrongly typed value or a UID that is not digits and dots
fails its study with a MappingError naming the study and the attribute), and every UID that goes
into a request path passes ``uids.path_uid`` first.

Servers that are not Orthanc (see README, *Servers that are not Orthanc*): a server without the
study-level instance search (404/400 there; AWS HealthImaging documents series-level instance
searches only) is asked series by series; a server without WADO-RS metadata (404/406/501) is
mapped from what QIDO-RS gave. What is learned holds for the rest of the run (``Learned``) and,
through the state, for the next runs of the source (``CrawlOptions``).
"""

from __future__ import annotations

import enum
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from . import dicomjson as dj
from .dicomjson import Dataset, Tag
from .errors import FatalQidoError, MappingError
from .mapping import StudyInput
from .leanjson import Selection
from .mapping.tags import INSTANCE_TAGS, READ_TAGS
from .qido import Page, QidoClient
from .uids import path_uid, shown

if TYPE_CHECKING:
    from .tables.tags import IncludeTag

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


def tag_fields(tags: tuple[IncludeTag, ...], *levels: str) -> tuple[str, ...]:
    """The ``--include-tag`` tags at ``levels``, as includefield values (instance results carry
    the series' attributes on most servers: the instance search asks for series tags too)."""
    return tuple(t.tag for t in tags if t.level in levels)


def metadata_selection(tags: tuple[IncludeTag, ...]) -> Selection:
    """``METADATA`` plus the ``--include-tag`` series tags (of each series' first instance) and
    instance tags (of every instance)."""
    if not tags:
        return METADATA
    return Selection(READ_TAGS | set(tag_fields(tags, "series", "instance")), Tag.SeriesInstanceUID,
                     INSTANCE_TAGS | set(tag_fields(tags, "instance")))


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
    uid = uid.rstrip("\x00").strip() if uid else uid   # UI values may be padded with NUL to an even length
    if not uid:
        raise ValueError(f"{dj.keyword(Tag.StudyInstanceUID)}: missing")
    if "\x00" in uid:
        raise ValueError(f"{dj.keyword(Tag.StudyInstanceUID)}: contains a NUL character")
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


SERIES_LEVEL_INSTANCES = "series_level_instances"
"""Fallback: the server answers instance searches only per series."""
METADATA_UNAVAILABLE = "metadata_unavailable"
"""Fallback: the server has no WADO-RS metadata; studies are mapped from QIDO-RS alone."""
FALLBACKS = (SERIES_LEVEL_INSTANCES, METADATA_UNAVAILABLE)


@dataclass(frozen=True)
class CrawlOptions:
    instance_page_size: int = 1000
    metadata: MetadataMode = MetadataMode.AUTO
    metadata_max_instances: int = 1000
    fallbacks: tuple[tuple[str, str], ...] = ()
    """Fallbacks earlier runs learned for this source: (name, reason) pairs (see FALLBACKS)."""
    tags: tuple[IncludeTag, ...] = ()
    """``--include-tag``: asked for with includefield at their level and kept from WADO-RS
    metadata (``SyncConfig`` sets them from ``include_tags``)."""


@dataclass
class Learned:
    """What the crawl learns about the server during a run (shared by the worker threads).

    The first study decides whether QIDO leaves sequences out; ``deciding`` makes the other
    workers wait for that answer instead of all asking QIDO first. ``fallbacks`` maps a
    fallback's name to its reason, once a study has shown the server needs it.
    """

    qido_lacks_sequences: bool | None = None
    deciding: threading.Lock = field(default_factory=threading.Lock, repr=False)
    fallbacks: dict[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, options: CrawlOptions) -> Learned:
        """What a run starts knowing: the fallbacks its source needed before."""
        return cls(fallbacks=dict(options.fallbacks))


@dataclass(frozen=True)
class Fetched:
    data: StudyInput
    enumerated: int
    consistent: bool
    path: str
    fallbacks: tuple[tuple[str, str], ...] = ()
    """The fallbacks this study was fetched with, (name, reason)."""


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


def _read_uid(item: Dataset, tag: str, study_uid: str) -> str | None:
    """A UID of a server's answer as text (None when absent); MappingError when it is no text."""
    try:
        return dj.string(item, tag)
    except ValueError as exc:
        raise MappingError(study_uid, dj.keyword(tag), str(exc)) from None


def _path(value: str, tag: str, study_uid: str) -> str:
    """``value`` once it is checked to be safe in a request path (see uids.path_uid)."""
    try:
        return path_uid(value)
    except ValueError as exc:
        raise MappingError(study_uid, dj.keyword(tag), str(exc)) from None


def study_path_uid(summary: StudySummary) -> str:
    """The study's UID, checked before any path is built with it."""
    try:
        return path_uid(summary.uid)
    except ValueError as exc:
        raise MappingError(shown(summary.uid), dj.keyword(Tag.StudyInstanceUID), str(exc)) from None


def fetch_instances(
    client: QidoClient, study_uid: str, page_size: int, learned: Learned | None = None, used: dict[str, str] | None = None,
    tags: tuple[IncludeTag, ...] = (),
) -> list[dict[str, Any]]:
    """Instance-level results of a study, with series attributes where the server gives them.

    When instance results carry no series attributes (no Modality), one series-level query fills
    them in; when they do not even carry the Series Instance UID, the series are listed and their
    instances asked for series by series. With ``learned``, a server that refuses the study-level
    instance search (404/400) while it lists the study's series is asked series by series from
    then on (the fallback is noted in ``used``). ``tags`` (``--include-tag``) are asked for too.
    """
    study_uid = path_uid(study_uid)
    if learned is not None and SERIES_LEVEL_INSTANCES in learned.fallbacks:
        if used is not None:
            used[SERIES_LEVEL_INSTANCES] = learned.fallbacks[SERIES_LEVEL_INSTANCES]
        return _instances_by_series(client, study_uid, page_size, tags)
    path = f"studies/{study_uid}/instances"
    limit = getattr(client, "max_limit", None)
    try:
        items = _gather(client.iter_pages("instances", path, includefields(INSTANCE_FIELDS + tag_fields(tags, "series", "instance")), page_size))
    except FatalQidoError as exc:
        if learned is None or exc.status not in (400, 404):
            raise
        if exc.status == 400 and hasattr(client, "max_limit"):
            client.max_limit = limit   # the halved limits were not the cause: the search itself is refused
        merged = _instances_by_series(client, study_uid, page_size, tags)
        if not merged:
            raise   # no series either: the study is gone (or empty), and the first answer says so
        reason = f"HTTP {exc.status} on studies/{{uid}}/instances"
        learned.fallbacks.setdefault(SERIES_LEVEL_INSTANCES, reason)
        if used is not None:
            used[SERIES_LEVEL_INSTANCES] = reason
        return merged
    if not items or all(Tag.Modality in item for item in items):
        return items
    by_uid = _series_by_uid(client, study_uid, page_size, tags)
    if all(Tag.SeriesInstanceUID in item for item in items):
        return [{**by_uid.get(_read_uid(item, Tag.SeriesInstanceUID, study_uid) or "", {}), **item} for item in items]
    return _instances_of_series(client, study_uid, by_uid, page_size, tags)


def _series_by_uid(client: QidoClient, study_uid: str, page_size: int, tags: tuple[IncludeTag, ...] = ()) -> dict[str, Dataset]:
    """The study's series-level results by Series Instance UID (the first result of each)."""
    by_uid: dict[str, Dataset] = {}
    fields = includefields(SERIES_FIELDS + tag_fields(tags, "series"))
    for item in _gather(client.iter_pages("series", f"studies/{study_uid}/series", fields, page_size)):
        uid = _read_uid(item, Tag.SeriesInstanceUID, study_uid)
        if uid:
            by_uid.setdefault(uid, item)
    return by_uid


def _instances_by_series(client: QidoClient, study_uid: str, page_size: int, tags: tuple[IncludeTag, ...] = ()) -> list[dict[str, Any]]:
    """The study's series, then each series' instances (with the series' attributes merged in)."""
    return _instances_of_series(client, study_uid, _series_by_uid(client, study_uid, page_size, tags), page_size, tags)


def _instances_of_series(client: QidoClient, study_uid: str, by_uid: dict[str, Dataset], page_size: int,
                         tags: tuple[IncludeTag, ...] = ()) -> list[dict[str, Any]]:
    merged: list[dict[str, Any]] = []
    fields = includefields(INSTANCE_FIELDS + tag_fields(tags, "instance"))
    for series_uid, series_item in by_uid.items():
        series_path = f"studies/{study_uid}/series/{_path(series_uid, Tag.SeriesInstanceUID, study_uid)}/instances"
        for item in _gather(client.iter_pages("instances", series_path, fields, page_size)):
            merged.append({**series_item, **item})
    return merged


def fetch_study_metadata(client: QidoClient, study_uid: str, keep: Selection = METADATA) -> list[dict[str, Any]]:
    """The study's instances with the attributes the mapping reads (of the whole metadata)."""
    return client.get("metadata", f"studies/{path_uid(study_uid)}/metadata", keep=keep).items


def fetch_series_metadata(client: QidoClient, study_uid: str, instances: list[dict[str, Any]], keep: Selection = METADATA) -> list[dict[str, Any]]:
    """One instance's metadata per series: the series-level sequences at one request per series."""
    study_uid = path_uid(study_uid)
    chosen: dict[str, str] = {}
    for item in instances:
        series_uid = _read_uid(item, Tag.SeriesInstanceUID, study_uid)
        instance_uid = _read_uid(item, Tag.SOPInstanceUID, study_uid)
        if series_uid and instance_uid:
            chosen.setdefault(series_uid, instance_uid)
    out = []
    for series_uid, instance_uid in chosen.items():
        series_part = _path(series_uid, Tag.SeriesInstanceUID, study_uid)
        instance_part = _path(instance_uid, Tag.SOPInstanceUID, study_uid)
        out.extend(client.get("metadata", f"studies/{study_uid}/series/{series_part}/instances/{instance_part}/metadata", keep=keep).items[:1])
    return out


def _count(instances: list[dict[str, Any]], study_uid: str) -> int:
    """Distinct SOP Instance UIDs (read by ``dj.string`` unless the first value is a plain string)."""
    uids = set()
    for item in instances:
        element = item.get(Tag.SOPInstanceUID)
        value = element.get("Value") if type(element) is dict else None
        first = value[0] if type(value) is list and value else None
        if type(first) is str and first and first == first.strip():
            uids.add(first)
        elif uid := _read_uid(item, Tag.SOPInstanceUID, study_uid):
            uids.add(uid)
    return len(uids)


METADATA_MISSING = frozenset({404, 406, 501})
"""Answers to a WADO-RS metadata request that mean the server has none (with --metadata auto)."""

_Path = tuple[StudyInput, int, str]


def _fetch_once(client: QidoClient, summary: StudySummary, options: CrawlOptions, learned: Learned, used: dict[str, str]) -> _Path:
    if options.metadata is MetadataMode.AUTO and learned.qido_lacks_sequences is None and METADATA_UNAVAILABLE not in learned.fallbacks:
        with learned.deciding:
            if learned.qido_lacks_sequences is None:
                return _fetch_path(client, summary, options, learned, used)
    return _fetch_path(client, summary, options, learned, used)


def _fetch_path(client: QidoClient, summary: StudySummary, options: CrawlOptions, learned: Learned, used: dict[str, str]) -> _Path:
    uid = summary.uid
    mode = options.metadata
    if mode is MetadataMode.AUTO and METADATA_UNAVAILABLE in learned.fallbacks:
        used[METADATA_UNAVAILABLE] = learned.fallbacks[METADATA_UNAVAILABLE]
        mode = MetadataMode.NEVER
    small = summary.n_instances is not None and summary.n_instances <= options.metadata_max_instances
    wants_metadata = mode is MetadataMode.ALWAYS or (mode is MetadataMode.AUTO and learned.qido_lacks_sequences)
    keep = metadata_selection(options.tags)
    if wants_metadata and small:
        try:
            metadata = fetch_study_metadata(client, uid, keep)
        except FatalQidoError as exc:
            return _without_metadata(client, summary, options, learned, used, exc, None)
        return StudyInput(summary.attributes, metadata), _count(metadata, uid), "metadata"
    instances = fetch_instances(client, uid, options.instance_page_size, learned, used, options.tags)
    if mode is MetadataMode.NEVER:
        return StudyInput(summary.attributes, instances), _count(instances, uid), "qido"
    if mode is MetadataMode.AUTO and not wants_metadata:
        lacking = lacks_sequences(summary.attributes, instances)
        if learned.qido_lacks_sequences is None or lacking:
            learned.qido_lacks_sequences = lacking
        if not lacking:
            return StudyInput(summary.attributes, instances), _count(instances, uid), "qido"
    if summary.n_instances is None:
        small = _count(instances, uid) <= options.metadata_max_instances   # no count reported: the number just listed
    try:
        if small:
            metadata = fetch_study_metadata(client, uid, keep)
            return StudyInput(summary.attributes, metadata), _count(metadata, uid), "qido+metadata"
        series_metadata = fetch_series_metadata(client, uid, instances, keep)
    except FatalQidoError as exc:
        return _without_metadata(client, summary, options, learned, used, exc, instances)
    return StudyInput(summary.attributes, instances, series_metadata), _count(instances, uid), "qido+series-metadata"


def _without_metadata(
    client: QidoClient, summary: StudySummary, options: CrawlOptions, learned: Learned, used: dict[str, str],
    exc: FatalQidoError, instances: list[dict[str, Any]] | None,
) -> _Path:
    """After a metadata request was refused: with --metadata auto and an answer that means the
    server has no WADO-RS metadata, the study from QIDO-RS alone (when QIDO-RS lists it: a study
    deleted meanwhile keeps the original error); else the error stands."""
    if options.metadata is not MetadataMode.AUTO or exc.status not in METADATA_MISSING:
        raise exc
    if instances is None:
        instances = fetch_instances(client, summary.uid, options.instance_page_size, learned, used, options.tags)
    if not instances:
        raise exc
    reason = f"HTTP {exc.status} on WADO-RS metadata"
    learned.fallbacks.setdefault(METADATA_UNAVAILABLE, reason)
    used[METADATA_UNAVAILABLE] = reason
    return StudyInput(summary.attributes, instances), _count(instances, summary.uid), "qido"


def fetch_study(client: QidoClient, summary: StudySummary, options: CrawlOptions, learned: Learned) -> Fetched:
    """A study's instances (and metadata where needed), asked again once when their number differs
    from the count the listing reported. Raises MappingError for a study whose UIDs are unusable
    (wrongly typed, or not safe in a request path) and QidoError for requests that failed."""
    study_path_uid(summary)
    used: dict[str, str] = {}
    for _ in range(2):
        data, enumerated, path = _fetch_once(client, summary, options, learned, used)
        if summary.n_instances is None or enumerated == summary.n_instances:
            return Fetched(data, enumerated, True, path, tuple(sorted(used.items())))
    return Fetched(data, enumerated, False, path, tuple(sorted(used.items())))

"""``--include-tag``: DICOM attributes chosen by the user, one typed column each in the tables.

Pure: no I/O, no pyarrow (``arrow_type`` names the Arrow type as text; the schema module makes
it). A tag is named by keyword (``SliceThickness``) or by number (``00180050``, ``(0018,0050)``,
``0018,0050``), looked up in pydicom's DICOM dictionary, with an optional ``:study``,
``:series`` or ``:instance`` suffix for its level. Without one the level is inferred:
``STUDY_LEVEL`` and ``SERIES_LEVEL`` below (the Patient, General Study and Patient Study modules
and what QIDO-RS answers at the study level; General Series, Frame of Reference, General
Equipment and QIDO-RS's series level), every other tag at the instance level.

Types follow the VR: DA -> date32, DT -> timestamp (UTC), IS/SS/US/SL/UL/SV/UV -> int64,
DS/FL/FD -> float64, every other text VR -> string (TM kept as DICOM text: a TM may carry any
precision from hours to microseconds; PN as DICOM writes it, ``Family^Given^Middle^Prefix^Suffix``,
its alphabetic group); a VM other than 1 makes a list of that type.
Sequences and binary VRs (OB, OW, ...) cannot be a column.

Patient-identifying tags (``is_phi``) are refused unless the caller allows them
(``--include-phi``): every tag of group 0010 (the patient), every person name (VR PN), and the
attributes of PS3.15 Table E.1-1 (Basic Application Level Confidentiality Profile) that name or
identify a person, an institution or a device (``IDENTIFYING``).
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone, tzinfo
from typing import Any

from .. import dicomjson as dj

LEVELS = ("study", "series", "instance")
TABLE_OF_LEVEL = {"study": "studies", "series": "series", "instance": "instances"}

STUDY_LEVEL = frozenset({
    # General Study (PS3.3 C.7.2.1)
    "StudyInstanceUID", "StudyDate", "StudyTime", "ReferringPhysicianName", "ReferringPhysicianAddress",
    "ReferringPhysicianTelephoneNumbers", "ConsultingPhysicianName", "StudyID", "AccessionNumber",
    "StudyDescription", "PhysiciansOfRecord", "NameOfPhysiciansReadingStudy", "RequestingService",
    "RequestingPhysician", "ReasonForTheRequestedProcedure", "RequestedProcedureDescription", "RequestedProcedureID",
    # Patient Study (C.7.2.2), outside group 0010
    "AdmittingDiagnosesDescription", "Occupation", "AdditionalPatientHistory", "AdmissionID", "ServiceEpisodeID",
    "PregnancyStatus", "MedicalAlerts", "SmokingStatus", "LastMenstrualDate",
    # QIDO-RS's study level (PS3.18 Table 10.6.1-5) and what the crawler lists there
    "ModalitiesInStudy", "SOPClassesInStudy", "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances",
    "TimezoneOffsetFromUTC", "InstitutionalDepartmentName",
})
"""Keywords at the study level besides group 0010 (the Patient module: all at the study level)."""

SERIES_LEVEL = frozenset({
    # General Series (C.7.3.1)
    "Modality", "SeriesInstanceUID", "SeriesNumber", "Laterality", "SeriesDate", "SeriesTime", "PerformingPhysicianName",
    "ProtocolName", "SeriesDescription", "OperatorsName", "BodyPartExamined", "PatientPosition",
    "SmallestPixelValueInSeries", "LargestPixelValueInSeries", "PerformedProcedureStepID",
    "PerformedProcedureStepStartDate", "PerformedProcedureStepStartTime", "PerformedProcedureStepEndDate",
    "PerformedProcedureStepEndTime", "PerformedProcedureStepDescription", "AnatomicalOrientationType",
    "CommentsOnThePerformedProcedureStep", "SeriesType",
    # Frame of Reference (C.7.4.1)
    "FrameOfReferenceUID", "PositionReferenceIndicator",
    # General Equipment (C.7.5.1)
    "Manufacturer", "InstitutionName", "InstitutionAddress", "StationName", "ManufacturerModelName",
    "DeviceSerialNumber", "SoftwareVersions", "GantryID", "SpatialResolution", "DateOfLastCalibration",
    "TimeOfLastCalibration", "DeviceUID", "ManufacturerDeviceClassUID",
    # QIDO-RS's series level (Table 10.6.1-6)
    "NumberOfSeriesRelatedInstances",
})

IDENTIFYING = frozenset({
    "AccessionNumber", "StudyID", "InstitutionName", "InstitutionAddress", "InstitutionalDepartmentName",
    "ReferringPhysicianName", "ReferringPhysicianAddress", "ReferringPhysicianTelephoneNumbers",
    "ConsultingPhysicianName", "PerformingPhysicianName", "OperatorsName", "NameOfPhysiciansReadingStudy",
    "PhysiciansOfRecord", "RequestingPhysician", "RequestingService", "ScheduledPerformingPhysicianName",
    "OrderEnteredBy", "OrderEntererLocation", "OrderCallbackPhoneNumber", "PersonAddress", "PersonTelephoneNumbers",
    "StationName", "PerformedStationName", "ScheduledStationName", "PerformedLocation", "ScheduledProcedureStepLocation",
    "DeviceSerialNumber", "DeviceUID", "DetectorID", "GantryID", "PlateID", "CassetteID",
    "AdmissionID", "ServiceEpisodeID", "RequestedProcedureID", "PerformedProcedureStepID", "ScheduledProcedureStepID",
    "CurrentPatientLocation", "PatientInstitutionResidence", "PatientState", "Occupation",
    "ContentCreatorName", "VerifyingObserverName", "VerifyingOrganization", "PersonName",
})
"""PS3.15 Table E.1-1's attributes outside group 0010 that name or identify a person, an
institution or a device (person names are refused by their VR as well)."""

FIXED_COLUMNS: dict[str, frozenset[str]] = {
    "studies": frozenset({
        "source", "study_uid", "fhir_id", "patient_id", "patient_id_issuer", "accession", "accession_issuer", "study_date",
        "study_datetime", "study_tz_offset", "modalities", "description", "n_series", "n_instances", "referrer",
        "procedure_codes", "reason_codes", "endpoint", "change", "run_id", "synced_at",
    }),
    "series": frozenset({
        "source", "study_uid", "series_uid", "number", "modality", "description", "body_site", "laterality", "n_instances",
        "series_date", "started", "started_tz_offset", "performers", "change", "run_id", "synced_at",
    }),
    "instances": frozenset({
        "source", "study_uid", "series_uid", "sop_uid", "sop_class_uid", "sop_class_name", "number", "title", "change",
        "run_id", "synced_at",
    }),
}
"""The fixed columns of each table (the change-log columns of ``columns``, which checks it),
here so that a tag's column is checked without pyarrow."""

_INTEGER = frozenset({"IS", "SS", "US", "SL", "UL", "SV", "UV"})
_FLOAT = frozenset({"DS", "FL", "FD"})
_BINARY = frozenset({"OB", "OW", "OF", "OD", "OL", "OV", "UN"})
_HEX = re.compile(r"^\(?([0-9A-Fa-f]{4}),?([0-9A-Fa-f]{4})\)?$")
_DT = re.compile(r"^(\d{4})(\d{2})?(\d{2})?(\d{2})?(\d{2})?(\d{2})?(?:\.(\d{1,6}))?([+-]\d{4})?$")
_WORD = re.compile(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])")


class TagError(ValueError):
    """A tag that cannot be a column; the message names the tag and why (never a value)."""


@dataclass(frozen=True)
class IncludeTag:
    """One ``--include-tag``: the tag (8 upper-case hex digits, as DICOM JSON keys it), its
    keyword, VR (the first of the dictionary's when it allows several) and VM, its level and its
    column."""

    tag: str
    keyword: str
    vr: str
    multiple: bool
    level: str
    column: str
    phi: bool

    @property
    def table(self) -> str:
        return TABLE_OF_LEVEL[self.level]

    @property
    def arrow_type(self) -> str:
        """``date32``, ``timestamp``, ``int64``, ``float64`` or ``string``, in ``list<...>`` when multiple."""
        base = ("date32" if self.vr == "DA" else "timestamp" if self.vr == "DT" else "int64" if self.vr in _INTEGER
                else "float64" if self.vr in _FLOAT else "string")
        return f"list<{base}>" if self.multiple else base

    def __str__(self) -> str:
        return f"{self.keyword} ({self.tag[:4]},{self.tag[4:]})"


def column_name(keyword: str) -> str:
    """``SliceThickness`` -> ``slice_thickness``, ``SOPClassUID`` -> ``sop_class_uid``."""
    return _WORD.sub("_", keyword).lower()


def _lookup(name: str) -> int:
    from pydicom.datadict import dictionary_has_tag, tag_for_keyword

    match = _HEX.match(name)
    number = int(match[1] + match[2], 16) if match else tag_for_keyword(name)
    if number is None or not dictionary_has_tag(number):
        what = "private tags are not supported" if match and int(match[1], 16) % 2 else "not in the DICOM dictionary"
        raise TagError(f"unknown tag {name!r}: {what}")
    return number


def infer_level(keyword: str, group: int) -> str:
    if group == 0x0010 or keyword in STUDY_LEVEL:
        return "study"
    if keyword in SERIES_LEVEL:
        return "series"
    return "instance"


def is_phi(keyword: str, group: int, vr: str) -> bool:
    return group == 0x0010 or vr == "PN" or keyword in IDENTIFYING


def parse(text: str) -> IncludeTag:
    """One ``--include-tag`` value; TagError when it is unknown, a sequence or binary."""
    from pydicom.datadict import dictionary_keyword, dictionary_VM, dictionary_VR

    name, _, level = text.strip().partition(":")
    level = level.strip().lower()
    if level and level not in LEVELS:
        raise TagError(f"{text!r}: the level after ':' is study, series or instance, not {level!r}")
    number = _lookup(name.strip())
    keyword = dictionary_keyword(number)
    vr = dictionary_VR(number).split(" or ")[0]
    label = f"{keyword} ({number >> 16:04X},{number & 0xFFFF:04X})"
    if vr == "SQ":
        raise TagError(f"{label}: sequences cannot be a column")
    if vr in _BINARY:
        raise TagError(f"{label}: binary values (VR {vr}) cannot be a column")
    vrs = set(dictionary_VR(number).split(" or "))
    if len(vrs) > 1 and not vrs <= _INTEGER:
        vr = "LO"   # e.g. "US or SS or OW": no one type fits every form
    group = number >> 16
    return IncludeTag(
        tag=f"{number:08X}", keyword=keyword, vr=vr, multiple=dictionary_VM(number) != "1",
        level=level or infer_level(keyword, group), column=column_name(keyword), phi=is_phi(keyword, group, vr),
    )


def parse_all(texts: Iterable[str], include_phi: bool, fixed: Mapping[str, Collection[str]]) -> tuple[IncludeTag, ...]:
    """Every ``--include-tag`` (the same tag named twice counts once). TagError for the first
    that cannot be a column: unknown, a sequence, a PHI tag without ``include_phi``, or a column
    name among ``fixed`` (the fixed columns of each table, by table name)."""
    chosen: dict[str, IncludeTag] = {}
    for text in texts:
        tag = parse(text)
        if tag.phi and not include_phi:
            raise TagError(f"{tag} identifies a patient, a person or an institution: add --include-phi to write it")
        if tag.column in fixed.get(tag.table, ()):
            raise TagError(f"{tag}: its column {tag.column!r} is a fixed column of the {tag.table} table")
        earlier = chosen.get(tag.tag)
        if earlier is not None and earlier.level != tag.level:
            raise TagError(f"{tag} is asked for at two levels ({earlier.level} and {tag.level})")
        chosen[tag.tag] = tag
    return tuple(chosen.values())


def at_level(tags: Iterable[IncludeTag], level: str) -> tuple[IncludeTag, ...]:
    return tuple(t for t in tags if t.level == level)


def signature(tags: Iterable[IncludeTag]) -> tuple[str, ...]:
    """The included tags as the state's study hash takes them (``tag:level``, sorted): a study
    synced with other tags is crawled again when next listed, so its new columns get values."""
    return tuple(sorted(f"{t.tag}:{t.level}" for t in tags))


# --- values ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class TagValues:
    """One study's values of the included tags, by column: the study's, each series' (by Series
    Instance UID) and each instance's (by SOP Instance UID). A column absent from a dict is null."""

    study: dict[str, Any] = field(default_factory=dict)
    series: dict[str, dict[str, Any]] = field(default_factory=dict)
    instances: dict[str, dict[str, Any]] = field(default_factory=dict)
    signature: tuple[str, ...] = ()
    """``signature`` of the tags these are the values of (for the study hash)."""


def _date(text: str) -> date | None:
    try:
        year, month, day = dj.parse_date(text)
        return date(year, month, day) if month and day else None
    except ValueError:
        return None


def _datetime(text: str, offset: int | None, zone: tzinfo | None) -> datetime | None:
    """A DT as a UTC instant: its own offset, else the study's Timezone Offset From UTC, else
    ``zone`` (the PACS's), else this machine's (the mapping's rule for times). Reduced precision
    is filled with the start of the period; an unreadable value is null."""
    match = _DT.match(text.strip())
    if match is None:
        return None
    y, mo, d, h, mi, s, frac, own = match.groups()
    try:
        local = datetime(int(y), int(mo or 1), int(d or 1), int(h or 0), int(mi or 0), int(s or 0),
                         int((frac or "0").ljust(6, "0")))
        if own is not None:
            offset = dj.parse_offset(own)
    except ValueError:
        return None
    if offset is not None:
        local = local.replace(tzinfo=timezone(timedelta(minutes=offset)))
    elif zone is not None:
        local = local.replace(tzinfo=zone)
    else:
        local = local.astimezone()
    return local.astimezone(timezone.utc)


def _scalar(tag: IncludeTag, item: Any, offset: int | None, zone: tzinfo | None) -> Any:
    if tag.vr == "PN" and isinstance(item, Mapping):
        item = item.get("Alphabetic") or item.get("Ideographic") or item.get("Phonetic")
    if isinstance(item, (dict, list)):
        return None
    if tag.vr in _INTEGER or tag.vr in _FLOAT:
        if isinstance(item, bool):
            return None
        try:
            number = float(item) if tag.vr in _FLOAT else int(str(item).strip()) if isinstance(item, str) else int(item)
        except (TypeError, ValueError, OverflowError):
            return None
        return number if tag.vr in _FLOAT or -(2**63) <= number < 2**63 else None
    text = str(item).strip() if not isinstance(item, bool) else None
    if not text:
        return None
    if tag.vr == "DA":
        return _date(text)
    if tag.vr == "DT":
        return _datetime(text, offset, zone)
    return text


def value(tag: IncludeTag, ds: Mapping[str, Any], offset: int | None = None, zone: tzinfo | None = None) -> Any:
    """``tag``'s value in a DICOM JSON dataset as its column's Python value (a list when
    multiple; None when absent, empty or unreadable: a bad value is no reason to fail a study)."""
    try:
        raw = dj.values(ds, tag.tag)
    except ValueError:
        return None
    found = [v for v in (_scalar(tag, item, offset, zone) for item in raw) if v is not None]
    if tag.multiple:
        return found or None
    return found[0] if found else None


def _offset(study: Mapping[str, Any]) -> int | None:
    try:
        text = dj.string(study, dj.Tag.TimezoneOffsetFromUTC)
        return dj.parse_offset(text) if text else None
    except ValueError:
        return None


def extract(tags: Iterable[IncludeTag], study: Mapping[str, Any], items: Iterable[Mapping[str, Any]],
            zone: tzinfo | None = None) -> TagValues:
    """The values of ``tags`` for one study: the study's from its listing entry, each series' from
    the first of its instances' datasets that has one, each instance's from its dataset (QIDO-RS
    results or WADO-RS metadata, with the series' attributes merged in where the crawl did)."""
    tags = tuple(tags)
    offset = _offset(study)
    values = TagValues({t.column: value(t, study, offset, zone) for t in at_level(tags, "study")}, signature=signature(tags))
    series_tags, instance_tags = at_level(tags, "series"), at_level(tags, "instance")
    if not series_tags and not instance_tags:
        return values
    for item in items:
        try:
            series_uid = dj.string(item, dj.Tag.SeriesInstanceUID)
            sop_uid = dj.string(item, dj.Tag.SOPInstanceUID)
        except ValueError:
            continue
        if series_uid and series_tags:
            row = values.series.setdefault(series_uid, {})
            for t in series_tags:
                if row.get(t.column) is None:
                    row[t.column] = value(t, item, offset, zone)
        if sop_uid and instance_tags:
            values.instances.setdefault(sop_uid, {t.column: value(t, item, offset, zone) for t in instance_tags})
    return values

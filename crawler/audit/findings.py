"""The audit's pure core: per-study facts collected from plain DICOM JSON, and the findings.

No I/O here. The crawl (``crawler.audit.run``) feeds a :class:`Collector` with each listing entry
(:meth:`Collector.listed`) and, per study, the rows of its series and instances
(:meth:`Collector.crawled`); :func:`evaluate` then turns the collected facts (and, when given,
the rows of the state or of a FHIR server) into :class:`Finding` objects with stable codes.

Memory: the collector keeps one small :class:`StudyFacts` per study (no datasets), and, for
finding duplicated UIDs across studies, one 12-byte digest per distinct series and per distinct
instance UID with the number of the study it was first seen in: about 120 bytes per instance,
so some hundreds of thousands of instances cost some tens of MB. Much larger archives are
better audited window by window (``--since``/``--until``).
"""

from __future__ import annotations

import enum
import hashlib
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date
from typing import Any, NamedTuple

from .. import dicomjson as dj
from ..dicomjson import Dataset, Tag
from ..kinds import StudyStatus
from ..uids import valid_uid


class Severity(str, enum.Enum):
    ERROR = "error"
    WARNING = "warning"
    INFO = "info"


@dataclass(frozen=True)
class Check:
    code: str
    severity: Severity
    title: str
    description: str


_CHECKS = (
    Check("STUDY_COUNT_MISMATCH", Severity.ERROR, "Study counts differ",
          "The study's reported Number of Study Related Series (0020,1206) or Instances (0020,1208) differs from what its series and instances list."),
    Check("SERIES_COUNT_MISMATCH", Severity.ERROR, "Series counts differ",
          "A series' reported Number of Series Related Instances (0020,1209) differs from the instances listed for it."),
    Check("STUDY_UNREADABLE", Severity.ERROR, "Study could not be read",
          "The study was listed, but its series or instances could not be queried."),
    Check("STUDY_UID_MULTIPLE_PATIENTS", Severity.ERROR, "Study UID under several patients",
          "One Study Instance UID is listed under more than one Patient ID (with its issuer)."),
    Check("INVALID_UID", Severity.ERROR, "Invalid UIDs",
          "A Study, Series or SOP Instance UID breaks the rules of DICOM PS3.5 9.1 (1-64 characters, digits in components separated by single dots, no leading zero in a component of more than one digit)."),
    Check("DUPLICATE_SERIES_UID", Severity.ERROR, "Series UID in several places",
          "A Series Instance UID appears in more than one study, or twice in one study."),
    Check("DUPLICATE_INSTANCE_UID", Severity.ERROR, "SOP Instance UID in several places",
          "A SOP Instance UID appears in more than one study, or twice in one study."),
    Check("WINDOW_INCOMPLETE", Severity.ERROR, "Listing incomplete",
          "A part of the listing (a StudyDate window) could not be listed completely: the server truncated or refused it and it could not be split further, or it failed. Studies in it may be missing from this report."),
    Check("SERIES_WITHOUT_MODALITY", Severity.WARNING, "Series without Modality",
          "A series has no Modality (0008,0060), which DICOM (Type 1) and FHIR (ImagingStudy.series.modality, 1..1) require; a sync maps it with the data-absent-reason extension."),
    Check("NO_PATIENT_ID", Severity.WARNING, "No Patient ID",
          "The study has no Patient ID (0010,0020)."),
    Check("NO_STUDY_DATE", Severity.WARNING, "No Study Date",
          "The study has no Study Date (0008,0020): date-windowed (incremental) syncs never list it, only full ones."),
    Check("UNPARSEABLE_DATE", Severity.WARNING, "Unparseable Study Date",
          "The Study Date (0008,0020) is not a valid DICOM date (YYYYMMDD, a real calendar day)."),
    Check("FUTURE_DATE", Severity.WARNING, "Study Date in the future",
          "The Study Date (0008,0020) is after the day of the audit (in the PACS's time zone)."),
    Check("MODALITIES_MISMATCH", Severity.WARNING, "Modalities in Study differ",
          "Modalities in Study (0008,0061) differs from the Modality (0008,0060) values of the study's series."),
    Check("NO_ACCESSION_NUMBER", Severity.INFO, "No Accession Number",
          "The study has no Accession Number (0008,0050)."),
    Check("MISSING_FROM_STATE", Severity.WARNING, "Missing from the state",
          "The PACS holds the study, but the state has no record of it (or records it as gone)."),
    Check("EXTRA_IN_STATE", Severity.WARNING, "Extra in the state",
          "The state records the study, but the PACS no longer lists it (checked only when the listing was complete)."),
    Check("STALE_IN_STATE", Severity.WARNING, "Stale in the state",
          "The state's record of the study is not up to date: its counts or study-level attributes differ from the PACS's, or its last sync failed."),
    Check("MISSING_FROM_FHIR", Severity.WARNING, "Missing from the FHIR server",
          "The PACS holds the study, but the FHIR server has no ImagingStudy for it (by this source's deterministic id)."),
    Check("EXTRA_IN_FHIR", Severity.WARNING, "Extra in the FHIR server",
          "The FHIR server holds an ImagingStudy from this source for a study the PACS no longer lists (checked only when the listing was complete)."),
    Check("STALE_IN_FHIR", Severity.WARNING, "Stale in the FHIR server",
          "The FHIR server's ImagingStudy has other numbers of series or instances than the PACS reports."),
)
CHECKS: dict[str, Check] = {c.code: c for c in _CHECKS}
"""Every finding code, in report order, with its severity and description."""

STATE_CODES = ("MISSING_FROM_STATE", "EXTRA_IN_STATE", "STALE_IN_STATE")
FHIR_CODES = ("MISSING_FROM_FHIR", "EXTRA_IN_FHIR", "STALE_IN_FHIR")
SEVERITY_ORDER = {Severity.ERROR: 0, Severity.WARNING: 1, Severity.INFO: 2}


# --- UIDs (the rule itself is crawler.uids.valid_uid) ----------------------------------------


def _digest(uid: str) -> bytes:
    return hashlib.blake2b(uid.encode("utf-8", "surrogatepass"), digest_size=12).digest()


# --- dates ------------------------------------------------------------------------------------


def parse_study_date(text: str | None) -> date | None:
    """A DA value as a date; None when it is not ``YYYYMMDD`` of a real calendar day."""
    if not text or len(text) != 8 or not text.isdigit():
        return None
    try:
        return date(int(text[:4]), int(text[4:6]), int(text[6:]))
    except ValueError:
        return None


# --- masking ----------------------------------------------------------------------------------


def mask(value: str | None) -> str:
    """An accession number with its middle hidden: ``AC****23`` (short values: ``****``)."""
    if not value:
        return ""
    if len(value) < 6:
        return "****"
    return f"{value[:2]}****{value[-2:]}"


# --- collected facts --------------------------------------------------------------------------


class PatientEntry(NamedTuple):
    """One listing entry of a study (a study is listed once per patient that holds it)."""

    name: str | None
    n_series: int | None
    n_instances: int | None


class SeriesRow(NamedTuple):
    uid: str | None
    modality: str | None
    reported: int | None      # (0020,1209)


class InstanceRow(NamedTuple):
    series_uid: str | None
    uid: str | None


def _sum_known(values: list[int | None]) -> int | None:
    """The sum of ``values``; None when there are none or one of them is unknown."""
    known = [v for v in values if v is not None]
    return sum(known) if values and len(known) == len(values) else None


@dataclass(slots=True)
class StudyFacts:
    """What the audit keeps per study: listing attributes and counts, no datasets."""

    uid: str
    number: int
    study_date: str | None
    accession: str | None
    modalities_reported: tuple[str, ...] | None   # None: the server did not answer (0008,0061)
    listing_hash: str
    first_counts: tuple[int | None, int | None]
    patients: dict[tuple[str, str], PatientEntry] = field(default_factory=dict)
    crawled: bool = False
    error: str | None = None
    series_modalities: tuple[str, ...] = ()
    n_series: int | None = None
    n_instances: int | None = None
    series_mismatches: int = 0
    invalid_uids: int = 0
    duplicate_series: bool = False
    duplicate_instances: bool = False
    series_without_modality: int = 0

    @property
    def reported_series(self) -> int | None:
        return _sum_known([p.n_series for p in self.patients.values()])

    @property
    def reported_instances(self) -> int | None:
        return _sum_known([p.n_instances for p in self.patients.values()])

    @property
    def modalities(self) -> tuple[str, ...]:
        """The series' modalities where the study was read, else what the listing reported."""
        return self.series_modalities if self.crawled and self.series_modalities else (self.modalities_reported or ())

    @property
    def patient_ids(self) -> list[str]:
        return sorted({pid for _, pid in self.patients if pid})

    @property
    def patient_names(self) -> list[str]:
        return sorted({p.name for p in self.patients.values() if p.name})


def _safe(read: Any, ds: Dataset, tag: str) -> Any:
    try:
        return read(ds, tag)
    except ValueError:
        return None


def series_rows(items: Iterable[Dataset]) -> list[SeriesRow]:
    """Series-level QIDO results -> rows (UID, Modality, (0020,1209))."""
    return [
        SeriesRow(_safe(dj.string, s, Tag.SeriesInstanceUID), _safe(dj.string, s, Tag.Modality),
                  _safe(dj.integer, s, Tag.NumberOfSeriesRelatedInstances))
        for s in items
    ]


def instance_rows(items: Iterable[Dataset]) -> list[InstanceRow]:
    """Instance-level QIDO results -> rows (Series Instance UID, SOP Instance UID)."""
    return [InstanceRow(_safe(dj.string, i, Tag.SeriesInstanceUID), _safe(dj.string, i, Tag.SOPInstanceUID)) for i in items]


class Collector:
    """Accumulates the facts of an audit, study by study (use from one thread)."""

    def __init__(self) -> None:
        self.studies: dict[str, StudyFacts] = {}
        self._order: list[str] = []
        self._series_seen: dict[bytes, int] = {}
        self._instances_seen: dict[bytes, int] = {}
        self.incomplete: list[str] = []
        self.windows_listed = 0
        self.windows_split = 0

    def listed(self, item: Dataset, study_hash: str) -> StudyFacts | None:
        """Record a listing entry; returns the new facts on a study's first entry, else None.

        A study listed again under the same patient (a split window lists it twice) changes
        nothing; listed under another patient, its entry (and its counts) are added.
        """
        uid = dj.string(item, Tag.StudyInstanceUID) or ""
        patient = (_safe(dj.string, item, Tag.IssuerOfPatientID) or "", _safe(dj.string, item, Tag.PatientID) or "")
        n_series = _safe(dj.integer, item, Tag.NumberOfStudyRelatedSeries)
        n_instances = _safe(dj.integer, item, Tag.NumberOfStudyRelatedInstances)
        entry = PatientEntry(_safe(dj.person_name, item, Tag.PatientName), n_series, n_instances)
        facts = self.studies.get(uid)
        if facts is not None:
            facts.patients.setdefault(patient, entry)
            return None
        try:
            study_date = dj.string(item, Tag.StudyDate)
        except ValueError:
            study_date = "?"   # a wrongly typed value: reported as unparseable
        try:
            modalities = tuple(sorted(set(dj.strings(item, Tag.ModalitiesInStudy)))) if Tag.ModalitiesInStudy in item else None
        except ValueError:
            modalities = None
        facts = StudyFacts(
            uid=uid,
            number=len(self._order),
            study_date=study_date,
            accession=_safe(dj.string, item, Tag.AccessionNumber),
            modalities_reported=modalities or None,
            listing_hash=study_hash,
            first_counts=(n_series, n_instances),
            patients={patient: entry},
        )
        if not valid_uid(uid):
            facts.invalid_uids += 1
        self.studies[uid] = facts
        self._order.append(uid)
        return facts

    def failed(self, uid: str, error: str) -> None:
        facts = self.studies[uid]
        facts.crawled = True
        facts.error = error

    def crawled(self, uid: str, series: Sequence[SeriesRow], instances: Sequence[InstanceRow]) -> None:
        """Record what a study's series and instance queries listed."""
        facts = self.studies[uid]
        facts.crawled = True
        series_uids: set[str] = set()
        per_series: Counter[str] = Counter()
        sop_uids: set[str] = set()
        for row in series:
            if row.uid is None:
                continue
            if row.uid in series_uids:
                facts.duplicate_series = True
            series_uids.add(row.uid)
        for instance in instances:
            if instance.uid is None:
                continue
            if instance.uid in sop_uids:
                facts.duplicate_instances = True
                continue
            sop_uids.add(instance.uid)
            if instance.series_uid is not None:
                per_series[instance.series_uid] += 1
        all_series = series_uids | set(per_series)
        facts.n_series = len(all_series)
        facts.n_instances = len(sop_uids)
        facts.series_modalities = tuple(sorted({row.modality for row in series if row.modality}))
        facts.series_without_modality = sum(1 for row in series if row.uid is not None and not row.modality)
        facts.series_mismatches = sum(
            1 for row in series if row.uid is not None and row.reported is not None and row.reported != per_series.get(row.uid, 0)
        )
        facts.invalid_uids += sum(1 for u in all_series if not valid_uid(u)) + sum(1 for u in sop_uids if not valid_uid(u))
        self._register(facts, all_series, self._series_seen, "duplicate_series")
        self._register(facts, sop_uids, self._instances_seen, "duplicate_instances")

    def _register(self, facts: StudyFacts, uids: Iterable[str], seen: dict[bytes, int], flag: str) -> None:
        for uid in uids:
            key = _digest(uid)
            first = seen.setdefault(key, facts.number)
            if first != facts.number:
                setattr(facts, flag, True)
                setattr(self.studies[self._order[first]], flag, True)


# --- comparing with a copy (the state, a FHIR server) ---------------------------------------


class CopyRow(NamedTuple):
    """What a copy (the state or a FHIR server) holds for one study."""

    n_series: int | None
    n_instances: int | None
    study_hash: str | None = None     # state only: hash of the listing attributes at the last sync
    status: str = StudyStatus.SYNCED  # state only: a StudyStatus value
    study_date: str | None = None     # YYYYMMDD, to restrict "extra" to the audited window


@dataclass(frozen=True)
class Finding:
    code: str
    severity: Severity
    studies: tuple[str, ...] = ()
    windows: tuple[str, ...] = ()

    @property
    def count(self) -> int:
        return len(self.windows) if self.code == "WINDOW_INCOMPLETE" else len(self.studies)

    @property
    def title(self) -> str:
        return CHECKS[self.code].title

    @property
    def description(self) -> str:
        return CHECKS[self.code].description

    def as_dict(self) -> dict[str, Any]:
        return {
            "code": self.code,
            "severity": self.severity.value,
            "count": self.count,
            "title": self.title,
            "description": self.description,
            "studies": list(self.studies),
            "windows": list(self.windows),
        }


@dataclass
class Evaluation:
    findings: list[Finding]
    codes: dict[str, tuple[str, ...]]
    """Study UID -> its finding codes (sorted), for every study the PACS listed."""
    checked: list[str]
    """The codes that were checked (state and FHIR codes only when a copy was given)."""

    @property
    def errors(self) -> int:
        return sum(1 for f in self.findings if f.severity is Severity.ERROR)


def _in_window(day: str | None, since: str | None, until: str | None) -> bool:
    if since is None and until is None:
        return True
    if day is None:
        return False
    return (since is None or day >= since) and (until is None or day <= until)


def evaluate(
    studies: Mapping[str, StudyFacts],
    *,
    today: date,
    incomplete: Sequence[str] = (),
    state: Mapping[str, CopyRow] | None = None,
    fhir: Mapping[str, CopyRow] | None = None,
    since: str | None = None,
    until: str | None = None,
    fhir_extras: bool = True,
) -> Evaluation:
    """The findings over collected facts (pure). ``state``/``fhir`` are the copies' rows by
    Study UID, or None when that copy is not compared; ``since``/``until`` the audited window
    (extras in a copy are looked for only within it, and only when the listing was complete;
    ``fhir_extras=False`` when the FHIR server could not be searched, only read by id)."""
    found: dict[str, set[str]] = {code: set() for code in CHECKS}
    for uid, s in studies.items():
        if s.error is not None:
            found["STUDY_UNREADABLE"].add(uid)
        elif s.crawled:
            rs, ri = s.reported_series, s.reported_instances
            if (rs is not None and rs != s.n_series) or (ri is not None and ri != s.n_instances):
                found["STUDY_COUNT_MISMATCH"].add(uid)
            if s.series_mismatches:
                found["SERIES_COUNT_MISMATCH"].add(uid)
            if s.modalities_reported is not None and s.series_modalities and set(s.modalities_reported) != set(s.series_modalities):
                found["MODALITIES_MISMATCH"].add(uid)
        if len(s.patients) > 1:
            found["STUDY_UID_MULTIPLE_PATIENTS"].add(uid)
        if s.invalid_uids:
            found["INVALID_UID"].add(uid)
        if s.duplicate_series:
            found["DUPLICATE_SERIES_UID"].add(uid)
        if s.duplicate_instances:
            found["DUPLICATE_INSTANCE_UID"].add(uid)
        if s.series_without_modality:
            found["SERIES_WITHOUT_MODALITY"].add(uid)
        if any(not pid for _, pid in s.patients):
            found["NO_PATIENT_ID"].add(uid)
        if not s.accession:
            found["NO_ACCESSION_NUMBER"].add(uid)
        if not s.study_date:
            found["NO_STUDY_DATE"].add(uid)
        else:
            day = parse_study_date(s.study_date)
            if day is None:
                found["UNPARSEABLE_DATE"].add(uid)
            elif day > today:
                found["FUTURE_DATE"].add(uid)
    complete = not incomplete
    checked = [c for c in CHECKS if c not in STATE_CODES + FHIR_CODES]
    for rows, (missing, extra, stale), extras in ((state, STATE_CODES, True), (fhir, FHIR_CODES, fhir_extras)):
        if rows is None:
            continue
        extras = extras and complete
        checked += [missing, stale] + ([extra] if extras else [])
        for uid, s in studies.items():
            row = rows.get(uid)
            if row is None or row.status == StudyStatus.GONE:
                found[missing].add(uid)
                continue
            counts = s.first_counts   # what a sync records and maps: the first listing entry's counts
            wanted_series = counts[0] if counts[0] is not None else s.n_series
            wanted_instances = counts[1] if counts[1] is not None else s.n_instances
            if row.status != StudyStatus.SYNCED or (row.study_hash is not None and row.study_hash != s.listing_hash) or (
                (wanted_series is not None and row.n_series != wanted_series)
                or (wanted_instances is not None and row.n_instances != wanted_instances)
            ):
                found[stale].add(uid)
        if extras:
            for uid, row in rows.items():
                if uid not in studies and row.status != StudyStatus.GONE and _in_window(row.study_date, since, until):
                    found[extra].add(uid)
    findings = []
    for code, uids in found.items():
        if code == "WINDOW_INCOMPLETE":
            if incomplete:
                findings.append(Finding(code, CHECKS[code].severity, windows=tuple(sorted(incomplete))))
        elif uids:
            findings.append(Finding(code, CHECKS[code].severity, studies=tuple(sorted(uids))))
    codes: dict[str, set[str]] = {uid: set() for uid in studies}
    for f in findings:
        for uid in f.studies:
            if uid in codes:
                codes[uid].add(f.code)
    return Evaluation(findings, {uid: tuple(sorted(c)) for uid, c in codes.items()}, [c for c in CHECKS if c in checked])


# --- totals and chart data --------------------------------------------------------------------


def totals(studies: Mapping[str, StudyFacts]) -> dict[str, int]:
    """Counts over the PACS as the audit saw it (patients: distinct (issuer, Patient ID) pairs;
    series and instances: as enumerated, and as the listing reported)."""
    patients = {key for s in studies.values() for key in s.patients if key[1]}
    return {
        "patients": len(patients),
        "studies": len(studies),
        "series": sum(s.n_series or 0 for s in studies.values()),
        "instances": sum(s.n_instances or 0 for s in studies.values()),
        "series_reported": sum(s.reported_series or 0 for s in studies.values()),
        "instances_reported": sum(s.reported_instances or 0 for s in studies.values()),
        "studies_unreadable": sum(1 for s in studies.values() if s.error is not None),
    }


def by_modality(studies: Mapping[str, StudyFacts]) -> list[tuple[str, int]]:
    """(modality, studies with it), most frequent first; a study counts once per modality."""
    counts: Counter[str] = Counter()
    for s in studies.values():
        counts.update(s.modalities or ("(none)",))
    return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))


DENSE_MONTHS = 240


def by_month(studies: Mapping[str, StudyFacts]) -> list[tuple[str, int]]:
    """(YYYY-MM, studies) for every month from the first to the last (gaps as 0; when that
    span is longer than DENSE_MONTHS, e.g. because of a date far in the past or future, only
    the months that have studies), then ``no date`` and ``invalid date`` when there are such
    studies."""
    counts: Counter[str] = Counter()
    other: Counter[str] = Counter()
    for s in studies.values():
        day = parse_study_date(s.study_date)
        if day is not None:
            counts[f"{day.year:04d}-{day.month:02d}"] += 1
        elif not s.study_date:
            other["no date"] += 1
        else:
            other["invalid date"] += 1
    out: list[tuple[str, int]] = []
    if counts:
        first, last = min(counts), max(counts)
        span = (int(last[:4]) - int(first[:4])) * 12 + int(last[5:]) - int(first[5:]) + 1
        if span > DENSE_MONTHS:
            return sorted(counts.items()) + [(k, other[k]) for k in ("no date", "invalid date") if other[k]]
        year, month = int(first[:4]), int(first[5:])
        while f"{year:04d}-{month:02d}" <= last:
            key = f"{year:04d}-{month:02d}"
            out.append((key, counts.get(key, 0)))
            year, month = (year + 1, 1) if month == 12 else (year, month + 1)
    return out + [(k, other[k]) for k in ("no date", "invalid date") if other[k]]

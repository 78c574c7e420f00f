"""One study's rows of the three tables, from its ImagingStudy (R5 or R4), as plain Python values.

Pure functions: no I/O, no pyarrow (the sinks turn the rows into Arrow batches with
``schema``). Every value comes from the ImagingStudy the same run writes as NDJSON, so the tables
and the FHIR copy cannot disagree; docs/tables.md names the element behind each column.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from typing import Any

TABLES = ("studies", "series", "instances")
KEYS: dict[str, tuple[str, ...]] = {
    "studies": ("source", "study_uid"),
    "series": ("source", "study_uid", "series_uid"),
    "instances": ("source", "study_uid", "series_uid", "sop_uid"),
}

Row = dict[str, Any]
Code = dict[str, "str | None"]

_DATETIME = re.compile(
    r"(?P<y>\d{4})(?:-(?P<m>\d{2})(?:-(?P<d>\d{2})"
    r"(?:T(?P<H>\d{2}):(?P<M>\d{2})(?::(?P<S>\d{2})(?:\.(?P<f>\d+))?)?(?P<tz>Z|[+-]\d{2}:\d{2})?)?)?)?$"
)
_UID_URN = "urn:oid:"
_ACCESSION_TYPE = ("http://terminology.hl7.org/CodeSystem/v2-0203", "ACSN")


@dataclass
class StudyRows:
    """One study's rows: its ``studies`` row, its series and its instances."""

    study: Row
    series: list[Row] = field(default_factory=list)
    instances: list[Row] = field(default_factory=list)

    def table(self, name: str) -> list[Row]:
        return [self.study] if name == "studies" else self.series if name == "series" else self.instances


@functools.lru_cache(maxsize=4096)   # a study's series mostly share its time: the rows of a sync ask for few distinct ones
def fhir_datetime(text: str | None) -> tuple[date | None, datetime | None, int | None]:
    """(date, UTC instant, offset in minutes) of a FHIR date or dateTime.

    A full date gives the date; a time with an offset gives the instant (microseconds, in UTC)
    and the offset the resource carried (so local time = instant + offset). A reduced date
    (``2023``, ``2023-03``) gives no date: a date32 cannot say "some day of March"."""
    if not text:
        return None, None, None
    match = _DATETIME.match(text)
    if match is None:
        return None, None, None
    g = match.groupdict()
    if g["d"] is None:
        return None, None, None
    try:
        day = date(int(g["y"]), int(g["m"]), int(g["d"]))
    except ValueError:
        return None, None, None
    if g["H"] is None or g["tz"] is None:
        return day, None, None
    offset = 0 if g["tz"] == "Z" else (1 if g["tz"][0] == "+" else -1) * (int(g["tz"][1:3]) * 60 + int(g["tz"][4:6]))
    micros = int((g["f"] or "0")[:6].ljust(6, "0"))
    local = datetime(day.year, day.month, day.day, int(g["H"]), int(g["M"]), int(g["S"] or 0), micros,
                     tzinfo=timezone(timedelta(minutes=offset)))
    return day, local.astimezone(timezone.utc), offset


def _codings(value: Any) -> tuple[list[dict[str, Any]], str | None]:
    """The codings and text of a CodeableReference (R5: {concept}), CodeableConcept or Coding (R4)."""
    if not isinstance(value, dict):
        return [], None
    if "concept" in value:
        value = value["concept"]
    if "coding" in value:
        return [c for c in value["coding"] if isinstance(c, dict)], value.get("text")
    if "code" in value or "system" in value or "display" in value:
        return [value], None
    return [], value.get("text")


def _code(coding: Mapping[str, Any], text: str | None) -> Code:
    return {"system": coding.get("system"), "code": coding.get("code"), "display": coding.get("display"), "text": text}


def codes(value: Any) -> list[Code]:
    """One entry per coding; a concept with text only (e.g. a reason as free text) is one entry
    with ``text`` and no code."""
    codings, text = _codings(value)
    if not codings:
        return [_code({}, text)] if text else []
    return [_code(c, text) for c in codings]


def first_code(value: Any) -> Code | None:
    """``codes(value)[0]`` (None when there is none), without making the others."""
    codings, text = _codings(value)
    if codings:
        return _code(codings[0], text)
    return _code({}, text) if text else None


def _code_value(value: Any) -> str | None:
    codings, _ = _codings(value)
    return codings[0].get("code") if codings else None


def _issuer(identifier: Mapping[str, Any]) -> str | None:
    """An identifier's system, else its assigner's name (an issuer that is no URI)."""
    system = identifier.get("system")
    if system:
        return str(system)
    assigner = identifier.get("assigner")
    return assigner.get("display") if isinstance(assigner, dict) else None


def _accession(study: Mapping[str, Any]) -> Mapping[str, Any] | None:
    for based_on in study.get("basedOn", ()):
        identifier = based_on.get("identifier") if isinstance(based_on, dict) else None
        if isinstance(identifier, dict):
            codings, _ = _codings(identifier.get("type"))
            if any((c.get("system"), c.get("code")) == _ACCESSION_TYPE for c in codings):
                return identifier
    return None


def study_uid(study: Mapping[str, Any]) -> str:
    for identifier in study.get("identifier", ()):
        if identifier.get("system") == "urn:dicom:uid" and str(identifier.get("value", "")).startswith(_UID_URN):
            return str(identifier["value"])[len(_UID_URN):]
    raise ValueError(f"ImagingStudy/{study.get('id')} has no Study Instance UID identifier")


def _endpoint(references: Any, endpoints: Mapping[str, str]) -> str | None:
    """The address of the first Endpoint referenced, when known, else the reference itself."""
    for reference in references or ():
        target = reference.get("reference") if isinstance(reference, dict) else None
        if target:
            return endpoints.get(target, target)
    return None


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _performer(performer: Mapping[str, Any]) -> dict[str, str | None]:
    actor = performer.get("actor") or {}
    identifier = actor.get("identifier")
    return {
        "function": _code_value(performer.get("function")),
        "type": actor.get("type"),
        "display": actor.get("display"),
        "identifier": identifier.get("value") if isinstance(identifier, dict) else None,
    }


def study_rows(study: Mapping[str, Any], source: str, endpoints: Mapping[str, str] | None = None) -> StudyRows:
    """The rows of one ImagingStudy (R5 or R4) of ``source`` (the normalised DICOMweb base).

    ``endpoints`` maps ``Endpoint/<id>`` to the Endpoint's address (see docs/tables.md)."""
    endpoints = endpoints or {}
    uid = study_uid(study)
    subject = study.get("subject") or {}
    patient: Mapping[str, Any] = subject["identifier"] if isinstance(subject.get("identifier"), dict) else {}
    accession = _accession(study) or {}
    day, instant, offset = fhir_datetime(study.get("started"))
    procedures = study.get("procedure", study.get("procedureCode", ()))
    reasons = study.get("reason", study.get("reasonCode", ()))
    referrer = study.get("referrer") or {}
    rows = StudyRows({
        "source": source,
        "study_uid": uid,
        "fhir_id": study.get("id"),
        "patient_id": patient.get("value"),
        "patient_id_issuer": _issuer(patient) if patient else None,
        "accession": accession.get("value"),
        "accession_issuer": _issuer(accession) if accession else None,
        "study_date": day,
        "study_datetime": instant,
        "study_tz_offset": offset,
        "modalities": [code for code in (_code_value(m) for m in study.get("modality", ())) if code],
        "description": study.get("description"),
        "n_series": _int(study.get("numberOfSeries")),
        "n_instances": _int(study.get("numberOfInstances")),
        "referrer": referrer.get("display"),
        "procedure_codes": [c for p in procedures for c in codes(p)],
        "reason_codes": [c for r in reasons for c in codes(r)],
        "endpoint": _endpoint(study.get("endpoint"), endpoints),
    })
    for series in study.get("series", ()):
        series_day, started, series_offset = fhir_datetime(series.get("started"))
        rows.series.append({
            "source": source,
            "study_uid": uid,
            "series_uid": series["uid"],
            "number": _int(series.get("number")),
            "modality": _code_value(series.get("modality")),
            "description": series.get("description"),
            "body_site": first_code(series.get("bodySite")),
            "laterality": first_code(series.get("laterality")),
            "n_instances": _int(series.get("numberOfInstances")),
            "series_date": series_day,
            "started": started,
            "started_tz_offset": series_offset,
            "performers": [_performer(p) for p in series.get("performer", ())],
        })
        for instance in series.get("instance", ()):
            sop_class = instance.get("sopClass") or {}
            code = sop_class.get("code")
            rows.instances.append({
                "source": source,
                "study_uid": uid,
                "series_uid": series["uid"],
                "sop_uid": instance["uid"],
                "sop_class_uid": code[len(_UID_URN):] if isinstance(code, str) and code.startswith(_UID_URN) else code,
                "sop_class_name": sop_class.get("display"),
                "number": _int(instance.get("number")),
                "title": instance.get("title"),
            })
    return rows

"""FHIR R4 (4.0.1; the R4B models have the same shapes here) from the R5 plain data.

A pure transform of what :func:`crawler.mapping.map_study` and :func:`crawler.mapping.endpoint`
produce: no I/O, no models, no clock. It builds new dicts (the input is never changed and shares
no mutable object with the output) in R4 element order, and is cheap enough to run per study:
a 10,000-instance study takes 6-10 ms on a slow 2-core box (``copy.deepcopy`` of it alone takes
~80 ms, serialising it with orjson ~2 ms).

What changes between R5 and R4 (checked against the R4 and R5 structure definitions and the
HL7 R5->R4 cross-version comparison):

ImagingStudy
  * ``modality``: R5 CodeableConcept[] -> R4 Coding[] (first coding of each). R4 defines the
    element as "the series.modality values that are actual acquisition modalities, i.e. those
    in the DICOM Context Group 29"; R5 widened it to every series modality. DICOM defined terms
    that are *not* acquisition modalities (SR, KO, PR, SEG, ...) are therefore left out of the
    study-level list; the series keep their modality.
  * ``procedure`` (CodeableReference(PlanDefinition|ActivityDefinition)[]) -> ``procedureCode``
    (its concepts). Its references have no R4 element and are dropped.
  * ``partOf`` (Reference(Procedure)[]) -> ``procedureReference`` (Reference(Procedure), 0..1):
    the first one.
  * ``reason`` (CodeableReference[]) -> ``reasonCode`` (concepts) + ``reasonReference``
    (references; R5's targets are a subset of R4's).
  * Accession Number: the ``basedOn`` ServiceRequest identifier of type v2-0203 ``ACSN`` is kept
    and also added to ``identifier`` (R4: "Accession Number should use ACSN Identifier type").
  * ``interpreter`` is R4 only and nothing in R5 maps to it.
  * series ``modality``, ``laterality`` (CodeableConcept) and ``bodySite`` (CodeableReference
    (BodyStructure)) -> Coding: the first coding; a concept with only ``text`` becomes
    ``{"display": text}`` (R4 Coding has no text). A bodySite that is only a BodyStructure
    reference has no R4 form.
  * series ``performer`` ({function, actor}) has the same shape; R5 adds HealthcareService to
    the actor targets, which R4 lacks, so such performers are dropped.
  * contained Location: ``form`` -> ``physicalType``, ``contact[].telecom`` -> ``telecom``,
    ``hoursOfOperation`` (Availability) -> R4 ``hoursOfOperation`` + ``availabilityExceptions``;
    ``characteristic`` and ``virtualService`` have no R4 form.

Endpoint: ``connectionType`` CodeableConcept[] (1..*) -> one Coding (1..1); ``payload[]``
({type, mimeType}) -> ``payloadType`` (1..*, required in R4) + ``payloadMimeType``;
``environmentType`` and ``description`` are R5 only.

Patient: the resource is the same in R4 and R5 apart from Attachment (``photo``), whose R5
``height``, ``width``, ``frames``, ``duration`` and ``pages`` are new and whose ``size`` became
integer64 (a JSON string) instead of unsignedInt.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from itertools import combinations
from typing import Any

from . import codes

Resource = dict[str, Any]

PAYLOAD_TYPE_SYSTEM = "http://terminology.hl7.org/CodeSystem/endpoint-payload-type"
ANY_PAYLOAD: Resource = {"system": PAYLOAD_TYPE_SYSTEM, "code": "any", "display": "Any"}
"""endpoint-payload-type ``any`` (defined in R4's and R4B's code system, and in HL7 Terminology)."""

NON_ACQUISITION_MODALITIES: frozenset[str] = frozenset(
    {
        "ANN", "ASMT", "AU", "CTPROTOCOL", "DOC", "FID", "HC", "IOL", "KO", "M3D", "OT", "PLAN",
        "PR", "REG", "RTDOSE", "RTINTENT", "RTPLAN", "RTRAD", "RTRECORD", "RTSEGANN", "RTSTRUCT",
        "RWV", "SEG", "SMR", "SR", "STAIN", "TEXTUREMAP", "XAPROTOCOL",
    }
)  # fmt: skip
"""Current Modality defined terms (PS3.3 C.7.3.1.1.1) that are not in CID 29 "Acquisition
Modality". R4 ImagingStudy.modality lists acquisition modalities only; retired terms and
codes DICOM does not define are kept, as nothing says they are not acquisition modalities."""

_ATOMS = frozenset({str, int, float, bool, type(None)})
_RESOURCE_HEAD = ("id", "meta", "implicitRules", "language", "text")
_EXTENSIONS = ("extension", "modifierExtension")
_BACKBONE_HEAD = ("id", "extension", "modifierExtension")
_INSTANCE_ORDER = ("uid", "sopClass", "number", "title")
_PLAIN_INSTANCE_LAYOUTS = frozenset(
    layout for n in range(len(_INSTANCE_ORDER) + 1) for layout in combinations(_INSTANCE_ORDER, n)
)
"""Key sequences of an instance with only these elements, in R4 (= R5) order."""
_PLAIN_CODING_KEYS = frozenset({"id", "system", "version", "code", "display", "userSelected"})
_R5_ONLY_ATTACHMENT = frozenset(
    {"height", "width", "frames", "duration", "pages", "_height", "_width", "_frames", "_duration", "_pages"}
)
_UNSIGNED_INT_MAX = 2**31 - 1


def to_r4(study: Mapping[str, Any]) -> Resource:
    """The R4 ImagingStudy for an R5 ImagingStudy dict (as ``map_study`` makes it)."""
    out: Resource = {"resourceType": "ImagingStudy"}
    _copy(out, study, _RESOURCE_HEAD)
    contained = study.get("contained")
    if contained:
        out["contained"] = [_contained(resource) for resource in contained]
    _copy(out, study, _EXTENSIONS)
    identifiers = _identifiers(study)
    if identifiers:
        out["identifier"] = identifiers
    _copy(out, study, ("status",))
    modality = _study_modalities(study.get("modality") or ())
    if modality:
        out["modality"] = modality
    _copy(out, study, ("subject", "encounter", "started", "basedOn", "referrer"))  # interpreter: R4 only
    _copy(out, study, ("endpoint", "numberOfSeries", "numberOfInstances"))
    part_of = study.get("partOf")
    if part_of:
        out["procedureReference"] = _clone(part_of[0])
    procedure_codes = _concepts(study.get("procedure") or ())
    if procedure_codes:
        out["procedureCode"] = procedure_codes
    _copy(out, study, ("location",))
    reasons = study.get("reason") or ()
    reason_codes = _concepts(reasons)
    if reason_codes:
        out["reasonCode"] = reason_codes
    reason_references = [_clone(r["reference"]) for r in reasons if r.get("reference")]
    if reason_references:
        out["reasonReference"] = reason_references
    _copy(out, study, ("note", "description"))
    series = study.get("series")
    if series:
        out["series"] = [_series(item) for item in series]
    return out


def endpoint_r4(r5_endpoint: Mapping[str, Any]) -> Resource:
    """The R4 Endpoint for an R5 Endpoint dict (as ``endpoint`` makes it).

    Raises ``ValueError`` if no connectionType has a coding: R4 requires exactly one Coding.
    """
    out: Resource = {"resourceType": "Endpoint"}
    _copy(out, r5_endpoint, (*_RESOURCE_HEAD, "contained", *_EXTENSIONS, "identifier", "status"))
    connection = next(
        (c["coding"][0] for c in r5_endpoint.get("connectionType") or () if c.get("coding")), None
    )
    if connection is None:
        raise ValueError("Endpoint.connectionType has no coding; R4 requires one Coding")
    out["connectionType"] = _clone(connection)
    _copy(out, r5_endpoint, ("name", "managingOrganization", "contact", "period"))
    payload = r5_endpoint.get("payload") or ()
    payload_types: list[Resource] = []
    mime_types: dict[str, None] = {}
    for item in payload:
        for concept in item.get("type") or ():
            converted = _payload_type(concept)
            if converted not in payload_types:
                payload_types.append(converted)
        mime_types.update(dict.fromkeys(item.get("mimeType") or ()))
    out["payloadType"] = payload_types or [{"coding": [dict(ANY_PAYLOAD)]}]
    if mime_types:
        out["payloadMimeType"] = list(mime_types)
    _copy(out, r5_endpoint, ("address", "header"))
    return out


def patient_r4(r5_patient: Mapping[str, Any]) -> Resource:
    """The R4 Patient for an R5 Patient dict.

    Patient has the same elements, in the same order, in both versions; only ``photo``
    (Attachment) changes shape, so the rest is copied as it is.
    """
    out: Resource = {}
    for key, value in r5_patient.items():
        if key == "photo":
            photos = [_attachment(photo) for photo in value]
            if photos:
                out["photo"] = photos
        else:
            out[key] = _clone(value)
    return out


def _clone(value: Any) -> Any:
    """A copy of JSON-shaped data (dicts, lists, scalars); far cheaper than ``copy.deepcopy``."""
    kind = type(value)
    if kind is dict:
        return {k: (v if type(v) in _ATOMS else _clone(v)) for k, v in value.items()}
    if kind is list:
        return [v if type(v) in _ATOMS else _clone(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _clone(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clone(v) for v in value]
    return value


def _copy(out: Resource, src: Mapping[str, Any], keys: Iterable[str]) -> None:
    """Copy the elements named (and their ``_name`` primitive extensions) that ``src`` has."""
    for key in keys:
        if key in src:
            out[key] = _clone(src[key])
        extra = "_" + key
        if extra in src:
            out[extra] = _clone(src[extra])


def _is_accession(identifier: Mapping[str, Any]) -> bool:
    coding = (identifier.get("type") or {}).get("coding") or ()
    return any(c.get("system") == codes.V2_0203 and c.get("code") == "ACSN" for c in coding)


def _identifiers(study: Mapping[str, Any]) -> list[Resource]:
    out = [_clone(i) for i in study.get("identifier") or ()]
    seen = {(i.get("system"), i.get("value")) for i in out if _is_accession(i)}
    for reference in study.get("basedOn") or ():
        identifier = reference.get("identifier")
        if identifier and _is_accession(identifier):
            key = (identifier.get("system"), identifier.get("value"))
            if key not in seen:
                seen.add(key)
                out.append(_clone(identifier))
    return out


def _coding(concept: Mapping[str, Any] | None) -> Resource | None:
    """R4 Coding for an R5 CodeableConcept: its first coding, else its text as a display."""
    if not concept:
        return None
    codings = concept.get("coding")
    if codings:
        first: Resource = _clone(codings[0])
        return first
    text = concept.get("text")
    if text:
        return {"display": text}
    extension = concept.get("extension")
    return {"extension": _clone(extension)} if extension else None


def _study_modalities(concepts: Sequence[Mapping[str, Any]]) -> list[Resource]:
    out: list[Resource] = []
    for concept in concepts:
        coding = _coding(concept)
        if coding is None or coding in out:
            continue
        if coding.get("system") == codes.DCM and coding.get("code") in NON_ACQUISITION_MODALITIES:
            continue
        out.append(coding)
    return out


def _concepts(references: Iterable[Mapping[str, Any]]) -> list[Resource]:
    """The concepts of R5 CodeableReferences, as R4 CodeableConcepts."""
    return [_clone(r["concept"]) for r in references if r.get("concept")]


def _payload_type(concept: Mapping[str, Any]) -> Resource:
    if concept.get("coding"):
        same: Resource = _clone(concept)
        return same
    out: Resource = {"coding": [dict(ANY_PAYLOAD)]}
    out.update(_clone(concept))
    return out


def _series(series: Mapping[str, Any]) -> Resource:
    out: Resource = {}
    _copy(out, series, (*_BACKBONE_HEAD, "uid", "number"))
    modality = _coding(series.get("modality"))
    if modality is not None:
        out["modality"] = modality
    _copy(out, series, ("description", "numberOfInstances", "endpoint"))
    body_site = series.get("bodySite")
    body_site_coding = _coding(body_site.get("concept")) if body_site else None
    if body_site_coding is not None:
        out["bodySite"] = body_site_coding
    laterality = _coding(series.get("laterality"))
    if laterality is not None:
        out["laterality"] = laterality
    _copy(out, series, ("specimen", "started"))
    performers = [
        _clone(p) for p in series.get("performer") or () if (p.get("actor") or {}).get("type") != "HealthcareService"
    ]
    if performers:
        out["performer"] = performers
    instances = series.get("instance")
    if instances:
        out["instance"] = _instances(instances)
    return out


def _instances(instances: Iterable[Mapping[str, Any]]) -> list[Resource]:
    # The hot loop (10,000s of instances per study). What map_study makes is already in R4 order
    # (R4 and R5 order the instance elements alike) and its only non-scalar is a sopClass Coding
    # without extensions: copy those with dict(). Everything else takes the general way.
    out: list[Resource] = []
    append = out.append
    for instance in instances:
        layout = tuple(instance) if type(instance) is dict else None
        if layout == _INSTANCE_ORDER or layout in _PLAIN_INSTANCE_LAYOUTS:
            copied = dict(instance)
            sop_class = copied.get("sopClass")
            if sop_class is not None:
                plain = type(sop_class) is dict and sop_class.keys() <= _PLAIN_CODING_KEYS
                copied["sopClass"] = dict(sop_class) if plain else _clone(sop_class)
            append(copied)
        else:
            general: Resource = {}
            _copy(general, instance, (*_BACKBONE_HEAD, *_INSTANCE_ORDER))
            append(general)
    return out


def _attachment(attachment: Mapping[str, Any]) -> Resource:
    out: Resource = {}
    for key, value in attachment.items():
        if key in _R5_ONLY_ATTACHMENT:
            continue
        if key == "size":
            size = _unsigned_int(value)
            if size is not None:
                out["size"] = size
            continue
        out[key] = _clone(value)
    return out


def _unsigned_int(value: Any) -> int | None:
    """R5 integer64 (a JSON string, or a number from a lenient writer) -> R4 unsignedInt."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        text = value.strip()
        if not text.isdigit():
            return None
        value = int(text)
    if isinstance(value, int) and 0 <= value <= _UNSIGNED_INT_MAX:
        return value
    return None


# Location: R4 element order, and the R5 elements that changed.
_LOCATION_ORDER = (
    "identifier", "status", "operationalStatus", "name", "alias", "description", "mode", "type",
    "telecom", "address", "physicalType", "position", "managingOrganization", "partOf",
    "hoursOfOperation", "availabilityExceptions", "endpoint",
)  # fmt: skip


def _contained(resource: Mapping[str, Any]) -> Resource:
    if resource.get("resourceType") != "Location":
        copy: Resource = _clone(resource)
        return copy
    return _location(resource)


def _location(location: Mapping[str, Any]) -> Resource:
    source: dict[str, Any] = dict(location)
    if "form" in source:
        source["physicalType"] = source.pop("form")
    if "_form" in source:
        source["_physicalType"] = source.pop("_form")
    contacts = source.pop("contact", None) or ()
    telecom = [t for contact in contacts for t in contact.get("telecom") or ()]
    if telecom and "telecom" not in source:
        source["telecom"] = telecom
    availability = source.pop("hoursOfOperation", None)
    if availability:
        hours, exceptions = _hours(availability)
        if hours:
            source["hoursOfOperation"] = hours
        if exceptions:
            source["availabilityExceptions"] = exceptions
    out: Resource = {"resourceType": "Location"}
    _copy(out, source, (*_RESOURCE_HEAD, "contained", *_EXTENSIONS, *_LOCATION_ORDER))
    return out


def _hours(availability: Any) -> tuple[list[Resource], str | None]:
    """R5 Availability (0..* on Location) -> R4 hoursOfOperation[] and availabilityExceptions."""
    items = availability if isinstance(availability, list) else [availability]
    hours: list[Resource] = []
    exceptions: list[str] = []
    for item in items:
        for time in item.get("availableTime") or ():
            entry: Resource = {}
            _copy(entry, time, ("daysOfWeek", "allDay"))
            if "availableStartTime" in time:
                entry["openingTime"] = time["availableStartTime"]
            if "availableEndTime" in time:
                entry["closingTime"] = time["availableEndTime"]
            if entry:
                hours.append(entry)
        exceptions += [n["description"] for n in item.get("notAvailableTime") or () if n.get("description")]
    return hours, ("; ".join(exceptions) or None)

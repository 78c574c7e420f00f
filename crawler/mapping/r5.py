"""DICOM JSON -> FHIR R5 ImagingStudy, as plain data. Pure: no I/O, no models, no clock."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from .. import dicomjson as dj
from ..dicomjson import Dataset, Tag
from ..errors import MappingError
from . import codes
from .dates import fhir_datetime
from .endpoint import endpoint
from .ids import endpoint_id, normalise_base, resource_id, study_id
from .model import Mapped, MappingOptions, StudyInput


DICOM_UID = "urn:dicom:uid"
_OID = re.compile(r"^[0-2](\.(0|[1-9][0-9]*))+$")

T = TypeVar("T")
Resource = dict[str, Any]


@dataclass(frozen=True)
class _Reader:
    """Reads attributes of one study, turning bad values into MappingErrors that name them."""

    study_uid: str | None

    def __call__(self, read: Callable[[Dataset, str], T], ds: Dataset, tag: str) -> T:
        try:
            return read(ds, tag)
        except ValueError as exc:
            raise MappingError(self.study_uid, dj.keyword(tag), str(exc)) from None

    def datetime(self, ds: Dataset, date_tag: str, time_tag: str, options: MappingOptions, study: Dataset | None = None) -> str | None:
        """Date + time as FHIR dateTime; the offset from ``ds``, else from the study's attributes."""
        date = self(dj.string, ds, date_tag)
        time = self(dj.string, ds, time_tag)
        offset = self(dj.string, ds, Tag.TimezoneOffsetFromUTC)
        if offset is None and study is not None:
            offset = self(dj.string, study, Tag.TimezoneOffsetFromUTC)
        try:
            return fhir_datetime(date, time, offset, options.zone)
        except ValueError as exc:
            raise MappingError(self.study_uid, f"{dj.keyword(date_tag)} + {dj.keyword(time_tag)}", str(exc)) from None


def map_study(data: StudyInput, options: MappingOptions) -> Resource:
    """One ImagingStudy (R5 JSON as a dict) for one study.

    Raises MappingError (naming the study and the attribute) for data that cannot be mapped.
    """
    return map_resources(data, options).study


def map_resources(data: StudyInput, options: MappingOptions) -> Mapped:
    """The ImagingStudy of one study with the Endpoints and Patient it refers to."""
    if not isinstance(data.study, Mapping):
        raise MappingError(None, "study", "search result is not a JSON object")
    first_instance = next((i for i in data.instances if isinstance(i, Mapping)), {})
    first_series = next((i for i in data.series if isinstance(i, Mapping)), {})
    study = {**first_series, **first_instance, **data.study}
    read = _Reader(None)
    study_uid = read(dj.uid, study, Tag.StudyInstanceUID)
    if not study_uid:
        raise MappingError(None, dj.keyword(Tag.StudyInstanceUID), "missing")
    read = _Reader(study_uid)
    for kind, items in (("instances", data.instances), ("series", data.series)):
        if not all(type(item) is dict or isinstance(item, Mapping) for item in items):
            raise MappingError(study_uid, kind, "a search result is not a JSON object")

    endpoints: dict[str, Resource] = {}
    series = _series(data, read, options, study, endpoints)
    resource: Resource = {"resourceType": "ImagingStudy", "id": study_id(options.source, study_uid)}
    location, contained = _location(study, read)
    if contained:
        resource["contained"] = contained
    resource["identifier"] = _identifiers(study, study_uid, read)
    resource["status"] = "available"
    modalities = read(dj.codes, study, Tag.ModalitiesInStudy) or sorted(
        {s["modality"]["coding"][0]["code"] for s in series}
    )
    if modalities:
        resource["modality"] = [_modality(code) for code in _unique(modalities)]
    patient = _patient(study, read, options) if options.patients else None
    resource["subject"] = _subject(study, read, options, patient)
    started = read.datetime(study, Tag.StudyDate, Tag.StudyTime, options)
    if started:
        resource["started"] = started
    based_on = _accession(study, read, options)
    if based_on:
        resource["basedOn"] = [based_on]
    referrer = _person(study, Tag.ReferringPhysicianName, Tag.ReferringPhysicianIdentificationSequence, 0, read)
    if referrer:
        resource["referrer"] = referrer
    if options.wado_base:
        resource["endpoint"] = [{"reference": f"Endpoint/{endpoint_id(options.wado_base)}"}]
    n_series = read(dj.count, study, Tag.NumberOfStudyRelatedSeries)
    n_instances = read(dj.count, study, Tag.NumberOfStudyRelatedInstances)
    if n_instances is None:
        n_instances = sum(s.get("numberOfInstances", 0) for s in series)
        if n_instances > 2**31 - 1:
            raise MappingError(study_uid, dj.keyword(Tag.NumberOfSeriesRelatedInstances), "the series' counts add up past 2147483647")
    resource["numberOfSeries"] = n_series if n_series is not None else len(series)
    resource["numberOfInstances"] = n_instances
    procedures = [c for item in read(dj.sequence, study, Tag.ProcedureCodeSequence) if (c := _codeable(item, read))]
    if procedures:
        resource["procedure"] = [{"concept": concept} for concept in procedures]
    if location:
        resource["location"] = location
    reason = _reason(study, read)
    if reason:
        resource["reason"] = reason
    description = read(dj.string, study, Tag.StudyDescription)
    if description:
        resource["description"] = description
    if series:
        resource["series"] = series
    return Mapped(resource, tuple(endpoints[k] for k in sorted(endpoints)), patient)


def _unique(items: Iterable[T]) -> list[T]:
    return list(dict.fromkeys(items))


def _modality(code: str) -> Resource:
    coding: Resource = {"system": codes.DCM, "code": code}
    display = codes.modality_display(code)
    if display:
        coding["display"] = display
    return {"coding": [coding]}


def _identifiers(study: Dataset, study_uid: str, read: _Reader) -> list[Resource]:
    out: list[Resource] = [{"system": DICOM_UID, "value": f"urn:oid:{study_uid}"}]
    study_id_value = read(dj.string, study, Tag.StudyID)
    if study_id_value:
        out.append({"use": "secondary", "type": {"text": "DICOM Study ID"}, "value": study_id_value})
    return out


def _issuer_system(local: str | None, universal: str | None, kind: str | None, options: MappingOptions) -> str | None:
    for key in (universal, local):
        if key and key in options.issuer_systems:
            return options.issuer_systems[key]
    if universal:
        kind = (kind or "").upper()
        if kind == "ISO" or (not kind and _OID.match(universal)):
            return f"urn:oid:{universal}"
        if kind in ("URI", "URL"):
            return universal
        if kind == "UUID":
            return f"urn:uuid:{universal.lower()}"
    if local and _OID.match(local):
        return f"urn:oid:{local}"
    return None


def _issuer_item(items: Sequence[Dataset], read: _Reader) -> tuple[str | None, str | None, str | None]:
    if not items:
        return None, None, None
    item = items[0]
    return (
        read(dj.string, item, Tag.LocalNamespaceEntityID),
        read(dj.string, item, Tag.UniversalEntityID),
        read(dj.string, item, Tag.UniversalEntityIDType),
    )


def _identifier(value: str, system: str | None, assigner: str | None) -> Resource:
    identifier: Resource = {}
    if system:
        identifier["system"] = system
    identifier["value"] = value
    if assigner and not system:
        identifier["assigner"] = {"display": assigner}
    return identifier


def _patient_identifier(study: Dataset, read: _Reader, options: MappingOptions) -> Resource | None:
    patient_id = read(dj.string, study, Tag.PatientID)
    if not patient_id:
        return None
    issuer = read(dj.string, study, Tag.IssuerOfPatientID)
    local, universal, kind = _issuer_item(read(dj.sequence, study, Tag.IssuerOfPatientIDQualifiersSequence), read)
    system = _issuer_system(issuer or local, universal, kind, options)
    return _identifier(patient_id, system, issuer or local)


def _subject(study: Dataset, read: _Reader, options: MappingOptions, patient: Resource | None) -> Resource:
    subject: Resource = {"reference": f"Patient/{patient['id']}"} if patient else {}
    subject["type"] = "Patient"
    identifier = _patient_identifier(study, read, options)
    if identifier:
        subject["identifier"] = identifier
    name = read(dj.person_name, study, Tag.PatientName)
    subject["display"] = name or ("Patient without a name" if identifier else "Patient without an ID or name")
    return subject


_GENDER = {"M": "male", "F": "female", "O": "other"}


def _patient(study: Dataset, read: _Reader, options: MappingOptions) -> Resource | None:
    """A Patient per (issuer, Patient ID): the id is the same wherever the pair is seen; without a
    known issuer system, IDs are only unique within one PACS, so the PACS is part of the id."""
    identifier = _patient_identifier(study, read, options)
    if identifier is None:
        return None
    scope = identifier.get("system") or "|".join((options.source, identifier.get("assigner", {}).get("display", "")))
    patient: Resource = {"resourceType": "Patient", "id": resource_id("Patient", scope, identifier["value"]), "identifier": [identifier]}
    raw_names = read(dj.values, study, Tag.PatientName)
    names = []
    for raw in raw_names[:1]:
        text = raw.get("Alphabetic") if isinstance(raw, Mapping) else raw
        if isinstance(text, str) and text.strip():
            names.append(_human_name(text))
    if names:
        patient["name"] = names
    sex = read(dj.string, study, Tag.PatientSex)
    if sex:
        patient["gender"] = _GENDER.get(sex.upper(), "unknown")
    birth = read(dj.string, study, Tag.PatientBirthDate)
    if birth:
        try:
            patient["birthDate"] = fhir_datetime(birth, None, None, None)
        except ValueError as exc:
            raise MappingError(read.study_uid, dj.keyword(Tag.PatientBirthDate), str(exc)) from None
    return patient


def _human_name(pn: str) -> Resource:
    parts = [part.strip() for part in pn.split("=")[0].split("^")] + [""] * 5
    family, given, middle, prefix, suffix = parts[:5]
    name: Resource = {"text": dj.readable_name(pn)}
    if family:
        name["family"] = family
    given_names = [g for g in (given, *middle.split()) if g]
    if given_names:
        name["given"] = given_names
    if prefix:
        name["prefix"] = [prefix]
    if suffix:
        name["suffix"] = [suffix]
    return name


def _accession(study: Dataset, read: _Reader, options: MappingOptions) -> Resource | None:
    accession = read(dj.string, study, Tag.AccessionNumber)
    if not accession:
        return None
    local, universal, kind = _issuer_item(read(dj.sequence, study, Tag.IssuerOfAccessionNumberSequence), read)
    identifier = _identifier(accession, _issuer_system(local, universal, kind, options), local)
    identifier = {
        "type": {"coding": [{"system": codes.V2_0203, "code": "ACSN"}]},
        **identifier,
    }
    return {"type": "ServiceRequest", "identifier": identifier}


def _coding(item: Dataset, read: _Reader) -> Resource | None:
    code = read(dj.code, item, Tag.CodeValue) or read(dj.code, item, Tag.LongCodeValue) or read(dj.code, item, Tag.URNCodeValue)
    designator = read(dj.string, item, Tag.CodingSchemeDesignator)
    meaning = read(dj.string, item, Tag.CodeMeaning)
    if not code:
        return None
    coding: Resource = {}
    if designator:
        coding["system"] = codes.scheme_system(designator)
        version = read(dj.string, item, Tag.CodingSchemeVersion)
        if version:
            coding["version"] = version
    elif item.get(Tag.URNCodeValue):
        coding["system"] = "urn:ietf:rfc:3986"
    coding["code"] = code
    if meaning:
        coding["display"] = meaning
    return coding


def _codeable(item: Dataset, read: _Reader) -> Resource | None:
    coding = _coding(item, read)
    if coding:
        return {"coding": [coding]}
    meaning = read(dj.string, item, Tag.CodeMeaning)
    return {"text": meaning} if meaning else None


def _reason(study: Dataset, read: _Reader) -> list[Resource]:
    concepts = [c for item in read(dj.sequence, study, Tag.ReasonForRequestedProcedureCodeSequence) if (c := _codeable(item, read))]
    if concepts:
        return [{"concept": concept} for concept in concepts]
    text = read(dj.string, study, Tag.ReasonForTheRequestedProcedure)
    return [{"concept": {"text": text}}] if text else []


def _location(study: Dataset, read: _Reader) -> tuple[Resource | None, list[Resource]]:
    name = read(dj.string, study, Tag.InstitutionalDepartmentName)
    types = [c for item in read(dj.sequence, study, Tag.InstitutionalDepartmentTypeCodeSequence) if (c := _codeable(item, read))]
    if not types:
        return ({"type": "Location", "display": name} if name else None), []
    location: Resource = {"resourceType": "Location", "id": "department"}
    if name:
        location["name"] = name
    location["type"] = types
    reference: Resource = {"reference": "#department", "type": "Location"}
    if name:
        reference["display"] = name
    return reference, [location]


def _person(ds: Dataset, name_tag: str, id_tag: str, index: int, read: _Reader) -> Resource | None:
    """A Practitioner reference from a PN value and the matching item of its identification sequence."""
    names = read(dj.person_names, ds, name_tag)
    items = read(dj.sequence, ds, id_tag)
    return _practitioner(names[index] if index < len(names) else None, items[index] if index < len(items) else None, read)


def _practitioner(name: str | None, item: Dataset | None, read: _Reader) -> Resource | None:
    identifier = None
    if item is not None:
        for code_item in read(dj.sequence, item, Tag.PersonIdentificationCodeSequence):
            coding = _coding(code_item, read)
            if coding:
                identifier = {"value": coding["code"]}
                if "system" in coding:
                    identifier = {"system": coding["system"], **identifier}
                break
    if not name and not identifier:
        return None
    reference: Resource = {"type": "Practitioner"}
    if identifier:
        reference["identifier"] = identifier
    if name:
        reference["display"] = name
    return reference


def _people(ds: Dataset, name_tag: str, id_tag: str, read: _Reader) -> list[Resource]:
    names = read(dj.person_names, ds, name_tag)
    items = read(dj.sequence, ds, id_tag)
    people = (
        _practitioner(names[i] if i < len(names) else None, items[i] if i < len(items) else None, read)
        for i in range(max(len(names), len(items)))
    )
    return [p for p in people if p]


def _performers(ds: Dataset, read: _Reader) -> list[Resource]:
    def role(code_display: tuple[str, str]) -> Resource:
        return {"coding": [{"system": codes.PARTICIPATION_TYPE, "code": code_display[0], "display": code_display[1]}]}

    physicians = _people(ds, Tag.PerformingPhysicianName, Tag.PerformingPhysicianIdentificationSequence, read)
    operators = _people(ds, Tag.OperatorsName, Tag.OperatorIdentificationSequence, read)
    out = [{"function": role(codes.PERFORMER), "actor": actor} for actor in physicians]
    operator_role = role(codes.SECONDARY_PERFORMER) if physicians else role(codes.PERFORMER)
    out += [{"function": operator_role, "actor": actor} for actor in operators]
    device = " ".join(
        part for part in (read(dj.string, ds, Tag.Manufacturer), read(dj.string, ds, Tag.ManufacturerModelName)) if part
    )
    if device:
        out.append({"function": role(codes.PERFORMER), "actor": {"type": "Device", "display": device}})
    institution = read(dj.string, ds, Tag.InstitutionName)
    if institution:
        out.append({"function": role(codes.PERFORMER), "actor": {"type": "Organization", "display": institution}})
    return out


def _body_site(ds: Dataset, read: _Reader) -> Resource | None:
    body_part = read(dj.string, ds, Tag.BodyPartExamined)
    if body_part:
        found = codes.body_part(body_part)
        if found:
            code, meaning = found
            return {"concept": {"coding": [{"system": codes.SNOMED, "code": code, "display": meaning}]}}
    for item in read(dj.sequence, ds, Tag.AnatomicRegionSequence):
        concept = _codeable(item, read)
        if concept:
            return {"concept": concept}
    return {"concept": {"text": body_part}} if body_part else None


def _laterality(ds: Dataset, read: _Reader) -> Resource | None:
    value = read(dj.code, ds, Tag.Laterality)
    if not value:
        return None
    found = codes.LATERALITY.get(value.upper())
    if not found:
        return {"text": value}
    code, display = found
    return {"coding": [{"system": codes.SNOMED, "code": code, "display": display}]}


def _specimens(instances: Sequence[Dataset], read: _Reader, options: MappingOptions) -> list[Resource]:
    found: dict[tuple[str | None, str], Resource] = {}
    for instance in instances:
        if Tag.SpecimenDescriptionSequence not in instance:
            continue
        for item in read(dj.sequence, instance, Tag.SpecimenDescriptionSequence):
            specimen_id = read(dj.string, item, Tag.SpecimenIdentifier)
            specimen_uid = read(dj.uid, item, Tag.SpecimenUID)
            if specimen_id:
                local, universal, kind = _issuer_item(read(dj.sequence, item, Tag.IssuerOfTheSpecimenIdentifierSequence), read)
                identifier = _identifier(specimen_id, _issuer_system(local, universal, kind, options), local)
            elif specimen_uid:
                identifier = {"system": DICOM_UID, "value": f"urn:oid:{specimen_uid}"}
            else:
                continue
            found.setdefault((identifier.get("system"), identifier["value"]), {"type": "Specimen", "identifier": identifier})
    return list(found.values())


def _instance_order(instance: Resource) -> tuple[bool, int, str]:
    number = instance.get("number")
    return (number is None, number or 0, instance["uid"])


def _sort_key(number: int | None, uid: str) -> tuple[bool, int, str]:
    return (number is None, number or 0, uid)


def _instance(ds: Dataset, uid: str, read: _Reader) -> Resource:
    out: Resource = {"uid": uid}
    sop_class = read(dj.uid, ds, Tag.SOPClassUID)
    if not sop_class:
        raise MappingError(read.study_uid, dj.keyword(Tag.SOPClassUID), f"missing in instance {uid}")
    out["sopClass"] = _sop_coding(sop_class)
    number = read(dj.count, ds, Tag.InstanceNumber)
    if number is not None:
        out["number"] = number
    title = read(dj.string, ds, Tag.DocumentTitle) or "\\".join(read(dj.strings, ds, Tag.ImageType))
    if title:
        out["title"] = title
    return out


_FAST_UID = re.compile(r"[0-9A-Za-z.\-]{1,64}").fullmatch
_SOP_CODINGS: dict[str, Resource] = {}


def _fast_uid(ds: Dataset, tag: str, known: set[str] | None = None) -> str | None:
    """The common, well-formed case of dj.uid without its checks' overhead; None sends the
    caller to the careful reader (which also raises the precise MappingError). ``known`` holds
    UIDs already checked (series and SOP class UIDs repeat across instances)."""
    element = ds.get(tag)
    if type(element) is not dict:
        return None
    value = element.get("Value")
    if type(value) is not list or len(value) != 1:
        return None
    uid = value[0]
    if type(uid) is not str:
        return None
    if known is not None and uid in known:
        return uid
    if _FAST_UID(uid):
        if known is not None:
            known.add(uid)
        return uid
    return None


def _sop_coding(sop_class: str) -> Resource:
    """The sopClass Coding; one shared (never mutated) dict per SOP class."""
    coding = _SOP_CODINGS.get(sop_class)
    if coding is None:
        coding = {"system": codes.SOP_CLASS_SYSTEM, "code": f"urn:oid:{sop_class}"}
        name = codes.sop_class_name(sop_class)
        if name:
            coding["display"] = name
        if len(_SOP_CODINGS) < 4096:
            _SOP_CODINGS[sop_class] = coding
    return coding


class _Fast:
    """Per-study caches for the fast path: UIDs checked, Image Type values joined."""

    __slots__ = ("uids", "titles")

    def __init__(self) -> None:
        self.uids: set[str] = set()
        self.titles: dict[tuple, str | None] = {}


def _fast_instance(ds: Dataset, uid: str, fast: _Fast) -> Resource | None:
    """An instance from well-formed attributes, or None to take the careful path. Per-instance
    work dominates the mapping of large studies, so the common case is read directly."""
    sop_class = _fast_uid(ds, Tag.SOPClassUID, fast.uids)
    if sop_class is None or Tag.DocumentTitle in ds:
        return None
    out: Resource = {"uid": uid, "sopClass": _sop_coding(sop_class)}
    element = ds.get(Tag.InstanceNumber)
    if element is not None:
        if type(element) is not dict:
            return None
        value = element.get("Value")
        if value:
            if type(value) is not list or len(value) != 1:
                return None
            number = value[0]
            if type(number) is not int or not 0 <= number <= 2**31 - 1:
                return None
            out["number"] = number
    element = ds.get(Tag.ImageType)
    if element is not None:
        if type(element) is not dict:
            return None
        value = element.get("Value")
        if value:
            if type(value) is not list:
                return None
            key = tuple(value)
            title = fast.titles.get(key, False)
            if title is False:
                title = "\\".join(value) if all(type(v) is str and v and v == v.strip() for v in value) else None
                fast.titles[key] = title
            if title is None:
                return None
            out["title"] = title
    return out


def _retrieve_base(ds: Dataset, read: _Reader) -> str | None:
    """The DICOMweb base of a Retrieve URL (0008,1190): everything before ``/studies/``."""
    url = read(dj.string, ds, Tag.RetrieveURL)
    if not url or "/studies/" not in url:
        return None
    return normalise_base(url.split("/studies/", 1)[0])


def _series(
    data: StudyInput, read: _Reader, options: MappingOptions, study: Dataset, endpoints: dict[str, Resource]
) -> list[Resource]:
    """Series with their instances. A series whose Retrieve URL names another DICOMweb base than
    the study's gets an Endpoint of its own (collected in ``endpoints``)."""
    study_base = _retrieve_base(study, read)
    fast = _Fast()
    grouped: dict[str, list[Dataset]] = {}
    for instance in data.instances:
        series_uid = _fast_uid(instance, Tag.SeriesInstanceUID, fast.uids) or read(dj.uid, instance, Tag.SeriesInstanceUID)
        if not series_uid:
            raise MappingError(read.study_uid, dj.keyword(Tag.SeriesInstanceUID), "missing in an instance result")
        grouped.setdefault(series_uid, []).append(instance)
    series_results: dict[str, Dataset] = {}
    for item in data.series:
        series_uid = read(dj.uid, item, Tag.SeriesInstanceUID)
        if not series_uid:
            raise MappingError(read.study_uid, dj.keyword(Tag.SeriesInstanceUID), "missing in a series result")
        series_results[series_uid] = item
        grouped.setdefault(series_uid, [])

    built = []
    for series_uid, instances in grouped.items():
        ds = {**(instances[0] if instances else {}), **series_results.get(series_uid, {})}
        number = read(dj.count, ds, Tag.SeriesNumber)
        out: Resource = {"uid": series_uid}
        if number is not None:
            out["number"] = number
        modality = read(dj.code, ds, Tag.Modality)
        if not modality:
            raise MappingError(read.study_uid, dj.keyword(Tag.Modality), f"missing in series {series_uid}")
        out["modality"] = _modality(modality)
        description = read(dj.string, ds, Tag.SeriesDescription)
        if description:
            out["description"] = description
        reported = read(dj.count, ds, Tag.NumberOfSeriesRelatedInstances)
        out["numberOfInstances"] = reported if reported is not None else len(instances)
        series_base = _retrieve_base(ds, read)
        if series_base and study_base and series_base != study_base:
            endpoints.setdefault(series_base, endpoint(series_base))
            out["endpoint"] = [{"reference": f"Endpoint/{endpoint_id(series_base)}"}]
        elif options.wado_base:
            out["endpoint"] = [{"reference": f"Endpoint/{endpoint_id(options.wado_base)}"}]
        body_site = _body_site(ds, read)
        if body_site:
            out["bodySite"] = body_site
        laterality = _laterality(ds, read)
        if laterality:
            out["laterality"] = laterality
        specimens = _specimens(instances, read, options)
        if specimens:
            out["specimen"] = specimens
        started = read.datetime(ds, Tag.SeriesDate, Tag.SeriesTime, options, study)
        if started:
            out["started"] = started
        performers = _performers(ds, read)
        if performers:
            out["performer"] = performers
        mapped_instances = {}
        for instance in instances:
            uid = _fast_uid(instance, Tag.SOPInstanceUID) or read(dj.uid, instance, Tag.SOPInstanceUID)
            if not uid:
                raise MappingError(read.study_uid, dj.keyword(Tag.SOPInstanceUID), f"missing in series {series_uid}")
            if uid not in mapped_instances:
                mapped_instances[uid] = _fast_instance(instance, uid, fast) or _instance(instance, uid, read)
        if mapped_instances:
            out["instance"] = sorted(mapped_instances.values(), key=_instance_order)
        built.append(out)
    return sorted(built, key=lambda s: _sort_key(s.get("number"), s["uid"]))

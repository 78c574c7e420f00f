"""DICOM JSON -> FHIR R5 ImagingStudy, as plain data. Pure: no I/O, no models, no clock.

Attributes are read by small readers (``_string``, ``_count``, ``_items`` ...) that take the
well-formed shapes of DICOM JSON directly and hand anything else to the readers of
:mod:`crawler.dicomjson` through ``_careful``, which turns their ValueErrors into MappingErrors
naming the study and the attribute. Both ways give the same values; the direct one saves the
fixed cost every study pays, whatever its size. ``uid`` is the Study Instance UID the errors
name (None until it is known).

Elements that depend only on a code (sopClass, modality, body site, laterality, performer
function, identifier types, endpoint references) are built once and shared by every resource
that has them: they must not be changed in place.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import lru_cache
from operator import itemgetter
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
_FAST_UID = re.compile(r"[0-9A-Za-z.\-]{1,64}").fullmatch
_UNSIGNED_INT_MAX = 2**31 - 1

# Tags as module globals: CPython 3.11 specialises reading a global, not a class attribute.
_ACCESSION_NUMBER = Tag.AccessionNumber
_ANATOMIC_REGION_SEQUENCE = Tag.AnatomicRegionSequence
_BODY_PART_EXAMINED = Tag.BodyPartExamined
_CODE_MEANING = Tag.CodeMeaning
_CODE_VALUE = Tag.CodeValue
_CODING_SCHEME_DESIGNATOR = Tag.CodingSchemeDesignator
_CODING_SCHEME_VERSION = Tag.CodingSchemeVersion
_DOCUMENT_TITLE = Tag.DocumentTitle
_IMAGE_TYPE = Tag.ImageType
_INSTANCE_NUMBER = Tag.InstanceNumber
_INSTITUTIONAL_DEPARTMENT_NAME = Tag.InstitutionalDepartmentName
_INSTITUTIONAL_DEPARTMENT_TYPE_CODE_SEQUENCE = Tag.InstitutionalDepartmentTypeCodeSequence
_INSTITUTION_NAME = Tag.InstitutionName
_ISSUER_OF_ACCESSION_NUMBER_SEQUENCE = Tag.IssuerOfAccessionNumberSequence
_ISSUER_OF_PATIENT_ID = Tag.IssuerOfPatientID
_ISSUER_OF_PATIENT_ID_QUALIFIERS_SEQUENCE = Tag.IssuerOfPatientIDQualifiersSequence
_ISSUER_OF_THE_SPECIMEN_IDENTIFIER_SEQUENCE = Tag.IssuerOfTheSpecimenIdentifierSequence
_LATERALITY = Tag.Laterality
_LOCAL_NAMESPACE_ENTITY_ID = Tag.LocalNamespaceEntityID
_LONG_CODE_VALUE = Tag.LongCodeValue
_MANUFACTURER = Tag.Manufacturer
_MANUFACTURER_MODEL_NAME = Tag.ManufacturerModelName
_MODALITIES_IN_STUDY = Tag.ModalitiesInStudy
_MODALITY = Tag.Modality
_NUMBER_OF_SERIES_RELATED_INSTANCES = Tag.NumberOfSeriesRelatedInstances
_NUMBER_OF_STUDY_RELATED_INSTANCES = Tag.NumberOfStudyRelatedInstances
_NUMBER_OF_STUDY_RELATED_SERIES = Tag.NumberOfStudyRelatedSeries
_OPERATORS_NAME = Tag.OperatorsName
_OPERATOR_IDENTIFICATION_SEQUENCE = Tag.OperatorIdentificationSequence
_PATIENT_BIRTH_DATE = Tag.PatientBirthDate
_PATIENT_ID = Tag.PatientID
_PATIENT_NAME = Tag.PatientName
_PATIENT_SEX = Tag.PatientSex
_PERFORMING_PHYSICIAN_IDENTIFICATION_SEQUENCE = Tag.PerformingPhysicianIdentificationSequence
_PERFORMING_PHYSICIAN_NAME = Tag.PerformingPhysicianName
_PERSON_IDENTIFICATION_CODE_SEQUENCE = Tag.PersonIdentificationCodeSequence
_PROCEDURE_CODE_SEQUENCE = Tag.ProcedureCodeSequence
_REASON_FOR_REQUESTED_PROCEDURE_CODE_SEQUENCE = Tag.ReasonForRequestedProcedureCodeSequence
_REASON_FOR_THE_REQUESTED_PROCEDURE = Tag.ReasonForTheRequestedProcedure
_REFERRING_PHYSICIAN_IDENTIFICATION_SEQUENCE = Tag.ReferringPhysicianIdentificationSequence
_REFERRING_PHYSICIAN_NAME = Tag.ReferringPhysicianName
_RETRIEVE_URL = Tag.RetrieveURL
_SERIES_DATE = Tag.SeriesDate
_SERIES_DESCRIPTION = Tag.SeriesDescription
_SERIES_INSTANCE_UID = Tag.SeriesInstanceUID
_SERIES_NUMBER = Tag.SeriesNumber
_SERIES_TIME = Tag.SeriesTime
_SOP_CLASS_UID = Tag.SOPClassUID
_SOP_INSTANCE_UID = Tag.SOPInstanceUID
_SPECIMEN_DESCRIPTION_SEQUENCE = Tag.SpecimenDescriptionSequence
_SPECIMEN_IDENTIFIER = Tag.SpecimenIdentifier
_SPECIMEN_UID = Tag.SpecimenUID
_STUDY_DATE = Tag.StudyDate
_STUDY_DESCRIPTION = Tag.StudyDescription
_STUDY_ID = Tag.StudyID
_STUDY_INSTANCE_UID = Tag.StudyInstanceUID
_STUDY_TIME = Tag.StudyTime
_TIMEZONE_OFFSET_FROM_UTC = Tag.TimezoneOffsetFromUTC
_UNIVERSAL_ENTITY_ID = Tag.UniversalEntityID
_UNIVERSAL_ENTITY_ID_TYPE = Tag.UniversalEntityIDType
_URN_CODE_VALUE = Tag.URNCodeValue

T = TypeVar("T")
Resource = dict[str, Any]


# --------------------------------------------------------------------------------------------
# Readers
# --------------------------------------------------------------------------------------------


def _careful(read: Callable[[Dataset, str], T], ds: Dataset, tag: str, uid: str | None) -> T:
    """``read(ds, tag)``, its ValueError as a MappingError naming the study and the attribute."""
    try:
        return read(ds, tag)
    except ValueError as exc:
        raise MappingError(uid, dj.keyword(tag), str(exc)) from None


def _values(ds: Dataset, tag: str) -> list[Any] | None:
    """The attribute's Value list as it came; ``[]`` when the attribute or its Value is
    missing; None for any other shape, which the fast readers leave to the careful ones."""
    element = ds.get(tag)
    if element is None:
        return []
    if type(element) is dict:
        value = element.get("Value")
        if value is None:
            return []
        if type(value) is list:
            return value
    return None


def _string(ds: Dataset, tag: str, uid: str | None) -> str | None:
    """``dj.string``."""
    values = _values(ds, tag)
    if values == []:
        return None
    if values is not None:
        text = values[0]
        if type(text) is str:
            text = text.strip()
            if text:
                return text
    return _careful(dj.string, ds, tag, uid)


def _code(ds: Dataset, tag: str, uid: str | None) -> str | None:
    """``dj.code``."""
    text = _string(ds, tag, uid)
    if text is None or text.isalnum():
        return text
    return " ".join(text.split()) or None


def _codes(ds: Dataset, tag: str, uid: str | None) -> list[str]:
    """``dj.codes``."""
    values = _values(ds, tag)
    if values is not None:
        out = []
        for item in values:
            if type(item) is not str:
                break
            code = item if item.isalnum() else " ".join(item.split())
            if code:
                out.append(code)
        else:
            return out
    return _careful(dj.codes, ds, tag, uid)


def _count(ds: Dataset, tag: str, uid: str | None) -> int | None:
    """``dj.count``."""
    values = _values(ds, tag)
    if values == []:
        return None
    if values is not None:
        number = values[0]
        if type(number) is int and 0 <= number <= _UNSIGNED_INT_MAX:
            return number
    return _careful(dj.count, ds, tag, uid)


def _items(ds: Dataset, tag: str, uid: str | None) -> Sequence[Dataset]:
    """``dj.sequence``."""
    values = _values(ds, tag)
    if values is not None:
        for item in values:
            if type(item) is not dict:
                break
        else:
            return values
    return _careful(dj.sequence, ds, tag, uid)


def _names(ds: Dataset, tag: str, uid: str | None) -> list[str]:
    """``dj.person_names``."""
    values = _values(ds, tag)
    if values is not None:
        names = []
        for item in values:
            if type(item) is not dict:
                break
            raw = item.get("Alphabetic")
            if type(raw) is not str or not raw:
                break
            name = dj.readable_name(raw)
            if name:
                names.append(name)
        else:
            return names
    return _careful(dj.person_names, ds, tag, uid)


def _fast_uid(ds: Dataset, tag: str) -> str | None:
    """``dj.uid`` when the first value is a well-formed UID (which the careful reader would
    return as it is), else None: the careful reader decides."""
    element = ds.get(tag)
    if type(element) is not dict:
        return None
    value = element.get("Value")
    if type(value) is not list or not value:
        return None
    uid = value[0]
    if type(uid) is not str or not _FAST_UID(uid):
        return None
    return uid


def _uid(ds: Dataset, tag: str, uid: str | None) -> str | None:
    """``dj.uid``."""
    return _fast_uid(ds, tag) or _careful(dj.uid, ds, tag, uid)


def _datetime(ds: Dataset, date_tag: str, time_tag: str, uid: str | None, zone: Any, study: Dataset | None = None) -> str | None:
    """Date + time as FHIR dateTime; the offset from ``ds``, else from the study's attributes."""
    date = _string(ds, date_tag, uid)
    time = _string(ds, time_tag, uid)
    offset = _string(ds, _TIMEZONE_OFFSET_FROM_UTC, uid)
    if offset is None and study is not None:
        offset = _string(study, _TIMEZONE_OFFSET_FROM_UTC, uid)
    try:
        return fhir_datetime(date, time, offset, zone)
    except ValueError as exc:
        raise MappingError(uid, f"{dj.keyword(date_tag)} + {dj.keyword(time_tag)}", str(exc)) from None


# --------------------------------------------------------------------------------------------
# The study
# --------------------------------------------------------------------------------------------


def map_study(data: StudyInput, options: MappingOptions) -> Resource:
    """One ImagingStudy (R5 JSON as a dict) for one study.

    Raises MappingError (naming the study and the attribute) for data that cannot be mapped.
    """
    return _map(data, options)[0]


def map_resources(data: StudyInput, options: MappingOptions) -> Mapped:
    """The ImagingStudy of one study with the Endpoints and Patient it refers to."""
    return Mapped(*_map(data, options))


def _map(data: StudyInput, options: MappingOptions) -> tuple[Resource, tuple[Resource, ...], Resource | None]:
    if type(data.study) is not dict and not isinstance(data.study, Mapping):
        raise MappingError(None, "study", "search result is not a JSON object")
    study = {**_first_object(data.series), **_first_object(data.instances), **data.study}
    uid = _uid(study, _STUDY_INSTANCE_UID, None)
    if not uid:
        raise MappingError(None, dj.keyword(_STUDY_INSTANCE_UID), "missing")
    if not _all_objects(data.instances):
        raise MappingError(uid, "instances", "a search result is not a JSON object")
    if not _all_objects(data.series):
        raise MappingError(uid, "series", "a search result is not a JSON object")

    endpoints: dict[str, Resource] = {}
    series = _series(data, uid, options, study, endpoints)
    resource: Resource = {"resourceType": "ImagingStudy", "id": study_id(options.source, uid)}
    location, contained = _location(study, uid)
    if contained:
        resource["contained"] = contained
    resource["identifier"] = _identifiers(study, uid)
    resource["status"] = "available"
    modalities = _codes(study, _MODALITIES_IN_STUDY, uid) or sorted({s["modality"]["coding"][0]["code"] for s in series if "coding" in s["modality"]})
    if modalities:
        resource["modality"] = _modalities(modalities)
    patient = _patient(study, uid, options) if options.patients else None
    resource["subject"] = _subject(study, uid, options, patient)
    started = _datetime(study, _STUDY_DATE, _STUDY_TIME, uid, options.zone)
    if started:
        resource["started"] = started
    based_on = _accession(study, uid, options)
    if based_on:
        resource["basedOn"] = [based_on]
    names = _names(study, _REFERRING_PHYSICIAN_NAME, uid)
    items = _items(study, _REFERRING_PHYSICIAN_IDENTIFICATION_SEQUENCE, uid)
    referrer = _practitioner(names[0] if names else None, items[0] if items else None, uid)
    if referrer:
        resource["referrer"] = referrer
    if options.wado_base:
        resource["endpoint"] = _endpoint_reference(options.wado_base)
    n_series = _count(study, _NUMBER_OF_STUDY_RELATED_SERIES, uid)
    n_instances = _count(study, _NUMBER_OF_STUDY_RELATED_INSTANCES, uid)
    if n_instances is None:
        n_instances = sum(s.get("numberOfInstances", 0) for s in series)
        if n_instances > _UNSIGNED_INT_MAX:
            raise MappingError(uid, dj.keyword(_NUMBER_OF_SERIES_RELATED_INSTANCES), "the series' counts add up past 2147483647")
    resource["numberOfSeries"] = n_series if n_series is not None else len(series)
    resource["numberOfInstances"] = n_instances
    procedures = _concepts(study, _PROCEDURE_CODE_SEQUENCE, uid, wrap=True)
    if procedures:
        resource["procedure"] = procedures
    if location:
        resource["location"] = location
    reason = _reason(study, uid)
    if reason:
        resource["reason"] = reason
    description = _string(study, _STUDY_DESCRIPTION, uid)
    if description:
        resource["description"] = description
    if series:
        resource["series"] = series
    return resource, tuple(endpoints[k] for k in sorted(endpoints)) if endpoints else (), patient


def absent() -> list[Resource]:
    """FHIR's data-absent-reason extension ``unknown``, for a required element DICOM left empty
    (a series without Modality, a patient without a name or an ID): a fresh list each time."""
    return [{"url": codes.DATA_ABSENT_REASON, "valueCode": "unknown"}]


def _first_object(items: Iterable[Any]) -> Dataset:
    for item in items:
        if type(item) is dict or isinstance(item, Mapping):
            return item
    return {}


def _all_objects(items: Iterable[Any]) -> bool:
    for item in items:
        if type(item) is not dict and not isinstance(item, Mapping):
            return False
    return True


@lru_cache(maxsize=64)
def _endpoint_reference(wado_base: str) -> list[Resource]:
    """The ``endpoint`` element for a WADO-RS base; shared, never mutated."""
    return [{"reference": f"Endpoint/{endpoint_id(wado_base)}"}]


def _modalities(values: Iterable[str]) -> list[Resource]:
    out = []
    for code in dict.fromkeys(values):
        out.append(_modality(code))
    return out


_MODALITY_CONCEPTS: dict[str, Resource] = {}


def _modality(code: str) -> Resource:
    """The CodeableConcept of a modality; shared, never mutated."""
    concept = _MODALITY_CONCEPTS.get(code)
    if concept is None:
        display = codes.modality_display(code)
        coding = {"system": codes.DCM, "code": code, "display": display} if display else {"system": codes.DCM, "code": code}
        concept = {"coding": [coding]}
        if len(_MODALITY_CONCEPTS) < 1024:
            _MODALITY_CONCEPTS[code] = concept
    return concept


_STUDY_ID_TYPE: Resource = {"text": "DICOM Study ID"}
_ACCESSION_TYPE: Resource = {"coding": [{"system": codes.V2_0203, "code": "ACSN"}]}


def _identifiers(study: Dataset, uid: str) -> list[Resource]:
    out: list[Resource] = [{"system": DICOM_UID, "value": f"urn:oid:{uid}"}]
    study_id_value = _string(study, _STUDY_ID, uid)
    if study_id_value:
        out.append({"use": "secondary", "type": _STUDY_ID_TYPE, "value": study_id_value})
    return out


def _issuer_system(local: str | None, universal: str | None, kind: str | None, options: MappingOptions) -> str | None:
    systems = options.issuer_systems
    if systems:
        for key in (universal, local):
            if key and key in systems:
                return systems[key]
    if universal:
        kind = kind.upper() if kind else ""
        if kind == "ISO" or (not kind and _OID.match(universal)):
            return f"urn:oid:{universal}"
        if kind in ("URI", "URL"):
            return universal
        if kind == "UUID":
            return f"urn:uuid:{universal.lower()}"
    if local and _OID.match(local):
        return f"urn:oid:{local}"
    return None


def _issuer_item(items: Sequence[Dataset], uid: str) -> tuple[str | None, str | None, str | None]:
    if not items:
        return None, None, None
    item = items[0]
    return (
        _string(item, _LOCAL_NAMESPACE_ENTITY_ID, uid),
        _string(item, _UNIVERSAL_ENTITY_ID, uid),
        _string(item, _UNIVERSAL_ENTITY_ID_TYPE, uid),
    )


def _identifier(value: str, system: str | None, assigner: str | None) -> Resource:
    if system:
        return {"system": system, "value": value}
    if assigner:
        return {"value": value, "assigner": {"display": assigner}}
    return {"value": value}


def _patient_identifier(study: Dataset, uid: str, options: MappingOptions) -> Resource | None:
    patient_id = _string(study, _PATIENT_ID, uid)
    if not patient_id:
        return None
    issuer = _string(study, _ISSUER_OF_PATIENT_ID, uid)
    local, universal, kind = _issuer_item(_items(study, _ISSUER_OF_PATIENT_ID_QUALIFIERS_SEQUENCE, uid), uid)
    system = _issuer_system(issuer or local, universal, kind, options)
    return _identifier(patient_id, system, issuer or local)


def _subject(study: Dataset, uid: str, options: MappingOptions, patient: Resource | None) -> Resource:
    subject: Resource = {"reference": f"Patient/{patient['id']}", "type": "Patient"} if patient else {"type": "Patient"}
    identifier = _patient_identifier(study, uid, options)
    if identifier:
        subject["identifier"] = identifier
    names = _names(study, _PATIENT_NAME, uid)
    if names:
        subject["display"] = names[0]
    elif not identifier:
        subject["extension"] = absent()   # Reference's ref-2 wants a reference, identifier, display or extension
    return subject


_GENDER = {"M": "male", "F": "female", "O": "other"}


def _patient(study: Dataset, uid: str, options: MappingOptions) -> Resource | None:
    """A Patient per (issuer, Patient ID): the id is the same wherever the pair is seen; without a
    known issuer system, IDs are only unique within one PACS, so the PACS is part of the id."""
    identifier = _patient_identifier(study, uid, options)
    if identifier is None:
        return None
    scope = identifier.get("system") or "|".join((options.source, identifier.get("assigner", {}).get("display", "")))
    patient: Resource = {"resourceType": "Patient", "id": resource_id("Patient", scope, identifier["value"]), "identifier": [identifier]}
    raw_names = _careful(dj.values, study, _PATIENT_NAME, uid)
    names = []
    for raw in raw_names[:1]:
        text = raw.get("Alphabetic") if isinstance(raw, Mapping) else raw
        if isinstance(text, str) and text.strip():
            names.append(_human_name(text))
    if names:
        patient["name"] = names
    sex = _string(study, _PATIENT_SEX, uid)
    if sex:
        patient["gender"] = _GENDER.get(sex.upper(), "unknown")
    birth = _string(study, _PATIENT_BIRTH_DATE, uid)
    if birth:
        try:
            patient["birthDate"] = fhir_datetime(birth, None, None, None)
        except ValueError as exc:
            raise MappingError(uid, dj.keyword(_PATIENT_BIRTH_DATE), str(exc)) from None
    return patient


def _human_name(pn: str) -> Resource:
    family, given, middle, prefix, suffix = (part.strip() for part in (pn.partition("=")[0] + "^^^^").split("^")[:5])
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


def _accession(study: Dataset, uid: str, options: MappingOptions) -> Resource | None:
    accession = _string(study, _ACCESSION_NUMBER, uid)
    if not accession:
        return None
    local, universal, kind = _issuer_item(_items(study, _ISSUER_OF_ACCESSION_NUMBER_SEQUENCE, uid), uid)
    system = _issuer_system(local, universal, kind, options)
    identifier: Resource = {"type": _ACCESSION_TYPE}
    if system:
        identifier["system"] = system
    identifier["value"] = accession
    if local and not system:
        identifier["assigner"] = {"display": local}
    return {"type": "ServiceRequest", "identifier": identifier}


def _coding(item: Dataset, uid: str) -> Resource | None:
    code = _code(item, _CODE_VALUE, uid) or _code(item, _LONG_CODE_VALUE, uid) or _code(item, _URN_CODE_VALUE, uid)
    designator = _string(item, _CODING_SCHEME_DESIGNATOR, uid)
    meaning = _string(item, _CODE_MEANING, uid)
    if not code:
        return None
    if designator:
        coding: Resource = {"system": codes.scheme_system(designator)}
        version = _string(item, _CODING_SCHEME_VERSION, uid)
        if version:
            coding["version"] = version
    elif item.get(_URN_CODE_VALUE):
        coding = {"system": "urn:ietf:rfc:3986"}
    else:
        coding = {}
    coding["code"] = code
    if meaning:
        coding["display"] = meaning
    return coding


def _codeable(item: Dataset, uid: str) -> Resource | None:
    coding = _coding(item, uid)
    if coding:
        return {"coding": [coding]}
    meaning = _string(item, _CODE_MEANING, uid)
    return {"text": meaning} if meaning else None


def _concepts(ds: Dataset, tag: str, uid: str, wrap: bool = False) -> list[Resource]:
    """The CodeableConcepts of a code sequence's items (those that make one); with ``wrap``, as
    the ``concept`` of CodeableReferences."""
    out = []
    for item in _items(ds, tag, uid):
        concept = _codeable(item, uid)
        if concept:
            out.append({"concept": concept} if wrap else concept)
    return out


def _reason(study: Dataset, uid: str) -> list[Resource]:
    concepts = _concepts(study, _REASON_FOR_REQUESTED_PROCEDURE_CODE_SEQUENCE, uid, wrap=True)
    if concepts:
        return concepts
    text = _string(study, _REASON_FOR_THE_REQUESTED_PROCEDURE, uid)
    return [{"concept": {"text": text}}] if text else []


def _location(study: Dataset, uid: str) -> tuple[Resource | None, list[Resource]]:
    name = _string(study, _INSTITUTIONAL_DEPARTMENT_NAME, uid)
    types = _concepts(study, _INSTITUTIONAL_DEPARTMENT_TYPE_CODE_SEQUENCE, uid)
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


def _practitioner(name: str | None, item: Dataset | None, uid: str) -> Resource | None:
    """A Practitioner reference from a PN value and the matching item of its identification sequence."""
    identifier = None
    if item is not None:
        for code_item in _items(item, _PERSON_IDENTIFICATION_CODE_SEQUENCE, uid):
            coding = _coding(code_item, uid)
            if coding:
                system = coding.get("system")
                identifier = {"system": system, "value": coding["code"]} if system else {"value": coding["code"]}
                break
    if identifier:
        if name:
            return {"type": "Practitioner", "identifier": identifier, "display": name}
        return {"type": "Practitioner", "identifier": identifier}
    return {"type": "Practitioner", "display": name} if name else None


# --------------------------------------------------------------------------------------------
# Series
# --------------------------------------------------------------------------------------------


def _people(ds: Dataset, name_tag: str, id_tag: str, uid: str) -> list[Resource]:
    """Practitioner references from a PN attribute and its identification sequence, pairwise."""
    names = _names(ds, name_tag, uid)
    items = _items(ds, id_tag, uid)
    out = []
    for index in range(max(len(names), len(items))):
        person = _practitioner(names[index] if index < len(names) else None, items[index] if index < len(items) else None, uid)
        if person:
            out.append(person)
    return out


def _role(code_display: tuple[str, str]) -> Resource:
    return {"coding": [{"system": codes.PARTICIPATION_TYPE, "code": code_display[0], "display": code_display[1]}]}


_PERFORMER = _role(codes.PERFORMER)
_SECONDARY_PERFORMER = _role(codes.SECONDARY_PERFORMER)


def _performers(ds: Dataset, uid: str) -> list[Resource]:
    physicians = _people(ds, _PERFORMING_PHYSICIAN_NAME, _PERFORMING_PHYSICIAN_IDENTIFICATION_SEQUENCE, uid)
    operators = _people(ds, _OPERATORS_NAME, _OPERATOR_IDENTIFICATION_SEQUENCE, uid)
    out = []
    for actor in physicians:
        out.append({"function": _PERFORMER, "actor": actor})
    if operators:
        operator_role = _SECONDARY_PERFORMER if physicians else _PERFORMER
        for actor in operators:
            out.append({"function": operator_role, "actor": actor})
    manufacturer = _string(ds, _MANUFACTURER, uid)
    model = _string(ds, _MANUFACTURER_MODEL_NAME, uid)
    device = f"{manufacturer} {model}" if manufacturer and model else manufacturer or model
    if device:
        out.append({"function": _PERFORMER, "actor": {"type": "Device", "display": device}})
    institution = _string(ds, _INSTITUTION_NAME, uid)
    if institution:
        out.append({"function": _PERFORMER, "actor": {"type": "Organization", "display": institution}})
    return out


def _body_site(ds: Dataset, uid: str) -> Resource | None:
    body_part = _string(ds, _BODY_PART_EXAMINED, uid)
    if body_part:
        coded = _coded_body_site(body_part)
        if coded:
            return coded
    for item in _items(ds, _ANATOMIC_REGION_SEQUENCE, uid):
        concept = _codeable(item, uid)
        if concept:
            return {"concept": concept}
    return {"concept": {"text": body_part}} if body_part else None


@lru_cache(maxsize=256)
def _coded_body_site(body_part: str) -> Resource | None:
    """The bodySite for a Body Part Examined that Annex L codes; shared, never mutated."""
    found = codes.body_part(body_part)
    if not found:
        return None
    return {"concept": {"coding": [{"system": codes.SNOMED, "code": found[0], "display": found[1]}]}}


_LATERALITIES: dict[str, Resource] = {
    value: {"coding": [{"system": codes.SNOMED, "code": code, "display": display}]}
    for value, (code, display) in codes.LATERALITY.items()
}


def _laterality(ds: Dataset, uid: str) -> Resource | None:
    value = _code(ds, _LATERALITY, uid)
    if not value:
        return None
    return _LATERALITIES.get(value.upper()) or {"text": value}


def _specimens(instances: Sequence[Dataset], uid: str, options: MappingOptions) -> list[Resource]:
    found: dict[tuple[str | None, str], Resource] = {}
    for instance in instances:
        for item in _careful(dj.sequence, instance, _SPECIMEN_DESCRIPTION_SEQUENCE, uid):
            specimen_id = _careful(dj.string, item, _SPECIMEN_IDENTIFIER, uid)
            specimen_uid = _careful(dj.uid, item, _SPECIMEN_UID, uid)
            if specimen_id:
                issuer = _careful(dj.sequence, item, _ISSUER_OF_THE_SPECIMEN_IDENTIFIER_SEQUENCE, uid)
                local, universal, kind = _issuer_item(issuer, uid)
                identifier = _identifier(specimen_id, _issuer_system(local, universal, kind, options), local)
            elif specimen_uid:
                identifier = {"system": DICOM_UID, "value": f"urn:oid:{specimen_uid}"}
            else:
                continue
            found.setdefault((identifier.get("system"), identifier["value"]), {"type": "Specimen", "identifier": identifier})
    return list(found.values())


def _retrieve_base(ds: Dataset, uid: str) -> str | None:
    """The DICOMweb base of a Retrieve URL (0008,1190): everything before ``/studies/``."""
    url = _string(ds, _RETRIEVE_URL, uid)
    if not url:
        return None
    base, found, _ = url.partition("/studies/")
    return normalise_base(base) if found else None


def _series(data: StudyInput, uid: str, options: MappingOptions, study: Dataset, endpoints: dict[str, Resource]) -> list[Resource]:
    """Series with their instances. A series whose Retrieve URL names another DICOMweb base than
    the study's gets an Endpoint of its own (collected in ``endpoints``)."""
    study_base = _retrieve_base(study, uid)
    grouped = _group(data.instances, uid)
    series_results: dict[str, Dataset] = {}
    for item in data.series:
        series_uid = _uid(item, _SERIES_INSTANCE_UID, uid)
        if not series_uid:
            raise MappingError(uid, dj.keyword(_SERIES_INSTANCE_UID), "missing in a series result")
        series_results[series_uid] = item
        if series_uid not in grouped:
            grouped[series_uid] = _Group(item)

    built = []
    for series_uid, group in grouped.items():
        result = series_results.get(series_uid)
        if result is None or result is group.first:
            ds = group.first
        else:
            ds = {**group.first, **result}
        number = _count(ds, _SERIES_NUMBER, uid)
        out: Resource = {"uid": series_uid, "number": number} if number is not None else {"uid": series_uid}
        modality = _code(ds, _MODALITY, uid)
        out["modality"] = _modality(modality) if modality else {"extension": absent()}
        description = _string(ds, _SERIES_DESCRIPTION, uid)
        if description:
            out["description"] = description
        reported = _count(ds, _NUMBER_OF_SERIES_RELATED_INSTANCES, uid)
        out["numberOfInstances"] = reported if reported is not None else group.count
        series_base = _retrieve_base(ds, uid)
        if series_base and study_base and series_base != study_base:
            if series_base not in endpoints:
                endpoints[series_base] = endpoint(series_base)
            out["endpoint"] = _endpoint_reference(series_base)
        elif options.wado_base:
            out["endpoint"] = _endpoint_reference(options.wado_base)
        body_site = _body_site(ds, uid)
        if body_site:
            out["bodySite"] = body_site
        laterality = _laterality(ds, uid)
        if laterality:
            out["laterality"] = laterality
        if group.specimens:
            specimens = _specimens(group.specimens, uid, options)
            if specimens:
                out["specimen"] = specimens
        started = _datetime(ds, _SERIES_DATE, _SERIES_TIME, uid, options.zone, study)
        if started:
            out["started"] = started
        performers = _performers(ds, uid)
        if performers:
            out["performer"] = performers
        if group.count:
            out["instance"] = _instances(group, series_uid, uid)
        built.append(out)
    return _in_order(built, False)


# --------------------------------------------------------------------------------------------
# Instances: their work dominates large studies, so the common case is read directly
# --------------------------------------------------------------------------------------------


_SOP_CODINGS: dict[str, Resource] = {}


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


class _Group:
    """The instance results of one series: the first (it carries the series attributes; for a
    series that no instance result names, the series result), how many, the instances the fast
    path made by SOP Instance UID (the first result of each), the
    results from the first one it could not make on (to map in order, carefully where needed),
    those that describe specimens, and whether every instance so far has a number."""

    __slots__ = ("first", "count", "instances", "rest", "specimens", "numbered")

    def __init__(self, first: Dataset) -> None:
        self.first = first
        self.count = 0
        self.instances: dict[str, Resource] = {}
        self.rest: list[tuple[Dataset, Resource | None]] = []
        self.specimens: list[Dataset] = []
        self.numbered = True


class _Titles:
    """The last Image Type value seen and its title (None: not plain text): the instances of a
    series mostly share it, and comparing lists is cheaper than joining and checking them."""

    __slots__ = ("value", "title")

    def __init__(self) -> None:
        self.value: list[Any] | None = None
        self.title: str | None = None


def _group(instances: Iterable[Dataset], uid: str) -> dict[str, _Group]:
    """Instance results by series, each looked at once. Only the series UID is read carefully
    here; the rest of the careful reading (and raising) happens later, in the order it always had.
    A Series Instance UID that is already a key was checked when it became one."""
    grouped: dict[str, _Group] = {}
    titles = _Titles()
    for instance in instances:
        values = _values(instance, _SERIES_INSTANCE_UID)
        group = grouped.get(values[0]) if values and type(values[0]) is str else None
        if group is None:
            series_uid = _uid(instance, _SERIES_INSTANCE_UID, uid)
            if not series_uid:
                raise MappingError(uid, dj.keyword(_SERIES_INSTANCE_UID), "missing in an instance result")
            group = grouped.get(series_uid)
            if group is None:
                group = grouped[series_uid] = _Group(instance)
        group.count += 1
        mapped = _fast_instance(instance, titles)
        if mapped is None or group.rest:
            group.rest.append((instance, mapped))
        elif mapped["uid"] not in group.instances:
            group.instances[mapped["uid"]] = mapped
            if "number" not in mapped:
                group.numbered = False
        if _SPECIMEN_DESCRIPTION_SEQUENCE in instance:
            group.specimens.append(instance)
    return grouped


def _fast_instance(ds: Dataset, titles: _Titles) -> Resource | None:
    """An instance from well-formed attributes, or None to take the careful path. A first value
    that passes is what the careful readers would return, whatever follows it."""
    instance_uid = _fast_uid(ds, _SOP_INSTANCE_UID)
    if instance_uid is None:
        return None
    element = ds.get(_SOP_CLASS_UID)
    if type(element) is not dict:
        return None
    value = element.get("Value")
    if type(value) is not list or not value:
        return None
    sop_class = value[0]
    if type(sop_class) is not str:
        return None
    coding = _SOP_CODINGS.get(sop_class)
    if coding is None:
        if not _FAST_UID(sop_class):
            return None
        coding = _sop_coding(sop_class)
    if _DOCUMENT_TITLE in ds:
        return None
    out: Resource = {"uid": instance_uid, "sopClass": coding}
    element = ds.get(_INSTANCE_NUMBER)
    if element is not None:
        if type(element) is not dict:
            return None
        value = element.get("Value")
        if value:
            if type(value) is not list:
                return None
            number = value[0]
            if type(number) is not int or not 0 <= number <= _UNSIGNED_INT_MAX:
                return None
            out["number"] = number
    element = ds.get(_IMAGE_TYPE)
    if element is not None:
        if type(element) is not dict:
            return None
        value = element.get("Value")
        if value:
            if type(value) is not list:
                return None
            if value == titles.value:
                title = titles.title
            else:
                title = "\\".join(value) if _plain_texts(value) else None
                titles.value = value
                titles.title = title
            if title is None:
                return None
            out["title"] = title
    return out


def _plain_texts(values: list[Any]) -> bool:
    """Whether ``values`` are all strings that ``dj.strings`` keeps as they are."""
    for value in values:
        if type(value) is not str or not value or value != value.strip():
            return False
    return True


def _instance(ds: Dataset, instance_uid: str, uid: str) -> Resource:
    out: Resource = {"uid": instance_uid}
    sop_class = _careful(dj.uid, ds, _SOP_CLASS_UID, uid)
    if not sop_class:
        raise MappingError(uid, dj.keyword(_SOP_CLASS_UID), f"missing in instance {instance_uid}")
    out["sopClass"] = _sop_coding(sop_class)
    number = _careful(dj.count, ds, _INSTANCE_NUMBER, uid)
    if number is not None:
        out["number"] = number
    title = _careful(dj.string, ds, _DOCUMENT_TITLE, uid) or "\\".join(_careful(dj.strings, ds, _IMAGE_TYPE, uid))
    if title:
        out["title"] = title
    return out


def _instances(group: _Group, series_uid: str, uid: str) -> list[Resource]:
    """The instances of one series (the first result of each SOP Instance UID), in order."""
    out = group.instances
    numbered = group.numbered
    for instance, mapped in group.rest:
        if mapped is None:
            instance_uid = _uid(instance, _SOP_INSTANCE_UID, uid)
            if not instance_uid:
                raise MappingError(uid, dj.keyword(_SOP_INSTANCE_UID), f"missing in series {series_uid}")
            if instance_uid in out:
                continue
            mapped = _instance(instance, instance_uid, uid)
        elif mapped["uid"] in out:
            continue
        out[mapped["uid"]] = mapped
        numbered = numbered and "number" in mapped
    return _in_order(list(out.values()), numbered)


_BY_NUMBER = itemgetter("number", "uid")


def _order(item: Resource) -> tuple[bool, int, str]:
    """Series and instances: by number (those without one last), then by UID."""
    number = item.get("number")
    return (number is None, number or 0, item["uid"])


def _in_order(items: list[Resource], numbered: bool) -> list[Resource]:
    """``items`` sorted by ``_order``; ``numbered``: all have a number, so (number, uid) sorts
    them alike without a Python call per item."""
    if len(items) > 1:
        items.sort(key=_BY_NUMBER if numbered else _order)
    return items

"""R4 output as a pure transform of the R5 plain data (crawler/mapping/r4.py)."""

from __future__ import annotations

import copy
from typing import Any

import orjson
import pytest
from fhir.resources.endpoint import Endpoint as EndpointR5
from fhir.resources.imagingstudy import ImagingStudy as ImagingStudyR5
from fhir.resources.patient import Patient as PatientR5
from fhir.resources.R4B.endpoint import Endpoint as EndpointR4
from fhir.resources.R4B.imagingstudy import ImagingStudy as ImagingStudyR4
from fhir.resources.R4B.patient import Patient as PatientR4

from crawler.dicomjson import Tag
from crawler.mapping import MappingOptions, StudyInput, endpoint, map_study
from crawler.mapping.r4 import endpoint_r4, patient_r4, to_r4

OPTIONS = MappingOptions(source="http://pacs/dicom-web", wado_base="http://pacs/dicom-web")
DCM = "http://dicom.nema.org/resources/ontology/DCM"
SNOMED = "http://snomed.info/sct"
V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"
PAYLOAD_TYPES = "http://terminology.hl7.org/CodeSystem/endpoint-payload-type"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"

# R4 element order (hl7.org/fhir/R4/imagingstudy.html), resource-level elements first.
R4_STUDY_ORDER = [
    "resourceType", "id", "meta", "implicitRules", "language", "text", "contained", "extension",
    "modifierExtension", "identifier", "status", "modality", "subject", "encounter", "started",
    "basedOn", "referrer", "interpreter", "endpoint", "numberOfSeries", "numberOfInstances",
    "procedureReference", "procedureCode", "location", "reasonCode", "reasonReference", "note",
    "description", "series",
]  # fmt: skip
R4_SERIES_ORDER = [
    "id", "extension", "modifierExtension", "uid", "number", "modality", "description",
    "numberOfInstances", "endpoint", "bodySite", "laterality", "specimen", "started", "performer",
    "instance",
]  # fmt: skip
R4_INSTANCE_ORDER = ["id", "extension", "modifierExtension", "uid", "sopClass", "number", "title"]
R4_ENDPOINT_ORDER = [
    "resourceType", "id", "meta", "implicitRules", "language", "text", "contained", "extension",
    "modifierExtension", "identifier", "status", "connectionType", "name", "managingOrganization",
    "contact", "period", "payloadType", "payloadMimeType", "address", "header",
]  # fmt: skip


# --- DICOM JSON builders -------------------------------------------------------------------


def el(vr: str, *values: Any) -> dict[str, Any]:
    return {"vr": vr, "Value": list(values)}


def code_item(value: str, scheme: str, meaning: str) -> dict[str, Any]:
    return {
        Tag.CodeValue: el("SH", value),
        Tag.CodingSchemeDesignator: el("SH", scheme),
        Tag.CodeMeaning: el("LO", meaning),
    }


def person_id(value: str) -> dict[str, Any]:
    return {Tag.PersonIdentificationCodeSequence: el("SQ", code_item(value, "99HOSP", "Staff number"))}


RICH_UID = "1.2.826.0.1.3680043.8.498.10"
CT_SERIES = RICH_UID + ".1"
SR_SERIES = RICH_UID + ".2"
MR_SERIES = RICH_UID + ".3"

RICH_STUDY = {
    Tag.StudyInstanceUID: el("UI", RICH_UID),
    Tag.StudyDate: el("DA", "20240115"),
    Tag.StudyTime: el("TM", "101530"),
    Tag.TimezoneOffsetFromUTC: el("SH", "+0100"),
    Tag.StudyID: el("SH", "S-42"),
    Tag.AccessionNumber: el("SH", "ACC123"),
    Tag.IssuerOfAccessionNumberSequence: el(
        "SQ", {Tag.UniversalEntityID: el("UT", "1.2.3.4.5"), Tag.UniversalEntityIDType: el("CS", "ISO")}
    ),
    Tag.ReferringPhysicianName: el("PN", {"Alphabetic": "House^Gregory"}),
    Tag.ReferringPhysicianIdentificationSequence: el("SQ", person_id("12345")),
    Tag.ProcedureCodeSequence: el(
        "SQ", code_item("RPID16", "RADLEX", "CT Chest wo contrast"), code_item("24627-2", "LN", "CT Chest")
    ),
    Tag.ReasonForRequestedProcedureCodeSequence: el("SQ", code_item("233604007", "SCT", "Pneumonia")),
    Tag.InstitutionalDepartmentName: el("LO", "Radiology"),
    Tag.InstitutionalDepartmentTypeCodeSequence: el("SQ", code_item("394914008", "SCT", "Radiology")),
    Tag.StudyDescription: el("LO", "CT CHEST"),
    Tag.PatientID: el("LO", "P1"),
    Tag.PatientName: el("PN", {"Alphabetic": "Doe^Jane"}),
    Tag.IssuerOfPatientID: el("LO", "HOSP"),
    Tag.ModalitiesInStudy: el("CS", "CT", "MR", "SR"),
}

CT_SERIES_ATTRIBUTES = {
    Tag.SeriesDescription: el("LO", "Axial 1mm"),
    Tag.SeriesDate: el("DA", "20240115"),
    Tag.SeriesTime: el("TM", "102000"),
    Tag.TimezoneOffsetFromUTC: el("SH", "+0100"),
    Tag.BodyPartExamined: el("CS", "CHEST"),
    Tag.Laterality: el("CS", "L"),
    Tag.PerformingPhysicianName: el("PN", {"Alphabetic": "Wilson^James"}),
    Tag.PerformingPhysicianIdentificationSequence: el("SQ", person_id("777")),
    Tag.OperatorsName: el("PN", {"Alphabetic": "Tech^Tom"}),
    Tag.OperatorIdentificationSequence: el("SQ", person_id("888")),
    Tag.Manufacturer: el("LO", "ACME"),
    Tag.ManufacturerModelName: el("LO", "Scanner 9000"),
    Tag.InstitutionName: el("LO", "General Hospital"),
    Tag.SpecimenDescriptionSequence: el(
        "SQ",
        {
            Tag.SpecimenIdentifier: el("LO", "SPEC-1"),
            Tag.SpecimenUID: el("UI", "1.2.3.99"),
            Tag.IssuerOfTheSpecimenIdentifierSequence: el("SQ", {Tag.UniversalEntityID: el("UT", "1.2.3.7")}),
        },
    ),
    Tag.ImageType: el("CS", "ORIGINAL", "PRIMARY", "AXIAL"),
}


def instance(
    series: str, number: int, modality: str, sop_class: str, series_number: int, **more: Any
) -> dict[str, Any]:
    return {
        Tag.StudyInstanceUID: el("UI", RICH_UID if series.startswith(RICH_UID) else "1.2.3"),
        Tag.SeriesInstanceUID: el("UI", series),
        Tag.SeriesNumber: el("IS", series_number),
        Tag.SOPInstanceUID: el("UI", f"{series}.{number}"),
        Tag.SOPClassUID: el("UI", sop_class),
        Tag.Modality: el("CS", modality),
        Tag.InstanceNumber: el("IS", number),
        **more,
    }


RICH_INSTANCES = [
    instance(CT_SERIES, 1, "CT", CT_IMAGE_STORAGE, 1, **CT_SERIES_ATTRIBUTES),
    instance(CT_SERIES, 2, "CT", CT_IMAGE_STORAGE, 1, **CT_SERIES_ATTRIBUTES),
    # A report series: document title, an unknown body part (kept as text), odd laterality.
    instance(
        SR_SERIES, 1, "SR", BASIC_TEXT_SR, 3,
        **{
            Tag.DocumentTitle: el("ST", "Chest CT report"),
            Tag.BodyPartExamined: el("CS", "SOMEWHERE"),
            Tag.Laterality: el("CS", "X"),
            Tag.OperatorsName: el("PN", {"Alphabetic": "Tech^Tom"}),
        },
    ),  # fmt: skip
    # Anatomic Region Sequence instead of Body Part Examined; right side.
    instance(
        MR_SERIES, 1, "MR", "1.2.840.10008.5.1.4.1.1.4", 2,
        **{
            Tag.AnatomicRegionSequence: el("SQ", code_item("39607008", "SCT", "Lung")),
            Tag.Laterality: el("CS", "R"),
        },
    ),  # fmt: skip
]

MINIMAL_STUDY = {Tag.StudyInstanceUID: el("UI", "1.2.3")}
MINIMAL_INSTANCES = [instance("1.2.3.1", 1, "CT", CT_IMAGE_STORAGE, 1)]


@pytest.fixture(scope="module")
def rich() -> dict[str, Any]:
    return map_study(StudyInput(study=RICH_STUDY, instances=RICH_INSTANCES), OPTIONS)


@pytest.fixture(scope="module")
def minimal() -> dict[str, Any]:
    return map_study(StudyInput(study=MINIMAL_STUDY, instances=MINIMAL_INSTANCES), OPTIONS)


# --- helpers --------------------------------------------------------------------------------


def assert_in_order(keys: list[str], order: list[str]) -> None:
    unknown = [k for k in keys if k not in order]
    assert not unknown, f"elements R4 does not have here: {unknown}"
    assert keys == sorted(keys, key=order.index)


def containers(value: Any) -> list[Any]:
    """Every dict and list inside JSON-shaped data (identity matters, so no dedup by value)."""
    found = []
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            found.append(item)
            stack.extend(item.values())
        elif isinstance(item, list):
            found.append(item)
            stack.extend(item)
    return found


def series_by_uid(resource: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {s["uid"]: s for s in resource["series"]}


# --- ImagingStudy ---------------------------------------------------------------------------


def test_inputs_are_valid_r5(rich: dict[str, Any], minimal: dict[str, Any]) -> None:
    ImagingStudyR5.model_validate(rich)
    ImagingStudyR5.model_validate(minimal)
    assert {"procedure", "reason", "location", "contained", "basedOn", "referrer"} <= rich.keys()


@pytest.mark.parametrize("name", ["rich", "minimal"])
def test_validates_as_r4_in_r4_element_order(name: str, request: pytest.FixtureRequest) -> None:
    r5 = request.getfixturevalue(name)
    r4 = to_r4(r5)
    ImagingStudyR4.model_validate(r4)
    assert_in_order(list(r4), R4_STUDY_ORDER)
    for series in r4["series"]:
        assert_in_order(list(series), R4_SERIES_ORDER)
        for item in series["instance"]:
            assert_in_order(list(item), R4_INSTANCE_ORDER)


def test_rich_study_top_level(rich: dict[str, Any]) -> None:
    r4 = to_r4(rich)
    assert list(r4) == [
        "resourceType", "id", "contained", "identifier", "status", "modality", "subject", "started",
        "basedOn", "referrer", "endpoint", "numberOfSeries", "numberOfInstances", "procedureCode",
        "location", "reasonCode", "description", "series",
    ]  # fmt: skip
    for key in ("id", "contained", "status", "subject", "started", "basedOn", "referrer", "endpoint",
                "numberOfSeries", "numberOfInstances", "location", "description"):  # fmt: skip
        assert r4[key] == rich[key], key
    assert r4["contained"][0]["resourceType"] == "Location"
    assert r4["procedureCode"] == [p["concept"] for p in rich["procedure"]]
    assert [c["coding"][0]["code"] for c in r4["procedureCode"]] == ["RPID16", "24627-2"]
    assert r4["reasonCode"] == [r["concept"] for r in rich["reason"]]
    assert r4["reasonCode"][0]["coding"][0] == {"system": SNOMED, "code": "233604007", "display": "Pneumonia"}
    assert not {"procedure", "reason", "partOf", "interpreter"} & r4.keys()


def test_study_modality_is_codings_of_acquisition_modalities(rich: dict[str, Any]) -> None:
    r4 = to_r4(rich)
    assert [c["code"] for c in (m["coding"][0] for m in rich["modality"])] == ["CT", "MR", "SR"]
    # R4: "the series.modality values that are actual acquisition modalities" (CID 29); SR is not.
    assert r4["modality"] == [m["coding"][0] for m in rich["modality"][:2]]
    assert [(c["system"], c["code"]) for c in r4["modality"]] == [(DCM, "CT"), (DCM, "MR")]
    # ... but the series keep theirs.
    assert [s["modality"]["code"] for s in r4["series"]] == ["CT", "MR", "SR"]


def test_accession_number_is_also_an_identifier(rich: dict[str, Any]) -> None:
    r4 = to_r4(rich)
    accession = rich["basedOn"][0]["identifier"]
    assert accession["type"]["coding"][0] == {"system": V2_0203, "code": "ACSN"}
    assert r4["basedOn"] == rich["basedOn"]
    assert r4["identifier"] == [*rich["identifier"], accession]
    acsn = [i for i in r4["identifier"] if i.get("type", {}).get("coding", [{}])[0].get("code") == "ACSN"]
    acsn_type = {"coding": [{"system": V2_0203, "code": "ACSN"}]}
    assert acsn == [{"type": acsn_type, "system": "urn:oid:1.2.3.4.5", "value": "ACC123"}]
    assert r4["identifier"][0] == {"system": "urn:dicom:uid", "value": f"urn:oid:{RICH_UID}"}
    assert r4["identifier"][1]["value"] == "S-42"


def test_accession_already_an_identifier_is_not_repeated(rich: dict[str, Any]) -> None:
    r5 = {**rich, "identifier": [*rich["identifier"], rich["basedOn"][0]["identifier"]]}
    assert to_r4(r5)["identifier"] == r5["identifier"]


def test_series_content(rich: dict[str, Any]) -> None:
    r4_series = series_by_uid(to_r4(rich))
    r5_series = series_by_uid(rich)
    assert list(r4_series) == list(r5_series)
    for uid, r5 in r5_series.items():
        r4 = r4_series[uid]
        assert r4["modality"] == r5["modality"]["coding"][0]
        same_shape = (
            "number", "description", "numberOfInstances", "endpoint", "specimen", "started", "performer", "instance",
        )  # fmt: skip
        for key in same_shape:
            assert r4.get(key) == r5.get(key), (uid, key)

    ct = r4_series[CT_SERIES]
    assert ct["bodySite"] == {"system": SNOMED, "code": "816094009", "display": "Chest"}
    assert ct["bodySite"] == r5_series[CT_SERIES]["bodySite"]["concept"]["coding"][0]
    assert ct["laterality"] == {"system": SNOMED, "code": "7771000", "display": "Left"}
    assert ct["laterality"] == r5_series[CT_SERIES]["laterality"]["coding"][0]
    assert [p["function"]["coding"][0]["code"] for p in ct["performer"]] == ["PRF", "SPRF", "PRF", "PRF"]
    assert [p["actor"]["type"] for p in ct["performer"]] == ["Practitioner", "Practitioner", "Device", "Organization"]
    assert ct["specimen"] == [{"type": "Specimen", "identifier": {"system": "urn:oid:1.2.3.7", "value": "SPEC-1"}}]
    assert [i["title"] for i in ct["instance"]] == ["ORIGINAL\\PRIMARY\\AXIAL"] * 2
    assert ct["instance"][0]["sopClass"]["code"] == f"urn:oid:{CT_IMAGE_STORAGE}"

    mr = r4_series[MR_SERIES]
    assert mr["bodySite"] == {"system": SNOMED, "code": "39607008", "display": "Lung"}
    assert mr["laterality"]["code"] == "24028007"

    # Concepts with only text: R4 Coding has no text, so it goes into display.
    sr = r4_series[SR_SERIES]
    assert r5_series[SR_SERIES]["bodySite"] == {"concept": {"text": "SOMEWHERE"}}
    assert sr["bodySite"] == {"display": "SOMEWHERE"}
    assert r5_series[SR_SERIES]["laterality"] == {"text": "X"}
    assert sr["laterality"] == {"display": "X"}
    assert sr["instance"][0]["title"] == "Chest CT report"


def test_minimal_study(minimal: dict[str, Any]) -> None:
    r4 = to_r4(minimal)
    assert r4["identifier"] == [{"system": "urn:dicom:uid", "value": "urn:oid:1.2.3"}]
    assert r4["modality"] == [minimal["modality"][0]["coding"][0]]
    assert r4["subject"] == minimal["subject"]
    assert not {"basedOn", "referrer", "procedureCode", "reasonCode", "location", "contained"} & r4.keys()
    (series,) = r4["series"]
    assert not {"bodySite", "laterality", "performer", "specimen"} & series.keys()
    assert series["instance"] == minimal["series"][0]["instance"]


def test_reason_text_only_becomes_reason_code_text() -> None:
    study = {Tag.StudyInstanceUID: el("UI", "1.2.3"), Tag.ReasonForTheRequestedProcedure: el("LO", "Cough for 3 weeks")}
    r4 = to_r4(map_study(StudyInput(study=study, instances=MINIMAL_INSTANCES), OPTIONS))
    assert r4["reasonCode"] == [{"text": "Cough for 3 weeks"}]
    ImagingStudyR4.model_validate(r4)


def test_r5_elements_map_study_does_not_make_yet(rich: dict[str, Any]) -> None:
    """partOf, reason references, procedure references, note, a BodyStructure, a rich Location."""
    r5 = copy.deepcopy(rich)
    r5["partOf"] = [{"reference": "Procedure/p1"}, {"reference": "Procedure/p2"}]
    r5["procedure"].append({"reference": {"reference": "PlanDefinition/chest-ct"}})
    r5["reason"].append({"reference": {"reference": "Condition/c1"}})
    r5["note"] = [{"text": "Patient moved"}]
    r5["contained"][0].update(
        form={"coding": [{"system": "http://terminology.hl7.org/CodeSystem/location-physical-type", "code": "wa"}]},
        contact=[{"telecom": [{"system": "phone", "value": "+1 555 0100"}]}],
        hoursOfOperation=[
            {
                "availableTime": [
                    {"daysOfWeek": ["mon", "tue"], "availableStartTime": "08:00:00", "availableEndTime": "17:00:00"}
                ],
                "notAvailableTime": [{"description": "Closed on public holidays"}],
            }
        ],
    )
    ct = series_by_uid(r5)[CT_SERIES]
    ct["bodySite"]["reference"] = {"reference": "BodyStructure/b1"}
    ct["performer"].append({"actor": {"type": "HealthcareService", "display": "Imaging service"}})
    only_reference = series_by_uid(r5)[MR_SERIES]
    only_reference["bodySite"] = {"reference": {"reference": "BodyStructure/b2"}}
    ImagingStudyR5.model_validate(r5)

    r4 = to_r4(r5)
    ImagingStudyR4.model_validate(r4)
    assert_in_order(list(r4), R4_STUDY_ORDER)
    assert r4["procedureReference"] == {"reference": "Procedure/p1"}
    assert r4["procedureCode"] == [p["concept"] for p in rich["procedure"]]
    assert r4["reasonCode"] == [r["concept"] for r in rich["reason"]]
    assert r4["reasonReference"] == [{"reference": "Condition/c1"}]
    assert r4["note"] == [{"text": "Patient moved"}]
    location = r4["contained"][0]
    assert list(location) == [
        "resourceType", "id", "name", "type", "telecom", "physicalType", "hoursOfOperation", "availabilityExceptions",
    ]  # fmt: skip
    assert location["physicalType"]["coding"][0]["code"] == "wa"
    assert location["telecom"] == [{"system": "phone", "value": "+1 555 0100"}]
    assert location["hoursOfOperation"] == [
        {"daysOfWeek": ["mon", "tue"], "openingTime": "08:00:00", "closingTime": "17:00:00"}
    ]
    assert location["availabilityExceptions"] == "Closed on public holidays"
    series = series_by_uid(r4)
    assert series[CT_SERIES]["bodySite"]["code"] == "816094009"
    assert all(p["actor"]["type"] != "HealthcareService" for p in series[CT_SERIES]["performer"])
    assert "bodySite" not in series[MR_SERIES]


def test_primitive_extensions_and_unusual_instances_take_the_general_path(minimal: dict[str, Any]) -> None:
    r5 = copy.deepcopy(minimal)
    r5["_description"] = {"extension": [{"url": "http://example.org/x", "valueString": "y"}]}
    r5["description"] = "described"
    item = r5["series"][0]["instance"][0]
    # Out of order and with an extension: rebuilt in R4 order.
    r5["series"][0]["instance"][0] = {
        "title": "t",
        "number": item["number"],
        "sopClass": {**item["sopClass"], "extension": [{"url": "http://example.org/e", "valueCode": "c"}]},
        "uid": item["uid"],
        "extension": [{"url": "http://example.org/i", "valueBoolean": True}],
    }
    r4 = to_r4(r5)
    ImagingStudyR4.model_validate(r4)
    assert r4["_description"] == r5["_description"]
    assert list(r4["series"][0]["instance"][0]) == ["extension", "uid", "sopClass", "number", "title"]
    assert r4["series"][0]["instance"][0]["sopClass"] == r5["series"][0]["instance"][0]["sopClass"]


def test_pure_no_mutation_no_shared_objects_deterministic(rich: dict[str, Any]) -> None:
    before = copy.deepcopy(rich)
    first = to_r4(rich)
    assert rich == before
    assert orjson.dumps(rich) == orjson.dumps(before)  # key order unchanged too
    assert orjson.dumps(to_r4(rich)) == orjson.dumps(first)
    # Nothing in the output is an object of the input: changing one never changes the other.
    assert not {id(c) for c in containers(first)} & {id(c) for c in containers(rich)}
    first["series"][0]["instance"][0]["sopClass"]["display"] = "changed"
    first["identifier"][-1]["value"] = "changed"
    assert rich == before


def test_large_study_is_converted_without_deep_copying(monkeypatch: pytest.MonkeyPatch) -> None:
    instances = [
        instance(f"1.2.3.{s}", n, "CT", CT_IMAGE_STORAGE, s, **{Tag.ImageType: el("CS", "ORIGINAL", "PRIMARY")})
        for s in range(1, 11)
        for n in range(1, 1001)
    ]
    r5 = map_study(StudyInput(study=MINIMAL_STUDY, instances=instances), OPTIONS)
    assert r5["numberOfInstances"] == 10_000
    r4 = to_r4(r5)
    assert sum(len(s["instance"]) for s in r4["series"]) == 10_000
    assert r4["series"][3]["instance"][5] == r5["series"][3]["instance"][5]
    # Speed is the mapping benchmark's business (benchmarks/bench_mapping.py); here: no deep copy.
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("to_r4 deep-copied")

    monkeypatch.setattr(copy, "deepcopy", refuse)
    assert to_r4(r5) == r4


# --- Endpoint -------------------------------------------------------------------------------


def test_endpoint() -> None:
    r5 = endpoint("http://pacs/dicom-web")
    EndpointR5.model_validate(r5)
    before = copy.deepcopy(r5)
    r4 = endpoint_r4(r5)
    assert r5 == before
    EndpointR4.model_validate(r4)
    assert_in_order(list(r4), R4_ENDPOINT_ORDER)
    assert r4["connectionType"] == {
        "system": "http://terminology.hl7.org/CodeSystem/endpoint-connection-type",
        "code": "dicom-wado-rs",
    }
    assert r4["payloadType"] == [
        {
            "coding": [{"system": PAYLOAD_TYPES, "code": "any", "display": "Any"}],
            "text": "DICOM",
        }
    ]
    assert r4["payloadMimeType"] == ["application/dicom", "application/dicom+json"]
    for key in ("id", "status", "name", "address"):
        assert r4[key] == r5[key]
    assert not {"payload", "environmentType", "description"} & r4.keys()
    # The ImagingStudy points at this Endpoint.
    study = to_r4(map_study(StudyInput(study=MINIMAL_STUDY, instances=MINIMAL_INSTANCES), OPTIONS))
    assert study["endpoint"] == [{"reference": f"Endpoint/{r4['id']}"}]


def test_endpoint_payloads_merge_and_coded_types_are_kept() -> None:
    r5 = endpoint("http://pacs/dicom-web")
    ihe_format = "urn:oid:1.3.6.1.4.1.19376.1.2.3"
    coded = {"coding": [{"system": ihe_format, "code": "urn:ihe:rad:1.2.840.10008.5.1.4.1.1.88.59"}]}
    r5["payload"].append({"type": [coded], "mimeType": ["application/dicom", "multipart/related"]})
    r5["environmentType"] = [{"coding": [{"system": "http://hl7.org/fhir/endpoint-environment", "code": "prod"}]}]
    EndpointR5.model_validate(r5)
    r4 = endpoint_r4(r5)
    EndpointR4.model_validate(r4)
    assert r4["payloadType"][1] == coded
    assert r4["payloadMimeType"] == ["application/dicom", "application/dicom+json", "multipart/related"]

    no_payload = {k: v for k, v in r5.items() if k != "payload"}
    assert endpoint_r4(no_payload)["payloadType"] == [
        {"coding": [{"system": PAYLOAD_TYPES, "code": "any", "display": "Any"}]}
    ]
    EndpointR4.model_validate(endpoint_r4(no_payload))


def test_endpoint_without_connection_coding_is_refused() -> None:
    r5 = {**endpoint("http://pacs/dicom-web"), "connectionType": [{"text": "DICOMweb"}]}
    with pytest.raises(ValueError, match="connectionType"):
        endpoint_r4(r5)


# --- Patient --------------------------------------------------------------------------------


def test_patient() -> None:
    r5 = {
        "resourceType": "Patient",
        "id": "p1",
        "identifier": [{"system": "urn:oid:1.2.3.4", "value": "P1"}],
        "name": [{"family": "Doe", "given": ["Jane"], "text": "Jane Doe"}],
        "gender": "female",
        "birthDate": "1970-01-02",
        "photo": [
            {
                "contentType": "image/jpeg", "url": "http://example.org/p.jpg", "size": "1024",
                "height": 100, "width": 80, "pages": 1,
            },  # fmt: skip
            {"contentType": "image/png", "url": "http://example.org/q.png", "size": "99999999999"},
        ],
        "contact": [{"name": {"text": "John Doe"}, "telecom": [{"system": "phone", "value": "123"}]}],
        "link": [{"other": {"reference": "Patient/p0"}, "type": "replaces"}],
    }
    PatientR5.model_validate(r5)
    before = copy.deepcopy(r5)
    r4 = patient_r4(r5)
    assert r5 == before
    PatientR4.model_validate(r4)
    assert list(r4) == list(r5)
    assert r4["photo"] == [
        {"contentType": "image/jpeg", "url": "http://example.org/p.jpg", "size": 1024},
        {"contentType": "image/png", "url": "http://example.org/q.png"},  # too big for unsignedInt
    ]
    assert {k: v for k, v in r4.items() if k != "photo"} == {k: v for k, v in r5.items() if k != "photo"}
    assert not {id(c) for c in containers(r4)} & {id(c) for c in containers(r5)}

    plain = {k: v for k, v in r5.items() if k != "photo"}
    assert patient_r4(plain) == plain
    PatientR4.model_validate(patient_r4(plain))

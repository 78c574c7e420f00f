"""Golden tests: each recorded fixture study maps to its committed expected output, every row of
the mapping table is present in some outputs and absent in others, and everything validates."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
from fhir.resources import get_fhir_model_class as r5_model
from fhir.resources.R4B import get_fhir_model_class as r4_model

from crawler.dicomjson import Tag
from crawler.errors import MappingError
from crawler.mapping import StudyInput, map_resources, map_study
from fixtures.golden import EXPECTED, OPTIONS, VARIANTS, load, mapped, recordings, render

RECORDINGS = recordings()
CASES = [(path, variant) for path in RECORDINGS for variant in VARIANTS]


def test_there_are_recordings():
    assert len(RECORDINGS) >= 16


@pytest.mark.parametrize(("path", "variant"), CASES, ids=[f"{p.stem}-{v}" for p, v in CASES])
def test_golden_output(path, variant):
    expected = EXPECTED / f"{path.stem}.{variant}.json"
    assert render(mapped(load(path), variant)) == expected.read_text(), f"regenerate with python -m fixtures.record --expected and review: {expected.name}"


@pytest.mark.parametrize(("path", "variant"), CASES, ids=[f"{p.stem}-{v}" for p, v in CASES])
def test_golden_output_validates(path, variant):
    model = r4_model if variant == "r4" else r5_model
    for resource in mapped(load(path), variant):
        model(resource["resourceType"]).model_validate(resource)


def _studies(variant: str = "r5") -> list[dict[str, Any]]:
    return [r for path in RECORDINGS for r in mapped(load(path), variant) if r["resourceType"] == "ImagingStudy"]


def _series(study: dict[str, Any]) -> list[dict[str, Any]]:
    return study.get("series", [])


def _performers(study: dict[str, Any], actor: str, function: str | None = None) -> bool:
    return any(
        p["actor"].get("type") == actor and (function is None or p["function"]["coding"][0]["code"] == function)
        for s in _series(study)
        for p in s.get("performer", [])
    )


# Each row of the mapping table (and the parts of rows that are optional), as a test of an R5
# ImagingStudy. Rows whose output is always there (status, modality, subject and its display,
# the counts, series.uid ...) are checked in test_required_elements_are_always_there, and what
# they do when their input is absent in the tests after it.
ROWS: dict[str, Callable[[dict[str, Any]], bool]] = {
    "identifier: Study ID": lambda s: len(s["identifier"]) > 1,
    "subject: Patient ID": lambda s: "identifier" in s["subject"],
    "subject: issuer system": lambda s: "system" in s["subject"].get("identifier", {}),
    "started: date": lambda s: "started" in s,
    "started: time with offset": lambda s: "T" in s.get("started", ""),
    "basedOn: accession": lambda s: "basedOn" in s,
    "basedOn: accession issuer": lambda s: any("system" in b["identifier"] for b in s.get("basedOn", [])),
    "referrer": lambda s: "referrer" in s,
    "referrer: identification": lambda s: "identifier" in s.get("referrer", {}),
    "procedure": lambda s: "procedure" in s,
    "location": lambda s: "location" in s,
    "location: department type": lambda s: "contained" in s,
    "reason": lambda s: "reason" in s,
    "reason: codes": lambda s: any("coding" in r["concept"] for r in s.get("reason", [])),
    "description": lambda s: "description" in s,
    "series.number": lambda s: any("number" in x for x in _series(s)),
    "series.description": lambda s: any("description" in x for x in _series(s)),
    "series.bodySite: Body Part Examined": lambda s: any("coding" in x.get("bodySite", {}).get("concept", {}) and x["bodySite"]["concept"]["coding"][0]["system"] == "http://snomed.info/sct" for x in _series(s)),
    "series.bodySite: unmapped text": lambda s: any("text" in x.get("bodySite", {}).get("concept", {}) for x in _series(s)),
    "series.laterality": lambda s: any("laterality" in x for x in _series(s)),
    "series.specimen": lambda s: any("specimen" in x for x in _series(s)),
    "series.started": lambda s: any("started" in x for x in _series(s)),
    "series.performer: performing physician (PRF)": lambda s: _performers(s, "Practitioner", "PRF"),
    "series.performer: operator (SPRF)": lambda s: _performers(s, "Practitioner", "SPRF"),
    "series.performer: device": lambda s: _performers(s, "Device"),
    "series.performer: institution": lambda s: _performers(s, "Organization"),
    "series.performer: identification": lambda s: any("identifier" in p["actor"] for x in _series(s) for p in x.get("performer", [])),
    "instance.number": lambda s: any("number" in i for x in _series(s) for i in x.get("instance", [])),
    "instance.title: Image Type": lambda s: any("\\" in i.get("title", "") for x in _series(s) for i in x.get("instance", [])),
    "instance.title: Document Title": lambda s: any(i.get("title") and "\\" not in i["title"] for x in _series(s) for i in x.get("instance", [])),
}


@pytest.mark.parametrize("row", sorted(ROWS))
def test_row_is_present_in_some_studies_and_absent_in_others(row):
    found = [ROWS[row](study) for study in _studies()]
    assert any(found), f"{row}: never mapped"
    assert not all(found), f"{row}: never absent in the fixtures"


def test_required_elements_are_always_there():
    for study in _studies():
        assert study["status"] == "available"
        assert study["identifier"][0]["system"] == "urn:dicom:uid"
        assert study["subject"]["type"] == "Patient"
        assert study["numberOfSeries"] == len(study["series"])
        assert study["numberOfInstances"] == sum(s["numberOfInstances"] for s in study["series"])
        for series in study["series"]:
            assert series["uid"] and series["modality"]["coding"][0]["system"] == "http://dicom.nema.org/resources/ontology/DCM"
            assert series["endpoint"] and series["numberOfInstances"] == len(series["instance"])
            for instance in series["instance"]:
                assert instance["uid"] and instance["sopClass"]["code"].startswith("urn:oid:")


def _recording(name: str) -> dict[str, Any]:
    return load(next(p for p in RECORDINGS if p.stem == name))


def _without(recording: dict[str, Any], *tags: str) -> StudyInput:
    data = copy.deepcopy(recording)
    for item in [data["study"], *data["metadata"]]:
        for tag in tags:
            item.pop(tag, None)
    return StudyInput(data["study"], data["metadata"])


def test_counts_come_from_the_server_else_from_what_was_enumerated():
    recording = _recording("study-01")
    data = copy.deepcopy(recording)
    data["study"][Tag.NumberOfStudyRelatedInstances]["Value"] = [99]
    assert map_study(StudyInput(data["study"], data["metadata"]), OPTIONS)["numberOfInstances"] == 99
    study = map_study(_without(recording, Tag.NumberOfStudyRelatedSeries, Tag.NumberOfStudyRelatedInstances), OPTIONS)
    assert (study["numberOfSeries"], study["numberOfInstances"]) == (3, 6)


def test_modality_falls_back_to_the_series_modalities():
    study = map_study(_without(_recording("study-01"), Tag.ModalitiesInStudy), OPTIONS)
    assert [m["coding"][0]["code"] for m in study["modality"]] == ["CT", "SR"]


def test_a_study_without_patient_id_or_name_still_has_a_valid_subject():
    mapped_ = map_resources(_without(_recording("study-01"), Tag.PatientID, Tag.PatientName), OPTIONS)
    assert mapped_.patient is None
    absent = {"url": "http://hl7.org/fhir/StructureDefinition/data-absent-reason", "valueCode": "unknown"}
    assert mapped_.study["subject"] == {"type": "Patient", "extension": [absent]}
    r5_model("ImagingStudy").model_validate(mapped_.study)


def test_subject_references_the_patient_and_the_issuer_map_gives_its_system():
    from dataclasses import replace

    options = replace(OPTIONS, issuer_systems={"HOSP-QUARKNORTH": "https://quarkwood.example/patients"})
    mapped_ = map_resources(_without(_recording("study-01")), options)
    assert mapped_.study["subject"]["reference"] == f"Patient/{mapped_.patient['id']}"
    assert mapped_.patient["identifier"] == [{"system": "https://quarkwood.example/patients", "value": "PID-73019-QX"}]
    assert mapped_.study["subject"]["identifier"]["system"] == "https://quarkwood.example/patients"


def test_same_patient_in_two_studies_gets_one_id():
    first = map_resources(_without(_recording("study-01")), OPTIONS).patient
    again = map_resources(_without(_recording("study-07")), OPTIONS).patient
    assert first is not None and again is not None and first["id"] == again["id"]


def test_series_whose_retrieve_url_points_elsewhere_gets_its_own_endpoint():
    data = copy.deepcopy(_recording("study-01"))
    elsewhere = "http://archive.example.org/wado"
    moved = data["instances"][0][Tag.SeriesInstanceUID]["Value"][0]
    for item in data["instances"]:
        if item["0020000E"]["Value"][0] == moved:
            item[Tag.RetrieveURL] = {"vr": "UR", "Value": [f"{elsewhere}/studies/x/series/{moved}/instances/y"]}
    mapped_ = map_resources(StudyInput(data["study"], data["instances"]), OPTIONS)
    (extra,) = mapped_.endpoints
    assert extra["address"] == elsewhere
    refs = {s["uid"]: s["endpoint"][0]["reference"] for s in mapped_.study["series"]}
    assert refs[moved] == f"Endpoint/{extra['id']}"
    assert len(set(refs.values())) == 2


def test_missing_study_uid_is_a_mapping_error():
    with pytest.raises(MappingError, match="StudyInstanceUID"):
        map_study(_without(_recording("study-01"), Tag.StudyInstanceUID), OPTIONS)


def test_output_is_deterministic_whatever_the_order_of_the_answers():
    recording = _recording("study-09")
    forward = map_study(StudyInput(recording["study"], recording["metadata"]), OPTIONS)
    backward = map_study(StudyInput(recording["study"], list(reversed(recording["metadata"]))), OPTIONS)
    assert render([forward]) == render([backward])

"""Values a study lacks: a series without Modality and a patient without a name (or without both
a name and an ID) map with FHIR's data-absent-reason extension, validate (R5 and R4B), are counted
in the sync's summary and reported by the audit."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from fhir.resources import get_fhir_model_class as r5_model
from fhir.resources.R4B import get_fhir_model_class as r4_model

from crawler.audit.findings import CHECKS, Collector, Severity, evaluate, instance_rows, series_rows
from crawler.config import SyncConfig
from crawler.crawl import CrawlOptions, MetadataMode
from crawler.dicomjson import Tag
from crawler.mapping import StudyInput, map_resources
from crawler.http import RetryPolicy
from crawler.sync import sync
from crawler.worker import convert
from fixtures.fakepacs import FakePacs
from fixtures.golden import OPTIONS, RECORDINGS, load

DAR = "http://hl7.org/fhir/StructureDefinition/data-absent-reason"
UNKNOWN = [{"url": DAR, "valueCode": "unknown"}]


def _recording(name: str) -> dict[str, Any]:
    return copy.deepcopy(load(RECORDINGS / f"{name}.json"))


def _validate(resource: dict[str, Any]) -> None:
    r5_model("ImagingStudy").model_validate(resource)
    r4_model("ImagingStudy").model_validate(convert(resource, "R4"))


def test_a_series_without_modality_maps_with_data_absent_reason_and_validates():
    data = _recording("study-01")
    lacking = data["metadata"][0][Tag.SeriesInstanceUID]["Value"][0]
    for item in data["metadata"]:
        if item[Tag.SeriesInstanceUID]["Value"][0] == lacking:
            item.pop(Tag.Modality, None)
    data["study"].pop(Tag.ModalitiesInStudy, None)
    study = map_resources(StudyInput(data["study"], data["metadata"]), OPTIONS).study
    by_uid = {s["uid"]: s for s in study["series"]}
    assert by_uid[lacking]["modality"] == {"extension": UNKNOWN}
    others = [s for uid, s in by_uid.items() if uid != lacking]
    assert others and all(s["modality"]["coding"][0]["code"] for s in others)
    assert {m["coding"][0]["code"] for m in study["modality"]} == {s["modality"]["coding"][0]["code"] for s in others}
    r4 = convert(study, "R4")
    assert {s["uid"]: s for s in r4["series"]}[lacking]["modality"] == {"extension": UNKNOWN}
    _validate(study)


def test_a_patient_without_a_name_has_no_display_when_there_is_an_identifier():
    data = _recording("study-01")
    data["study"].pop(Tag.PatientName, None)
    for item in data["metadata"]:
        item.pop(Tag.PatientName, None)
    study = map_resources(StudyInput(data["study"], data["metadata"]), OPTIONS).study
    assert "display" not in study["subject"] and study["subject"]["identifier"]["value"]
    _validate(study)


def test_a_patient_without_a_name_or_an_id_is_marked_absent_not_named():
    data = _recording("study-01")
    for item in [data["study"], *data["metadata"]]:
        item.pop(Tag.PatientName, None)
        item.pop(Tag.PatientID, None)
    mapped = map_resources(StudyInput(data["study"], data["metadata"]), OPTIONS)
    assert mapped.study["subject"] == {"type": "Patient", "extension": UNKNOWN}
    assert mapped.patient is None
    _validate(mapped.study)


def test_a_sync_counts_series_without_modality_and_exits_0(tmp_path: Path):
    with FakePacs(n_studies=8, seed=41, no_modality={2, 5}) as pacs:
        result = sync(SyncConfig(
            url=pacs.url, out=tmp_path / "out", state=tmp_path / "state.db", workers=2, validate=True,
            retry=RetryPolicy(base_delay=0.01, max_delay=0.05), crawl=CrawlOptions(metadata=MetadataMode.NEVER),
        ))
        assert result.exit_code == 0, result.errors
        expected = pacs.n_series(pacs.study_uid(2)) + pacs.n_series(pacs.study_uid(5))
        assert result.figures.series_without_modality == expected and result.summary()["series_without_modality"] == expected


def test_the_audit_reports_series_without_modality_as_a_warning():
    assert CHECKS["SERIES_WITHOUT_MODALITY"].severity is Severity.WARNING
    c = Collector()
    for uid, modality in (("1.2.1", "CT"), ("1.2.2", None)):
        item = {Tag.StudyInstanceUID: {"vr": "UI", "Value": [uid]}, Tag.PatientID: {"vr": "LO", "Value": ["P"]}}
        series = {Tag.SeriesInstanceUID: {"vr": "UI", "Value": [f"{uid}.1"]}}
        if modality:
            series[Tag.Modality] = {"vr": "CS", "Value": [modality]}
        facts = c.listed(item, "h")
        c.crawled(facts.uid, series_rows([series]), instance_rows([{Tag.SeriesInstanceUID: series[Tag.SeriesInstanceUID],
                                                                    Tag.SOPInstanceUID: {"vr": "UI", "Value": [f"{uid}.1.1"]}}]))
    found = {f.code: set(f.studies) for f in evaluate(c.studies, today=__import__("datetime").date(2025, 1, 1)).findings}
    assert found["SERIES_WITHOUT_MODALITY"] == {"1.2.2"}

"""The rows of the analytics tables from one ImagingStudy (crawler/tables/rows.py), checked field
by field against the golden ImagingStudy fixtures (fixtures/expected), R5 and R4; and that the
tables extra is imported only by what uses it."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import date, datetime, timezone
from pathlib import Path

import pytest

from crawler.tables.rows import KEYS, codes, fhir_datetime, study_rows

EXPECTED = Path(__file__).resolve().parent.parent / "fixtures" / "expected"
SOURCE = "http://pacs.example.org/dicom-web"
ENDPOINT = "Endpoint/385f9b69-7b8d-51b1-b4f9-cb107a5f01d0"
GOLDEN = sorted(EXPECTED.glob("*.json"))


def imaging_study(path: Path) -> dict:
    (study,) = [r for r in json.loads(path.read_text()) if r["resourceType"] == "ImagingStudy"]
    return study


def utc(*parts: int) -> datetime:
    return datetime(*parts, tzinfo=timezone.utc)


def test_study_01_r5_field_by_field():
    rows = study_rows(imaging_study(EXPECTED / "study-01.r5.json"), SOURCE, {ENDPOINT: SOURCE})
    assert rows.study == {
        "source": SOURCE,
        "study_uid": "2.25.135469620240961204817724944333117003989",
        "fhir_id": "e93d655e-8d6e-5b22-a89c-b1a87dbb6792",
        "patient_id": "PID-73019-QX",
        "patient_id_issuer": "HOSP-QUARKNORTH",
        "accession": "ACC-QX-20230314",
        "accession_issuer": "urn:oid:1.2.826.0.1.3680043.10.1010.1",
        "study_date": date(2023, 3, 14),
        "study_datetime": utc(2023, 3, 14, 9, 15, 30, 123000),
        "study_tz_offset": 60,
        "modalities": ["CT", "SR"],
        "description": "CT THORAX WITHOUT CONTRAST",
        "n_series": 3,
        "n_instances": 6,
        "referrer": "Dr Ignatius Hawthorne-Vale",
        "procedure_codes": [{"system": "http://loinc.org", "code": "24627-2", "display": "CT Chest", "text": None}],
        "reason_codes": [{"system": "http://snomed.info/sct", "code": "49727002", "display": "Cough", "text": None}],
        "endpoint": SOURCE,
    }
    first, second, report = rows.series
    assert first == {
        "source": SOURCE,
        "study_uid": "2.25.135469620240961204817724944333117003989",
        "series_uid": "2.25.56635431584041287288095855952470655977",
        "number": 1,
        "modality": "CT",
        "description": "Thorax 1.0 B30f",
        "body_site": {"system": "http://snomed.info/sct", "code": "816094009", "display": "Chest", "text": None},
        "laterality": None,
        "n_instances": 3,
        "series_date": date(2023, 3, 14),
        "started": utc(2023, 3, 14, 9, 17, 12, 250000),
        "started_tz_offset": 60,
        "performers": [
            {"function": "PRF", "type": "Practitioner", "display": "Beatrix Okonkwo-Lindqvist", "identifier": "PPH-30877"},
            {"function": "SPRF", "type": "Practitioner", "display": "Aurelio Tenterhook", "identifier": "OPR-11873"},
            {"function": "PRF", "type": "Device", "display": "Acme Tomography Voxelmaster 64", "identifier": None},
            {"function": "PRF", "type": "Organization", "display": "Quarkwood Memorial Hospital", "identifier": None},
        ],
    }
    assert (second["number"], second["started"], second["series_date"], second["n_instances"]) == (2, None, None, 2)
    assert (report["number"], report["modality"], report["body_site"], report["n_instances"], len(report["performers"])) == (90, "SR", None, 1, 1)
    assert rows.instances[0] == {
        "source": SOURCE,
        "study_uid": "2.25.135469620240961204817724944333117003989",
        "series_uid": "2.25.56635431584041287288095855952470655977",
        "sop_uid": "2.25.88994708958871009058865821812890783489",
        "sop_class_uid": "1.2.840.10008.5.1.4.1.1.2",
        "sop_class_name": "CT Image Storage",
        "number": 1,
        "title": "ORIGINAL\\PRIMARY\\AXIAL",
    }
    assert rows.instances[-1]["sop_class_uid"] == "1.2.840.10008.5.1.4.1.1.88.11"
    assert rows.instances[-1]["title"] is None
    assert [i["series_uid"] for i in rows.instances] == [first["series_uid"]] * 3 + [second["series_uid"]] * 2 + [report["series_uid"]]


def test_r4_gives_the_r5_rows_but_for_what_the_r4_resource_leaves_out():
    r5 = study_rows(imaging_study(EXPECTED / "study-01.r5.json"), SOURCE)
    r4 = study_rows(imaging_study(EXPECTED / "study-01.r4.json"), SOURCE)
    # R4's ImagingStudy.modality holds acquisition modalities only: SR is not in it
    assert r4.study["modalities"] == ["CT"]
    assert {**r4.study, "modalities": None} == {**r5.study, "modalities": None}
    assert r4.series == r5.series
    assert r4.instances == r5.instances
    assert r5.study["endpoint"] == ENDPOINT   # no address known: the reference


@pytest.mark.parametrize("path", GOLDEN, ids=lambda p: p.name)
def test_every_golden_study_gives_one_row_per_series_and_instance_with_its_values(path):
    study = imaging_study(path)
    rows = study_rows(study, SOURCE)
    uid = study["identifier"][0]["value"].removeprefix("urn:oid:")
    assert rows.study["study_uid"] == uid and rows.study["fhir_id"] == study["id"]
    assert rows.study["n_series"] == study["numberOfSeries"] and rows.study["n_instances"] == study["numberOfInstances"]
    assert rows.study["description"] == study.get("description")
    started = study.get("started")
    if started and "T" in started:
        instant = datetime.fromisoformat(started)
        assert rows.study["study_datetime"] == instant
        assert rows.study["study_tz_offset"] * 60 == instant.utcoffset().total_seconds()
        assert rows.study["study_date"] == instant.date()
    assert [s["series_uid"] for s in rows.series] == [s["uid"] for s in study["series"]]
    assert len(rows.series) >= 1
    for row, series in zip(rows.series, study["series"]):
        assert row["number"] == series.get("number") and row["n_instances"] == series["numberOfInstances"]
        assert row["description"] == series.get("description")
        modality = series["modality"]
        assert row["modality"] == (modality.get("code") or (modality.get("coding") or [{}])[0].get("code"))
    expected = [(s["uid"], i["uid"], i["sopClass"]["code"].removeprefix("urn:oid:"), i["sopClass"].get("display"), i.get("number"), i.get("title"))
                for s in study["series"] for i in s["instance"]]
    assert [(r["series_uid"], r["sop_uid"], r["sop_class_uid"], r["sop_class_name"], r["number"], r["title"]) for r in rows.instances] == expected
    for name, table_rows in (("studies", [rows.study]), ("series", rows.series), ("instances", rows.instances)):
        assert all(row[k] for row in table_rows for k in KEYS[name])


@pytest.mark.parametrize("text, expected", [
    ("2023-03-14T10:15:30.123+01:00", (date(2023, 3, 14), utc(2023, 3, 14, 9, 15, 30, 123000), 60)),
    ("2024-02-29T23:59:59.999999+01:00", (date(2024, 2, 29), utc(2024, 2, 29, 22, 59, 59, 999999), 60)),
    ("1997-04-30T11:27:49-05:00", (date(1997, 4, 30), utc(1997, 4, 30, 16, 27, 49), -300)),
    ("2020-01-01T00:00:00Z", (date(2020, 1, 1), utc(2020, 1, 1), 0)),
    ("2020-01-01T00:00:00.1234567+05:30", (date(2020, 1, 1), utc(2019, 12, 31, 18, 30, 0, 123456), 330)),
    ("2023-08-15", (date(2023, 8, 15), None, None)),
    ("2023-08", (None, None, None)),
    ("2023", (None, None, None)),
    ("2023-02-30", (None, None, None)),
    ("", (None, None, None)),
    (None, (None, None, None)),
    ("not a date", (None, None, None)),
])
def test_fhir_datetimes(text, expected):
    assert fhir_datetime(text) == expected


def test_codes_of_each_shape():
    coding = {"system": "http://snomed.info/sct", "code": "7771000", "display": "Left"}
    as_code = {**coding, "text": None}
    assert codes({"concept": {"coding": [coding]}}) == [as_code]      # R5 CodeableReference
    assert codes({"coding": [coding]}) == [as_code]                   # CodeableConcept
    assert codes(coding) == [as_code]                                 # R4 Coding
    assert codes({"concept": {"text": "free text reason"}}) == [{"system": None, "code": None, "display": None, "text": "free text reason"}]
    assert codes({"extension": [{"url": "http://hl7.org/fhir/StructureDefinition/data-absent-reason"}]}) == []
    assert codes(None) == []


def test_a_reason_given_as_text_and_a_study_without_subject_or_time():
    study = imaging_study(EXPECTED / "study-01.r5.json")
    study["reason"] = [{"concept": {"text": "persistent cough"}}]
    del study["subject"], study["basedOn"], study["referrer"]
    study["started"] = "2023-08-15"
    row = study_rows(study, SOURCE).study
    assert row["reason_codes"] == [{"system": None, "code": None, "display": None, "text": "persistent cough"}]
    assert (row["patient_id"], row["patient_id_issuer"], row["accession"], row["accession_issuer"], row["referrer"]) == (None,) * 5
    assert (row["study_date"], row["study_datetime"], row["study_tz_offset"]) == (date(2023, 8, 15), None, None)


def test_the_schema_has_every_column_the_rows_have():
    from crawler.tables.schema import CHANGE_LOG, SNAPSHOT

    rows = study_rows(imaging_study(EXPECTED / "study-01.r5.json"), SOURCE)
    for name in KEYS:
        assert set(rows.table(name)[0]) | {"run_id", "synced_at"} == set(SNAPSHOT[name].names)
        assert CHANGE_LOG[name].names == [*SNAPSHOT[name].names[:-2], "change", "run_id", "synced_at"]
        assert SNAPSHOT[name].names[:len(KEYS[name])] == list(KEYS[name])


def test_the_package_and_the_cli_start_without_the_tables_extra():
    code = (
        "import sys, crawler, crawler.cli, crawler.sync, crawler.watch, crawler.tables.rows\n"
        "from crawler.cli import build_parser\n"
        "build_parser().parse_args(['sync', 'http://x/dicom-web', '--parquet', 'p', '--delta', 'd'])\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('pyarrow', 'deltalake', 'duckdb')))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_the_accession_is_the_based_on_identifier_of_type_acsn():
    study = imaging_study(EXPECTED / "study-01.r5.json")
    study["basedOn"].insert(0, {"type": "ServiceRequest", "identifier": {"system": "urn:example:placer", "value": "PLACER-1"}})
    row = study_rows(study, SOURCE).study
    assert (row["accession"], row["accession_issuer"]) == ("ACC-QX-20230314", "urn:oid:1.2.826.0.1.3680043.10.1010.1")


def test_synced_at_grows_strictly_within_a_run_even_when_the_clock_does_not():
    from crawler.tables.collect import Collector

    collector = Collector("http://pacs/dicom-web", 1, clock=lambda: datetime(2026, 1, 1, tzinfo=timezone.utc))
    stamps = [collector.stamp() for _ in range(3)]
    assert stamps == sorted(set(stamps)) and len(stamps) == 3


def test_tables_without_the_extra_are_exit_2_naming_the_option_before_anything_runs(monkeypatch, tmp_path, capsys):
    import crawler.config
    from crawler.cli import main

    real = crawler.config.find_spec
    monkeypatch.setattr(crawler.config, "find_spec", lambda name: None if name == "deltalake" else real(name))
    # nothing listens on port 9: a run that went to the server would end with exit 3
    code = main(["sync", "http://127.0.0.1:9/dicom-web", "--delta", str(tmp_path / "d"), "--state", str(tmp_path / "s.db")])
    assert code == 2
    assert "--delta: the tables need deltalake: pip install 'qido-crawler[tables]'" in capsys.readouterr().err
    assert not (tmp_path / "s.db").exists()


def test_delta_needs_only_deltalake_and_parquet_needs_pyarrow(monkeypatch, tmp_path, capsys):
    import crawler.config
    from crawler.cli import main

    real = crawler.config.find_spec
    monkeypatch.setattr(crawler.config, "find_spec", lambda name: None if name == "pyarrow" else real(name))
    code = main(["sync", "http://127.0.0.1:9/dicom-web", "--delta", str(tmp_path / "d"), "--state", str(tmp_path / "s.db"), "--retries", "0"])
    assert code == 3 and "pyarrow" not in capsys.readouterr().err   # it went on to the (absent) server
    code = main(["sync", "http://127.0.0.1:9/dicom-web", "--parquet", str(tmp_path / "p"), "--state", str(tmp_path / "s2.db")])
    assert code == 2
    assert "--parquet: the tables need pyarrow: pip install 'qido-crawler[tables]'" in capsys.readouterr().err


def test_the_study_uid_is_the_dicom_uid_identifier_whatever_comes_first():
    study = imaging_study(EXPECTED / "study-01.r5.json")
    study["identifier"].reverse()
    study["identifier"].insert(0, {"system": "urn:ietf:rfc:3986", "value": "urn:oid:1.2.3.4"})
    assert study_rows(study, SOURCE).study["study_uid"] == "2.25.135469620240961204817724944333117003989"
    study["identifier"] = [i for i in study["identifier"] if i.get("system") != "urn:dicom:uid"]
    with pytest.raises(ValueError, match="no Study Instance UID"):
        study_rows(study, SOURCE)


def test_a_parquet_file_is_written_a_row_group_at_a_time(tmp_path):
    import pyarrow.parquet as pq

    from crawler.tables.arrow import ParquetFileWriter

    rows = study_rows(imaging_study(EXPECTED / "study-01.r5.json"), SOURCE).instances
    writer = ParquetFileWriter(tmp_path / "instances.parquet", "instances", change_log=False, rows_per_group=2)
    for row in rows:
        writer.add([row])
        assert len(writer.rows) < 2   # never more than a row group held
    writer.close()
    assert pq.ParquetFile(tmp_path / "instances.parquet").num_row_groups == 3
    assert pq.read_table(tmp_path / "instances.parquet").column("sop_uid").to_pylist() == [r["sop_uid"] for r in rows]

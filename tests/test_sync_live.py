"""End to end on the live Orthanc: sync to NDJSON, second sync, export, map, and exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import requests
from fhir.resources.endpoint import Endpoint
from fhir.resources.imagingstudy import ImagingStudy

from crawler.cli import main
from fixtures import corpus

ZONE = ["--timezone", "Europe/Berlin"]


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def read_folder(folder: Path) -> tuple[dict, dict[str, list[dict]]]:
    manifest = json.loads((folder / "manifest.json").read_text())
    resources = {}
    for entry in manifest["output"]:
        lines = (folder / entry["url"]).read_text().splitlines()
        assert len(lines) == entry["count"]
        resources[entry["type"]] = [json.loads(line) for line in lines]
    return manifest, resources


def test_first_sync_writes_a_run_folder_of_valid_resources(pacs, corpus_study_uids, tmp_path, capsys):
    out = tmp_path / "out"
    state = tmp_path / "state.db"
    code, stdout, stderr = run_cli(capsys, "sync", pacs.dicomweb, "--out", str(out), "--state", str(state), "--page-size", "4", "--json", *ZONE)
    assert code == 0, stderr
    summary = json.loads(stdout)
    assert summary["studies_listed"] == len(corpus_study_uids)
    assert summary["studies_new"] == len(corpus_study_uids)
    assert summary["studies_failed"] == summary["studies_inconsistent"] == 0
    assert summary["resources_written"] == len(corpus_study_uids) + 1
    listing_pages = len(corpus_study_uids) // 4 + 1
    # the listing, then its two halves to check that the server did not cap it silently
    assert listing_pages < summary["requests"]["studies"] <= 2 * listing_pages + 2
    requests_by_kind = summary["requests"]
    assert "series" not in requests_by_kind
    # Orthanc's QIDO leaves out sequences: the first study shows that (the other workers wait for
    # its answer), then studies are read by their metadata alone, one request each
    assert requests_by_kind["instances"] == 1
    assert requests_by_kind["metadata"] == len(corpus_study_uids)

    (folder,) = [p for p in out.iterdir()]
    assert str(folder) == summary["run_dir"]
    manifest, resources = read_folder(folder)
    assert manifest["requiresAccessToken"] is False
    assert manifest["transactionTime"].endswith("Z")
    assert manifest["error"] == [] and manifest["deleted"] == []
    assert {e["type"] for e in manifest["output"]} == {"ImagingStudy", "Endpoint"}
    assert not list(folder.glob("*.part"))

    studies = resources["ImagingStudy"]
    assert {s["identifier"][0]["value"] for s in studies} == {f"urn:oid:{uid}" for uid in corpus_study_uids}
    for study in studies:
        ImagingStudy.model_validate(study)
    (endpoint,) = resources["Endpoint"]
    Endpoint.model_validate(endpoint)
    assert endpoint["address"] == pacs.dicomweb
    assert all(s["endpoint"] == [{"reference": f"Endpoint/{endpoint['id']}"}] for s in studies)

    facts = {f.study_uid: f for f in corpus.expected_studies()}
    for study in studies:
        uid = study["identifier"][0]["value"][len("urn:oid:"):]
        if uid in facts:
            assert study["numberOfSeries"] == facts[uid].n_series == len(study["series"])
            assert study["numberOfInstances"] == facts[uid].n_instances
            assert sum(len(s["instance"]) for s in study["series"]) == facts[uid].n_instances


def test_qido_only_crawl_asks_one_instance_query_per_study(pacs, corpus_study_uids, tmp_path, capsys):
    code, stdout, stderr = run_cli(capsys, "sync", pacs.dicomweb, "--state", str(tmp_path / "s.db"), "--metadata", "never", "--json", *ZONE)
    assert code == 0, stderr
    summary = json.loads(stdout)
    assert summary["requests"]["instances"] == len(corpus_study_uids)
    assert summary["requests"]["total"] == len(corpus_study_uids) + summary["requests"]["studies"]


def test_second_sync_writes_nothing_and_export_reproduces_the_set(pacs, corpus_study_uids, tmp_path, capsys):
    out = tmp_path / "out"
    state = tmp_path / "state.db"
    code, stdout, _ = run_cli(capsys, "sync", pacs.dicomweb, "--out", str(out), "--state", str(state), "--json", *ZONE)
    assert code == 0
    first = json.loads(stdout)

    # the next run is incremental: from the first run's date minus the lookback, so none of the
    # fixture studies (all older) is listed
    code, stdout, stderr = run_cli(capsys, "sync", pacs.dicomweb, "--out", str(out), "--state", str(state), "--json", *ZONE)
    assert code == 0, stderr
    incremental = json.loads(stdout)
    assert incremental["scope"].startswith("since ")
    assert incremental["studies_listed"] == 0 and incremental["studies_gone"] == 0
    assert incremental["requests"] == {"total": 1, "studies": 1, "retries": 0}

    code, stdout, stderr = run_cli(capsys, "sync", pacs.dicomweb, "--out", str(out), "--state", str(state), "--full", "--json", *ZONE)
    assert code == 0, stderr
    second = json.loads(stdout)
    assert second["resources_written"] == 0
    assert second["studies_unchanged"] == len(corpus_study_uids)
    assert second["studies_new"] == second["studies_changed"] == 0
    assert second["run_dir"] is None
    assert second["requests"]["total"] == second["requests"]["studies"] == 1
    assert len(list(out.iterdir())) == 1

    exported = tmp_path / "export"
    code, _, stderr = run_cli(capsys, "export", "--state", str(state), "--out", str(exported))
    assert code == 0, stderr
    _, from_export = read_folder(exported)
    _, from_run = read_folder(Path(first["run_dir"]))
    for kind in ("ImagingStudy", "Endpoint"):
        assert sorted(from_export[kind], key=lambda r: r["id"]) == sorted(from_run[kind], key=lambda r: r["id"])

    code, stdout, _ = run_cli(capsys, "status", "--state", str(state), "--json")
    assert code == 0
    status = json.loads(stdout)
    assert status["studies"] == {"synced": len(corpus_study_uids)}
    assert [r["outcome"] for r in status["runs"]] == ["ok", "ok", "ok"]


def test_map_a_saved_dicom_json_file(pacs, tmp_path, capsys):
    study_uid = corpus.uid("study", "01")
    facts = {f.study_uid: f for f in corpus.expected_studies()}[study_uid]
    response = requests.get(f"{pacs.dicomweb}/studies/{study_uid}/instances", params={"includefield": "00080008"}, timeout=30)
    response.raise_for_status()
    saved = tmp_path / "instances.json"
    saved.write_bytes(response.content)
    code, stdout, stderr = run_cli(capsys, "map", str(saved), "--source", pacs.dicomweb, "--wado-url", pacs.dicomweb, *ZONE)
    assert code == 0, stderr
    study = json.loads(stdout)
    ImagingStudy.model_validate(study)
    assert study["identifier"][0]["value"] == f"urn:oid:{study_uid}"
    assert sum(len(s["instance"]) for s in study["series"]) == facts.n_instances


def test_sync_with_nothing_listening_exits_3_with_one_line(tmp_path, capsys):
    code, stdout, stderr = run_cli(capsys, "sync", "http://127.0.0.1:9/dicom-web", "--out", str(tmp_path / "x"), "--state", str(tmp_path / "s.db"), "--retries", "0")
    assert code == 3
    assert stdout == ""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1
    assert "cannot connect" in lines[0] and "127.0.0.1:9" in lines[0]
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("url", ["not a url", "ftp://host/dicom-web", "http://", "http://host:99999/dicom-web", "http://host/dicom-web?x=1"])
def test_malformed_url_exits_2(url, tmp_path, capsys):
    code, _, stderr = run_cli(capsys, "sync", url, "--state", str(tmp_path / "s.db"))
    assert code == 2
    assert len(stderr.strip().splitlines()) == 1
    assert not (tmp_path / "s.db").exists()


def test_unknown_option_exits_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["sync", "http://127.0.0.1:9/dicom-web", "--no-such-option"])
    assert exc.value.code == 2
    assert "unrecognized arguments: --no-such-option" in capsys.readouterr().err


def test_sync_prints_no_patient_data_at_debug_level(pacs, tmp_path, capsys):
    code, stdout, stderr = run_cli(capsys, "sync", pacs.dicomweb, "--out", str(tmp_path / "o"), "--state", str(tmp_path / "s.db"), "-vv", "--json", *ZONE)
    assert code == 0
    for patient in corpus.PATIENTS:
        for secret in (patient.patient_id, patient.name, *patient.name.split("^")):
            if len(secret) >= 4:
                assert secret not in stderr and secret not in stdout


@pytest.fixture(scope="module")
def pacs_with_auth(corpus_files, tmp_path_factory):
    from fixtures import orthanc

    server = orthanc.start(tmp_path_factory.mktemp("orthanc-auth"), user="crawler", password="s3cret-Zq81!")
    try:
        server.upload(corpus_files[:3])
        yield server
    finally:
        server.stop()


def test_basic_auth_by_option_and_environment_and_never_shown(pacs_with_auth, tmp_path, capsys, monkeypatch):
    url = pacs_with_auth.dicomweb
    code, _, stderr = run_cli(capsys, "sync", url, "--state", str(tmp_path / "a.db"), "--retries", "0")
    assert code == 3
    assert "401" in stderr and len(stderr.strip().splitlines()) == 1

    code, stdout, stderr = run_cli(capsys, "sync", url, "--state", str(tmp_path / "b.db"), "--user", "crawler", "--password", "s3cret-Zq81!", "-vv", "--json", *ZONE)
    assert code == 0, stderr
    assert json.loads(stdout)["studies_new"] >= 1
    assert "s3cret-Zq81!" not in stderr + stdout

    monkeypatch.setenv("QIDO_CRAWLER_USER", "crawler")
    monkeypatch.setenv("QIDO_CRAWLER_PASSWORD", "s3cret-Zq81!")
    code, stdout, stderr = run_cli(capsys, "sync", url, "--state", str(tmp_path / "c.db"), "-vv", "--json", *ZONE)
    assert code == 0, stderr
    assert "s3cret-Zq81!" not in stderr + stdout


def test_metadata_auto_fills_the_sequence_rows_with_at_most_one_request_per_series(pacs, corpus_study_uids, tmp_path, capsys):
    code, stdout, stderr = run_cli(capsys, "sync", pacs.dicomweb, "--out", str(tmp_path / "o"), "--state", str(tmp_path / "s.db"), "--json", *ZONE)
    assert code == 0, stderr
    summary = json.loads(stdout)
    _, resources = read_folder(Path(summary["run_dir"]))
    studies = {s["identifier"][0]["value"][8:]: s for s in resources["ImagingStudy"]}
    n_series = sum(s["numberOfSeries"] for s in studies.values())
    assert summary["requests"]["metadata"] + summary["requests"].get("instances", 0) <= n_series
    assert summary["requests"]["metadata"] <= n_series

    first = studies[corpus.uid("study", "01")]
    assert first["procedure"][0]["concept"]["coding"][0]["code"] == "24627-2"
    assert first["reason"][0]["concept"]["coding"][0]["system"] == "http://snomed.info/sct"
    assert first["basedOn"][0]["identifier"]["system"].startswith("urn:oid:")
    assert first["referrer"]["identifier"]["value"]
    assert first["contained"][0]["type"][0]["coding"][0]["code"]
    performers = [p["actor"] for s in first["series"] for p in s.get("performer", [])]
    assert any("identifier" in actor for actor in performers)
    pathology = studies[corpus.uid("study", "05")]
    assert any("specimen" in s for s in pathology["series"])
    brain = studies[corpus.uid("study", "06")]
    assert any(s.get("bodySite", {}).get("concept", {}).get("coding") for s in brain["series"])

    code, stdout, _ = run_cli(capsys, "sync", pacs.dicomweb, "--state", str(tmp_path / "q.db"), "--metadata", "never", "--json", *ZONE)
    assert code == 0
    assert "metadata" not in json.loads(stdout)["requests"]


def test_r4_output_and_patients_validate(pacs, tmp_path, capsys):
    from fhir.resources.R4B.imagingstudy import ImagingStudy as R4ImagingStudy
    from fhir.resources.R4B.patient import Patient as R4Patient
    from fhir.resources.R4B.endpoint import Endpoint as R4Endpoint

    code, stdout, stderr = run_cli(capsys, "sync", pacs.dicomweb, "--out", str(tmp_path / "o"), "--state", str(tmp_path / "s.db"), "--fhir-version", "R4", "--patients", "--validate", "--json", *ZONE)
    assert code == 0, stderr
    _, resources = read_folder(Path(json.loads(stdout)["run_dir"]))
    models = {"ImagingStudy": R4ImagingStudy, "Patient": R4Patient, "Endpoint": R4Endpoint}
    assert set(resources) == set(models)
    for kind, items in resources.items():
        for item in items:
            models[kind].model_validate(item)
    patient_ids = {p["id"] for p in resources["Patient"]}
    assert len(patient_ids) == len(resources["Patient"])
    referenced = {s["subject"]["reference"][8:] for s in resources["ImagingStudy"] if "reference" in s["subject"]}
    assert referenced == patient_ids


def test_the_demo_runs_and_leaves_valid_imaging_studies(tmp_path, capsys):
    from fixtures import demo

    assert demo.main(["--out", str(tmp_path / "demo-output")]) == 0
    err = capsys.readouterr().err
    (ndjson,) = (tmp_path / "demo-output" / "runs").glob("*/ImagingStudy.ndjson")
    lines = ndjson.read_text().splitlines()
    assert len(lines) >= 16 and f"{len(lines)} ImagingStudy resources, each valid FHIR R5" in err
    for line in lines:
        ImagingStudy.model_validate_json(line)

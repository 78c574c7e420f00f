"""The Medplum-based FHIR R4 test server (fixtures/medplum.py): it really validates, rolls back
failed transactions, and its switches give the behaviours of real Medplum deployments; and the
sink, end to end, against it."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
import requests

from crawler.cli import main
from crawler.mapping.ids import study_id
from fixtures.medplum import MedplumServer

FHIR_JSON = {"Content-Type": "application/fhir+json"}
ZONE = ["--timezone", "Europe/Berlin"]


def new_id() -> str:
    return str(uuid.uuid4())


def patient(pid: str) -> dict:
    return {"resourceType": "Patient", "id": pid, "identifier": [{"system": "urn:test", "value": pid}]}


def study(sid: str, patient_id: str) -> dict:
    return {"resourceType": "ImagingStudy", "id": sid, "status": "available", "subject": {"reference": f"Patient/{patient_id}"}}


def put_entry(resource: dict) -> dict:
    return {"resource": resource, "request": {"method": "PUT", "url": f"{resource['resourceType']}/{resource['id']}"}}


def transaction(*entries: dict) -> dict:
    return {"resourceType": "Bundle", "type": "transaction", "entry": list(entries)}


def post(server: MedplumServer, bundle: dict, **headers: str) -> requests.Response:
    return requests.post(server.url, data=json.dumps(bundle), headers={**FHIR_JSON, **headers}, timeout=30)


def read(server: MedplumServer, resource_type: str, resource_id: str) -> requests.Response:
    return requests.get(f"{server.url}/{resource_type}/{resource_id}", timeout=30)


def issue_paths(outcome: dict) -> list[str]:
    return [path for issue in outcome["issue"] for path in issue.get("expression", [])]


def test_metadata_is_an_r4_capability_statement(medplum: Callable[..., MedplumServer]) -> None:
    server = medplum()
    statement = requests.get(f"{server.url}/metadata", timeout=30).json()
    assert statement["resourceType"] == "CapabilityStatement"
    assert statement["fhirVersion"] == "4.0.1"
    resources = {r["type"]: r for r in statement["rest"][0]["resource"]}
    assert set(resources) == {"ImagingStudy", "Patient", "Endpoint"}
    assert all(r["updateCreate"] is True for r in resources.values())
    assert {"transaction", "batch"} <= {i["code"] for i in statement["rest"][0]["interaction"]}
    assert server.seconds_to_ready < 10


def test_an_invalid_imaging_study_is_refused_with_its_element_path(medplum: Callable[..., MedplumServer]) -> None:
    server = medplum()
    sid = new_id()
    bad = {"resourceType": "ImagingStudy", "id": sid, "status": "available"}   # subject is 1..1
    response = requests.put(f"{server.url}/ImagingStudy/{sid}", data=json.dumps(bad), headers=FHIR_JSON, timeout=30)
    assert response.status_code == 400
    outcome = response.json()
    assert outcome["resourceType"] == "OperationOutcome"
    assert "ImagingStudy.subject" in issue_paths(outcome)
    assert read(server, "ImagingStudy", sid).status_code == 404

    wrong_type = {**study(sid, new_id()), "numberOfSeries": "two"}
    response = requests.put(f"{server.url}/ImagingStudy/{sid}", data=json.dumps(wrong_type), headers=FHIR_JSON, timeout=30)
    assert response.status_code == 400
    assert "ImagingStudy.numberOfSeries" in issue_paths(response.json())

    good = study(sid, new_id())
    response = requests.put(f"{server.url}/ImagingStudy/{sid}", data=json.dumps(good), headers=FHIR_JSON, timeout=30)
    assert response.status_code == 200, response.text
    assert read(server, "ImagingStudy", sid).json()["subject"] == good["subject"]


def test_a_transaction_with_one_invalid_entry_rolls_back_entirely(medplum: Callable[..., MedplumServer]) -> None:
    server = medplum()
    kept_pid, kept_sid = new_id(), new_id()
    assert post(server, transaction(put_entry(patient(kept_pid)), put_entry(study(kept_sid, kept_pid)))).status_code == 200
    changed = {**patient(kept_pid), "gender": "other"}
    pid, sid, bad_sid = new_id(), new_id(), new_id()
    bad = {"resourceType": "ImagingStudy", "id": bad_sid, "status": "available"}
    response = post(server, transaction(put_entry(changed), put_entry(patient(pid)), put_entry(study(sid, pid)), put_entry(bad)))
    assert response.status_code == 400
    assert "ImagingStudy.subject" in issue_paths(response.json())
    for resource_type, resource_id in (("Patient", pid), ("ImagingStudy", sid), ("ImagingStudy", bad_sid)):
        assert read(server, resource_type, resource_id).status_code == 404, (resource_type, resource_id)
    assert "gender" not in read(server, "Patient", kept_pid).json()   # the update before the bad entry is undone
    assert read(server, "ImagingStudy", kept_sid).status_code == 200


def test_rejected_ids_fail_like_invalid_resources(medplum: Callable[..., MedplumServer]) -> None:
    refused = new_id()
    server = medplum("--reject-ids", f"{refused},{new_id()}", "--reject-type", "Endpoint")
    pid = new_id()
    response = post(server, transaction(put_entry(patient(pid)), put_entry(study(refused, pid))))
    assert response.status_code == 400
    assert issue_paths(response.json()) == ["ImagingStudy.id"]
    assert read(server, "Patient", pid).status_code == 404
    endpoint = {"resourceType": "Endpoint", "id": new_id(), "status": "active"}
    response = requests.put(f"{server.url}/Endpoint/{endpoint['id']}", data=json.dumps(endpoint), headers=FHIR_JSON, timeout=30)
    assert response.status_code == 400


def test_transactions_as_batches_apply_entries_independently(medplum: Callable[..., MedplumServer]) -> None:
    refused = new_id()
    server = medplum("--transactions-as-batches", "--reject-ids", refused)
    pid, sid = new_id(), new_id()
    response = post(server, transaction(put_entry(patient(pid)), put_entry(study(refused, pid)), put_entry(study(sid, pid))))
    assert response.status_code == 200
    answer = response.json()
    assert answer["type"] == "transaction-response"
    assert [e["response"]["status"] for e in answer["entry"]] == ["200", "400", "200"]
    assert issue_paths(answer["entry"][1]["response"]["outcome"]) == ["ImagingStudy.id"]
    assert read(server, "Patient", pid).status_code == 200
    assert read(server, "ImagingStudy", sid).status_code == 200
    assert read(server, "ImagingStudy", refused).status_code == 404


def test_minimal_mode_answers_with_empty_bodies(medplum: Callable[..., MedplumServer]) -> None:
    refused = new_id()
    server = medplum("--transactions-as-batches", "--minimal", "--reject-ids", refused)
    pid = new_id()
    bundle = transaction(put_entry(patient(pid)), put_entry(study(refused, pid)))
    response = post(server, bundle, Prefer="return=minimal")
    assert (response.status_code, response.content) == (200, b"")   # an entry was refused, and nothing says so
    assert read(server, "Patient", pid).status_code == 200
    assert read(server, "ImagingStudy", refused).status_code == 404
    response = post(server, bundle, Prefer="return=representation")
    assert [e["response"]["status"] for e in response.json()["entry"]] == ["200", "400"]
    bad = requests.put(f"{server.url}/Patient/{pid}", data=b"{}", headers={**FHIR_JSON, "Prefer": "return=minimal"}, timeout=30)
    assert (bad.status_code, bad.content) == (400, b"")   # errors too, as Medplum's interceptor does


def test_more_than_fifty_updates_in_a_transaction_are_refused(medplum: Callable[..., MedplumServer]) -> None:
    server = medplum()
    patients = [patient(new_id()) for _ in range(51)]
    response = post(server, transaction(*map(put_entry, patients)))
    assert response.status_code == 400
    assert response.json()["issue"][0]["details"]["text"] == "Transaction contains more update operations than allowed"
    assert read(server, "Patient", patients[0]["id"]).status_code == 404
    assert post(server, transaction(*map(put_entry, patients[:50]))).status_code == 200

    lower = medplum("--max-updates", "3")
    response = post(lower, transaction(*map(put_entry, patients[:4])))
    assert response.status_code == 400
    assert response.json()["issue"][0]["details"]["text"] == "Transaction contains more update operations than allowed"
    assert post(lower, transaction(*map(put_entry, patients[:3]))).status_code == 200

    batches = medplum("--transactions-as-batches")
    assert post(batches, transaction(*map(put_entry, patients))).status_code == 200   # no limit on batches


def test_no_update_create_refuses_a_put_of_a_new_id(medplum: Callable[..., MedplumServer]) -> None:
    server = medplum("--no-update-create")
    statement = requests.get(f"{server.url}/metadata", timeout=30).json()
    assert {r["updateCreate"] for r in statement["rest"][0]["resource"]} == {False}
    pid = new_id()
    response = requests.put(f"{server.url}/Patient/{pid}", data=json.dumps(patient(pid)), headers=FHIR_JSON, timeout=30)
    assert response.status_code == 404
    assert response.json()["issue"][0]["code"] == "not-found"
    assert post(server, transaction(put_entry(patient(pid)))).status_code == 404
    created = requests.post(f"{server.url}/Patient", data=json.dumps({"resourceType": "Patient"}), headers=FHIR_JSON, timeout=30)
    assert created.status_code == 201
    assigned = created.json()["id"]
    assert created.headers["Location"].endswith(f"/Patient/{assigned}")
    update = {**patient(assigned), "gender": "other"}
    response = requests.put(f"{server.url}/Patient/{assigned}", data=json.dumps(update), headers=FHIR_JSON, timeout=30)
    assert response.status_code == 200
    assert read(server, "Patient", assigned).json()["gender"] == "other"


def test_medplum_refuses_large_conditional_transactions_and_deletes_of_unknown_ids(medplum: Callable[..., MedplumServer]) -> None:
    """Two limits of Medplum's batch.ts a sink meets: conditional writes need a serializable
    transaction of at most 8 entries, and a DELETE of an id it does not have fails the whole
    transaction (404), while a batch applies the rest."""
    server = medplum()
    conditional = {
        "resource": {"resourceType": "Patient", "identifier": [{"system": "urn:test", "value": "c"}]},
        "request": {"method": "PUT", "url": "Patient?identifier=urn:test|c"},
    }
    others = [put_entry(patient(new_id())) for _ in range(8)]
    response = post(server, transaction(conditional, *others))
    assert response.status_code == 400
    assert response.json()["issue"][0]["details"]["text"] == "Transaction requires strict isolation but has too many entries"
    assert post(server, transaction(conditional, *others[:7])).status_code == 200
    found = requests.get(f"{server.url}/Patient", params={"identifier": "urn:test|c"}, timeout=30).json()
    assert found["total"] == 1

    pid = new_id()
    unknown = {"request": {"method": "DELETE", "url": f"Patient/{new_id()}"}}
    response = post(server, transaction(put_entry(patient(pid)), unknown))
    assert response.status_code == 404
    assert read(server, "Patient", pid).status_code == 404
    batches = medplum("--transactions-as-batches")
    answer = post(batches, transaction(put_entry(patient(pid)), unknown)).json()
    assert [e["response"]["status"] for e in answer["entry"]] == ["200", "404"]
    assert read(batches, "Patient", pid).status_code == 200


# --- the sink against it ------------------------------------------------------------------------


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def exported(folder: Path) -> dict[tuple[str, str], dict]:
    manifest = json.loads((folder / "manifest.json").read_text())
    resources = {}
    for entry in manifest["output"]:
        for line in (folder / entry["url"]).read_text().splitlines():
            resource = json.loads(line)
            resources[(resource["resourceType"], resource["id"])] = resource
    return resources


def without_meta(resource: dict) -> dict:
    return {key: value for key, value in resource.items() if key != "meta"}


def test_sync_to_medplum_leaves_exactly_what_export_writes(
    pacs, corpus_study_uids, medplum: Callable[..., MedplumServer], tmp_path: Path, capsys
) -> None:
    server = medplum()
    state = tmp_path / "state.db"
    code, stdout, stderr = run_cli(
        capsys, "sync", pacs.dicomweb, "--fhir-url", server.url, "--fhir-version", "R4", "--patients",
        "--fhir-batch-size", "5", "--state", str(state), "--json", *ZONE,
    )
    assert code == 0, stderr
    summary = json.loads(stdout)
    assert summary["studies_failed"] == 0
    assert summary["studies_new"] == len(corpus_study_uids)

    code, _, stderr = run_cli(capsys, "export", "--state", str(state), "--out", str(tmp_path / "export"))
    assert code == 0, stderr
    expected = exported(tmp_path / "export")
    assert sum(t == "ImagingStudy" for t, _ in expected) == len(corpus_study_uids)
    assert {t for t, _ in expected} == {"ImagingStudy", "Endpoint", "Patient"}
    for (resource_type, resource_id), resource in expected.items():
        response = read(server, resource_type, resource_id)
        assert response.status_code == 200, (resource_type, resource_id, response.text[:300])
        assert without_meta(response.json()) == without_meta(resource), (resource_type, resource_id)
    held = requests.get(f"{server.url}/ImagingStudy", params={"_count": "1000"}, timeout=30).json()
    assert held["total"] == len(corpus_study_uids)


def sync_r4(capsys: pytest.CaptureFixture[str], pacs, server: MedplumServer, state: Path, *extra: str) -> tuple[int, dict, str]:
    code, stdout, stderr = run_cli(
        capsys, "sync", pacs.dicomweb, "--fhir-url", server.url, "--fhir-version", "R4", "--patients",
        "--state", str(state), "--json", *ZONE, *extra,
    )
    return code, json.loads(stdout) if stdout.strip() else {}, stderr


def refusing_server(
    medplum: Callable[..., MedplumServer], pacs, corpus_study_uids: set[str], tmp_path: Path
) -> tuple[MedplumServer, Path, str, str]:
    """Medplum's defaults (transactions run as batches, minimal answers honoured), refusing the
    ImagingStudy of one corpus study for as long as its id is in the returned file."""
    victim_uid = sorted(corpus_study_uids)[0]
    victim_id = study_id(pacs.dicomweb, victim_uid)
    refused = tmp_path / "refused.txt"
    refused.write_text(victim_id + "\n")
    server = medplum("--transactions-as-batches", "--minimal", "--reject-ids", f"@{refused}")
    return server, refused, victim_uid, victim_id


def test_a_batch_server_with_minimal_answers_refusing_one_study_loses_nothing(
    pacs, corpus_study_uids, medplum: Callable[..., MedplumServer], tmp_path: Path, capsys
) -> None:
    server, _, victim_uid, victim_id = refusing_server(medplum, pacs, corpus_study_uids, tmp_path)
    code, summary, stderr = sync_r4(capsys, pacs, server, tmp_path / "state.db")
    assert code == 1, stderr
    assert summary["studies_failed"] == 1
    assert victim_uid in stderr and "ImagingStudy.id" in stderr
    assert read(server, "ImagingStudy", victim_id).status_code == 404
    held = requests.get(f"{server.url}/ImagingStudy", params={"_count": "1000"}, timeout=30).json()
    others = {study_id(pacs.dicomweb, uid) for uid in corpus_study_uids} - {victim_id}
    assert {e["resource"]["id"] for e in held.get("entry", [])} == others


def test_a_refused_study_is_sent_again_by_the_next_run(
    pacs, corpus_study_uids, medplum: Callable[..., MedplumServer], tmp_path: Path, capsys
) -> None:
    server, refused, victim_uid, victim_id = refusing_server(medplum, pacs, corpus_study_uids, tmp_path)
    state = tmp_path / "state.db"
    code, _, stderr = sync_r4(capsys, pacs, server, state)
    assert code == 1, stderr
    refused.write_text("")
    code, summary, stderr = sync_r4(capsys, pacs, server, state)
    assert code == 0, stderr
    assert read(server, "ImagingStudy", victim_id).status_code == 200, f"study {victim_uid} was not sent again"
    assert summary["studies_failed"] == 0

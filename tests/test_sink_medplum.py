"""The FHIR sink against a FHIR server we did not write (issue 20's acceptance lines).

The server is built from Medplum's packages (fixtures/medplum.py): its router, in-memory
repository, batch/transaction processor and validator, in its default mode and in the modes of
real Medplum deployments (transactions run as batches, minimal answers, no update as create, the
limit of 50 updates per transaction). The PACS is the live Orthanc with the fixture corpus, or
the QIDO-RS simulator where 60 studies are needed.
"""

from __future__ import annotations

import json
from pathlib import Path

import pydicom
import pytest
import requests

from crawler.cli import main
from crawler.mapping.ids import study_id
from crawler.sinks import fhir as fhir_sink
from crawler.state import State
from fixtures import corpus
from fixtures.fakepacs import FakePacs
from fixtures.medplum import MedplumServer

from test_incremental_live import _copy_with

ZONE = ["--timezone", "UTC"]


def run(capsys, *args: str) -> tuple[int, dict, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, (json.loads(out) if out.strip() else {}), err


def exported(state: Path, folder: Path, capsys) -> dict[tuple[str, str], dict]:
    assert main(["export", "--state", str(state), "--out", str(folder)]) == 0
    capsys.readouterr()
    resources = {}
    for path in folder.glob("*.ndjson"):
        for line in path.read_text().splitlines():
            resource = json.loads(line)
            resources[(resource["resourceType"], resource["id"])] = resource
    return resources


def held(server: MedplumServer, resource_type: str) -> dict[str, dict]:
    bundle = requests.get(f"{server.url}/{resource_type}", params={"_count": "1000"}, timeout=30).json()
    return {e["resource"]["id"]: e["resource"] for e in bundle.get("entry", [])}


def without_meta(resource: dict) -> dict:
    return {k: v for k, v in resource.items() if k != "meta"}


def assert_server_holds_exactly(server: MedplumServer, expected: dict[tuple[str, str], dict]) -> None:
    for resource_type in ("ImagingStudy", "Patient", "Endpoint"):
        on_server = held(server, resource_type)
        wanted = {i: r for (t, i), r in expected.items() if t == resource_type}
        assert set(on_server) == set(wanted), resource_type
        for resource_id, resource in wanted.items():
            assert without_meta(on_server[resource_id]) == resource, (resource_type, resource_id)


def test_medplum_follows_a_sync_with_creates_updates_and_deletes(live, corpus_files, medplum, tmp_path, capsys):
    server = medplum()
    state = tmp_path / "state.db"
    base = ["sync", live.dicomweb, "--state", str(state), "--fhir-url", server.url, "--fhir-version", "R4", "--patients", "--json", *ZONE]
    code, summary, err = run(capsys, *base)
    assert code == 0 and summary["studies_failed"] == 0, err
    assert_server_holds_exactly(server, exported(state, tmp_path / "export1", capsys))

    by_study = {pydicom.dcmread(p, stop_before_pixels=True).StudyInstanceUID: p for p in corpus_files}
    changed, gone = corpus.uid("study", "09"), corpus.uid("study", "03")
    live.upload([_copy_with(by_study[changed], tmp_path / "extra.dcm", SOPInstanceUID=corpus.uid("instance", "extra7"), InstanceNumber=97)])
    live.upload([_copy_with(by_study[corpus.uid("study", "05")], tmp_path / "new.dcm", StudyInstanceUID=corpus.uid("study", "new7"),
                            SeriesInstanceUID=corpus.uid("series", "new7"), SOPInstanceUID=corpus.uid("instance", "new7"))])
    live.rest("DELETE", f"/studies/{live.rest('POST', '/tools/lookup', data=gone).json()[0]['ID']}")
    code, summary, err = run(capsys, *base, "--full", "--prune")
    assert code == 0, err
    assert (summary["studies_new"], summary["studies_changed"], summary["studies_gone"], summary["resources_deleted"]) == (1, 1, 1, 1)
    expected = exported(state, tmp_path / "export2", capsys)
    assert ("ImagingStudy", study_id(live.dicomweb, gone)) not in expected
    assert_server_holds_exactly(server, expected)
    assert requests.get(f"{server.url}/ImagingStudy/{study_id(live.dicomweb, gone)}", timeout=30).status_code in (404, 410)


@pytest.mark.parametrize("flags", [(), ("--transactions-as-batches", "--minimal")], ids=["transactions", "batches-minimal"])
def test_refused_studies_are_failed_with_their_element_path_and_sent_again(pacs, corpus_study_uids, medplum, flags, tmp_path, capsys):
    refused = sorted(corpus_study_uids)[:2]
    server = medplum(*flags, "--reject-ids", ",".join(study_id(pacs.dicomweb, uid) for uid in refused))
    state = tmp_path / "state.db"
    args = ["sync", pacs.dicomweb, "--state", str(state), "--fhir-url", server.url, "--fhir-version", "R4", "--patients",
            "--json", *ZONE]
    code, summary, err = run(capsys, *args)
    assert code == 1, err
    assert summary["studies_failed"] == 2 and summary["studies_new"] == len(corpus_study_uids) - 2, err
    s = State(state)
    try:
        rows = {uid: s.study(pacs.dicomweb, uid) for uid in corpus_study_uids}
    finally:
        s.close()
    assert {uid for uid, row in rows.items() if row.status != "synced"} == set(refused)
    assert all("ImagingStudy.id" in rows[uid].last_error and "HTTP 400" in rows[uid].last_error for uid in refused)
    on_server = held(server, "ImagingStudy")
    assert set(on_server) == {study_id(pacs.dicomweb, uid) for uid in corpus_study_uids if uid not in refused}
    expected = exported(state, tmp_path / "export", capsys)
    for (resource_type, resource_id), resource in expected.items():
        got = requests.get(f"{server.url}/{resource_type}/{resource_id}", timeout=30)
        assert got.status_code == 200 and without_meta(got.json()) == resource
    code, summary, err = run(capsys, *args, "--full")
    assert code == 1 and summary["studies_failed"] == 2 and summary["studies_unchanged"] == len(corpus_study_uids) - 2, err
    assert err.count("ImagingStudy.id") >= 2


def test_no_update_as_create_stops_at_the_check(pacs, medplum, tmp_path, capsys):
    server = medplum("--no-update-create")
    code, _, err = run(capsys, "sync", pacs.dicomweb, "--state", str(tmp_path / "s.db"), "--fhir-url", server.url,
                       "--fhir-version", "R4", *ZONE)
    assert code == 2 and "update as create" in err and len(err.strip().splitlines()) == 1
    assert held(server, "ImagingStudy") == {}


def test_sixty_studies_to_a_server_taking_fifty_updates(medplum, tmp_path, capsys, monkeypatch):
    bundles: list[int] = []
    refusals: list[int] = []
    transact = fhir_sink.FhirServer._transact

    def counted(self, units):
        entries = len(self._build(units).methods)
        bundles.append(entries)
        try:
            return transact(self, units)
        except fhir_sink._TooLarge:
            refusals.append(entries)
            raise

    monkeypatch.setattr(fhir_sink.FhirServer, "_transact", counted)
    server = medplum()
    state = tmp_path / "state.db"
    with FakePacs(n_studies=60, seed=11) as first, FakePacs(n_studies=60, seed=12) as second:
        args = ["--state", str(state), "--fhir-url", server.url, "--fhir-version", "R4", "--patients", "--metadata", "never",
                "--json", *ZONE]
        code, summary, err = run(capsys, "sync", first.url, *args)
        assert code == 0 and summary["studies_new"] == 60, err
        assert len(refusals) == 1 and bundles[0] == refusals[0] > 50
        assert len(bundles) - 1 <= 4 and all(n <= 50 for n in bundles[1:])
        assert len(held(server, "ImagingStudy")) == 60
        bundles.clear()
        code, summary, err = run(capsys, "sync", second.url, *args)
        assert code == 0 and summary["studies_new"] == 60, err
        assert len(refusals) == 1 and bundles and all(n <= 50 for n in bundles)
        assert len(held(server, "ImagingStudy")) == 120


@pytest.mark.parametrize("flags", [("--no-update-create",), ("--no-update-create", "--transactions-as-batches", "--minimal")],
                         ids=["transactions", "batches-minimal"])
def test_server_ids_on_medplum_without_update_as_create(live, corpus_files, medplum, flags, tmp_path, capsys):
    server = medplum(*flags)
    state = tmp_path / "state.db"
    base = ["sync", live.dicomweb, "--state", str(state), "--fhir-url", server.url, "--fhir-version", "R4", "--fhir-ids", "server",
            "--json", *ZONE]
    code, summary, err = run(capsys, *base)
    assert code == 0 and summary["studies_failed"] == 0, err
    if "--transactions-as-batches" not in flags:    # Medplum: conditional writes, 8 entries per transaction
        assert "at most 8 entries per Bundle" in err

    def held_by_uid() -> dict[str, dict]:
        return {r["identifier"][0]["value"][8:]: r for r in held(server, "ImagingStudy").values()}

    first = {uid: r["id"] for uid, r in held_by_uid().items()}
    assert len(first) == summary["studies_new"] and not any(i == study_id(live.dicomweb, uid) for uid, i in first.items())
    by_study = {pydicom.dcmread(p, stop_before_pixels=True).StudyInstanceUID: p for p in corpus_files}
    changed, gone = corpus.uid("study", "09"), corpus.uid("study", "03")
    live.upload([_copy_with(by_study[changed], tmp_path / "extra.dcm", SOPInstanceUID=corpus.uid("instance", "extra8"), InstanceNumber=96)])
    live.rest("DELETE", f"/studies/{live.rest('POST', '/tools/lookup', data=gone).json()[0]['ID']}")
    code, summary, err = run(capsys, *base, "--full", "--prune")
    assert code == 0 and (summary["studies_changed"], summary["resources_deleted"]) == (1, 1), err
    now = held_by_uid()
    assert {uid: r["id"] for uid, r in now.items()} == {uid: i for uid, i in first.items() if uid != gone}
    (endpoint,) = held(server, "Endpoint").values()
    expected = exported(state, tmp_path / "export", capsys)
    for uid, resource in now.items():
        ours = expected[("ImagingStudy", study_id(live.dicomweb, uid))]
        assert fhir_sink._same(resource, json.dumps(ours).encode(), references=False), uid
        assert resource["endpoint"][0]["reference"] == f"Endpoint/{endpoint['id']}"

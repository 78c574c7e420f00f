"""--fhir-ids server: conditional updates by identifier for servers that forbid update as create.

Against the FHIR simulator (fixtures/fakefhir.py) with ``update_create=False``: a PUT of a new id
is refused, a conditional update by identifier creates the resource under an id the server
chooses. The sink must address every later update and deletion to that resource.
"""

from __future__ import annotations

import orjson
import pytest

from crawler.sinks.fhir import FhirServer
from fixtures.fakefhir import FakeFhir
from tests.test_sink_fhir import ENDPOINT, ENDPOINT_ID, FAST, key, posts

SYSTEM = "urn:oid:1.2.3.4"


def patient(p: int, system: str | None = SYSTEM) -> tuple[str, str, bytes]:
    identifier = {"system": system, "value": f"PID{p}"} if system else {"value": f"PID{p}"}
    body = {"resourceType": "Patient", "id": f"pat-{p}", "identifier": [identifier], "gender": "female"}
    return "Patient", f"pat-{p}", orjson.dumps(body)


def study(i: int, p: int, status: str = "available") -> tuple[str, str, bytes]:
    body = {
        "resourceType": "ImagingStudy",
        "id": f"study-{i}",
        "identifier": [{"system": "urn:dicom:uid", "value": f"urn:oid:{key(i)}"}],
        "status": status,
        "subject": {"reference": f"Patient/pat-{p}"},
        "endpoint": [{"reference": f"Endpoint/{ENDPOINT_ID}"}],
        "series": [{"uid": f"1.2.{i}", "modality": {"code": "CT"}, "endpoint": [{"reference": f"Endpoint/{ENDPOINT_ID}"}]}],
    }
    return "ImagingStudy", f"study-{i}", orjson.dumps(body)


def resources(i: int, n_patients: int) -> list[tuple[str, str, bytes]]:
    return [("Endpoint", ENDPOINT_ID, orjson.dumps(ENDPOINT)), patient(i % n_patients), study(i, i % n_patients)]


def server_sink(server: FakeFhir, known: dict | None = None, **options) -> FhirServer:
    sink = FhirServer(server.url, retry=FAST, sleep=lambda s: None, ids="server", **options)
    if known is not None:
        sink.server_id_lookup = lambda t, i: known.get((t, i))
    return sink


def by_identifier(server: FakeFhir, resource_type: str) -> dict[str, dict]:
    return {r["identifier"][0]["value"]: r for (t, _), (_, r) in server.resources.items() if t == resource_type}


def test_a_server_without_update_as_create_gets_everything_under_its_own_ids():
    with FakeFhir(update_create=False) as server:
        sink = server_sink(server, known={})
        sink.check()
        for i in range(6):
            sink.add(key(i), resources(i, 3))
        assert sink.flush() == {}
        ids = sink.take_server_ids()
        assert len(ids) == 1 + 3 + 6 and all(v.startswith("srv") for v in ids.values())
        studies = by_identifier(server, "ImagingStudy")
        assert len(studies) == 6
        one = studies[f"urn:oid:{key(4)}"]
        assert one["id"] == ids[("ImagingStudy", "study-4")]
        assert one["subject"]["reference"] == f"Patient/{ids[('Patient', 'pat-1')]}"
        assert one["endpoint"][0]["reference"] == one["series"][0]["endpoint"][0]["reference"] == f"Endpoint/{ids[('Endpoint', ENDPOINT_ID)]}"
        assert len(server.resources) == 10

        # the next run: an update of one study alone (its Patient unchanged) and a deletion
        again = server_sink(server, known=ids)
        again.add(key(4), [study(4, 1, status="cancelled")])
        again.delete(key(5), "ImagingStudy", "study-5")
        assert again.flush() == {}
        studies = by_identifier(server, "ImagingStudy")
        assert set(studies) == {f"urn:oid:{key(i)}" for i in range(5)}
        assert studies[f"urn:oid:{key(4)}"]["id"] == ids[("ImagingStudy", "study-4")]
        assert studies[f"urn:oid:{key(4)}"]["status"] == "cancelled"
        assert studies[f"urn:oid:{key(4)}"]["subject"]["reference"] == f"Patient/{ids[('Patient', 'pat-1')]}"
        assert again.take_server_ids() == {} and again.deleted == 1


def test_without_locations_the_server_ids_are_read_back():
    with FakeFhir(update_create=False, answer="empty") as server:
        sink = server_sink(server, known={})
        for i in range(3):
            sink.add(key(i), resources(i, 3))
        assert sink.flush() == {}
        ids = sink.take_server_ids()
        assert {r["id"] for (_, r) in server.resources.values()} == set(ids.values()) and len(ids) == 7
        assert sink.read_back == 7


def test_studies_that_cannot_be_addressed_are_refused_alone():
    with FakeFhir(update_create=False) as server:
        sink = server_sink(server, known={})
        sink.add(key(0), [("Endpoint", ENDPOINT_ID, orjson.dumps(ENDPOINT)), patient(0, system=None), study(0, 0)])
        sink.add(key(1), [patient(1), study(1, 1)])     # its Endpoint was never sent: no server id
        sink.add(key(2), resources(2, 3))
        refused = sink.flush()
        assert set(refused) == {key(0), key(1)}
        assert "no identifier with a system" in refused[key(0)] and "server id of its Endpoint is not known" in refused[key(1)]
        assert set(by_identifier(server, "ImagingStudy")) == {f"urn:oid:{key(2)}"}
        assert posts(server) == [3]


def test_medplum_strict_isolation_refusal_cuts_bundles_to_8_entries():
    from crawler.sinks import fhir

    assert fhir._size_refusal(400, orjson.dumps({"resourceType": "OperationOutcome", "issue": [
        {"severity": "error", "code": "invalid", "details": {"text": "Transaction requires strict isolation but has too many entries"}}]})) == (True, 8)


def test_ours_stays_the_default_and_a_wrong_value_is_a_config_error():
    from crawler.errors import ConfigError

    assert FhirServer("http://localhost/fhir").ids == "ours"
    with pytest.raises(ConfigError, match="the FHIR ids must be ours or server") as raised:
        FhirServer("http://localhost/fhir", ids="theirs")
    assert raised.value.setting == "fhir_ids"


def test_a_sync_with_server_ids_follows_updates_and_deletions(tmp_path, capsys):
    import json

    from crawler.cli import main
    from crawler.mapping.ids import study_id
    from crawler.state import State
    from fixtures.fakepacs import FakePacs

    state = tmp_path / "state.db"
    with FakePacs(n_studies=8, seed=21) as pacs, FakeFhir(update_create=False) as server:
        args = ["sync", pacs.url, "--state", str(state), "--fhir-url", server.url, "--fhir-ids", "server", "--metadata", "never",
                "--json", "--timezone", "UTC"]
        assert main(args) == 0, capsys.readouterr().err
        capsys.readouterr()
        studies = by_identifier(server, "ImagingStudy")
        assert len(studies) == 8 and all(r["id"].startswith("srv") for r in studies.values())
        first = {uid: r["id"] for uid, r in studies.items()}
        pacs.add_instances(2)
        pacs.delete_study(3)
        assert main([*args, "--full", "--prune"]) == 0
        summary = json.loads(capsys.readouterr().out)
        assert (summary["studies_changed"], summary["resources_deleted"]) == (1, 1)
        studies = by_identifier(server, "ImagingStudy")
        assert set(studies) == {f"urn:oid:{pacs.study_uid(i)}" for i in range(8) if i != 3}
        assert {uid: r["id"] for uid, r in studies.items()} == {uid: i for uid, i in first.items() if uid != f"urn:oid:{pacs.study_uid(3)}"}
        assert studies[f"urn:oid:{pacs.study_uid(2)}"]["meta"]["versionId"] == "2"
        endpoint_id = next(r["id"] for (t, _), (_, r) in server.resources.items() if t == "Endpoint")
        assert all(r["endpoint"][0]["reference"] == f"Endpoint/{endpoint_id}" for r in studies.values())
        held = State(state)
        try:
            for i in (0, 2):
                ours = study_id(pacs.url, pacs.study_uid(i))
                assert held.fhir_server_id(server.url, "ImagingStudy", ours) == first[f"urn:oid:{pacs.study_uid(i)}"]
        finally:
            held.close()


def test_switching_a_state_to_server_ids_sends_the_shared_resources_again(tmp_path, capsys):
    from crawler.cli import main
    from fixtures.fakepacs import FakePacs

    state = tmp_path / "state.db"
    with FakePacs(n_studies=4, seed=22) as pacs, FakeFhir() as before, FakeFhir(update_create=False) as server:
        common = ["sync", pacs.url, "--state", str(state), "--metadata", "never", "-q", "--timezone", "UTC"]
        assert main([*common, "--fhir-url", before.url]) == 0
        pacs.add_instances(1)
        code = main([*common, "--fhir-url", server.url, "--fhir-ids", "server", "--full"])
        assert code == 0, capsys.readouterr().err
        held = server.resources
        assert sum(t == "Endpoint" for t, _ in held) == 1
        (study,) = [r for (t, _), (_, r) in held.items() if t == "ImagingStudy"]
        endpoint_id = next(i for t, i in held if t == "Endpoint")
        assert study["identifier"][0]["value"] == f"urn:oid:{pacs.study_uid(1)}"
        assert study["endpoint"][0]["reference"] == f"Endpoint/{endpoint_id}"

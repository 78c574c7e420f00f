"""The FHIR server sink (crawler/sinks/fhir.py) against the FHIR simulator (fixtures/fakefhir.py).

No real FHIR server can run here; FakeFhir implements the RESTful interactions the sink uses,
per the specification, and injects the faults (429/503, rejections, refused credentials) that
a real server does not produce on demand. Retries are tested without sleeping.
"""

from __future__ import annotations

import email.utils
import logging
import socket
import time
from pathlib import Path

import orjson
import pytest
import requests

from crawler.errors import ConfigError, SinkError
from crawler.mapping import endpoint
from crawler.http import RetryPolicy
from crawler.sinks import fhir
from crawler.sinks.fhir import FhirServer
from fixtures.fakefhir import FakeFhir

FIXTURES = Path(__file__).parent.parent / "fixtures" / "dicomjson"
FAST = RetryPolicy(attempts=3, max_seconds=60.0, base_delay=0.01, max_delay=0.01)
ENDPOINT = endpoint("http://pacs.example/dicom-web")
ENDPOINT_ID = ENDPOINT["id"]
NAME = "SECRETFAMILY"


def key(i: int) -> str:
    return f"2.25.{1000 + i}"


def patient(p: int) -> tuple[str, str, bytes]:
    body = {"resourceType": "Patient", "id": f"pat-{p}", "name": [{"family": f"{NAME}{p}", "given": ["Ann"]}], "gender": "female"}
    return "Patient", f"pat-{p}", orjson.dumps(body)


def imaging_study(i: int, p: int, status: str = "available") -> tuple[str, str, bytes]:
    body = {
        "resourceType": "ImagingStudy",
        "id": f"study-{i}",
        "identifier": [{"system": "urn:dicom:uid", "value": f"urn:oid:{key(i)}"}],
        "status": status,
        "subject": {"reference": f"Patient/pat-{p}"},
        "endpoint": [{"reference": f"Endpoint/{ENDPOINT_ID}"}],
        "numberOfSeries": 1,
    }
    return "ImagingStudy", f"study-{i}", orjson.dumps(body)


def resources(i: int, n_patients: int, status: str = "available") -> list[tuple[str, str, bytes]]:
    p = i % n_patients
    return [("Endpoint", ENDPOINT_ID, orjson.dumps(ENDPOINT)), patient(p), imaging_study(i, p, status)]


def make_sink(server: FakeFhir, waits: list[float] | None = None, url: str | None = None, **options) -> FhirServer:
    options.setdefault("retry", FAST)
    return FhirServer(url or server.url, sleep=(waits if waits is not None else []).append, **options)


def posts(server: FakeFhir) -> list[int]:
    return [r.n_entries for r in server.requests if r.method == "POST"]


def without_meta(resource: dict) -> dict:
    return {k: v for k, v in resource.items() if k != "meta"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- capabilities ------------------------------------------------------------------------


@pytest.mark.parametrize(("wanted", "served"), [("R5", "5.0.0"), ("R4", "4.0.1"), ("R4", "4.3.0")])
def test_check_accepts_the_matching_fhir_version(wanted, served):
    with FakeFhir(version=served) as server:
        sink = make_sink(server, fhir_version=wanted)
        assert sink.check() == served
        assert server.requests[0].path == "/metadata"


@pytest.mark.parametrize(("wanted", "served"), [("R5", "4.0.1"), ("R4", "5.0.0")])
def test_version_mismatch_is_a_one_line_config_error(wanted, served):
    with FakeFhir(version=served) as server:
        with pytest.raises(ConfigError) as caught:
            make_sink(server, fhir_version=wanted).check()
    message = str(caught.value)
    assert "\n" not in message and served in message and f"--fhir-version {wanted}" in message


def test_unreachable_server_is_a_sink_error_after_retries_without_waiting():
    waits: list[float] = []
    sink = FhirServer(f"http://127.0.0.1:{free_port()}/fhir", retry=FAST, sleep=waits.append)
    started = time.monotonic()
    with pytest.raises(SinkError) as caught:
        sink.check()
    assert str(caught.value).startswith("cannot reach FHIR server http://127.0.0.1:")
    assert sink.requests == FAST.attempts and len(waits) == FAST.attempts - 1
    assert time.monotonic() - started < 10  # the waits are recorded, not slept


def test_unreachable_on_first_flush_without_check():
    sink = FhirServer(f"http://127.0.0.1:{free_port()}/fhir", retry=FAST, sleep=lambda s: None)
    sink.add(key(1), resources(1, 1))
    with pytest.raises(SinkError, match="^cannot reach FHIR server"):
        sink.flush()
    sink.abort()


def test_constructor_validates_its_arguments():
    with pytest.raises(ConfigError, match="R5 or R4"):
        FhirServer("http://localhost/fhir", fhir_version="STU3")
    with pytest.raises(ConfigError, match="query"):
        FhirServer("http://localhost/fhir?x=1")
    with pytest.raises(ConfigError):
        FhirServer("ftp://localhost/fhir")
    with pytest.raises(ConfigError, match="batch size"):
        FhirServer("http://localhost/fhir", batch_size=0)


# --- transactions --------------------------------------------------------------------------


def test_250_studies_in_batches_of_100_are_3_transactions_and_land_exactly():
    with FakeFhir() as server:
        sink = make_sink(server, batch_size=100)
        sink.check()
        for i in range(250):
            sink.add(key(i), resources(i, 50))
            if i == 99:
                assert posts(server) == [151]       # sent as soon as 100 studies are queued
        assert sink.flush() == {}
        assert posts(server) == [151, 151, 101]     # one Endpoint, 50 Patients, the studies
        held = server.resources
        expected = {("Endpoint", ENDPOINT_ID)} | {("Patient", f"pat-{p}") for p in range(50)}
        expected |= {("ImagingStudy", f"study-{i}") for i in range(250)}
        assert set(held) == expected
        assert without_meta(held[("ImagingStudy", "study-42")][1]) == orjson.loads(imaging_study(42, 42 % 50)[2])
        assert {version for version, _ in held.values()} == {"1"}
        assert (sink.bundles, sink.resources_sent, sink.refused) == (3, 151 + 151 + 101, 0)
        assert sink.requests == 4                    # /metadata and three transactions
        assert sink.finish() == f"FHIR server {server.url}"


def test_shared_resources_are_sent_once_per_bundle_before_the_studies():
    with FakeFhir() as server:
        sink = make_sink(server)
        for i in range(10):
            sink.add(key(i), resources(i, 3))
        assert sink.flush() == {}
        (bundle,) = server.transactions
        urls = [e["request"]["url"] for e in bundle["entry"]]
        assert len(urls) == len(set(urls)) == 1 + 3 + 10
        assert urls.count(f"Endpoint/{ENDPOINT_ID}") == 1
        kinds = [u.split("/")[0] for u in urls]
        assert kinds.index("ImagingStudy") == 4 and set(kinds[:4]) == {"Endpoint", "Patient"}
        assert all(e["fullUrl"] == f"{server.url}/{e['request']['url']}" and e["request"]["method"] == "PUT" for e in bundle["entry"])


def test_the_bundle_is_a_valid_fhir_r5_transaction():
    bundle_model = pytest.importorskip("fhir.resources.bundle").Bundle
    with FakeFhir() as server:
        sink = make_sink(server)
        for i in range(3):
            sink.add(key(i), resources(i, 2))
        sink.delete(key(9), "ImagingStudy", "study-9")
        assert sink.flush() == {}
        (bundle,) = server.transactions
    parsed = bundle_model.model_validate(bundle)
    assert parsed.type == "transaction" and len(parsed.entry) == 1 + 2 + 3 + 1
    assert parsed.entry[-1].request.method == "DELETE" and parsed.entry[-1].resource is None


@pytest.mark.parametrize(("wanted", "served"), [("R5", "5.0.0"), ("R4", "4.0.1")])
def test_mapped_fixture_studies_land_as_mapped(wanted, served):
    from crawler.mapping import MappingOptions, StudyInput, map_resources
    from crawler.mapping.r4 import endpoint_r4, patient_r4, to_r4

    to = {"ImagingStudy": to_r4, "Endpoint": endpoint_r4, "Patient": patient_r4}
    options = MappingOptions(source="http://pacs/dicom-web", wado_base="http://pacs/dicom-web")
    sent = {}
    with FakeFhir(version=served) as server:
        sink = make_sink(server, fhir_version=wanted, batch_size=5)
        for path in sorted(FIXTURES.glob("*.json")):
            data = orjson.loads(path.read_bytes())
            mapped = map_resources(StudyInput(data["study"], data["metadata"]), options)
            out = [r if wanted == "R5" else to[r["resourceType"]](r) for r in mapped.resources()]
            sent.update({(r["resourceType"], r["id"]): r for r in out})
            sink.add(path.stem, [(r["resourceType"], r["id"], orjson.dumps(r)) for r in out])
        assert sink.flush() == {}
        held = server.resources
    assert {k: without_meta(r) for k, (_, r) in held.items()} == sent
    assert sum(k[0] == "ImagingStudy" for k in held) == len(list(FIXTURES.glob("*.json")))


def test_an_update_makes_version_2_and_an_unchanged_one_does_not():
    with FakeFhir() as server:
        sink = make_sink(server)
        sink.add(key(1), resources(1, 1))
        assert sink.flush() == {}
        sink.add(key(1), [imaging_study(1, 0, status="cancelled")])
        assert sink.flush() == {}
        held = server.get("ImagingStudy", "study-1")
        assert held["meta"]["versionId"] == "2" and held["status"] == "cancelled"
        sink.add(key(1), resources(1, 1, status="cancelled"))
        assert sink.flush() == {}
        assert server.get("ImagingStudy", "study-1")["meta"]["versionId"] == "2"
        assert server.get("Patient", "pat-0")["meta"]["versionId"] == "1"


def test_delete_removes_the_resource_and_a_missing_one_counts_as_deleted():
    with FakeFhir() as server:
        sink = make_sink(server)
        sink.add(key(1), resources(1, 1))
        sink.add(key(2), resources(2, 1))
        assert sink.flush() == {}
        sink.delete(key(1), "ImagingStudy", "study-1")
        sink.delete(key(3), "ImagingStudy", "study-never-sent")
        assert sink.flush() == {}
        assert sink.deleted == 2
        assert requests.get(f"{server.url}/ImagingStudy/study-1", timeout=5).status_code == 410
        assert requests.get(f"{server.url}/ImagingStudy/study-never-sent", timeout=5).status_code == 404
        assert server.get("ImagingStudy", "study-2") is not None


def test_a_server_answering_404_to_a_missing_delete_does_not_refuse_it():
    with FakeFhir(delete_absent_status=404) as server:
        sink = make_sink(server)
        for i in range(3):
            sink.add(key(i), resources(i, 3))
        sink.delete(key(7), "ImagingStudy", "study-gone")
        assert sink.flush() == {}        # the bundle fails with 404, one by one the DELETE is fine
        assert posts(server) == [8, 3, 3, 3, 1]
        assert {k for k in server.resources if k[0] == "ImagingStudy"} == {("ImagingStudy", f"study-{i}") for i in range(3)}


def test_a_put_and_a_delete_of_one_resource_never_share_a_bundle():
    with FakeFhir() as server:
        sink = make_sink(server)
        sink.add(key(1), resources(1, 1))
        sink.delete(key(1), "ImagingStudy", "study-1")
        sink.add(key(2), resources(2, 1))
        assert sink.flush() == {}
        assert posts(server) == [3, 4]       # the DELETE starts the second bundle
        assert server.get("ImagingStudy", "study-1") is None
        assert server.get("ImagingStudy", "study-2") is not None


def test_bundles_are_cut_at_the_entry_limit():
    with FakeFhir() as server:
        sink = make_sink(server, max_entries=10)
        for i in range(20):
            sink.add(key(i), resources(i, 20))
        assert sink.flush() == {}
        assert len(posts(server)) > 2 and all(n <= 10 for n in posts(server))
        assert sum(posts(server)) == 40 + len(posts(server))   # the Endpoint once per Bundle
        assert len(server.resources) == 41


def test_bundles_are_cut_at_the_byte_limit():
    with FakeFhir() as server:
        sink = make_sink(server, max_bytes=2000)
        for i in range(20):
            sink.add(key(i), resources(i, 20))
        assert sink.flush() == {}
        sizes = [len(orjson.dumps(t)) for t in server.transactions]
        assert len(sizes) > 2 and max(sizes) < 4000
        assert sum(posts(server)) == 40 + len(posts(server))
        assert len(server.resources) == 41


def test_the_default_bundle_holds_at_most_500_entries():
    """200 studies per Bundle, each with a Patient of its own: 401 entries would fit, 600 with a
    second Patient each do not; the default cap (Azure's 500) cuts the Bundle."""
    assert fhir.MAX_ENTRIES == 500
    with FakeFhir() as server:
        sink = make_sink(server, batch_size=200)
        for i in range(200):
            extra = ("Patient", f"other-{i}", orjson.dumps({"resourceType": "Patient", "id": f"other-{i}", "gender": "other"}))
            sink.add(key(i), [*resources(i, 200), extra])
        assert sink.flush() == {}
        assert max(posts(server)) <= 500 and len(posts(server)) == 2
        assert sum(posts(server)) == 200 * 3 + 2 and len(server.resources) == 601


# --- faults --------------------------------------------------------------------------------


def test_429_and_503_are_retried_honouring_retry_after_without_sleeping():
    waits: list[float] = []
    with FakeFhir(fail_requests={2: 429, 3: 503}, retry_after="7") as server:
        sink = make_sink(server, waits)
        for i in range(5):
            sink.add(key(i), resources(i, 5))
        assert sink.flush() == {}
        assert waits == [7.0, 7.0] and sink.retries == 2
        assert [s for s in (429, 503) if server.statuses[s]] == [429, 503]
        assert posts(server) == [11, 11, 11] and sink.bundles == 1
        assert len(server.resources) == 11


def test_retry_after_as_an_http_date():
    waits: list[float] = []
    later = email.utils.formatdate(time.time() + 30, usegmt=True)
    with FakeFhir(fail_requests={2: 503}, retry_after=later) as server:
        sink = make_sink(server, waits)
        sink.add(key(1), resources(1, 1))
        assert sink.flush() == {}
    assert len(waits) == 1 and 20 < waits[0] <= 31


def test_a_server_that_keeps_failing_refuses_the_studies_in_bounded_time():
    waits: list[float] = []
    with FakeFhir() as server:
        sink = make_sink(server, waits)
        sink.check()
        server.fail_every, server.fail_status = 1, 500
        for i in range(10):
            sink.add(key(i), resources(i, 10))
        refused = sink.flush()
        assert set(refused) == {key(i) for i in range(10)}
        assert all(r.startswith("HTTP 500 Internal Server Error") for r in refused.values())
        # the bundle, then GIVE_UP_AFTER studies one by one, each with all its attempts
        assert len(posts(server)) == FAST.attempts * (1 + fhir.GIVE_UP_AFTER)
        assert server.resources == {}


def test_a_rejected_resource_only_holds_back_its_own_study():
    with FakeFhir(reject={("ImagingStudy", "study-7")}) as server:
        sink = make_sink(server)
        for i in range(20):
            sink.add(key(i), resources(i, 20))
        refused = sink.flush()
        assert list(refused) == [key(7)]
        reason = refused[key(7)]
        assert reason == "HTTP 422 Unprocessable Entity: error business-rule at ImagingStudy.subject"
        assert "\n" not in reason and len(reason) <= 250 and NAME not in reason and "{" not in reason
        assert posts(server) == [41] + [3] * 20         # the bundle, then one transaction per study
        held = server.resources
        assert ("ImagingStudy", "study-7") not in held and ("Patient", "pat-7") not in held   # all or nothing
        assert len([k for k in held if k[0] == "ImagingStudy"]) == 19
        assert sink.refused == 1 and sink.flush() == {}


def test_entry_errors_in_a_200_answer_are_refusals_too():
    with FakeFhir(reject={("ImagingStudy", "study-3")}, non_atomic=True) as server:
        sink = make_sink(server)
        for i in range(6):
            sink.add(key(i), resources(i, 6))
        refused = sink.flush()
        assert list(refused) == [key(3)] and refused[key(3)].startswith("HTTP 422")
        assert len([k for k in server.resources if k[0] == "ImagingStudy"]) == 5


def test_reasons_are_one_line_and_truncated():
    long = {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "invalid", "diagnostics": "bad\nvalue " * 100}]}
    assert fhir._outcome_line(400, orjson.dumps(long)) == "HTTP 400 Bad Request: error invalid"
    line = fhir._outcome_line(400, orjson.dumps(long), server_text=True)
    assert line.startswith("HTTP 400 Bad Request: error invalid (bad value bad") and "\n" not in line and len(line) < 240
    assert fhir._outcome_line(502, b"<html>proxy error with the whole request echoed</html>") == "HTTP 502 Bad Gateway"
    coded = {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "x-y", "details": {"text": "why"}}]}
    assert fhir._outcome_line(422, orjson.dumps(coded)) == "HTTP 422 Unprocessable Entity: error x-y"
    assert fhir._outcome_line(422, orjson.dumps(coded), server_text=True) == "HTTP 422 Unprocessable Entity: error x-y (why)"


def test_invalid_ids_are_refused_without_a_request():
    with FakeFhir() as server:
        sink = make_sink(server)
        sink.add(key(1), [("ImagingStudy", "has space", b"{}")])
        sink.add(key(2), resources(2, 1))
        refused = sink.flush()
        assert list(refused) == [key(1)] and "not a valid FHIR type/id" in refused[key(1)]
        assert posts(server) == [3]


# --- authentication -----------------------------------------------------------------------

SECRET = "s3cret-Pw"
TOKEN = "tok-0123456789"


def test_basic_auth_is_required_and_passed(caplog):
    caplog.set_level(logging.DEBUG)
    with FakeFhir(auth=("crawler", SECRET), reject={("ImagingStudy", "study-1")}) as server:
        with pytest.raises(SinkError) as caught:
            make_sink(server).check()
        assert "refused authentication" in str(caught.value) and "401" in str(caught.value)
        with pytest.raises(SinkError) as wrong:
            make_sink(server, auth=("crawler", "wrong")).check()
        sink = make_sink(server, auth=("crawler", SECRET))
        for i in range(3):
            sink.add(key(i), resources(i, 3))
        assert list(sink.flush()) == [key(1)]
        assert sink.finish() == f"FHIR server {server.url}"
        assert server.statuses[401] == 2
    for text in (str(caught.value), str(wrong.value), caplog.text):
        assert SECRET not in text


def test_credentials_in_the_url_are_used_and_never_shown():
    with FakeFhir(auth=("crawler", SECRET)) as server:
        url = server.url.replace("http://", f"http://crawler:{SECRET}@")
        sink = make_sink(server, url=url)
        sink.add(key(1), resources(1, 1))
        assert sink.flush() == {}
        assert sink.base_url == server.url and SECRET not in sink.finish()
        assert len(server.resources) == 3


def test_bearer_token_is_required_and_passed():
    with FakeFhir(token=TOKEN) as server:
        with pytest.raises(SinkError) as caught:
            make_sink(server, token="expired").check()
        assert "refused authentication" in str(caught.value)
        sink = make_sink(server, token=TOKEN)
        sink.add(key(1), resources(1, 1))
        assert sink.flush() == {}
        assert len(server.resources) == 3


def test_credentials_never_appear_in_error_messages():
    port = free_port()
    messages = []
    for options in ({"token": TOKEN}, {"auth": ("crawler", SECRET)}, {}):
        url = f"http://crawler:{SECRET}@127.0.0.1:{port}/fhir" if not options else f"http://127.0.0.1:{port}/fhir"
        sink = FhirServer(url, retry=FAST, sleep=lambda s: None, **options)
        with pytest.raises(SinkError) as caught:
            sink.check()
        messages.append(str(caught.value))
    with FakeFhir(version="4.0.1", auth=("crawler", SECRET)) as server:
        url = server.url.replace("http://", f"http://crawler:{SECRET}@")
        with pytest.raises(ConfigError) as caught:
            FhirServer(url, retry=FAST).check()
        messages.append(str(caught.value))
    assert all(SECRET not in m and TOKEN not in m for m in messages)
    assert all(m.startswith("cannot reach FHIR server http://127.0.0.1:") for m in messages[:3])


# --- the rest of the protocol ----------------------------------------------------------------


def test_abort_drops_the_queue_and_finish_needs_a_flush():
    with FakeFhir() as server:
        sink = make_sink(server)
        sink.add(key(1), resources(1, 1))
        with pytest.raises(RuntimeError):
            sink.finish()
        sink.abort()
        assert posts(server) == []
        with pytest.raises(RuntimeError):
            sink.add(key(2), resources(2, 1))


def test_error_bodies_are_counted_not_sent():
    with FakeFhir() as server:
        sink = make_sink(server)
        sink.error(b'{"resourceType":"OperationOutcome","issue":[]}')
        assert sink.flush() == {}
        assert sink.errors == 1 and server.requests == []
        assert sink.figures()["errors"] == 1

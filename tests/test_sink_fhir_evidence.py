"""The FHIR sink believes no answer it has not read (issue 20, issue 13 items 3, 4, 6, 7).

Against the FHIR simulator (fixtures/fakefhir.py) in modes that reproduce what real servers do:
Medplum runs a transaction as a batch and answers ``Prefer: return=minimal`` with an empty 200,
refuses a transaction of more than 50 updates and may forbid update as create; hostile or
broken servers redirect elsewhere, trickle or send huge answers. Retries run without sleeping.
"""

from __future__ import annotations

import logging
import time

import orjson
import pytest

from crawler.errors import ConfigError, SinkError
from crawler.sinks.fhir import FhirServer
from fixtures.fakefhir import FakeFhir
from tests.test_sink_fhir import FAST, NAME, imaging_study, key, make_sink, posts, resources


def studies_held(server: FakeFhir) -> set[str]:
    return {i for t, i in server.resources if t == "ImagingStudy"}


def send(sink: FhirServer, n: int, n_patients: int) -> dict[str, str]:
    for i in range(n):
        sink.add(key(i), resources(i, n_patients))
    return sink.flush()


# --- 1. silent loss ----------------------------------------------------------------------


def test_bundles_never_ask_for_minimal_answers():
    with FakeFhir() as server:
        assert send(make_sink(server), 3, 3) == {}
        assert server.prefer == ["return=OperationOutcome"]


def test_a_batch_run_transaction_with_minimal_answers_refuses_exactly_the_refused_studies():
    refused_ids = {("ImagingStudy", "study-3"), ("ImagingStudy", "study-5")}
    with FakeFhir(as_batch=True, honour_minimal=True, reject=refused_ids) as server:
        sink = make_sink(server)
        refused = send(sink, 10, 10)
        assert set(refused) == {key(3), key(5)}
        assert all(r.startswith("HTTP 422 Unprocessable Entity") for r in refused.values())
        assert studies_held(server) == {f"study-{i}" for i in range(10) if i not in (3, 5)}
        assert posts(server) == [21]           # per-entry outcomes: nothing sent again
        assert sink.resources_sent == 19


@pytest.mark.parametrize("answer", ["empty", "outcome", "short", "no-status"])
def test_an_answer_without_per_entry_outcomes_is_checked_by_reading_back(answer):
    # entries: the Endpoint, 3 Patients, 6 ImagingStudy; "short" leaves out the last (study-5)
    with FakeFhir(as_batch=True, answer=answer, reject={("ImagingStudy", "study-5")}) as server:
        sink = make_sink(server)
        refused = send(sink, 6, 3)
        assert list(refused) == [key(5)] and "does not hold it" in refused[key(5)]
        assert studies_held(server) == {f"study-{i}" for i in range(5)}
        reads = sorted(r.path for r in server.requests if r.method == "GET")
        if answer == "short":
            assert reads == ["/ImagingStudy", "/metadata"] and sink.read_back == 1
        else:
            assert reads == ["/Endpoint", "/ImagingStudy", "/Patient", "/metadata"] and sink.read_back == 10
        assert sink.resources_sent == 9


def test_read_back_refuses_an_update_the_server_did_not_apply():
    with FakeFhir() as server:
        sink = make_sink(server)
        assert send(sink, 2, 2) == {}
        server.answer, server.non_atomic = "empty", True
        server.reject = {("ImagingStudy", "study-1")}
        sink.add(key(0), [imaging_study(0, 0, status="cancelled")])
        sink.add(key(1), [imaging_study(1, 1, status="cancelled")])
        refused = sink.flush()
        assert list(refused) == [key(1)] and "another version" in refused[key(1)]
        assert server.get("ImagingStudy", "study-0")["status"] == "cancelled"


def test_read_back_confirms_a_deletion():
    with FakeFhir(answer="empty") as server:
        sink = make_sink(server)
        assert send(sink, 2, 2) == {}
        sink.delete(key(0), "ImagingStudy", "study-0")
        assert sink.flush() == {} and sink.deleted == 1
        assert studies_held(server) == {"study-1"}


def test_an_unreadable_answer_and_a_failed_read_back_record_nothing():
    with FakeFhir(as_batch=True) as server:
        sink = make_sink(server, max_answer=100_000)
        sink.check()
        server.pad_answers = 200_000
        refused = send(sink, 3, 3)
        assert set(refused) == {key(i) for i in range(3)}
        assert all("reading it back failed" in r or "did not answer" in r for r in refused.values())


# --- 2. size limits ----------------------------------------------------------------------


def test_medplum_size_refusal_learns_50_and_sends_at_most_4_more_bundles():
    with FakeFhir(max_updates=50, size_refusal="medplum") as server:
        sink = make_sink(server, batch_size=100)
        assert send(sink, 60, 60) == {}
        sent = posts(server)
        assert sent[0] == 121 and len(sent) - 1 <= 4 and all(n <= 50 for n in sent[1:])
        assert sink.learned_max_entries == 50 and sink.refused == 0
        assert studies_held(server) == {f"study-{i}" for i in range(60)}
        server.reset_counts()
        again = make_sink(server, batch_size=100, max_entries=sink.learned_max_entries)
        assert send(again, 60, 60) == {}
        assert server.statuses[400] == 0 and all(n <= 50 for n in posts(server))


@pytest.mark.parametrize("kind", ["too-costly", "413"])
def test_other_size_refusals_halve_the_bundle_until_it_fits(kind):
    with FakeFhir(max_updates=50, size_refusal=kind) as server:
        sink = make_sink(server)
        assert send(sink, 60, 60) == {}
        assert sink.learned_max_entries is not None and sink.learned_max_entries <= 50
        assert studies_held(server) == {f"study-{i}" for i in range(60)}
        assert len(posts(server)) <= 8


def test_a_single_study_too_large_for_the_server_is_refused_not_looped():
    with FakeFhir(max_updates=1, size_refusal="too-costly") as server:
        sink = make_sink(server)
        refused = send(sink, 2, 2)
        assert set(refused) == {key(0), key(1)}
        assert len(posts(server)) < 10


# --- 3. update as create -------------------------------------------------------------------


def test_a_server_without_update_as_create_stops_at_the_check():
    with FakeFhir(update_create=False) as server:
        with pytest.raises(ConfigError) as caught:
            make_sink(server).check()
        message = str(caught.value)
        assert "update as create" in message and "updateCreate: false" in message and "\n" not in message
        assert posts(server) == []


def test_update_as_create_is_checked_only_for_the_types_written():
    with FakeFhir(update_create=False) as server:
        with pytest.raises(ConfigError, match="Endpoint, ImagingStudy$|Endpoint, ImagingStudy \\(|Endpoint, ImagingStudy"):
            make_sink(server, written_types=("ImagingStudy", "Endpoint")).check()


# --- 4. refusal reasons --------------------------------------------------------------------


def test_reasons_keep_codes_and_paths_but_not_the_server_text(caplog):
    caplog.set_level(logging.DEBUG)
    rejected = {("Patient", "pat-1")}
    with FakeFhir(reject=rejected, reject_text=True) as server:
        refused = send(make_sink(server), 3, 3)
    assert refused == {key(1): "HTTP 422 Unprocessable Entity: error business-rule at Patient.subject"}
    assert NAME not in caplog.text
    with FakeFhir(reject=rejected, reject_text=True) as server:
        refused = send(make_sink(server, server_text=True), 3, 3)
    assert NAME in refused[key(1)]


def test_paths_that_are_not_plain_element_paths_are_left_out():
    from crawler.sinks import fhir

    outcome = {"resourceType": "OperationOutcome", "issue": [
        {"severity": "error", "code": "invalid", "expression": ["Patient.name.where(family='SECRET')", "Patient.name[0].family"],
         "location": ["/f:Patient/f:name"], "diagnostics": "SECRET is not allowed"},
        {"severity": "FATAL!", "code": "Some Code", "diagnostics": "SECRET"},
    ]}
    line = fhir._outcome_line(400, orjson.dumps(outcome))
    assert line == "HTTP 400 Bad Request: error invalid at Patient.name[0].family; issue"


# --- 5. redirects, deadline, size cap --------------------------------------------------------


def test_a_redirect_to_another_origin_is_refused_naming_both_origins():
    with FakeFhir() as elsewhere, FakeFhir() as server:
        sink = make_sink(server)
        sink.check()
        server.redirect = (307, f"{elsewhere.url}/")
        sink.add(key(1), resources(1, 1))
        with pytest.raises(SinkError) as caught:
            sink.flush()
        message = str(caught.value)
        port, other = server.url.split(":")[2].split("/")[0], elsewhere.url.split(":")[2].split("/")[0]
        assert f"http://127.0.0.1:{port}" in message and f"http://127.0.0.1:{other}" in message and "\n" not in message
        assert elsewhere.requests == [] and server.resources == {}
        sink.abort()


def test_a_same_origin_307_is_followed_and_a_303_on_post_is_not():
    with FakeFhir() as server:
        sink = make_sink(server)
        sink.check()
        server.redirect = (307, f"{server.url}/")
        assert send(sink, 2, 2) == {}
        assert studies_held(server) == {"study-0", "study-1"}
        server.redirect = (303, f"{server.url}/")
        sink.add(key(3), resources(3, 3))
        with pytest.raises(SinkError, match="303"):
            sink.flush()
        sink.abort()


def test_a_trickling_answer_is_cut_at_the_deadline():
    with FakeFhir(trickle=0.05) as server:
        sink = make_sink(server, deadline=0.5)
        started = time.monotonic()
        with pytest.raises(SinkError, match="not complete within 0.5 s"):
            sink.check()
        assert time.monotonic() - started < 10 and sink.requests == FAST.attempts


def test_an_answer_over_the_size_cap_is_not_read():
    with FakeFhir(pad_answers=2_000_000) as server:
        with pytest.raises(SinkError, match="larger than 1000000 bytes"):
            make_sink(server, max_answer=1_000_000).check()


@pytest.mark.parametrize("encoding", ["gzip", "x-gzip", "deflate"])
def test_a_compressed_answer_is_capped_after_decoding(encoding):
    with FakeFhir(compress=encoding) as server:
        assert make_sink(server).check() == "5.0.0"       # compressed answers are read
        server.pad_answers = 20_000_000                     # about 20 kB on the wire
        with pytest.raises(SinkError, match="larger than 1000000 bytes"):
            make_sink(server, max_answer=1_000_000).check()


def test_a_transaction_answer_that_trickles_refuses_its_studies_in_bounded_time():
    with FakeFhir() as server:
        sink = make_sink(server, deadline=0.5)
        sink.check()
        server.trickle = 0.05
        started = time.monotonic()
        refused = send(sink, 2, 2)
        assert set(refused) == {key(0), key(1)} and all("not complete within 0.5 s" in r for r in refused.values())
        assert time.monotonic() - started < 15


def test_an_answer_whose_headers_trickle_is_cut_at_the_deadline():
    with FakeFhir(trickle_headers=0.05) as server:
        sink = make_sink(server, deadline=0.5)
        started = time.monotonic()
        with pytest.raises(SinkError, match="within 0.5 s"):
            sink.check()
        assert time.monotonic() - started < 10 and sink.requests == FAST.attempts


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    from fixtures.hostile import self_signed

    return self_signed(tmp_path_factory.mktemp("tls"))


@pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning")
@pytest.mark.parametrize("variable", ["REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"])
def test_ca_bundle_and_insecure_win_over_the_environment(certificate, variable, monkeypatch, tmp_path):
    monkeypatch.setenv(variable, str(tmp_path / "no-such-bundle.pem"))
    cert, key = certificate
    with FakeFhir(tls=(str(cert), str(key))) as server:
        assert server.url.startswith("https://")
        assert make_sink(server, verify=str(cert)).check() == "5.0.0"
        assert make_sink(server, verify=False).check() == "5.0.0"
        if variable == "REQUESTS_CA_BUNDLE":      # with the default verification the environment counts
            with pytest.raises(ConfigError, match="cannot set up TLS .*no-such-bundle"):
                make_sink(server).check()
        monkeypatch.delenv(variable)
        with pytest.raises(SinkError, match="TLS error"):
            make_sink(server).check()

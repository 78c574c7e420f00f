"""The audit's FHIR reader goes through the transport's one retry loop (crawler.http.Retrier):
which failures are asked again, the server's Retry-After, when to give up. The servers are
simulators (fixtures/fakefhir.py, fixtures/hostile.py): no real server fails or redirects to a
stranger on demand."""

from __future__ import annotations

import time

import pytest

from crawler.audit.copies import FhirReader
from crawler.errors import SinkError
from crawler.http import RetryPolicy
from fixtures.fakefhir import FakeFhir
from fixtures.hostile import Hostile


def test_the_reader_asks_again_after_503_honouring_retry_after_without_sleeping():
    waits: list[float] = []
    with FakeFhir(fail_requests={1: 503, 2: 429}, retry_after="7") as server:
        reader = FhirReader(server.url, retries=3, sleep=waits.append)
        assert reader.rows("http://pacs/dicom-web", ["1.2.3"]) == {}
        paths = [r.path for r in server.requests]
    assert waits == [7.0, 7.0]
    assert reader.requests == len(paths) == 4   # the search three times (two failed), then by id
    assert paths[:3] == ["/ImagingStudy"] * 3
    assert paths[3].startswith("/ImagingStudy/") and not reader.searched


def test_the_reader_gives_up_after_its_retries_naming_the_status():
    waits: list[float] = []
    with FakeFhir(fail_every=1, fail_status=503) as server:
        reader = FhirReader(server.url, retries=2, sleep=waits.append)
        with pytest.raises(SinkError, match=r"^FHIR server answered HTTP 503 for GET http://127\.0\.0\.1:\d+/fhir/ImagingStudy\?_count="):
            reader.rows("http://pacs/dicom-web", [])
        assert len(server.requests) == 3
    assert len(waits) == 2 and 0.25 <= waits[0] <= 0.5 and 0.5 <= waits[1] <= 1.0


def test_the_reader_does_not_retry_a_refusal_of_the_credentials():
    waits: list[float] = []
    with FakeFhir(auth=("u", "p")) as server:
        reader = FhirReader(server.url, auth=("u", "wrong"), retries=3, sleep=waits.append)
        with pytest.raises(SinkError, match=r"refused the credentials \(HTTP 401\)"):
            reader.rows("http://pacs/dicom-web", [])
        assert len(server.requests) == 1
    assert waits == []


def test_an_unreachable_reader_says_so_after_its_retries(monkeypatch):
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    waits: list[float] = []
    reader = FhirReader("http://127.0.0.1:9/fhir", retries=1, sleep=waits.append)
    with pytest.raises(SinkError, match=r"^cannot reach FHIR server http://127\.0\.0\.1:9/fhir: ConnectionError$"):
        reader.rows("http://pacs/dicom-web", [])
    assert reader.requests == 2 and len(waits) == 1


def test_a_trickling_fhir_server_holds_the_reader_no_longer_than_its_deadline():
    """Each byte comes well within the read timeout; the total deadline (connect + read) ends it."""
    with FakeFhir(trickle=0.2) as server:
        reader = FhirReader(server.url, timeout=(1.0, 1.0), retries=0)
        started = time.monotonic()
        with pytest.raises(SinkError, match=r"^cannot reach FHIR server http://127\.0\.0\.1:\d+/fhir: no complete answer within 2 s$"):
            reader.rows("http://pacs/dicom-web", [])
        assert time.monotonic() - started < 4.0


def test_a_fhir_answer_over_the_cap_is_refused_in_every_encoding():
    for compress in (None, "gzip", "deflate"):
        with FakeFhir(pad_answers=200_000, compress=compress) as server:
            reader = FhirReader(server.url, retries=2, max_answer=100_000, sleep=lambda s: None)
            with pytest.raises(SinkError, match=r"^FHIR server http://127\.0\.0\.1:\d+/fhir: the answer to GET http://127\.0\.0\.1:\d+/fhir/ImagingStudy\?_count=200&_elements=\S+ was refused: larger than 100000 bytes$"):
                reader.rows("http://pacs/dicom-web", [])
            assert len(server.requests) == 1, compress   # not asked again: the same answer would come


def test_a_redirect_to_another_origin_is_not_followed_and_the_token_stays_home():
    with Hostile("json", body=b'{"resourceType": "Bundle", "type": "searchset", "entry": []}') as other:
        with Hostile("redirect", location=other.url) as source:
            reader = FhirReader(source.url, token="t-SECRET-9", retries=2, sleep=lambda s: None)
            with pytest.raises(SinkError) as raised:
                reader.rows("http://pacs/dicom-web", ["1.2.3"])
    assert other.seen == [], "nothing may reach the other origin"
    assert len(source.seen) == 1 and source.seen[0]["authorization"] == "Bearer t-SECRET-9"
    assert str(raised.value) == f"FHIR server {source.url}: redirect from {source.origin} to {other.origin} refused (another origin)"


def test_same_origin_redirects_are_followed_a_bounded_number_of_times():
    with Hostile("redirect") as server:
        server.location = server.url
        reader = FhirReader(server.url, retries=0)
        with pytest.raises(SinkError, match=r"^FHIR server http://127\.0\.0\.1:\d+/\S+ redirected GET more than 5 times$"):
            reader.rows("http://pacs/dicom-web", [])
        assert len(server.seen) == 6


def test_the_reader_waits_as_the_connections_retry_policy_says():
    waits: list[float] = []
    with FakeFhir(fail_requests={1: 503}) as server:
        reader = FhirReader(server.url, retries=1, retry=RetryPolicy(attempts=9, base_delay=8, max_delay=8), sleep=waits.append)
        reader.rows("http://pacs/dicom-web", [])
    assert len(waits) == 1 and 4 <= waits[0] <= 8

"""QidoClient's direct GET (LeanAdapter) against the session's own path: same requests on the
wire, same answers, same errors; and the cases that must go through requests (proxies, cookies,
redirects)."""

from __future__ import annotations

import copy
import gzip
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests

from crawler import http
from crawler.errors import FatalQidoError, RetriableQidoError
from crawler.http import RequestCounts, RetryPolicy, resolve_origin
from crawler.qido import QidoClient
from fixtures.fakepacs import FakePacs

Handler = Callable[[BaseHTTPRequestHandler], tuple[int, dict[str, str], bytes]]


@contextmanager
def server(answer: Handler) -> Iterator[tuple[str, list[dict[str, str]]]]:
    """A one-route HTTP/1.1 server; yields its DICOMweb base URL and the headers of each request seen."""
    seen: list[dict[str, str]] = []

    class Handle(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:  # noqa: N802
            seen.append({"path": self.path, **{k.lower(): v for k, v in self.headers.items()}})
            status, headers, body = answer(self)
            self.send_response(status)
            for key, value in {**headers, "Content-Length": str(len(body))}.items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handle)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/dicom-web", seen
    finally:
        httpd.shutdown()
        httpd.server_close()


def no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)


def test_direct_and_session_paths_send_the_same_requests_and_read_the_same_answers(monkeypatch):
    no_proxy(monkeypatch)
    params = [("PatientName", "DOE^J*"), ("StudyDate", "20200101-20201231"), ("ModalitiesInStudy", "CT,MR"),
              ("AccessionNumber", "a b&c"), ("includefield", "00081030"), ("limit", 7)]
    with FakePacs(n_studies=20, seed=3) as pacs:
        direct = QidoClient(pacs.url)
        assert direct._direct_origin() is not None
        fast = direct.get("studies", "studies", params)
        by_session = QidoClient(pacs.url)
        by_session._resolved = True
        slow = by_session.get("studies", "studies", params)
        first, second = pacs.requests[-2:]
    assert fast.items == slow.items and fast.status == slow.status
    assert first == second


def test_both_paths_send_the_same_request_line_and_headers(monkeypatch):
    no_proxy(monkeypatch)
    with server(lambda h: (200, {"Content-Type": "application/dicom+json"}, b"[]")) as (url, seen):
        for direct in (True, False):
            client = QidoClient(url, auth=("ann", "s3cret"), headers={"X-Site": "north"})
            client._resolved = not direct
            client.get("studies", "studies", [("PatientName", "DOE^J*"), ("limit", 3)])
    assert len(seen) == 2 and seen[0] == seen[1]
    assert seen[0]["path"] == "/dicom-web/studies?PatientName=DOE%5EJ*&limit=3"
    assert seen[0]["authorization"].startswith("Basic ") and seen[0]["x-site"] == "north"


def test_user_and_password_go_with_the_direct_path(monkeypatch):
    no_proxy(monkeypatch)
    with FakePacs(n_studies=3, seed=1, auth=("ann", "s3cret")) as pacs:
        client = QidoClient(pacs.url, auth=("ann", "s3cret"))
        assert client._direct_origin().authorization.startswith("Basic ")
        assert len(client.get("studies", "studies").items) == 3


def test_credentials_in_the_url_go_with_the_direct_path(monkeypatch):
    no_proxy(monkeypatch)
    with FakePacs(n_studies=2, seed=1, auth=("ann", "s3cret")) as pacs:
        client = QidoClient(pacs.url.replace("http://", "http://ann:s3cret@"))
        assert client._direct_origin().authorization.startswith("Basic ")
        assert len(client.get("studies", "studies").items) == 2


def test_a_bearer_token_stays_the_session_header_and_can_be_refreshed(monkeypatch):
    no_proxy(monkeypatch)
    with FakePacs(n_studies=2, seed=1, token="fresh") as pacs:
        client = QidoClient(pacs.url, token="stale", token_provider=lambda: "fresh")
        assert client._direct_origin().authorization is None
        assert len(client.get("studies", "studies").items) == 2
        assert [r.kind for r in pacs.requests] == ["studies", "studies"]


def test_gzip_answers_are_decoded(monkeypatch):
    no_proxy(monkeypatch)
    body = b'[{"0020000D": {"vr": "UI", "Value": ["1.2.3"]}}]'
    with server(lambda h: (200, {"Content-Type": "application/dicom+json", "Content-Encoding": "gzip"}, gzip.compress(body))) as (url, seen):
        page = QidoClient(url).get("studies", "studies")
    assert page.items == [{"0020000D": {"vr": "UI", "Value": ["1.2.3"]}}]
    assert "gzip" in seen[0]["accept-encoding"] and seen[0]["accept"] == "application/dicom+json"


def test_gunzip_decodes_as_urllib3_does():
    from urllib3.response import GzipDecoder

    body = b'[{"0020000D": {"vr": "UI", "Value": ["1.2.3"]}}]' * 50
    whole = gzip.compress(body)
    for data in (
        whole, gzip.compress(body[:40]) + gzip.compress(body[40:]), whole + b"\0garbage", b"",
        whole[:-1], whole[:-8], whole[: len(whole) // 2], whole + gzip.compress(body)[:20],
    ):  # fmt: skip
        decoder = GzipDecoder()
        assert http.gunzip(data) == decoder.decompress(data) + decoder.flush()


def test_a_gzip_answer_cut_short_is_malformed_json(monkeypatch):
    no_proxy(monkeypatch)
    data = gzip.compress(b"[" + b'{"00080018": {"vr": "UI", "Value": ["1.2.3"]}},' * 100 + b"{}]")
    with server(lambda h: (200, {"Content-Encoding": "gzip"}, data[: len(data) // 2])) as (url, seen):
        with pytest.raises(FatalQidoError, match="malformed JSON"):
            QidoClient(url, sleep=lambda s: None).get("studies", "studies")
    assert len(seen) == 1


def test_a_gzip_answer_that_does_not_decode_is_retried_then_reported(monkeypatch):
    no_proxy(monkeypatch)
    data = b"not gzip at all"
    def answer(h: BaseHTTPRequestHandler) -> tuple[int, dict[str, str], bytes]:
        return 200, {"Content-Encoding": "gzip"}, gzip.compress(b"[]") if h.path.endswith("/studies") else data

    with server(answer) as (url, seen):
        client = QidoClient(url, retry=RetryPolicy(attempts=2, base_delay=0, max_delay=0), sleep=lambda s: None)
        assert client.get("studies", "studies").items == []
        with pytest.raises(RetriableQidoError, match="request failed: .*: the compressed answer does not decode"):
            client.get("metadata", "studies/1.2.3/metadata")
    assert len(seen) == 3


def test_a_gzip_answer_may_not_expand_without_bound(monkeypatch):
    no_proxy(monkeypatch)
    monkeypatch.setattr(http, "MAX_BODY", 10_000)
    with server(lambda h: (200, {"Content-Encoding": "gzip"}, gzip.compress(b" " * 10_001))) as (url, seen):
        with pytest.raises(FatalQidoError, match="refused: larger than 10000 bytes"):
            QidoClient(url, sleep=lambda s: None).get("studies", "studies")
    assert len(seen) == 1, "a bomb is not inflated again"
    with server(lambda h: (200, {"Content-Encoding": "gzip"}, gzip.compress(b"[]" + b" " * 9_998))) as (url, _):
        assert QidoClient(url).get("studies", "studies").items == []


def test_cookies_the_server_sets_are_sent_back(monkeypatch):
    no_proxy(monkeypatch)

    def answer(h: BaseHTTPRequestHandler) -> tuple[int, dict[str, str], bytes]:
        return 200, {"Set-Cookie": "route=node2; Path=/"}, b"[]"

    with server(answer) as (url, seen):
        client = QidoClient(url)
        client.get("studies", "studies")
        client.get("studies", "studies")
    assert "cookie" not in seen[0]
    assert seen[1]["cookie"] == "route=node2"


def test_redirects_are_followed(monkeypatch):
    no_proxy(monkeypatch)

    def answer(h: BaseHTTPRequestHandler) -> tuple[int, dict[str, str], bytes]:
        if h.path.startswith("/dicom-web/"):
            return 308, {"Location": h.path.replace("/dicom-web/", "/moved/", 1)}, b""
        return 200, {"Content-Type": "application/dicom+json"}, b'[{"00080050": {"vr": "SH"}}]'

    with server(answer) as (url, seen):
        page = QidoClient(url).get("studies", "studies", [("limit", 5)])
    assert page.items == [{"00080050": {"vr": "SH"}}]
    assert seen[-1]["path"] == "/moved/studies?limit=5"


def test_a_proxy_in_the_environment_sends_requests_through_the_session(monkeypatch):
    no_proxy(monkeypatch)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    assert resolve_origin(QidoClient("http://pacs.example.org/dicom-web").session, "http://pacs.example.org/dicom-web") is not None
    monkeypatch.setenv("HTTP_PROXY", "http://proxy.example.org:3128")
    assert resolve_origin(QidoClient("http://pacs.example.org/dicom-web").session, "http://pacs.example.org/dicom-web") is None
    monkeypatch.setenv("NO_PROXY", "pacs.example.org")
    assert resolve_origin(QidoClient("http://pacs.example.org/dicom-web").session, "http://pacs.example.org/dicom-web") is not None


def test_another_adapter_auth_object_or_hooks_send_requests_through_the_session():
    session = requests.Session()
    session.auth = requests.auth.HTTPDigestAuth("u", "p")
    assert resolve_origin(QidoClient("http://pacs.example.org/dicom-web", session=session).session, "http://pacs.example.org/dicom-web") is None
    session = requests.Session()
    client = QidoClient("http://pacs.example.org/dicom-web", session=session)
    session.mount("http://", requests.adapters.HTTPAdapter())
    assert resolve_origin(client.session, client.base_url) is None
    client = QidoClient("http://pacs.example.org/dicom-web")
    client.session.hooks["response"].append(lambda response, **_: None)
    assert resolve_origin(client.session, client.base_url) is None


# Read timeouts far from the server's timing either way, so that a loaded machine cannot turn one
# failure into another: the truncation and reset come at once (a 30 s timeout never fires first),
# the stall outlasts its 1 s timeout by far (the simulator ends it when it stops).
@pytest.mark.parametrize(
    ("behaviour", "read_timeout", "message"),
    [
        ({"truncate_every": 1}, 30.0, "request failed"),
        ({"reset_every": 1}, 30.0, "cannot connect"),
        ({"stall_seconds": 600.0}, 1.0, "timed out"),
    ],
)
def test_transport_failures_are_retriable_with_the_same_messages_on_both_paths(monkeypatch, behaviour, read_timeout, message):
    no_proxy(monkeypatch)
    with FakePacs(n_studies=2, seed=4, **behaviour) as pacs:
        for direct in (True, False):
            client = QidoClient(pacs.url, timeout=(30.0, read_timeout), retry=RetryPolicy(attempts=1))
            client.answered = True
            client._resolved = not direct
            with pytest.raises(RetriableQidoError, match=message):
                client.get("studies", "studies")


def test_a_refused_connection_names_the_reason(monkeypatch):
    no_proxy(monkeypatch)
    client = QidoClient("http://127.0.0.1:9/dicom-web", retry=RetryPolicy(attempts=1))
    client.answered = True
    with pytest.raises(RetriableQidoError, match="cannot connect to .*connection refused"):
        client.get("studies", "studies")


@pytest.mark.parametrize("make", [QidoClient.for_task, copy.copy])
def test_copies_of_a_client_count_their_own_requests_and_retries(monkeypatch, make):
    no_proxy(monkeypatch)
    with FakePacs(n_studies=2, seed=4, fail_requests={1: 503}) as pacs:
        client = QidoClient(pacs.url, retry=RetryPolicy(attempts=3), sleep=lambda _: None)
        view = make(client)
        assert view.session is client.session and view.counts is not client.counts
        assert len(view.get("studies", "studies").items) == 2
    assert client.counts.as_dict() == {"total": 0, "retries": 0}
    assert view.counts.as_dict() == {"total": 2, "studies": 2, "retries": 1}
    client.counts.merge(view.counts)
    client.counts.merge(view.counts)
    assert client.counts.as_dict() == {"total": 4, "studies": 4, "retries": 2}
    assert view.counts.as_dict() == {"total": 2, "studies": 2, "retries": 1}


def test_request_counts_merge_from_many_threads_loses_nothing():
    total = RequestCounts()
    task = RequestCounts()
    for kind in ("studies", "instances", "instances"):
        task.add(kind)
    task.add_retry()

    def merge_many() -> None:
        for _ in range(500):
            total.merge(task)
            total.add("metadata")

    threads = [threading.Thread(target=merge_many) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert total.as_dict() == {"total": 8000, "instances": 4000, "metadata": 2000, "studies": 2000, "retries": 2000}


def test_a_closed_client_sends_nothing_more(monkeypatch):
    no_proxy(monkeypatch)
    with server(lambda h: (200, {}, b"[]")) as (url, seen):
        client = QidoClient(url)
        view = copy.copy(client)
        client.get("studies", "studies")
        client.close()
        for c in (client, view):
            with pytest.raises(FatalQidoError, match="the client was closed"):
                c.get("studies", "studies")
    assert len(seen) == 1


def test_azures_throttling_wait_in_milliseconds_is_honoured(monkeypatch):
    """Azure's services answer throttling with x-ms-retry-after-ms; the server here is a simulator."""
    no_proxy(monkeypatch)
    answers = iter([(429, {"x-ms-retry-after-ms": "1500"}, b""), (503, {"Retry-After": "2", "x-ms-retry-after-ms": "9000"}, b""), (200, {}, b"[]")])
    waits: list[float] = []
    with server(lambda h: next(answers)) as (url, seen):
        client = QidoClient(url, retry=RetryPolicy(attempts=3), sleep=waits.append)
        assert client.get("studies", "studies").items == []
    assert waits == [1.5, 2.0] and len(seen) == 3 and client.counts.retries == 2

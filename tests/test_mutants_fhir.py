"""What the FHIR sink records as accepted, refused or deleted, pinned by tests that the surviving
mutants of crawler/sinks/fhir.py failed (docs/testing.md): the per-entry outcomes of a
transaction-response, the read-back of entries without one, size refusals, the retry of a
refused Bundle study by study, and the figures a checkpoint takes from the sink.

In process against the FHIR simulator of fixtures/fakefhir.py; ``Scripted`` below is that
simulator with its transaction answers rewritten by the test (statuses, bodies a real server
sends that the simulator does not produce on demand), so it is a simulator too.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson
import pytest

from crawler.http import RetryPolicy
from crawler.sinks.fhir import FhirServer
from fixtures.fakefhir import FakeFhir, outcome
from tests.test_sink_fhir import ENDPOINT_ID, imaging_study, key, patient, resources
from tests.test_sink_fhir_server_ids import resources as identified, study as identified_study

ONE_TRY = RetryPolicy(attempts=1, max_seconds=10.0, base_delay=0.0, max_delay=0.0)
NO_OUTCOME = "no outcome in the answer, and the server "


class Scripted(FakeFhir):
    """The FHIR simulator, each transaction processed as usual (``as_batch`` and the other modes
    apply) and then its answer replaced by ``script(status, answer, number)`` (``number``: the
    transaction's position from 1), which returns a status and a JSON body (a dict, raw bytes
    or None). ``keep`` names resources a DELETE leaves in place; ``narrate`` adds a ``text`` to
    every resource stored, as servers that generate a narrative do."""

    def __init__(self, script: Callable[[int, Any, int], tuple[int, Any]] | None = None, *,
                 keep: set[tuple[str, str]] = frozenset(), narrate: bool = False, **options: Any) -> None:
        super().__init__(**options)
        self.script = script or (lambda status, answer, number: (status, answer))
        self.keep, self.narrate = set(keep), narrate
        self.number = 0
        self.searches: list[tuple[str, dict[str, list[str]]]] = []

    def _transaction(self, bundle: Any) -> tuple[int, Any]:
        self.number += 1
        try:
            status, answer = super()._transaction(bundle)
        except Exception as exc:  # the simulator's refusal, as it would answer it
            status, answer = exc.status, outcome("error", exc.code, exc.message, exc.expression, exc.details)  # type: ignore[attr-defined]
        return self.script(status, answer, self.number)

    def _search(self, resource_type: str, query: dict[str, list[str]]) -> dict[str, Any]:
        self.searches.append((resource_type, query))
        return super()._search(resource_type, query)

    def _delete(self, store: dict, resource_type: str, resource_id: str) -> int:
        if (resource_type, resource_id) in self.keep:
            return 200
        return super()._delete(store, resource_type, resource_id)

    def _put(self, store: dict, resource_type: str, resource_id: str, resource: Any, conditional: bool = False) -> tuple[int, int]:
        if self.narrate and isinstance(resource, dict):
            resource = {**resource, "text": {"status": "generated", "div": "<div xmlns=\"http://www.w3.org/1999/xhtml\">x</div>"}}
        return super()._put(store, resource_type, resource_id, resource, conditional)

    def _send(self, h: Any, status: int, answer: Any, headers: Any = ()) -> None:
        if isinstance(answer, bytes):
            h.send_response(status)
            h.send_header("Content-Type", "application/fhir+json")
            h.send_header("Content-Length", str(len(answer)))
            h.end_headers()
            h.wfile.write(answer)
            return
        super()._send(h, status, answer, headers)


def sink_for(server: FakeFhir, **options: Any) -> FhirServer:
    options.setdefault("retry", ONE_TRY)
    return FhirServer(server.url, sleep=lambda seconds: None, **options)


def entries_by_identity(bundle: dict[str, Any]) -> list[str]:
    """``Type/id`` of each entry of a transaction received, in order."""
    return [entry["request"]["url"] for entry in bundle["entry"]]


def posts(server: FakeFhir) -> list[int]:
    return [r.n_entries for r in server.requests if r.method == "POST"]


def gets(server: FakeFhir) -> list[str]:
    return [r.path for r in server.requests if r.method == "GET" and r.path != "/metadata"]


# --- per-entry outcomes of a transaction-response ------------------------------------------------


class Rewrite:
    """A script for Scripted: the first transaction's entries get the statuses (and outcomes)
    given by request URL; the simulator has applied the transaction as a batch before."""

    def __init__(self, statuses: dict[str, str | None], outcomes: dict[str, Any] | None = None, status: int = 200) -> None:
        self.statuses, self.outcomes, self.status = statuses, outcomes or {}, status
        self.urls: list[str] = []

    def __call__(self, status: int, answer: Any, number: int) -> tuple[int, Any]:
        if number != 1:
            return status, answer
        for url, entry in zip(self.urls, answer["entry"]):
            if url in self.statuses:
                entry["response"] = {"status": self.statuses[url]} if self.statuses[url] is not None else {}
                if url in self.outcomes:
                    entry["response"]["outcome"] = self.outcomes[url]
        return self.status, answer


class RewriteServer(Scripted):
    def __init__(self, rewrite: Rewrite, **options: Any) -> None:
        super().__init__(rewrite, **options)
        self.rewrite = rewrite

    def _transaction(self, bundle: Any) -> tuple[int, Any]:
        if isinstance(bundle, dict) and self.number == 0:
            self.rewrite.urls = entries_by_identity(bundle)
        return super()._transaction(bundle)


def test_each_entry_status_decides_its_study():
    """2xx accepted; a 3xx (300 included) or no status: read back; 4xx refused, with the issue's
    code and path (its free text only with server_text); 404/410 accept a DELETE only. Killed:
    the 3xx bounds (`301 <=`, `300 <`, `<= 400`, `< 401`), a 3xx taken as accepted unread, the
    DELETE-and-gone rule (`or`, `!=`, the method's name, `not in`), an entry outcome that is
    not an object read as one, and the 200-300 bounds of the answer itself (`<= 300`, `< 301`)."""
    rewrite = Rewrite(
        {
            "Patient/pat-0": "300 Multiple Choices",        # applied; read back: accepted
            "Patient/pat-1": "302 Found",                    # rejected by the server: read back refuses
            "Patient/pat-2": "399",                          # applied; read back: accepted
            "Patient/pat-3": "400 Bad Request",              # applied, but the answer refuses it
            "Patient/pat-4": "410 Gone",                     # a PUT answered Gone: refused
            "ImagingStudy/study-5": "409 Conflict",          # refused, no outcome
            "ImagingStudy/study-9": "404 Not Found",         # a DELETE of what is not there: done
            "ImagingStudy/study-8": "409 Conflict",          # a DELETE refused
        },
        {"Patient/pat-3": {"resourceType": "OperationOutcome",
                           "issue": [{"severity": "error", "code": "invalid", "expression": ["Patient.name"], "diagnostics": "bad name"}]},
         "ImagingStudy/study-5": "not an object"},
    )
    with RewriteServer(rewrite, as_batch=True, reject={("Patient", "pat-1")}) as server:
        sink = sink_for(server, batch_size=100)
        for i in range(6):
            sink.add(key(i), resources(i, 6))
        sink.delete(key(9), "ImagingStudy", "study-9")
        sink.delete(key(8), "ImagingStudy", "study-8")
        refused = sink.flush()
        assert refused == {
            key(1): f"{NO_OUTCOME}does not hold it (its Patient)",
            key(3): "HTTP 400 Bad Request: error invalid at Patient.name (its Patient)",
            key(4): "HTTP 410 Gone (its Patient)",
            key(5): "HTTP 409 Conflict (its ImagingStudy)",
            key(8): "HTTP 409 Conflict (its ImagingStudy)",
        }
        assert sink.read_back == 3
        assert sorted(gets(server)) == ["/Patient"]
        assert sink.deleted == 1
        # the Endpoint, pat-0, pat-2, pat-5 and the studies 0-4
        assert sink.resources_sent == 9
        assert posts(server) == [15]


def test_the_server_text_of_an_entry_outcome_is_shown_only_when_asked():
    """Killed: the entry outcome summarised without ``server_text`` (`None`, the argument
    dropped) in _entry_outcomes, and `server_text` -> None in _transact."""
    bad = {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "invalid", "diagnostics": "names: X"}]}
    for shown in (False, True):
        rewrite = Rewrite({"ImagingStudy/study-0": "422 Unprocessable Entity"}, {"ImagingStudy/study-0": bad})
        with RewriteServer(rewrite) as server:
            sink = sink_for(server, server_text=shown)
            sink.add(key(0), resources(0, 1))
            reason = sink.flush()[key(0)]
        assert reason == "HTTP 422 Unprocessable Entity: error invalid" + (" (names: X)" if shown else "") + " (its ImagingStudy)"


def test_an_answer_of_300_is_a_refusal_not_a_transaction_response():
    """A whole-Bundle answer outside 2xx refuses the Bundle, even with a Bundle for a body
    (killed: `200 <= status <= 300` and `< 301` in _transact)."""
    with Scripted(lambda status, answer, number: (300, answer)) as server:
        sink = sink_for(server)
        sink.add(key(0), resources(0, 1))
        assert sink.flush() == {key(0): "HTTP 300 Multiple Choices"}
        assert sink.resources_sent == 0 and sink.learned_max_entries is None
        assert posts(server) == [3]


# --- read-back of entries whose outcome the answer does not give ------------------------------


def test_read_back_by_id_in_parts_of_fifty_per_type():
    """An empty 200: every entry read back, 50 ids per search and per type, and each confirmed
    (killed: the grouping by type, the parts' range and slice, the ids searched, the count of
    resources read back, the lookup of what the server holds)."""
    with Scripted(answer="empty") as server:
        sink = sink_for(server, batch_size=60)
        for i in range(60):
            sink.add(key(i), resources(i, 60))
        assert sink.flush() == {}
        assert sink.read_back == 121 and sink.resources_sent == 121 and sink.refused == 0
        searches = gets(server)
        assert sorted(searches) == ["/Endpoint", "/ImagingStudy", "/ImagingStudy", "/Patient", "/Patient"]
        assert sorted((t, int(q["_count"][0]), len(q["_id"][0].split(","))) for t, q in server.searches) == [
            ("Endpoint", 1, 1), ("ImagingStudy", 10, 10), ("ImagingStudy", 50, 50), ("Patient", 10, 10), ("Patient", 50, 50)]
        assert {i for t, i in server.resources if t == "ImagingStudy"} == {f"study-{i}" for i in range(60)}


def test_read_back_decides_each_entry_and_says_why():
    """Empty 200 answers: a PUT the server did not apply (another version held; nothing held), a
    DELETE it did not apply (still held), a DELETE it did apply, each settled by what the server
    holds (killed: each branch of _read_back and the exact reasons)."""
    with Scripted(keep={("ImagingStudy", "study-2")}, answer="empty", non_atomic=True) as server:
        sink = sink_for(server)
        for i in range(4):
            sink.add(key(i), resources(i, 4))
        assert sink.flush() == {}
        server.reject = {("ImagingStudy", "study-0"), ("ImagingStudy", "study-5")}
        sink.add(key(0), [imaging_study(0, 0, status="cancelled")])
        sink.add(key(5), [imaging_study(5, 0)])
        sink.delete(key(2), "ImagingStudy", "study-2")
        sink.delete(key(3), "ImagingStudy", "study-3")
        refused = sink.flush()
        assert refused == {
            key(0): f"{NO_OUTCOME}holds another version (its ImagingStudy)",
            key(5): f"{NO_OUTCOME}does not hold it (its ImagingStudy)",
            key(2): f"{NO_OUTCOME}still holds it (its ImagingStudy)",
        }
        assert sink.deleted == 1 and sink.read_back == 9 + 4


def test_read_back_that_fails_records_nothing():
    """Killed: `if failure is None`, the failure's outcome dropped."""
    def script(status: int, answer: Any, number: int) -> tuple[int, Any]:
        return status, None

    with Scripted(script) as server:
        sink = sink_for(server)
        sink.check()
        server.fail_requests = {3: 400}
        sink.add(key(0), resources(0, 1))
        refused = sink.flush()
        assert refused == {key(0): "no outcome in the answer, and reading it back failed: HTTP 400 Bad Request: error transient (its Endpoint)"}


def test_a_reference_changed_on_the_server_is_another_version():
    """The server kept the study's old version, whose only difference is the patient it refers
    to: read back by id, references count (killed: `_same`'s default `references=False`,
    references always rewritten, the content compared as None)."""
    with Scripted(answer="empty", non_atomic=True) as server:
        sink = sink_for(server)
        sink.add(key(0), resources(0, 1))
        assert sink.flush() == {}
        server.reject = {("ImagingStudy", "study-0")}
        sink.add(key(0), [patient(7), imaging_study(0, 7)])
        assert sink.flush() == {key(0): f"{NO_OUTCOME}holds another version (its ImagingStudy)"}


def test_a_narrative_the_server_adds_is_not_a_difference():
    """Killed: ``text`` no longer set aside by _same."""
    with Scripted(answer="empty", narrate=True) as server:
        sink = sink_for(server)
        sink.add(key(0), resources(0, 1))
        assert sink.flush() == {}
        assert server.get("ImagingStudy", "study-0")["text"]["status"] == "generated"
        assert sink.read_back == 3 and sink.resources_sent == 3


# --- size refusals -----------------------------------------------------------------------------


def first_answer(status: int, body: Any) -> Callable[[int, Any, int], tuple[int, Any]]:
    """A script refusing the first transaction with ``status`` and ``body`` (nothing applied)."""
    def script(real_status: int, answer: Any, number: int) -> tuple[int, Any]:
        return (status, body) if number == 1 else (real_status, answer)
    return script


class RefuseFirst(Scripted):
    """Scripted, the first transaction refused before it is applied."""

    def _transaction(self, bundle: Any) -> tuple[int, Any]:
        if self.number == 0:
            self.number += 1
            return self.script(0, None, 1)
        return super()._transaction(bundle)


def two_studies(server: FakeFhir, **options: Any) -> tuple[FhirServer, dict[str, str]]:
    sink = sink_for(server, **options)
    sink.add(key(0), resources(0, 2))
    sink.add(key(1), resources(1, 2))
    return sink, sink.flush()


def issue(code: str, **fields: Any) -> dict[str, Any]:
    return {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": code, **fields}]}


@pytest.mark.parametrize(
    ("status", "body"),
    [
        pytest.param(413, None, id="413-without-a-body"),
        pytest.param(422, issue("too-costly"), id="too-costly"),
        pytest.param(400, issue("not-supported", diagnostics="Bundle too large"), id="not-supported-with-a-size-text"),
        pytest.param(400, {"resourceType": "OperationOutcome", "issue": ["not an issue", {"severity": "error", "code": "too-costly"}]},
                     id="an-issue-that-is-not-an-object-first"),
        pytest.param(400, issue("invalid", diagnostics="Transaction contains more update operations than allowed"), id="medplum-in-diagnostics"),
    ],
)
def test_a_bundle_refused_for_its_size_is_cut_smaller(status, body):
    """Killed in _size_refusal: 413 -> 414 or not a size refusal; `continue` -> `break`; the
    diagnostics not read; `too-costly` and `not-supported` and its size text (`and`, `or`,
    `!=`, the codes' names, `any(None)`)."""
    with RefuseFirst(first_answer(status, body)) as server:
        sink, refused = two_studies(server)
        assert refused == {}
        assert sink.learned_max_entries == 2
        assert posts(server)[0] == 5 and all(n <= 3 for n in posts(server)[1:])
        assert {i for t, i in server.resources if t == "ImagingStudy"} == {"study-0", "study-1"}


@pytest.mark.parametrize(
    ("status", "body"),
    [
        pytest.param(501, issue("too-costly"), id="a-5xx-is-no-size-refusal"),
        pytest.param(400, b"not json", id="not-json"),
        pytest.param(400, [], id="not-an-object"),
        pytest.param(400, {"resourceType": "OperationOutcome"}, id="no-issues"),
        pytest.param(400, issue("invalid", diagnostics="the request exceeds a limit"), id="a-size-text-without-not-supported"),
        pytest.param(400, issue("not-supported", diagnostics="PATCH"), id="not-supported-without-a-size-text"),
    ],
)
def test_a_bundle_refused_for_another_reason_is_sent_study_by_study(status, body):
    """Killed in _size_refusal: `return True` for a status outside 4xx and for a body that is not
    JSON; an outcome or its issues that are not what they should be read anyway; a size text
    without `not-supported` taken for a size refusal."""
    with RefuseFirst(first_answer(status, body)) as server:
        sink, refused = two_studies(server)
        assert refused == {}
        assert sink.learned_max_entries is None
        assert posts(server) == [5, 3, 3]


def test_a_study_too_large_alone_is_refused_with_the_reason_and_the_limit_learned():
    """One study of 2 entries refused for its size: the limit is halved to 1 and kept, and the
    study refused with the server's reason (killed in _transact: `len(bundle.methods) > 2`,
    `_TooLarge(None, ...)`; in _send_units: the resend in parts for `len(units) > 2`)."""
    with FakeFhir(max_updates=1, size_refusal="too-costly") as server:
        sink = sink_for(server)
        sink.add(key(0), [patient(0), imaging_study(0, 0)])
        assert sink.flush() == {key(0): "HTTP 422 Unprocessable Entity: error too-costly"}
        assert sink.learned_max_entries == 1
        assert posts(server) == [2]
    with FakeFhir(max_updates=2, size_refusal="too-costly") as server:
        sink, refused = two_studies(server)
        assert refused == {key(0): "HTTP 422 Unprocessable Entity: error too-costly", key(1): "HTTP 422 Unprocessable Entity: error too-costly"}
        assert sink.learned_max_entries == 1
        assert posts(server) == [5, 3, 3]


def test_a_lone_delete_refused_with_413_learns_no_limit():
    """Killed: `len(bundle.methods) >= 1` in _transact (a one-entry Bundle cannot be cut)."""
    with RefuseFirst(first_answer(413, None)) as server:
        sink = sink_for(server)
        sink.delete(key(0), "ImagingStudy", "study-0")
        assert sink.flush() == {key(0): "HTTP 413 Request Entity Too Large"}
        assert sink.learned_max_entries is None and sink.max_entries == 500


# --- a refused Bundle sent again study by study ---------------------------------------------------


def test_a_single_study_refused_is_sent_once():
    """Killed: `len(units) == 2` in _send_units (a lone study sent twice; of two, the second
    never sent)."""
    with FakeFhir(reject={("ImagingStudy", "study-0")}) as server:
        sink = sink_for(server)
        sink.add(key(0), resources(0, 1))
        assert list(sink.flush()) == [key(0)]
        assert posts(server) == [3]
        sink, refused = two_studies(server)
        assert list(refused) == [key(0)]
        assert {i for t, i in server.resources if t == "ImagingStudy"} == {"study-1"}


def test_refusals_in_answers_to_one_study_transactions_are_kept():
    """The Bundle fails with 500; sent study by study to a server that runs transactions as
    batches, one study's entry is refused in a 200 answer (killed: the key or the reason of
    those refusals dropped in _send_units)."""
    with FakeFhir(as_batch=True, reject={("ImagingStudy", "study-1")}, fail_requests={2: 500}) as server:
        sink, refused = two_studies(server)
        assert refused == {key(1): "HTTP 422 Unprocessable Entity: error business-rule at ImagingStudy.subject (its ImagingStudy)"}
        assert posts(server) == [5, 3, 3]


def test_one_by_one_gives_up_after_three_studies_in_a_row_exhaust_the_retries():
    """Requests 2 (the Bundle) and 3, 5, 6 (studies 0, 2, 3) fail with 500 and no retry: study 1
    resets the run of failures, so studies 0, 2 and 3 are refused and 4 is sent (killed:
    `failing = 1` or None after a success). A fourth failure in a row refuses the rest unsent."""
    with FakeFhir(fail_requests={2: 500, 3: 500, 5: 500, 6: 500}) as server:
        sink = sink_for(server)
        sink.check()
        for i in range(5):
            sink.add(key(i), resources(i, 5))
        refused = sink.flush()
        assert sorted(refused) == [key(0), key(2), key(3)]
        assert set(refused.values()) == {"HTTP 500 Internal Server Error: error transient"}
        assert len(posts(server)) == 6
    with FakeFhir(fail_requests={n: 500 for n in range(2, 6)}) as server:
        sink = sink_for(server)
        sink.check()
        for i in range(5):
            sink.add(key(i), resources(i, 5))
        assert sorted(sink.flush()) == [key(i) for i in range(5)]
        assert len(posts(server)) == 4


def test_a_study_too_large_among_studies_sent_one_by_one_is_refused():
    """The Bundle fails with 500, then one study is too large for the server on its own (killed:
    `single, refused = None` in _send_units)."""
    with FakeFhir(fail_requests={2: 500}, max_updates=3, size_refusal="too-costly") as server:
        sink = sink_for(server)
        sink.check()
        sink.add(key(0), resources(0, 2))
        sink.add(key(1), [*resources(1, 2), patient(9)])
        refused = sink.flush()
        assert refused == {key(1): "HTTP 422 Unprocessable Entity: error too-costly"}
        assert {i for t, i in server.resources if t == "ImagingStudy"} == {"study-0"}


# --- what the sink counts and checks before sending ------------------------------------------------


def test_deletions_are_counted_over_bundles_and_a_missing_resource_answered_404_counts_once():
    """Killed: `self.deleted = ...` in place of `+=` (per Bundle, and for a lone DELETE answered
    404: `= 1`, `-= 1`, `+= 2`)."""
    with FakeFhir(delete_absent_status=404) as server:
        sink = sink_for(server, batch_size=1)
        sink.add(key(0), resources(0, 1))
        sink.delete(key(0), "ImagingStudy", "study-0")
        sink.delete(key(1), "ImagingStudy", "study-1")
        sink.delete(key(2), "ImagingStudy", "study-2")
        assert sink.flush() == {}
        assert sink.deleted == 3
    with FakeFhir() as server:
        sink = sink_for(server, batch_size=1)
        for i in range(3):
            sink.add(key(i), resources(i, 1))
        for i in range(3):
            sink.delete(key(i), "ImagingStudy", f"study-{i}")
        assert sink.flush() == {} and sink.deleted == 3


def test_a_delete_that_fills_the_batch_is_sent_at_once():
    """Killed: `len(self._queue) > self.batch_size` in delete."""
    with FakeFhir() as server:
        sink = sink_for(server, batch_size=2)
        sink.add(key(0), resources(0, 1))
        sink.delete(key(1), "ImagingStudy", "study-1")
        assert posts(server) == [4]
        assert sink.flush() == {}


def test_invalid_types_and_ids_are_refused_with_their_first_64_characters():
    """Killed: `or` in delete's check (a bad id with a good type sent), the refusal's key or
    reason dropped, `[:65]` in add's and delete's reasons."""
    long_type, long_id = "A" * 70, "b" * 70
    with FakeFhir() as server:
        sink = sink_for(server)
        sink.add(key(0), [("ImagingStudy", long_id + "/", b"{}")])
        sink.add(key(1), [(long_type + "1", "x", b"{}")])
        sink.delete(key(2), "ImagingStudy", "a/b")
        sink.delete(key(3), long_type + "1", long_id + "/")
        assert sink.flush() == {
            key(0): f"not a valid FHIR type/id: 'ImagingStudy'/'{'b' * 64}'",
            key(1): f"not a valid FHIR type/id: '{'A' * 64}'/'x'",
            key(2): "not a valid FHIR type/id: 'ImagingStudy'/'a/b'",
            key(3): f"not a valid FHIR type/id: '{'A' * 64}'/'{'b' * 64}'",
        }
        assert posts(server) == []


def test_finish_before_flush_says_what_was_never_reported():
    with FakeFhir() as server:
        sink = sink_for(server)
        sink.add(key(0), [("Bad Type", "x", b"{}")])
        with pytest.raises(RuntimeError, match=r"^FhirServer\.finish\(\) before flush\(\): queued studies or refusals were never reported$"):
            sink.finish()
        sink.abort()


def test_a_resource_is_unknown_to_the_server_only_with_server_ids_and_no_id_learned():
    """Killed: `or` in unknown_to_server (every resource resent with our ids), the type or id
    not passed to the lookup."""
    known = {("Endpoint", "e1"): "srv9"}
    ours = FhirServer("http://127.0.0.1:9/fhir")
    ours.server_id_lookup = lambda t, i: known.get((t, i))
    assert ours.unknown_to_server("Endpoint", "e2") is False
    server = FhirServer("http://127.0.0.1:9/fhir", ids="server")
    server.server_id_lookup = lambda t, i: known.get((t, i))
    assert server.unknown_to_server("Endpoint", "e1") is False
    assert server.unknown_to_server("Endpoint", "e2") is True
    assert server.unknown_to_server("Patient", "e1") is True


# --- server-assigned ids: the id each entry's location names ---------------------------------------


def test_server_ids_are_learned_from_the_locations_without_reading_back():
    """Killed: the location's type or id misread in _entry_outcomes or _transact (`location[1]`,
    `!=`, `identities[n][1]`, `(found[2], found[2])`, the location dropped), each of which sent
    every accepted resource to a read-back; and a DELETE read back (`outcome is None or PUT`)."""
    with Scripted() as server:
        sink = sink_for(server, ids="server")
        sink.add(key(0), identified(0, 1))
        assert sink.flush() == {}
        learned = sink.take_server_ids()
        assert learned == {("Endpoint", ENDPOINT_ID): "srv1", ("Patient", "pat-0"): "srv2", ("ImagingStudy", "study-0"): "srv3"}
        sink.delete(key(0), "ImagingStudy", "study-0")
        assert sink.flush() == {}
        assert sink.read_back == 0 and server.searches == [] and sink.deleted == 1


def test_a_location_that_names_no_resource_is_settled_by_reading_back():
    """An accepted PUT whose location is missing or names another type: its server id is read
    back (killed: `outcomes[n] = None` for it, which left the id unknown)."""
    def script(status: int, answer: Any, number: int) -> tuple[int, Any]:
        for entry in answer["entry"]:
            response = entry["response"]
            if response["location"].startswith("Patient/"):
                del response["location"]
            elif response["location"].startswith("ImagingStudy/"):
                response["location"] = "Endpoint/" + response["location"].split("/")[1]
        return status, answer

    with Scripted(script) as server:
        sink = sink_for(server, ids="server")
        sink.add(key(0), identified(0, 1))
        assert sink.flush() == {}
        assert sink.take_server_ids() == {("Endpoint", ENDPOINT_ID): "srv1", ("Patient", "pat-0"): "srv2", ("ImagingStudy", "study-0"): "srv3"}
        assert sink.read_back == 2 and [t for t, _ in server.searches] == ["Patient", "ImagingStudy"]


def test_read_back_by_identifier_compares_the_content_without_references():
    """With server ids, a study the server did not apply is found by its identifier in its old
    version: another version (killed in _same: `references and k != "id"`, which compared
    nothing, and the content rewritten from None)."""
    with Scripted(non_atomic=True) as server:
        sink = sink_for(server, ids="server")
        sink.add(key(0), identified(0, 1))
        assert sink.flush() == {}
        server.answer = "empty"
        server.reject = {("ImagingStudy", "srv3")}
        sink.add(key(0), [identified_study(0, 0, status="cancelled")])
        assert sink.flush() == {key(0): f"{NO_OUTCOME}holds another version (its ImagingStudy)"}
        server.reject = set()
        sink.add(key(0), [identified_study(0, 0, status="cancelled")])
        assert sink.flush() == {}
        assert server.get("ImagingStudy", "srv3")["status"] == "cancelled"

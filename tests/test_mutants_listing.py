"""What a listing reports as complete (and so what a run may mark gone), pinned by tests that the
surviving mutants of crawler/listing.py failed (docs/testing.md): the silent-cap check, the
switch to the other form of matching keys and its verification, and the sweep of studies
without a StudyDate behind a cap.

In process, fast: the simulator of fixtures/fakepacs.py (a fake PACS) through the real
QidoClient, or, where a test needs answers no simulator mode gives (pages in another order per
form of the matching keys), ``Scripted``, a stand-in for the client that answers from a list.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from typing import Any

import pytest

from crawler import listing
from crawler.errors import FatalQidoError, QidoError
from crawler.http import RetryPolicy
from crawler.listing import ListingReport, iter_studies
from crawler.planner import FIRST_DAY, LAST_DAY, Window
from crawler.qido import Page, QidoClient
from fixtures.fakepacs import FakePacs

FAST_RETRY = RetryPolicy(attempts=1, base_delay=0.0, max_delay=0.0, max_seconds=5)
UID, DATE, PID = "0020000D", "00080020", "00100020"


def uid_of(item: dict[str, Any]) -> str | None:
    return (item.get(UID) or {}).get("Value", [None])[0]


def listed(pacs: FakePacs, windows: Sequence[Window], report: ListingReport) -> tuple[set[str], int]:
    """The UIDs ``iter_studies`` lists from the simulator, and the study searches it made."""
    client = QidoClient(pacs.url, retry=FAST_RETRY)
    try:
        found = {uid_of(item) for item in iter_studies(client, windows, report)}
    finally:
        client.close()
    return found, pacs.counts()["studies"]


# --- a stand-in for the client ---------------------------------------------------------------


def study(uid: str | None, day: str | None, pid: str = "P1") -> dict[str, Any]:
    item: dict[str, Any] = {DATE: {"vr": "DA", "Value": [day]} if day else {"vr": "DA"}, PID: {"vr": "LO", "Value": [pid]}}
    if uid is not None:
        item[UID] = {"vr": "UI", "Value": [uid]}
    return item


class Scripted:
    """Stands in for QidoClient (no server): each search is answered by ``answer(params)``, a list
    of studies cut into pages by ``limit`` and ``offset``; every call is recorded as it was made."""

    max_limit = None

    def __init__(self, answer: Callable[[dict[str, str]], list[dict[str, Any]]]) -> None:
        self.answer = answer
        self.calls: list[tuple[str, str, list[tuple[str, Any]]]] = []

    def page_size(self, wanted: int) -> int:
        return wanted

    def smaller_limit(self, exc: QidoError, page_size: int, offset: int) -> bool:
        return False

    def get(self, kind: str, path: str, params: Sequence[tuple[str, Any]] = ()) -> Page:
        self.calls.append((kind, path, list(params)))
        query = {key: str(value) for key, value in params}
        offset = int(query.get("offset", 0))
        return Page(self.answer(query)[offset:offset + int(query["limit"])], 200)


def keyword_only(studies: list[dict[str, Any]]) -> Callable[[dict[str, str]], list[dict[str, Any]]]:
    """A server that ignores the tag form of StudyDate (answering every study, by ascending UID)
    and honours the keyword form (answering by descending UID)."""
    def answer(query: dict[str, str]) -> list[dict[str, Any]]:
        everything = sorted(studies, key=lambda s: uid_of(s) or "")
        if "StudyDate" not in query:
            return everything
        since, _, until = query["StudyDate"].partition("-") if "-" in query["StudyDate"] else (query["StudyDate"],) * 3
        dated = [s for s in everything if s[DATE].get("Value") and (not since or s[DATE]["Value"][0] >= since)
                 and (not until or s[DATE]["Value"][0] <= until)]
        return dated[::-1]
    return answer


def day_calls(client: Scripted, day: str) -> list[tuple[str, str, list[tuple[str, Any]]]]:
    return [call for call in client.calls if ("StudyDate", day) in call[2] or (DATE, day) in call[2]]


def spread(prefix: str, day: str, n: int) -> list[dict[str, Any]]:
    return [study(f"{prefix}.{k:03d}", day) for k in range(n)]


def test_the_other_form_is_kept_when_it_lists_the_study_shown_on_a_later_page():
    """The silent-cap check of the first (unfiltered) window finds the tag form ignored: a half
    strays. The keyword form is tried, and kept because the day of the first dated study shown
    (after one without a date), asked for in that form, lists it on its third page. Mutants of
    _stray (day or the stray key lost, `break` at a study without a date), of verify_cap's switch
    (the stray key, `not` dropped, the second probe's arguments) and of _form_works' choice of
    study, page size, parameters, kind, path and paging all change the calls or the result."""
    late, early = "20200201", "20200105"
    studies = [study("1.1.000", None), *spread("1.2", late, 5), *spread("1.3", early, 12)]
    client = Scripted(keyword_only(studies))
    report = ListingReport(page_size=2)
    found = {uid_of(item) for item in iter_studies(client, [Window()], report)}
    assert found == {uid_of(s) for s in studies}
    assert day_calls(client, late) == [
        ("studies", "studies", [("StudyDate", late), ("limit", 2)]),
        ("studies", "studies", [("StudyDate", late), ("limit", 2), ("offset", 2)]),
        ("studies", "studies", [("StudyDate", late), ("limit", 2), ("offset", 4)]),
    ]
    assert report.filters.keywords is True and report.filters.ignored == set()
    assert report.incomplete == []
    assert report.windows_complete == 1 and report.verified == 18
    assert [call[0] for call in client.calls] == ["studies"] * len(client.calls)
    assert [call[1] for call in client.calls] == ["studies"] * len(client.calls)


def test_the_other_form_is_kept_after_ten_full_pages_without_the_study():
    """_form_works asks at most ten pages of the day; past them the form is kept (killed:
    `pages=11`, `return False` after the pages, `len(found) <= page_size`)."""
    late, early = "20200201", "20200105"
    studies = [*spread("1.2", late, 25), *spread("1.3", early, 30)]
    client = Scripted(keyword_only(studies))
    report = ListingReport(page_size=2)
    found = {uid_of(item) for item in iter_studies(client, [Window()], report)}
    assert len(found) == 55
    assert [dict(call[2]).get("offset") for call in day_calls(client, late)] == [None, *range(2, 20, 2)]
    assert report.filters.keywords is True
    assert report.incomplete == [] and report.windows_complete == 1


def test_a_stray_study_without_a_uid_cannot_check_the_other_form_and_it_is_kept():
    """No dated study with a UID among the stray ones: the other form cannot be checked and is
    kept, with no request for a day (killed: `return False` in _form_works' `else`)."""
    late, early = "20200201", "20200105"
    studies = [study(None, late), *spread("1.3", early, 6)]
    client = Scripted(keyword_only(studies))
    report = ListingReport(page_size=1)
    items = list(iter_studies(client, [Window()], report))
    assert len(items) == 7
    assert day_calls(client, late) == []
    assert report.filters.keywords is True and report.incomplete == []


def test_a_server_that_honours_only_keywords_is_verified_in_that_form():
    """The simulator honouring only the keyword form: the first probe's tag-form half strays,
    the keyword form lists the day, and the second probe, in keywords, finds no silent cap."""
    with FakePacs(n_studies=60, seed=21, keyword_only=True) as pacs:
        report = ListingReport(page_size=100)
        found, searches = listed(pacs, [Window()], report)
        truth = set(pacs.study_uids())
        queries = [r.query for r in pacs.requests if r.kind == "studies"]
    assert found == truth and len(truth) == 60
    assert report.filters.keywords is True and report.filters.tried is True
    assert report.filters.ignored == set()
    assert report.incomplete == [] and report.verified == 60 and report.windows_complete == 1
    # the listing, one tag-form half, the day of the study shown, the two keyword-form halves
    assert searches == 5, queries
    assert sum(bool(re.search(r"(^|&)00080020=", q)) for q in queries) == 1
    assert sum(bool(re.search(r"(^|&)StudyDate=", q)) for q in queries) == 3


def test_a_server_that_ignores_both_forms_leaves_the_window_incomplete():
    """Both forms ignored, studies without a date listed first: the second probe strays too, so
    the first form is kept, StudyDate is recorded as ignored and the window is incomplete (a run
    marks nothing gone). Killed: `state.ignored = None` (the window counted complete), the stray
    key lost in `filters.stray`, the second probe not made, `break` at an undated study."""
    with FakePacs(n_studies=60, seed=22, ignore_filters=True, newest_first=True, no_date_fraction=0.2) as pacs:
        report = ListingReport(page_size=100)
        found, _ = listed(pacs, [Window()], report)
        truth = set(pacs.study_uids())
    assert found == truth
    assert report.filters.keywords is False
    assert report.filters.ignored == {"StudyDate"}
    assert report.windows_complete == 0
    assert report.incomplete == ["all studies: the server ignores StudyDate, as a tag and as a keyword; not split further"]


def test_a_form_that_lists_nothing_is_given_up_and_the_key_recorded_as_ignored():
    """Tags ignored and keywords matching nothing: the keyword form does not list the day of the
    study shown, so the tag form is kept and StudyDate recorded as ignored (killed: `lost(None)`,
    `state.ignored = None`, `if _form_works(...)` without `not`, `return True` for a short page)."""
    with FakePacs(n_studies=60, seed=23, keyword_only=True, keywords_match_nothing=True) as pacs:
        report = ListingReport(page_size=100)
        found, searches = listed(pacs, [Window()], report)
        truth = set(pacs.study_uids())
    assert found == truth
    assert report.filters.keywords is False and report.filters.ignored == {"StudyDate"}
    assert report.windows_complete == 0
    assert report.incomplete == ["all studies: the server ignores StudyDate, as a tag and as a keyword; not split further"]
    assert searches == 3


def test_a_window_no_larger_than_what_was_verified_is_not_probed_again():
    """verify_cap probes only a window larger than the largest verified (killed: `>` -> `>=`)."""
    with FakePacs(n_studies=40, seed=24) as pacs:
        report = ListingReport(page_size=100, verified=40)
        found, searches = listed(pacs, [Window()], report)
    assert len(found) == 40 and searches == 1
    assert report.verified == 40 and report.incomplete == []


def test_a_silent_cap_of_two_results_is_found_and_split_around():
    """Orthanc-like silent cap (2 results for any larger match): a first window of 2 studies is
    probed (2 > 1) and found capped, so its parts are listed until every study is found (killed:
    `max(report.verified, 2)`, which took the 2 studies for the whole PACS)."""
    with FakePacs(n_studies=6, seed=25, max_results=1, cap_mode="silent") as pacs:
        report = ListingReport(page_size=100)
        found, _ = listed(pacs, [Window()], report)
        truth = set(pacs.study_uids())
    assert found == truth and len(truth) == 6
    assert report.cap == 2
    assert report.windows_split >= 1 and report.incomplete == []


# --- the sweep of studies without a StudyDate behind a capped unfiltered window ---------------


def undated_pacs(**behaviour: Any) -> FakePacs:
    """300 studies, 60 without a StudyDate listed first, under a cap of 40: the unfiltered
    window's 40 results are all undated, so the rest of them can only be found by the sweep."""
    return FakePacs(n_studies=300, seed=13, no_date_fraction=0.2, max_results=40, newest_first=True, **behaviour)


def test_the_sweep_by_patient_id_finds_every_study_without_a_date():
    with undated_pacs() as pacs:
        report = ListingReport(page_size=100)
        found, _ = listed(pacs, [Window()], report)
        truth = set(pacs.study_uids())
        swept = [r.query for r in pacs.requests if r.kind == "studies" and "00100020=" in r.query]
    assert found == truth and len(truth) == 300
    assert report.incomplete == []
    assert swept and len(swept) < listing.SWEEP_MAX_REQUESTS


def test_the_sweep_uses_the_form_of_matching_keys_in_use():
    with undated_pacs(keyword_only=True) as pacs:
        report = ListingReport(page_size=100)
        report.filters.keywords = report.filters.tried = True
        found, _ = listed(pacs, [Window()], report)
        truth = set(pacs.study_uids())
        queries = [r.query for r in pacs.requests if r.kind == "studies"]
    assert found == truth
    assert report.incomplete == []
    assert any("PatientID=" in q for q in queries) and not any("00100020=" in q for q in queries)


def test_a_sweep_over_its_request_bound_leaves_the_studies_at_risk(monkeypatch):
    monkeypatch.setattr(listing, "SWEEP_MAX_REQUESTS", 10)
    with undated_pacs() as pacs:
        report = ListingReport(page_size=100)
        listed(pacs, [Window()], report)
        swept = [r.query for r in pacs.requests if r.kind == "studies" and "00100020=" in r.query]
    assert len(swept) == 10
    assert len(report.incomplete) == 1
    assert re.fullmatch(r"all studies: .*; studies without StudyDate past the cap cannot be listed "
                        r"\(the sweep by PatientID stopped at 10 requests \([1-9][0-9]* parts left\)\)", report.incomplete[0])


class SweepScript:
    """A capped unfiltered window whose undated studies only a sweep by PatientID reaches,
    answered by a stand-in for the client; ``part`` answers the sweep's parts by prefix."""

    def __init__(self, undated: list[dict[str, Any]], part: Callable[[str, dict[str, str]], list[dict[str, Any]]], cap: int = 3,
                 page_size: int = 100):
        self.undated, self.part, self.cap, self.page_size = undated, part, cap, page_size
        self.client = Scripted(self.answer)

    def answer(self, query: dict[str, str]) -> list[dict[str, Any]]:
        prefix = query.get(PID, query.get("PatientID"))
        if prefix is not None:
            return self.part(prefix, query)
        if DATE in query or "StudyDate" in query:
            return []
        return self.undated[: self.cap]

    def run(self) -> tuple[list[dict[str, Any]], ListingReport]:
        report = ListingReport(page_size=self.page_size, cap=self.cap)
        items = list(iter_studies(self.client, [Window()], report, verify=False))
        return items, report


def by_prefix(studies: list[dict[str, Any]]) -> Callable[[str, dict[str, str]], list[dict[str, Any]]]:
    """Wildcard or exact PatientID matching, as a server does it."""
    def part(prefix: str, query: dict[str, str]) -> list[dict[str, Any]]:
        pid = lambda s: s[PID]["Value"][0]  # noqa: E731
        if prefix.endswith("*"):
            return [s for s in studies if pid(s).startswith(prefix[:-1])]
        return [s for s in studies if pid(s) == prefix]
    return part


def sweep_prefixes(script: SweepScript) -> list[str]:
    return [dict(call[2]).get(PID) for call in script.client.calls if PID in dict(call[2])]


def test_the_sweep_splits_a_capped_part_by_one_more_character_and_asks_the_exact_id():
    undated = [study(f"9.{k}", None, pid) for k, pid in enumerate(["AB1", "AB2", "AB3", "AB", "C7"])]
    script = SweepScript(undated, by_prefix(undated))
    items, report = script.run()
    assert {uid_of(i) for i in items} == {uid_of(s) for s in undated}
    assert report.incomplete == []
    prefixes = sweep_prefixes(script)
    # A* is capped (4 >= 3): the exact A, then A0*..AZ*, and AB* capped again: AB exact, AB0*..
    assert prefixes[:1] == ["0*"] and "A*" in prefixes and "C*" in prefixes
    assert prefixes[prefixes.index("A*") + 1] == "A"
    assert prefixes[prefixes.index("A") + 1] == "A0*"
    assert "AB" in prefixes and prefixes[prefixes.index("AB") + 1] == "AB0*"
    assert "AB1*" in prefixes


@pytest.mark.parametrize(
    ("undated", "part", "failure"),
    [
        pytest.param([study("9.1", None, "")] * 3, None,
                     "studies without StudyDate and without PatientID cannot be swept by PatientID", id="no-patient-id"),
        pytest.param([study(f"9.{k}", None, "A1") for k in range(3)], "same-id",
                     "more studies share one PatientID than the server answers at once", id="one-id-capped"),
        pytest.param([study(f"9.{k}", None, "A1") for k in range(3)], "ignores",
                     "the server ignores PatientID (or its wildcards)", id="ignores-patient-id"),
        pytest.param([study(f"9.{k}", None, f"A{k}") for k in range(3)], "misses",
                     "the sweep by PatientID did not find 1 of the 3 studies without StudyDate listed before", id="misses-one"),
        pytest.param([study(f"9.{k}", None, f"A{k}") for k in range(3)], "fails",
                     "a part of the sweep by PatientID failed: HTTP 500 from the simulated server", id="a-part-fails"),
        pytest.param([study(f"9.{k}", None, "AB") for k in range(3)], "exact-as-prefix",
                     "the server ignores PatientID (or its wildcards)", id="an-exact-id-answered-as-a-prefix"),
    ],
)
def test_a_sweep_that_cannot_be_trusted_leaves_the_studies_at_risk(undated, part, failure, monkeypatch):
    def answer(prefix: str, query: dict[str, str]) -> list[dict[str, Any]]:
        if part == "same-id":
            return undated if prefix in ("A*", "A1*", "A1") else []
        if part == "ignores":
            return undated
        if part == "misses":
            return [s for s in undated[:2] if s[PID]["Value"][0].startswith(prefix.rstrip("*"))]
        if part == "fails" and prefix == "A*":
            raise FatalQidoError("HTTP 500 from the simulated server", status=500)
        if part == "exact-as-prefix":
            return by_prefix(undated + [study("9.9", None, "ABC")])(prefix.rstrip("*") + "*", query)
        return by_prefix(undated)(prefix, query)

    script = SweepScript(undated, answer)
    _, report = script.run()
    assert len(report.incomplete) == 1
    assert report.incomplete == [f"all studies: 3 results, at the server's cap; studies without StudyDate past the cap cannot be listed ({failure})"]


def test_the_sweep_alphabet_holds_the_characters_seen_in_patient_ids():
    """Killed: the characters seen left out of the first parts' alphabet (IDs starting with a
    lower-case letter or '-' were never asked for)."""
    undated = [study("9.1", None, "x1"), study("9.2", None, "x2"), study("9.3", None, "-3")]
    script = SweepScript(undated, by_prefix(undated))
    items, report = script.run()
    assert report.incomplete == []
    assert {"x*", "-*"} <= set(sweep_prefixes(script))


def test_a_capped_part_is_split_by_the_characters_seen_before_and_in_its_own_answer():
    """A part's answer is cut at the cap: its children take the next characters seen in the
    capped listing ('x') and in the part's own answer ('y'), so studies beyond both caps are
    found (killed: either set left out of the children's alphabet)."""
    undated = [study("9.1", None, "Ax"), study("9.2", None, "A1"), study("9.3", None, "A2"),
               study("9.4", None, "Ay"), study("9.5", None, "A3")]

    def part(prefix: str, query: dict[str, str]) -> list[dict[str, Any]]:
        ordered = sorted(undated, key=lambda s: {"Ay": 0, "A1": 1, "A2": 2, "A3": 3, "Ax": 4}[s[PID]["Value"][0]])
        return by_prefix(ordered)(prefix, query)[:3]

    script = SweepScript(undated, part)
    items, report = script.run()
    assert report.incomplete == []
    assert {uid_of(i) for i in items} == {"9.1", "9.2", "9.3", "9.4", "9.5"}
    assert {"Ax*", "Ay*"} <= set(sweep_prefixes(script))


def test_the_sweep_bound_counts_every_page_of_a_part(monkeypatch):
    """Three requests at most: the part "0*" takes two (a full page, then an empty one), "1*" one,
    so the sweep stops before "2*" with 34 of the 36 first parts left (killed: `requests -= ...`,
    `number > 1`, and the parts left miscounted)."""
    monkeypatch.setattr(listing, "SWEEP_MAX_REQUESTS", 3)
    undated = [study("9.1", None, "01"), study("9.2", None, "02"), study("9.3", None, "A3")]
    script = SweepScript(undated, by_prefix(undated), page_size=2)
    _, report = script.run()
    assert sweep_prefixes(script) == ["0*", "0*", "1*"]
    assert report.incomplete == ["all studies: 3 results, at the server's cap; studies without StudyDate past the cap cannot be listed "
                                 "(the sweep by PatientID stopped at 3 requests (34 parts left))"]


def test_a_sweep_part_still_capped_at_the_longest_prefix_gives_up(monkeypatch):
    monkeypatch.setattr(listing, "SWEEP_MAX_LENGTH", 2)
    undated = [study(f"9.{k}", None, f"AAA{k}") for k in range(3)]
    script = SweepScript(undated, by_prefix(undated))
    _, report = script.run()
    assert len(report.incomplete) == 1
    assert report.incomplete[0].endswith("(a part of the sweep by PatientID is still capped at 2 characters)")
    assert max(len(p.rstrip("*")) for p in sweep_prefixes(script)) == 2


def test_a_sweep_keeps_only_undated_studies_and_the_credentials_error_ends_it():
    dated_too = [study("9.1", None, "A1"), study("9.2", "20200101", "A2"), study("9.3", None, "B1")]
    script = SweepScript([dated_too[0], dated_too[2], study("9.4", None, "C1")], by_prefix(dated_too + [study("9.4", None, "C1")]))
    items, report = script.run()
    assert {uid_of(i) for i in items} == {"9.1", "9.3", "9.4"}
    assert report.incomplete == []

    for status in (401, 403):
        def refuse(prefix: str, query: dict[str, str], status: int = status) -> list[dict[str, Any]]:
            raise FatalQidoError(f"HTTP {status} from the simulated server", status=status)

        with pytest.raises(FatalQidoError, match=str(status)):
            SweepScript([study(f"9.{k}", None, f"A{k}") for k in range(3)], refuse).run()


# --- what follows a window's listing: its parts, or what cannot be listed -----------------------


def test_windows_listed_are_counted_complete_or_split_one_by_one():
    """Killed in follow_up: `windows_complete = 1`, `-= 1`, `+= 2`; `windows_split = 1`, `+= 2`."""
    with FakePacs(n_studies=120, seed=26, max_results=20) as pacs:
        report = ListingReport(page_size=100)
        found, _ = listed(pacs, [Window()], report)
        truth = set(pacs.study_uids())
    assert found == truth and report.incomplete == []
    assert report.windows_split >= 3 and report.windows_complete >= 4
    assert report.windows_listed == report.windows_complete + report.windows_split


def test_a_server_that_ignores_offset_teaches_its_page_as_the_cap():
    """Pages that repeat mean a cap of one page: it is kept for the later windows, so each is
    asked once (killed: the comparison with "the server ignores offset" and the cap not kept)."""
    with FakePacs(n_studies=30, seed=27, ignore_offset=True, date_from="20200101", date_to="20201231") as pacs:
        report = ListingReport(page_size=10)
        found, searches = listed(pacs, [Window()], report)
        truth = set(pacs.study_uids())
    assert found == truth
    assert report.cap == 10 and report.incomplete == []
    assert searches == report.windows_listed + 1


def test_undated_studies_in_dated_windows_need_no_sweep():
    """A server that matches empty StudyDates in date ranges returns the undated studies with
    the dated windows: no sweep (killed: `elsewhere = False`, and `undated or not unfiltered`,
    which dismissed the risk for a server that does not)."""
    undated = [study(f"9.{k}", None, f"A{k}") for k in range(4)]
    dated = [study(f"8.{k}", "20200101", f"B{k}") for k in range(2)]

    def answer(query: dict[str, str]) -> list[dict[str, Any]]:
        if DATE not in query:
            return [] if PID in query else (undated + dated)[:3]
        return dated + undated if query[DATE] == f"{FIRST_DAY}-{LAST_DAY}" else []

    client = Scripted(answer)
    report = ListingReport(page_size=100, cap=3)
    items = list(iter_studies(client, [Window()], report, verify=False))
    assert {uid_of(i) for i in items} == {uid_of(s) for s in undated + dated}
    assert report.incomplete == []
    assert not [call for call in client.calls if PID in dict(call[2])]


def test_the_parts_of_a_listing_listed_anyway_only_put_undated_studies_at_risk():
    """follow_up with ``parts_listed`` (the Dask executor's undated-only listing): no parts, the
    undated studies at risk with what the window saw (killed: `at_risk = None`, the seen studies
    and characters dropped or replaced by empty ones)."""
    state = listing.WindowListing(Window(), capped="40 results, at the server's cap", undated=2,
                                  undated_seen={"9.1": "A1", "9.2": "B7"}, id_chars={"A", "1", "B", "7"})
    report = ListingReport(page_size=100)
    undated = listing.UndatedRisk()
    assert listing.follow_up(state, report, undated, 100, parts_listed=True) == []
    assert undated.at_risk == "all studies: 40 results, at the server's cap; studies without StudyDate past the cap cannot be listed"
    assert undated.seen == {"9.1": "A1", "9.2": "B7"} and undated.chars == {"A", "1", "B", "7"}
    assert undated.sweep_needed and report.windows_complete == 0 and report.incomplete == []
    undated.close(report)
    assert report.incomplete == [undated.at_risk]


def timed(uid: str, day: str, time: str) -> dict[str, Any]:
    item = study(uid, day)
    item["00080030"] = {"vr": "TM", "Value": [time]}
    return item


def test_a_capped_day_is_not_split_by_a_study_time_the_server_ignores():
    """StudyTime ignored in both forms: the first day's first part is given up, its second not
    listed, and the second day, capped too, is not split (killed: that message replaced by None)."""
    days = {"20200101": [timed(f"1.{k}", "20200101", f"{k:02d}0000") for k in range(0, 24, 5)],
            "20200102": [timed(f"2.{k}", "20200102", f"{k:02d}0000") for k in range(0, 24, 5)]}

    def answer(query: dict[str, str]) -> list[dict[str, Any]]:
        day = query.get(DATE, query.get("StudyDate"))
        return list(days.get(day, []))

    client = Scripted(answer)
    report = ListingReport(page_size=100, cap=3)
    list(iter_studies(client, [Window("20200101", "20200101"), Window("20200102", "20200102")], report, verify=False))
    assert report.filters.ignored == {"StudyTime"}
    assert report.incomplete == [
        "StudyDate 20200101 StudyTime 000000-115959: the server ignores StudyTime, as a tag and as a keyword; not split further",
        "StudyDate 20200101 StudyTime 120000-235959: not listed: the server ignores StudyTime",
        "StudyDate 20200102: 5 results, at the server's cap; not split: the server ignores StudyTime",
    ]


def test_a_capped_day_with_studies_without_a_time_reports_them_at_risk():
    """A day over the cap is split by StudyTime; its studies without one cannot be reached by the
    parts (killed in follow_up: the day test's `since is None`, `time_from is not None`, and the
    message replaced by None)."""
    day = "20200101"
    studies = [timed(f"1.{k}", day, f"{k * 4:02d}0000") for k in range(4)] + [study("1.8", day), study("1.9", day)]

    def answer(query: dict[str, str]) -> list[dict[str, Any]]:
        if query.get(DATE) != day:
            return []
        if "00080030" not in query:
            return studies
        low, high = (int(t) for t in query["00080030"].split("-"))
        return [s for s in studies if "00080030" in s and low <= int(s["00080030"]["Value"][0]) <= high]

    client = Scripted(answer)
    report = ListingReport(page_size=100, cap=3)
    items = list(iter_studies(client, [Window(day, day)], report, verify=False))
    assert {uid_of(i) for i in items} == {uid_of(s) for s in studies}
    assert report.incomplete == [f"StudyDate {day}: 6 results, at the server's cap; studies without StudyTime on that day past the cap cannot be listed"]


# --- listing entries decoded one by one ---------------------------------------------------------


def test_entries_that_are_not_utf8_are_listed_repaired_and_counted():
    """Killed in _mended: the early return inverted or taken on `and`, the repaired marker not
    taken off the entry, the count of repaired entries (`= 1`, `-= 1`, `+= 2`). One entry per
    page, so that a page holds nothing but repaired entries too."""
    with FakePacs(n_studies=20, seed=28, latin1_entries={3, 17}) as pacs:
        client = QidoClient(pacs.url, retry=FAST_RETRY)
        report = ListingReport(page_size=1)
        try:
            items = list(iter_studies(client, [Window()], report, verify=False))
        finally:
            client.close()
        truth = set(pacs.study_uids())
        repaired = {pacs.study_uid(3), pacs.study_uid(17)}
    assert {uid_of(i) for i in items} == truth
    assert report.repaired == 2 and report.incomplete == []
    assert not [i for i in items if listing.dj.REPAIRED in i]
    assert {uid_of(i) for i in items if "\ufffd" in json.dumps(i, ensure_ascii=False)} == repaired


def test_a_page_of_unreadable_entries_without_a_uid_leaves_the_window_incomplete():
    """Entries that could not be read nor name their study are dropped and counted, even when
    nothing else is in the page (killed: `UNREADABLE not in item` in _mended's early return)."""
    unreadable = {listing.dj.UNREADABLE: "malformed JSON near byte 3"}
    client = Scripted(lambda query: [dict(unreadable), dict(unreadable)])
    report = ListingReport(page_size=100)
    items = list(iter_studies(client, [Window("20200101", "20200101")], report, verify=False))
    assert items == []
    assert report.incomplete == ["StudyDate 20200101: 2 listing entries could not be read, nor their studies named"]


def test_an_unreadable_entry_that_names_its_study_stays_for_the_run_to_fail_it():
    """Of an unreadable entry without a UID, one with a UID, and a good study, the last two are
    listed, and the window is incomplete for the first only (killed in _mended: `or` and the
    UID test inverted, `continue` -> `break`, the count of unreadable entries)."""
    named = {**study("1.2", "20200101"), listing.dj.UNREADABLE: "malformed JSON near byte 40"}
    client = Scripted(lambda query: [{listing.dj.UNREADABLE: "malformed JSON near byte 3"}, dict(named), study("1.3", "20200101")])
    report = ListingReport(page_size=100)
    items = list(iter_studies(client, [Window("20200101", "20200101")], report, verify=False))
    assert [uid_of(i) for i in items] == ["1.2", "1.3"]
    assert listing.dj.UNREADABLE in items[0]
    assert report.incomplete == ["StudyDate 20200101: 1 listing entries could not be read, nor their studies named"]


def test_the_largest_offset_is_asked_for_and_a_window_past_it_is_split():
    """max_offset 20 with pages of 10: offsets 0, 10 and 20 are asked, and the 25 studies are one
    complete window; with max_offset 10 the window is capped past offset 10 and split (killed:
    `offset >= max_offset`, and the cap not recorded, which took 20 studies for all)."""
    with FakePacs(n_studies=25, seed=29) as pacs:
        client = QidoClient(pacs.url, retry=FAST_RETRY)
        try:
            report = ListingReport(page_size=10)
            found = {uid_of(i) for i in iter_studies(client, [Window()], report, max_offset=20, verify=False)}
            assert found == set(pacs.study_uids())
            assert report.windows_split == 0 and report.windows_complete == 1 and pacs.counts()["studies"] == 3
            report = ListingReport(page_size=10)
            found = {uid_of(i) for i in iter_studies(client, [Window()], report, max_offset=10, verify=False)}
            assert found == set(pacs.study_uids())
            assert report.windows_split >= 1 and report.incomplete == []
        finally:
            client.close()


def test_a_400_past_an_offset_caps_the_window_and_keeps_the_page_size():
    """A server refusing offsets past 10 (400): the window is capped there and split, and the
    limit is not halved, which is for a 400 on a first page (killed: `smaller_limit(exc,
    page_size, None)`)."""
    with FakePacs(n_studies=30, seed=30, max_offset=10) as pacs:
        client = QidoClient(pacs.url, retry=FAST_RETRY)
        try:
            report = ListingReport(page_size=10)
            found = {uid_of(i) for i in iter_studies(client, [Window()], report, verify=False)}
            assert found == set(pacs.study_uids())
            assert client.max_limit is None
            assert report.windows_split >= 1 and report.incomplete == []
        finally:
            client.close()


@pytest.mark.parametrize(("status", "offset"), [(404, 1), (400, 0)])
def test_a_failed_page_that_is_no_cap_leaves_the_window_incomplete(status, offset):
    """A 404 past the first page, or a 400 on a first page with a limit of 1 (no smaller limit to
    try), is a failure, not a cap: the window is incomplete rather than split into parts that
    then list fine (killed: `exc.status == 400 or offset > 0`, `offset >= 0`)."""
    studies = spread("1.2", "20200101", 3) + spread("1.3", "20200301", 3)
    failed: list[int] = []

    def answer(query: dict[str, str]) -> list[dict[str, Any]]:
        if not failed and int(query.get("offset", 0)) == offset:
            failed.append(offset)
            raise FatalQidoError(f"HTTP {status} from the simulated server", status=status)
        return keyword_only(studies)({"StudyDate": query[DATE]} if DATE in query else {})[::-1]

    client = Scripted(answer)
    report = ListingReport(page_size=1)
    list(iter_studies(client, [Window("20200101", "20200331")], report, verify=False))
    assert report.windows_split == 0
    assert report.incomplete == [f"StudyDate 20200101-20200331: HTTP {status} from the simulated server"]


def by_date(studies: list[dict[str, Any]]) -> Callable[[dict[str, str]], list[dict[str, Any]]]:
    """A server honouring StudyDate in either form, answering by ascending UID."""
    def answer(query: dict[str, str]) -> list[dict[str, Any]]:
        value = query.get(DATE, query.get("StudyDate"))
        found = keyword_only(studies)({} if value is None else {"StudyDate": value})
        return sorted(found, key=lambda s: uid_of(s) or "")
    return answer


def test_a_400_at_the_second_offset_is_a_cap_too():
    """Killed: `offset > 1` for `offset > 0`, and the cap not recorded (one study taken for all)."""
    studies = spread("1.2", "20200101", 3) + spread("1.3", "20200301", 3)
    failed: list[int] = []

    def answer(query: dict[str, str]) -> list[dict[str, Any]]:
        if not failed and int(query.get("offset", 0)) == 1:
            failed.append(1)
            raise FatalQidoError("HTTP 400 from the simulated server", status=400)
        return by_date(studies)(query)

    report = ListingReport(page_size=1)
    found = {uid_of(i) for i in iter_studies(Scripted(answer), [Window("20200101", "20200331")], report, verify=False)}
    assert found == {uid_of(s) for s in studies}
    assert report.windows_split == 1 and report.incomplete == []


@pytest.mark.parametrize(
    ("window", "capped", "listed"),
    [
        pytest.param(Window("20200101", "20200331"), "more than 4 studies for one task", 4, id="a-range"),
        pytest.param(Window("20200101", "20200101"), None, 6, id="a-single-day"),
        pytest.param(Window("21000101", None), None, 6, id="a-window-that-cannot-be-split"),
    ],
)
def test_a_task_budget_caps_a_window_that_can_be_split(window, capped, listed):
    """A listing task's budget (the Dask executor's share of the work) caps a window once it is
    reached, unless the window is a single day or cannot be split (killed: each part of that
    test, `>` for `>=`, and the cap not recorded)."""
    day = window.since or "20200101"
    studies = spread("1.2", day, 6)
    state = listing.WindowListing(window, budget=4)
    pages = list(listing.list_window(Scripted(by_date(studies)), state, ListingReport(page_size=2), 1_000_000))
    assert sum(len(page) for page in pages) == listed
    assert state.capped == capped


# --- iter_study_pages: the queue of windows ------------------------------------------------------


def windows_asked(client: Scripted) -> list[str]:
    return [dict(call[2]).get(DATE, "all") for call in client.calls]


def test_a_window_that_fails_is_incomplete_and_the_next_is_listed_unverified():
    """A 500 on the first window: it is reported incomplete, the next window is listed, and only
    a first window is probed for a silent cap (killed: the failure not recorded, `break` for
    `continue`, `first` left True after a failure)."""
    studies = spread("1.2", "20200101", 3) + spread("1.3", "20200301", 3)

    def answer(query: dict[str, str]) -> list[dict[str, Any]]:
        if query.get(DATE) == "20200101-20200131":
            raise FatalQidoError("HTTP 500 from the simulated server", status=500)
        return by_date(studies)(query)

    client = Scripted(answer)
    report = ListingReport(page_size=100)
    found = {uid_of(i) for i in iter_studies(client, [Window("20200101", "20200131"), Window("20200201", "20200331")], report)}
    assert found == {uid_of(s) for s in studies[3:]}
    assert report.incomplete == ["StudyDate 20200101-20200131: HTTP 500 from the simulated server"]
    assert windows_asked(client) == ["20200101-20200131", "20200201-20200331"]
    assert report.windows_listed == 2 and report.windows_complete == 1


@pytest.mark.parametrize("error", [FatalQidoError("HTTP 401 Unauthorized", status=401), FatalQidoError("HTTP 403 Forbidden", status=403),
                                   listing.SourceUnreachable("cannot reach the simulated server")], ids=["401", "403", "unreachable"])
def test_refused_credentials_and_an_unreachable_source_end_the_listing(error):
    def answer(query: dict[str, str]) -> list[dict[str, Any]]:
        raise error

    with pytest.raises(type(error)):
        list(iter_studies(Scripted(answer), [Window("20200101", "20200131"), Window("20200201", "20200331")], ListingReport()))


def test_the_parts_of_a_capped_window_are_listed_in_order_before_the_next_window():
    """Killed: the parts queued after the later windows, or in reverse order."""
    studies = spread("1.2", "20200101", 2) + spread("1.3", "20200301", 2) + spread("1.4", "20200501", 1)
    client = Scripted(by_date(studies))
    report = ListingReport(page_size=100, cap=3)
    found = {uid_of(i) for i in iter_studies(client, [Window("20200101", "20200331"), Window("20200401", "20200531")], report, verify=False)}
    assert found == {uid_of(s) for s in studies}
    assert windows_asked(client) == ["20200101-20200331", "20200101-20200215", "20200216-20200331", "20200401-20200531"]


def test_windows_relying_on_an_ignored_key_are_not_listed():
    """StudyDate known to be ignored: dated windows are reported, not asked; the unfiltered one is
    listed (killed: the ignored keys not looked at)."""
    studies = spread("1.2", "20200101", 2)
    client = Scripted(by_date(studies))
    report = ListingReport(page_size=100)
    report.filters.ignored.add("StudyDate")
    found = {uid_of(i) for i in iter_studies(client, [Window("20200101", "20200131"), Window()], report, verify=False)}
    assert found == {uid_of(s) for s in studies}
    assert report.incomplete == ["StudyDate 20200101-20200131: not listed: the server ignores StudyDate"]
    assert windows_asked(client) == ["all"] and report.windows_listed == 1


@pytest.mark.parametrize(("n_studies", "searches"), [(6, 3), (8, 1)])
def test_a_first_window_larger_than_verify_max_is_not_probed(n_studies, searches, monkeypatch):
    """The silent-cap check keeps the dates of at most VERIFY_MAX studies: 6 of 6 are probed (the
    listing and two halves), 8 are not (killed: `>=` for `>`, the dates dropped as "")."""
    monkeypatch.setattr(listing, "VERIFY_MAX", 6)
    studies = spread("1.2", "20200101", n_studies // 2) + spread("1.3", "20200301", n_studies - n_studies // 2)
    client = Scripted(by_date(studies))
    report = ListingReport(page_size=100)
    assert len(list(iter_studies(client, [Window()], report))) == n_studies
    assert len(client.calls) == searches
    assert report.verified == (n_studies if searches > 1 else 0)


def keywords_match_nothing(studies: list[dict[str, Any]]) -> Callable[[dict[str, str]], list[dict[str, Any]]]:
    """A server that ignores the tag form of StudyDate and answers nothing to the keyword form."""
    def answer(query: dict[str, str]) -> list[dict[str, Any]]:
        return [] if "StudyDate" in query else keyword_only(studies)({})
    return answer


@pytest.mark.parametrize(("verify", "cap", "searches"), [(False, 13, 3), (True, None, 5)])
def test_a_dated_window_that_strays_switches_form_and_lists_again_from_the_start(verify, cap, searches):
    """The first page of a dated window strays in the tag form; the keyword form works (one
    request for a day), and the window is listed again from its first page, its counts and the
    silent-cap check's dates reset, and probed only when it is the first window to verify
    (killed: the counts set to None or 1 on the restart, the dates test inverted or dropped,
    `break` for the restart's `continue`)."""
    studies = spread("1.2", "20200101", 12) + spread("1.3", "20200601", 3)
    client = Scripted(keyword_only(studies))
    report = ListingReport(page_size=100, cap=cap)
    found = {uid_of(i) for i in iter_studies(client, [Window("20200101", "20200331")], report, verify=verify)}
    assert found == {uid_of(s) for s in studies[:12]}
    assert report.filters.keywords is True and report.incomplete == []
    assert report.windows_complete == 1 and report.windows_split == 0
    assert len(client.calls) == searches
    assert report.verified == (12 if verify else 0)


def test_a_window_that_strays_once_the_other_form_was_tried_is_given_up():
    """Killed: `state.ignored = None` when the other form was tried already (the window counted
    complete)."""
    studies = spread("1.2", "20200101", 3) + spread("1.3", "20200601", 3)
    client = Scripted(keyword_only(studies))
    report = ListingReport(page_size=100)
    report.filters.tried = True
    list(iter_studies(client, [Window("20200101", "20200331")], report, verify=False))
    assert report.incomplete == ["StudyDate 20200101-20200331: the server ignores StudyDate, as a tag and as a keyword; not split further"]
    assert report.windows_complete == 0


def test_a_dated_window_whose_other_form_lists_nothing_gives_the_key_up_for_later_windows():
    """Killed: `filters.lost(None)` in list_window (StudyDate not recorded as ignored, so the next
    dated window was asked for in the form that does not work)."""
    studies = spread("1.2", "20200101", 3) + spread("1.3", "20200601", 3)
    client = Scripted(keywords_match_nothing(studies))
    report = ListingReport(page_size=100)
    list(iter_studies(client, [Window("20200101", "20200331"), Window("20200401", "20200731")], report, verify=False))
    assert report.filters.ignored == {"StudyDate"} and report.filters.keywords is False
    assert report.incomplete == [
        "StudyDate 20200101-20200331: the server ignores StudyDate, as a tag and as a keyword; not split further",
        "StudyDate 20200401-20200731: not listed: the server ignores StudyDate",
    ]


def test_a_server_that_ignores_limit_is_listed_from_its_long_pages_without_a_cap():
    """A page longer than the limit is the server's whole answer: no cap when it repeats at the
    next offset (killed: the long-page flag never set, or set to None or False, which split the
    window for ever; the notice's arguments dropped)."""
    with FakePacs(n_studies=60, seed=31, ignore_limit=True, ignore_offset=True) as pacs:
        report = ListingReport(page_size=20)
        client = QidoClient(pacs.url, retry=FAST_RETRY)
        try:
            found = {uid_of(i) for i in iter_studies(client, [Window()], report, verify=False)}
        finally:
            client.close()
        assert found == set(pacs.study_uids())
        assert pacs.counts()["studies"] == 2
    assert report.windows_split == 0 and report.windows_complete == 1 and report.incomplete == []


def test_long_pages_behind_a_known_cap_are_not_a_cap():
    """Killed: `and long_pages` for `and not long_pages` in the cap test."""
    with FakePacs(n_studies=40, seed=32, ignore_limit=True) as pacs:
        report = ListingReport(page_size=20, cap=30)
        client = QidoClient(pacs.url, retry=FAST_RETRY)
        try:
            found = {uid_of(i) for i in iter_studies(client, [Window()], report, verify=False)}
        finally:
            client.close()
        assert found == set(pacs.study_uids())
    assert report.windows_split == 0 and report.incomplete == []


def test_only_the_first_window_is_probed_for_a_silent_cap():
    """Killed: `first = True` after a window was listed and checked (every window probed)."""
    studies = spread("1.2", "20200105", 3) + spread("1.3", "20200120", 3) + spread("1.4", "20200305", 4) + spread("1.5", "20200320", 4)
    client = Scripted(by_date(studies))
    report = ListingReport(page_size=100)
    found = {uid_of(i) for i in iter_studies(client, [Window("20200101", "20200131"), Window("20200301", "20200331")], report)}
    assert found == {uid_of(s) for s in studies}
    assert windows_asked(client) == ["20200101-20200131", "20200101-20200105", "20200106-20200131", "20200301-20200331"]
    assert report.verified == 6

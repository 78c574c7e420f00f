"""The crawl path (not only the mapping) against hostile answers: wrongly typed UIDs and counts,
UIDs that would build other paths, and random DICOM JSON.

Whatever a server sends about one study, that study either maps or fails alone with a one-line
error naming its Study Instance UID; no other exception escapes, the rest of the run goes on,
and no request is built from a UID that is not digits and dots. Sync-level cases use the
simulator in fixtures/fakepacs.py (no real server sends these answers on demand); the fuzzing
drives ``fetch_study`` + ``map_resources`` with a stand-in client object.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from crawler.config import SyncConfig
from crawler.crawl import CrawlOptions, Learned, MetadataMode, StudySummary, fetch_study
from crawler.dicomjson import Tag
from crawler.errors import FatalQidoError, MappingError, QidoError
from crawler.mapping import MappingOptions, map_resources
from crawler.http import RetryPolicy
from crawler.qido import Page
from crawler.state import State
from crawler.sync import sync
from crawler.worker import CrawlJob, crawl_one
from crawler.uids import path_uid
from fixtures.fakepacs import FakePacs

FAST_RETRY = RetryPolicy(base_delay=0.01, max_delay=0.05, max_seconds=10)
STUDY_UID = "1.2.826.0.1.3680043.8.498.1"


def run(pacs: FakePacs, tmp_path: Path, **overrides: Any) -> tuple[Any, dict[str, str]]:
    settings_ = dict(
        url=pacs.url, out=tmp_path / "out", state=tmp_path / "state.db", page_size=20, workers=3,
        retry=FAST_RETRY, timeout=(2.0, 5.0), crawl=CrawlOptions(metadata=MetadataMode.NEVER),
    )
    settings_.update(overrides)
    result = sync(SyncConfig(**settings_))
    state = State.open(settings_["state"], read_only=True)
    try:
        rows = {row.study_uid: row.status for row in state.iter_study_rows()}
    finally:
        state.close()
    return result, rows


# --- item 2: a wrongly typed UID fails its study only ---------------------------------------


@pytest.mark.parametrize(
    "crawl",
    [
        CrawlOptions(metadata=MetadataMode.NEVER),
        CrawlOptions(metadata=MetadataMode.ALWAYS),
        CrawlOptions(metadata=MetadataMode.AUTO, metadata_max_instances=0),
    ],
    ids=["qido", "metadata", "series-metadata"],
)
def test_an_instance_uid_that_is_an_object_fails_only_its_study(crawl, tmp_path):
    with FakePacs(n_studies=12, seed=21, object_uids={4}) as pacs:
        bad = pacs.study_uid(4)
        result, rows = run(pacs, tmp_path, crawl=crawl)
        assert result.exit_code == 1
        assert result.figures.studies_failed == 1
        assert rows.pop(bad) == "failed"
        assert set(rows.values()) == {"synced"} and len(rows) == 11
        (error,) = result.errors
        assert bad in error and "SOPInstanceUID" in error and "\n" not in error


def test_a_series_uid_that_is_an_object_in_the_series_answer_fails_only_its_study():
    instances = [_instance("1.2.3.1", "1.2.3.1.1", modality=False)]
    series = [{Tag.SeriesInstanceUID: {"vr": "UI", "Value": [{"x": 1}]}, Tag.Modality: {"vr": "CS", "Value": ["CT"]}}]
    client = StandIn(instances=instances, series=series)
    with pytest.raises(MappingError) as caught:
        fetch_study(client, _summary(), CrawlOptions(metadata=MetadataMode.NEVER), Learned())
    assert STUDY_UID in str(caught.value) and "SeriesInstanceUID" in str(caught.value)


def test_any_other_exception_of_one_study_becomes_its_failure_without_server_text():
    class Exploding(StandIn):
        def iter_pages(self, *args: Any, **kwargs: Any) -> Iterator[Page]:
            raise RuntimeError("DOE^JANE said the server")

    config = SyncConfig(url="http://127.0.0.1:9/dicom-web", crawl=CrawlOptions(metadata=MetadataMode.NEVER))
    outcome = crawl_one(Exploding(), _summary(), CrawlJob(config.crawl, MappingOptions(source="http://127.0.0.1:9/dicom-web")), Learned())
    assert outcome.status == "failed"
    assert STUDY_UID in outcome.error and "RuntimeError" in outcome.error and "DOE" not in outcome.error


# --- item 9: UIDs never build other paths -----------------------------------------------------


def test_path_uid_accepts_digits_and_dots_only():
    for good in ("1.2.3", "2.25.123456789012345678901234567890", "1.2.840.10008.0001", "0"):
        assert path_uid(good) == good
    for bad in ("", "../../x", "1.2?x=1", "1.2/3", "1..2", ".1", "1.", "1.2.3 ", "1.2.3a", "%2e%2e", "1" * 65, "１.２"):
        with pytest.raises(ValueError):
            path_uid(bad)


def test_a_study_with_an_unsafe_uid_fails_alone_and_no_request_uses_it(tmp_path):
    unsafe = {2: "../../x", 5: "1.2?x=1", 7: "1.2.3/../../../studies"}
    with FakePacs(n_studies=10, seed=22, listed_uids=unsafe) as pacs:
        result, rows = run(pacs, tmp_path)
        assert result.exit_code == 1 and result.figures.studies_failed == 3
        for uid in unsafe.values():
            assert rows.pop(uid) == "failed"
        assert set(rows.values()) == {"synced"} and len(rows) == 7
        assert len(result.errors) == 3 and all("StudyInstanceUID" in e and "not a valid UID" in e for e in result.errors)
        for request in pacs.requests:
            assert request.kind != "other" and ".." not in request.path and "x=1" not in request.query, request


def test_an_unsafe_series_or_instance_uid_never_reaches_a_path():
    instances = [_instance(None, "1.2.3.1.1", modality=False)]   # no series UID: the series are asked one by one
    client = StandIn(instances=instances, series=[_series("1.2.3.1/../..")])
    with pytest.raises(MappingError) as caught:
        fetch_study(client, _summary(), CrawlOptions(metadata=MetadataMode.NEVER), Learned())
    assert "SeriesInstanceUID" in str(caught.value)
    assert all(_safe_path(p) for p in client.paths), client.paths

    client = StandIn(instances=[_instance("1.2.3.1", "1.2?x=1")], metadata=[])
    with pytest.raises(MappingError) as caught:
        fetch_study(client, _summary(n=5), CrawlOptions(metadata=MetadataMode.AUTO, metadata_max_instances=0), Learned(qido_lacks_sequences=True))
    assert "SOPInstanceUID" in str(caught.value)
    assert all(_safe_path(p) for p in client.paths), client.paths


# --- fuzzing the crawl path ------------------------------------------------------------------


class StandIn:
    """A stand-in for QidoClient: answers from lists, records the paths asked for."""

    def __init__(self, instances: Sequence[Any] = (), series: Sequence[Any] = (), metadata: Sequence[Any] | None = None,
                 series_instances: Sequence[Any] | None = None, refuse_study_instances: bool = False) -> None:
        self.instances, self.series, self.metadata = list(instances), list(series), metadata
        self.series_instances = series_instances
        self.refuse_study_instances = refuse_study_instances
        self.paths: list[str] = []

    def iter_pages(self, kind: str, path: str, params: Any, page_size: int) -> Iterator[Page]:
        self.paths.append(path)
        if kind == "series":
            yield Page(self.series, 200)
        elif path.count("/") > 2:
            yield Page(self.series_instances if self.series_instances is not None else self.instances, 200)
        elif self.refuse_study_instances:
            raise FatalQidoError("HTTP 404 (not found) from stand-in", status=404)
        else:
            yield Page(self.instances, 200)

    def get(self, kind: str, path: str, params: Any = (), keep: Any = None) -> Page:
        self.paths.append(path)
        if self.metadata is None:
            raise FatalQidoError("HTTP 404 (not found) from stand-in", status=404)
        return Page(list(self.metadata), 200)


def _safe_path(path: str) -> bool:
    return all(part in ("studies", "series", "instances", "metadata") or re.fullmatch(r"[0-9]+(\.[0-9]+)*", part) for part in path.split("/"))


def _summary(n: int | None = None) -> StudySummary:
    attributes = {Tag.StudyInstanceUID: {"vr": "UI", "Value": [STUDY_UID]}}
    return StudySummary(STUDY_UID, None, n, attributes)


def _series(uid: Any) -> dict[str, Any]:
    return {Tag.SeriesInstanceUID: {"vr": "UI", "Value": [uid]}, Tag.Modality: {"vr": "CS", "Value": ["CT"]}}


def _instance(series_uid: Any, sop_uid: Any, modality: bool = True) -> dict[str, Any]:
    item = {
        Tag.SOPInstanceUID: {"vr": "UI", "Value": [sop_uid]},
        Tag.SOPClassUID: {"vr": "UI", "Value": ["1.2.840.10008.5.1.4.1.1.2"]},
    }
    if series_uid is not None:
        item[Tag.SeriesInstanceUID] = {"vr": "UI", "Value": [series_uid]}
    if modality:
        item[Tag.Modality] = {"vr": "CS", "Value": ["CT"]}
    return item


_scalar = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**40), 2**40), st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from(["1.2.3", "1.2.3.4", "CT", "", " ", "../../x", "1.2?x=1", "5", "abc", "1" * 70]),
    st.dictionaries(st.sampled_from(["x", "Alphabetic", "vr"]), st.integers(0, 3), max_size=2),
)
_element = st.one_of(
    st.fixed_dictionaries({"vr": st.sampled_from(["UI", "CS", "IS", "SQ"]), "Value": st.lists(_scalar, max_size=3)}),
    st.fixed_dictionaries({"vr": st.just("UI"), "Value": _scalar}),
    st.fixed_dictionaries({"vr": st.just("UI")}),
    _scalar,
    st.lists(_scalar, max_size=2),
)
_TAGS = [Tag.SOPInstanceUID, Tag.SeriesInstanceUID, Tag.Modality, Tag.SOPClassUID, Tag.InstanceNumber, Tag.SeriesNumber,
         Tag.NumberOfSeriesRelatedInstances, Tag.StudyInstanceUID]
_dataset = st.dictionaries(st.sampled_from(_TAGS), _element, max_size=6)
_answer = st.lists(_dataset, max_size=4)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    instances=_answer, series=_answer, metadata=st.one_of(st.none(), _answer), series_instances=st.one_of(st.none(), _answer),
    mode=st.sampled_from(list(MetadataMode)), small=st.integers(0, 3), n=st.one_of(st.none(), st.integers(0, 5)),
    lacks=st.sampled_from([None, True, False]), refuse=st.booleans(),
)
def test_fetch_and_map_give_a_study_or_a_clean_failure(instances, series, metadata, series_instances, mode, small, n, lacks, refuse):
    client = StandIn(instances, series, metadata, series_instances, refuse)
    options = CrawlOptions(metadata=mode, metadata_max_instances=small)
    try:
        fetched = fetch_study(client, _summary(n), options, Learned(qido_lacks_sequences=lacks))
        mapped = map_resources(fetched.data, MappingOptions(source="http://pacs.example/dicom-web"))
    except (MappingError, QidoError) as exc:
        assert STUDY_UID in str(exc) or isinstance(exc, QidoError), exc
        assert "\n" not in str(exc)
    else:
        assert mapped.study["resourceType"] == "ImagingStudy"
    assert all(_safe_path(p) for p in client.paths), client.paths


# --- the listing's own reads --------------------------------------------------------------------


class ListingStandIn:
    """Answers a study search with the items whose StudyDate is in the range asked for (one page)."""

    max_limit = None

    def __init__(self, items: list[Any]) -> None:
        self.items = items

    def page_size(self, wanted: int) -> int:
        return wanted

    def get(self, kind: str, path: str, params: Any = (), keep: Any = None) -> Page:
        asked = dict((str(k), str(v)) for k, v in params)
        wanted = asked.get(Tag.StudyDate) or asked.get("StudyDate")
        if not wanted:
            return Page(self.items, 200)
        since, _, until = wanted.partition("-") if "-" in wanted else (wanted, "", wanted)
        return Page([i for i in self.items if (since or "0") <= i[Tag.StudyDate]["Value"][0] <= (until or "9")], 200)


@pytest.mark.parametrize(
    "element",
    [{Tag.StudyTime: "101010"}, {Tag.StudyTime: ["101010"]}, {Tag.StudyInstanceUID: {"vr": "UI", "Value": []}},
     {Tag.StudyInstanceUID: {"vr": "UI", "Value": {"0": 1}}}, {Tag.StudyInstanceUID: "1.2.3"}],
    ids=["time-string", "time-list", "uid-empty", "uid-object", "uid-string"],
)
def test_the_listing_reads_wrongly_typed_entries_without_stopping(element):
    from crawler.listing import ListingReport, iter_studies
    from crawler.planner import Window

    good = [{Tag.StudyInstanceUID: {"vr": "UI", "Value": [f"1.2.{i}"]}, Tag.StudyDate: {"vr": "DA", "Value": [f"2024010{i}"]},
             Tag.StudyTime: {"vr": "TM", "Value": ["101010"]}} for i in range(1, 4)]
    odd = {**good[0], **element}
    client = ListingStandIn([*good, odd])
    report = ListingReport(page_size=100)
    listed = list(iter_studies(client, [Window("20240101", "20240109")], report))
    assert len(listed) >= 4 and not report.incomplete


def test_the_audit_never_asks_a_path_built_from_an_unsafe_uid(tmp_path):
    import contextlib
    import io
    import json

    from crawler.cli import main

    with FakePacs(n_studies=6, seed=23, listed_uids={1: "..", 3: "1.2/../../x"}) as pacs:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            code = main(["audit", pacs.url, "--report", str(tmp_path / "report"), "--json", "--retries", "0"])
        document = json.loads((tmp_path / "report" / "findings.json").read_text())
        found = {f["code"]: set(f["studies"]) for f in document["findings"]}
        assert code == 1 and found["INVALID_UID"] == {"..", "1.2/../../x"}
        assert found["STUDY_UNREADABLE"] == {"..", "1.2/../../x"}
        for request in pacs.requests:
            assert request.kind != "other" and "/../" not in request.path and not request.path.endswith("/.."), request


# --- Orthanc's change feed (--changes orthanc) -------------------------------------------------


class FeedStandIn:
    """A stand-in client whose fetch answers Orthanc REST paths from a dict (path -> JSON)."""

    timeout = (1.0, 1.0)

    def __init__(self, answers: dict[str, Any]) -> None:
        from crawler.http import RequestCounts

        self.answers = answers
        self.asked: list[str] = []
        self.counts = RequestCounts()
        self.session = self

    def get(self, url: str, timeout: Any = None, headers: Any = None) -> Any:
        path = url.removeprefix("http://orthanc.example")
        self.asked.append(path)
        answer = self.answers.get(path.split("?")[0])

        class Response:
            status_code = 200 if answer is not None else 404

            @staticmethod
            def json() -> Any:
                return answer

        return Response()

    def fetch(self, url: str, accept: str | None = None) -> Any:
        import orjson

        from crawler.http import Answer

        response = self.get(url)
        return Answer(response.status_code, {}, orjson.dumps(response.json()) if response.status_code == 200 else b"", None)


GOOD_ID = "6b9e19d9-62094390-5f9ddb01-4a191ae7-9766b715"


def test_the_change_feed_builds_no_path_from_a_hostile_id_and_reads_odd_entries_without_stopping():
    from crawler.changes import orthanc_changes

    changes = [
        {"ResourceType": "Study", "ChangeType": "NewStudy", "ID": "../../tools/reset"},
        {"ResourceType": "Study", "ChangeType": "NewStudy", "ID": {"x": 1}},
        "not an object",
        {"ResourceType": "Study", "ChangeType": "StableStudy", "ID": GOOD_ID},
        {"ResourceType": "Study", "ChangeType": "NewStudy", "ID": "0" * 8 + "-" + "-".join(["1" * 8] * 4)},
    ]
    client = FeedStandIn({
        "/changes": {"Changes": changes, "Done": True, "Last": 12},
        f"/studies/{GOOD_ID}": {"MainDicomTags": {"StudyInstanceUID": "1.2.3"}},
        "/studies/00000000-11111111-11111111-11111111-11111111": {"MainDicomTags": {"StudyInstanceUID": {"x": 1}}},
    })
    found = orthanc_changes(client, "http://orthanc.example", 5)
    assert found.study_uids == ("1.2.3",) and found.last == 12
    assert all(".." not in path and "{" not in path for path in client.asked), client.asked


@pytest.mark.parametrize("answer", [[1, 2], {"Changes": "x", "Last": 3}, {"Changes": [], "Last": "soon"}, {"Changes": [], "Last": True}])
def test_a_malformed_change_feed_is_a_clean_error(answer):
    from crawler.changes import orthanc_changes

    with pytest.raises(QidoError):
        orthanc_changes(FeedStandIn({"/changes": answer}), "http://orthanc.example", 5)


def test_the_listing_takes_a_nul_padded_study_uid_and_refuses_one_with_a_nul_inside():
    from crawler.crawl import summarise

    padded = {Tag.StudyInstanceUID: {"vr": "UI", "Value": ["1.2.3\x00"]}}
    assert summarise(padded).uid == "1.2.3"
    with pytest.raises(ValueError, match="StudyInstanceUID"):
        summarise({Tag.StudyInstanceUID: {"vr": "UI", "Value": ["1.2\x003"]}})   # a state on PostgreSQL cannot hold it

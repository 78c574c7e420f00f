"""The crawl against server behaviours no real server can be made to show on demand.

These use the simulated PACS in fixtures/fakepacs.py (a fake, named as such): result caps of
every kind, paging quirks, 429/503, resets, stalls, truncation, inconsistent counts, malformed
answers. The rule under test: every study is found exactly once, or the run says exactly which
windows it could not finish and exits 1; never silently less.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from crawler.config import SyncConfig
from crawler.crawl import STUDY_FIELDS, CrawlOptions, MetadataMode
from crawler.errors import SourceUnreachable
from crawler.http import RetryPolicy
from crawler.qido import QidoClient
from crawler.state import State
from crawler.sync import sync
from fixtures.fakepacs import FakePacs

FAST_RETRY = RetryPolicy(base_delay=0.01, max_delay=0.05, max_seconds=30)


def run(pacs: FakePacs, tmp_path: Path, **overrides) -> tuple:
    settings = dict(
        url=pacs.url,
        out=tmp_path / "out",
        state=tmp_path / "state.db",
        page_size=20,
        workers=4,
        retry=FAST_RETRY,
        timeout=(2.0, 5.0),
        crawl=CrawlOptions(metadata=MetadataMode.NEVER),
    )
    settings.update(overrides)
    result = sync(SyncConfig(**settings))
    state = State.open(settings["state"], read_only=True)
    try:
        rows = {row.study_uid: row.status for row in state.iter_study_rows()}
    finally:
        state.close()
    return result, rows


def written_study_uids(result) -> list[str]:
    if result.run_dir is None:
        return []
    lines = (Path(result.run_dir) / "ImagingStudy.ndjson").read_text().splitlines()
    return [json.loads(line)["identifier"][0]["value"][len("urn:oid:"):] for line in lines]


def assert_complete(pacs: FakePacs, result, rows) -> None:
    truth = set(pacs.study_uids())
    written = written_study_uids(result)
    assert len(written) == len(set(written)), "a study was written twice"
    assert set(written) == truth
    assert rows == {uid: "synced" for uid in truth}
    assert result.figures.studies_listed == len(truth)
    assert result.exit_code == 0, result.errors


@pytest.mark.parametrize("cap_mode", ["warning", "warning2013", "silent", "413"])
def test_capped_server_is_listed_completely_by_splitting_windows(cap_mode, tmp_path):
    with FakePacs(n_studies=150, seed=1, max_results=25, cap_mode=cap_mode) as pacs:
        # a page larger than the cap: dcm4chee only warns when limit is above its maximum
        result, rows = run(pacs, tmp_path, page_size=50)
        assert_complete(pacs, result, rows)
        assert result.figures.windows_split > 0


def test_silent_cap_found_once_is_remembered_by_the_next_run(tmp_path):
    with FakePacs(n_studies=120, seed=2, max_results=25, cap_mode="silent") as pacs:
        first, _ = run(pacs, tmp_path)
        pacs.reset_counts()
        second, rows = run(pacs, tmp_path, full=True)
        assert second.figures.studies_unchanged == 120
        assert second.figures.resources_written == 0
        assert pacs.counts().keys() == {"studies"}
        assert second.requests["studies"] < first.requests["studies"]


@pytest.mark.parametrize(
    "behaviour",
    [
        {"empty_status": 204},
        {"ignore_offset": True},
        {"duplicate_across_pages": True},
        {"newest_first": True, "duplicate_across_pages": True},
        {"max_offset": 40},
        {"max_limit": 10, "limit_error": True},
        {"fail_every": 4, "fail_status": 429, "retry_after": "0"},
        {"fail_every": 5, "fail_status": 503, "retry_after": "Thu, 01 Jan 1970 00:00:00 GMT"},
        {"reset_every": 6},
        {"truncate_every": 7},
        {"stall_seconds": 3.0, "stall_every": 9},
    ],
    ids=lambda b: ",".join(f"{k}={v}" for k, v in b.items()),
)
def test_paging_quirks_and_transient_faults_lose_nothing(behaviour, tmp_path):
    with FakePacs(n_studies=90, seed=3, **behaviour) as pacs:
        # every K-th request fails whoever sends it, so one request may fail several times in a row
        result, rows = run(pacs, tmp_path, timeout=(2.0, 1.0), retries=10)
        assert_complete(pacs, result, rows)


def test_retries_are_counted_and_honour_retry_after(tmp_path, monkeypatch):
    # every client the sync makes waits through this instead of sleeping
    slept: list[float] = []
    monkeypatch.setitem(QidoClient.__init__.__kwdefaults__, "sleep", slept.append)
    with FakePacs(n_studies=30, seed=4, fail_every=3, fail_status=429, retry_after="7") as pacs:
        # a third of all requests fail, whoever sends them: with 4 workers one request can be
        # among them several times in a row, so allow more than the default 4 retries
        result, rows = run(pacs, tmp_path, retries=10)
        assert_complete(pacs, result, rows)
        assert result.requests["retries"] == pacs.statuses[429] > 0
        # the backoff of FAST_RETRY is at most 0.05 s: each wait is the server's 7 s
        assert slept == [7.0] * pacs.statuses[429]


def test_inconsistent_and_broken_studies_are_reported_and_not_recorded_as_synced(tmp_path):
    with FakePacs(n_studies=40, seed=5, inconsistent={3: 2}, malformed={7}, bad_values={11}) as pacs:
        result, rows = run(pacs, tmp_path)
        bad = {pacs.study_uid(i): i for i in (3, 7, 11)}
        assert result.exit_code == 1
        assert result.figures.studies_inconsistent == 1
        assert result.figures.studies_failed == 2
        assert {uid: rows[uid] for uid in bad} == {pacs.study_uid(3): "inconsistent", pacs.study_uid(7): "failed", pacs.study_uid(11): "failed"}
        assert set(written_study_uids(result)) == set(pacs.study_uids()) - set(bad)
        for uid in bad:
            (message,) = [e for e in result.errors if uid in e]
            assert "\n" not in message
        assert any("malformed JSON" in e for e in result.errors)
        assert any("SeriesNumber" in e or "PatientName" in e for e in result.errors)
        manifest = json.loads((Path(result.run_dir) / "manifest.json").read_text())
        assert manifest["error"] == [{"type": "OperationOutcome", "url": "OperationOutcome.ndjson", "count": 3}]
        # the instance count is asked twice before the study is called inconsistent
        assert sum(1 for r in pacs.requests if r.kind == "instances" and pacs.study_uid(3) in r.path) == 2

        again, rows = run(pacs, tmp_path, full=True)
        assert again.figures.studies_unchanged == 37
        assert again.figures.studies_inconsistent == 1 and again.figures.studies_failed == 2


def test_a_window_that_cannot_be_split_further_is_reported():
    from crawler.listing import ListingReport, iter_studies
    from crawler.planner import Window
    from crawler.qido import QidoClient

    # a server that refuses (413) any query matching anything: a one-second window stays too big
    with FakePacs(n_studies=10, seed=6, max_results=0, cap_mode="413", date_from="20240101", date_to="20240101") as pacs:
        report = ListingReport()
        client = QidoClient(pacs.url)
        listed = list(iter_studies(client, [Window("20240101", "20240101", 0, 1)], report))
        assert listed == []
        assert report.incomplete == [
            "StudyDate 20240101 StudyTime 000000-000000: HTTP 413 (query matches too much); cannot be split further",
        ]


def test_a_listing_that_stops_midway_exits_1_and_names_the_window(tmp_path):
    with FakePacs(n_studies=60, seed=6, fail_listing_from_offset=40, fail_status=500) as pacs:
        result, rows = run(pacs, tmp_path, retries=1)
        assert result.exit_code == 1
        assert result.figures.windows_incomplete == 1
        assert [e for e in result.errors if "not listed" in e] == [
            f"not listed completely: all studies: HTTP 500 from {pacs.url}/studies?includefield=00080020&"
            + "&".join(f"includefield={t}" for t in sorted(STUDY_FIELDS)[1:]) + "&limit=20&offset=40"
        ]
        assert len(rows) == 40 and set(rows.values()) == {"synced"}


def test_a_server_that_always_fails_is_unreachable(tmp_path):
    with FakePacs(n_studies=10, seed=7, fail_every=1, fail_status=503) as pacs:
        with pytest.raises(SourceUnreachable):
            run(pacs, tmp_path, retries=1)


def test_request_budget_without_per_series_queries(tmp_path):
    with FakePacs(n_studies=50, seed=8) as pacs:
        result, rows = run(pacs, tmp_path)
        assert_complete(pacs, result, rows)
        counts = pacs.counts()
        assert counts["instances"] == 50
        assert "series" not in counts and "metadata" not in counts
        assert result.requests["instances"] == 50 and result.requests["studies"] == counts["studies"]


def test_series_fields_missing_at_instance_level_cost_one_series_query_per_study(tmp_path):
    with FakePacs(n_studies=20, seed=9, drop_series_fields_at_instance_level=True) as pacs:
        result, rows = run(pacs, tmp_path)
        assert_complete(pacs, result, rows)
        # these instance results lack even the Series Instance UID: the series are listed and
        # their instances asked for series by series
        assert pacs.counts()["series"] == 20
        assert pacs.counts()["instances"] == 20 + sum(len(pacs.series_uids(uid)) for uid in pacs.study_uids())


def test_metadata_auto_reads_at_most_one_metadata_request_per_study_here(tmp_path):
    with FakePacs(n_studies=20, seed=10) as pacs:
        result, rows = run(pacs, tmp_path, crawl=CrawlOptions(metadata=MetadataMode.AUTO))
        assert_complete(pacs, result, rows)
        assert result.requests["metadata"] == 20
        assert result.requests["instances"] == 1


def test_bearer_token(tmp_path):
    with FakePacs(n_studies=5, seed=11, token="tok-123") as pacs:
        with pytest.raises(SourceUnreachable, match="401"):
            run(pacs, tmp_path / "a")
        result, rows = run(pacs, tmp_path / "b", token="tok-123")
        assert_complete(pacs, result, rows)

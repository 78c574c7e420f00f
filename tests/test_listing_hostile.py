"""Listings that cannot run away: servers that ignore filters, limits or offsets, listings that
are not UTF-8 or not JSON, undated studies behind a cap.

The servers are the simulator of fixtures/fakepacs.py (a fake PACS, named as such): no real
server can be made to ignore its own matching keys on demand. The runaway cases run the CLI in
a subprocess, so that the time, the exit code, the size of stderr and the peak RSS are those an
operator would see.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from crawler.config import SyncConfig
from crawler.crawl import CrawlOptions, MetadataMode
from crawler.listing import ListingReport, iter_studies
from crawler.planner import Window
from crawler.http import RetryPolicy
from crawler.qido import QidoClient
from crawler.sync import sync
from fixtures.fakepacs import FakePacs

ROOT = Path(__file__).resolve().parents[1]
FAST_RETRY = RetryPolicy(base_delay=0.01, max_delay=0.05, max_seconds=30)


_WRAPPER = """
import json, os, resource, subprocess, sys, time
argv, stdout, stderr, cwd, deadline = json.loads(sys.argv[1])
start = time.monotonic()
with open(stdout, "wb") as out, open(stderr, "wb") as err:
    process = subprocess.Popen(argv, stdout=out, stderr=err, cwd=cwd)
    try:
        code = process.wait(timeout=deadline)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        code = None
print(json.dumps({"code": code, "seconds": time.monotonic() - start,
                  "rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss // 1024}))
"""


def run_cli(pacs: FakePacs, work: Path, *extra: str, deadline: float = 60.0) -> tuple[int, dict, str, float, int]:
    """(exit code, --json summary, stderr, seconds, peak RSS in MB) of a sync in a subprocess,
    killed (and the test failed) past ``deadline`` seconds. The sync is started by a small
    wrapper process: a child's peak RSS on Linux includes its parent's at the fork, and the test
    process may be large by the time this runs."""
    command = [
        sys.executable, "-m", "crawler", "sync", pacs.url, "--state", str(work / "state.db"), "--out", str(work / "out"),
        "--metadata", "never", "--json", "--page-size", "20", *extra,
    ]
    spec = [command, str(work / "stdout"), str(work / "stderr"), str(ROOT), deadline]
    done = subprocess.run([sys.executable, "-c", _WRAPPER, json.dumps(spec)], capture_output=True, text=True, check=True,
                          timeout=deadline + 30)
    measured = json.loads(done.stdout)
    if measured["code"] is None:
        pytest.fail(f"the sync was still running after {deadline} s ({pacs.counts()['studies']} study searches)")
    stdout = (work / "stdout").read_text()
    summary = json.loads(stdout) if stdout.strip() else {}
    return measured["code"], summary, (work / "stderr").read_text(), measured["seconds"], measured["rss_mb"]


@pytest.mark.parametrize(
    "quirks",
    [
        pytest.param({"ignore_filters": True, "ignore_offset": True}, id="ignores-offset-and-StudyDate"),
        pytest.param({"ignore_filters": True, "max_results": 50}, id="ignores-StudyDate-behind-a-cap"),
        pytest.param({"ignore_filters": True, "max_results": 50, "cap_mode": "silent"}, id="ignores-StudyDate-behind-a-silent-cap"),
    ],
)
def test_a_server_that_ignores_StudyDate_ends_quickly_with_the_window_incomplete(quirks, tmp_path):
    with FakePacs(n_studies=300, seed=3, **quirks) as pacs:
        code, summary, stderr, seconds, rss = run_cli(pacs, tmp_path)
        searches = pacs.counts()["studies"]
    assert code == 1, stderr[-2000:]
    assert summary["windows_incomplete"] >= 1
    assert "ignores StudyDate" in stderr
    assert seconds < 60 and rss < 300, (seconds, rss)
    assert len(stderr) < 20_000, stderr[:2000]
    assert searches < 100, searches


def test_a_server_that_honours_only_the_keyword_form_is_listed_completely(tmp_path):
    with FakePacs(n_studies=300, seed=4, keyword_only=True, max_results=50) as pacs:
        # limit above the cap: the server warns that it truncated, so windows must be split
        code, summary, stderr, seconds, rss = run_cli(pacs, tmp_path, "--page-size", "100")
        queries = [r.query for r in pacs.requests if r.kind == "studies"]
        truth = set(pacs.study_uids())
    assert code == 0, stderr[-2000:]
    assert summary["studies_listed"] == len(truth) == 300
    assert summary["windows_incomplete"] == 0
    tags = [q for q in queries if re.search(r"(^|&)00080020=", q)]
    keywords = [q for q in queries if re.search(r"(^|&)StudyDate=", q)]
    # the tag form was tried for one window, then the keyword form for the rest of the run
    assert len({re.search(r"(^|&)00080020=([^&]*)", q).group(2) for q in tags}) == 1, tags
    assert queries.index(keywords[0]) > queries.index(tags[-1])
    assert len(keywords) > 3
    assert len(stderr) < 20_000


def test_a_page_longer_than_the_limit_does_not_start_splitting(tmp_path):
    with FakePacs(n_studies=300, seed=5, ignore_limit=True, ignore_offset=True) as pacs:
        code, summary, stderr, seconds, rss = run_cli(pacs, tmp_path)
        searches = pacs.counts()["studies"]
    assert code == 0, stderr[-2000:]
    assert summary["studies_listed"] == 300
    assert summary["windows_split"] == 0
    assert searches <= 4, searches  # two pages, and the silent-cap check's two halves


def test_a_page_longer_than_the_limit_behind_a_known_cap_is_not_split(tmp_path):
    with FakePacs(n_studies=120, seed=5, ignore_limit=True) as pacs:
        code, summary, stderr, seconds, rss = run_cli(pacs, tmp_path, "--max-results", "100", deadline=60)
        searches = pacs.counts()["studies"]
    # 120 results in one page prove the cap of 100 wrong for this window: nothing is split
    assert code == 0, stderr[-2000:]
    assert summary["studies_listed"] == 120
    assert summary["windows_split"] == 0
    assert searches <= 3, searches


def test_ignored_StudyTime_stops_splitting_that_day(tmp_path):
    """A server that matches StudyDate but ignores StudyTime, with a cap that one day exceeds."""
    with FakePacs(n_studies=200, seed=6, date_from="20240101", date_to="20240102", max_results=30) as pacs:
        from fixtures import fakepacs

        original = pacs._select

        def no_time(params, quirks=False):
            kept = [(k, v) for k, v in params if not (quirks and k.lower() in ("studytime", fakepacs.T["StudyTime"].lower()))]
            return original(kept, quirks)

        pacs._select = no_time
        client = QidoClient(pacs.url, retry=FAST_RETRY)
        get = client.get

        def bounded_get(*args, **kwargs):
            assert pacs.counts()["studies"] < 500, "the listing runs away"
            return get(*args, **kwargs)

        client.get = bounded_get
        report = ListingReport(page_size=50)
        try:
            found = {item["0020000D"]["Value"][0] for item in iter_studies(client, [Window("20240101", "20240102")], report)}
        finally:
            client.close()
        searches = pacs.counts()["studies"]
    assert report.incomplete, "a day that cannot be split by StudyTime must be reported"
    assert any("ignores StudyTime" in message for message in report.incomplete)
    assert found
    assert searches < 60, searches


def test_a_run_with_an_ignored_filter_never_marks_studies_gone(tmp_path):
    with FakePacs(n_studies=60, seed=7) as pacs:
        code, first, stderr, _, _ = run_cli(pacs, tmp_path)
        assert code == 0, stderr[-2000:]
        pacs.behaviour = type(pacs.behaviour)(ignore_filters=True, ignore_offset=True)
        code, second, stderr, _, _ = run_cli(pacs, tmp_path, "--since", "20100101")
    assert code == 1, stderr[-2000:]
    assert second["studies_gone"] == 0
    assert second["windows_incomplete"] >= 1


@pytest.mark.parametrize(
    ("quirks", "expected"),
    [
        pytest.param({"ignore_filters": True, "ignore_offset": True}, 1, id="ignores-StudyDate"),
        pytest.param({"keyword_only": True, "max_results": 50}, 0, id="keyword-form-only"),
    ],
)
def test_dask_list_tasks_follow_the_same_rules(quirks, expected, tmp_path):
    pytest.importorskip("dask.distributed")
    with FakePacs(n_studies=300, seed=8, **quirks) as pacs:
        code, summary, stderr, seconds, _ = run_cli(
            pacs, tmp_path, "--executor", "dask", "--workers", "2", "--worker-threads", "2", "--page-size", "100", deadline=90
        )
        searches = pacs.counts()["studies"]
    assert code == expected, stderr[-2000:]
    if expected:
        assert summary["windows_incomplete"] >= 1
        assert searches < 100, searches
    else:
        assert summary["studies_listed"] == 300
        assert summary["windows_incomplete"] == 0
        assert searches < 300, searches
    assert len(stderr) < 20_000


def test_warnings_that_recur_per_entry_are_bounded_and_counted(tmp_path):
    with FakePacs(n_studies=80, seed=9, listed_uids={i: "" for i in range(60)}) as pacs:
        code, summary, stderr, _, _ = run_cli(pacs, tmp_path)
    assert code == 1, stderr[-2000:]
    assert summary["studies_failed"] == 60
    lines = [line for line in stderr.splitlines() if "listing entry" in line]
    assert len(lines) == 20, stderr[-3000:]
    assert "40 more unusable listing entries (not shown; counted)" in stderr
    assert summary["warnings_not_shown"] == 40


def sync_in_process(pacs: FakePacs, tmp_path: Path, **overrides):
    settings = dict(url=pacs.url, out=tmp_path / "out", state=tmp_path / "state.db", page_size=20, workers=2,
                    retry=FAST_RETRY, timeout=(2.0, 5.0), crawl=CrawlOptions(metadata=MetadataMode.NEVER))
    settings.update(overrides)
    return sync(SyncConfig(**settings))


def test_a_listing_entry_that_is_not_utf8_is_listed_with_a_replacement_and_a_counted_warning(tmp_path, caplog):
    with FakePacs(n_studies=40, seed=10, latin1_entries={3, 17}) as pacs:
        result = sync_in_process(pacs, tmp_path)
        bad = {pacs.study_uid(3), pacs.study_uid(17)}
    assert result.exit_code == 0, result.errors
    assert result.figures.studies_listed == 40
    assert result.figures.studies_new == 40
    assert result.figures.listing_entries_repaired == 2
    warned = [r.getMessage() for r in caplog.records if "not UTF-8" in r.getMessage()]
    assert len(warned) == 2
    assert {uid for uid in bad if any(uid in message for message in warned)} == bad
    assert all("malformed" not in message for message in warned)


def test_a_listing_entry_that_is_not_json_fails_its_study_alone(tmp_path):
    with FakePacs(n_studies=40, seed=11, broken_entries={5}) as pacs:
        result = sync_in_process(pacs, tmp_path)
        broken = pacs.study_uid(5)
    assert result.exit_code == 1
    assert result.figures.studies_failed == 1
    assert result.figures.studies_new == 39
    assert result.figures.windows_incomplete == 0
    assert [e for e in result.errors if broken in e] == [e for e in result.errors if "unreadable" in e]
    assert any(f"study {broken}: listing entry unreadable: malformed JSON near byte" in e for e in result.errors), result.errors


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b'[{"a": 1}, 2, {"b": 2}]', [{"a": 1}, "unreadable", {"b": 2}]),
        (b'[{"a": 1}, {"b": tru}]', [{"a": 1}, "unreadable"]),
        (b'[{"a": "\xe9"}]', [{"a": "\ufffd", "repaired": 8}]),
        (b'[{"a": 1}, {"b": 2', None),
        (b'{"a": 1}', None),
        (b'"x"', None),
    ],
    ids=["a-number-among-objects", "bad-literal", "latin1", "cut-short", "an-object", "a-string"],
)
def test_a_listing_is_salvaged_entry_by_entry_only_when_its_array_is_whole(body, expected):
    from crawler import dicomjson as dj

    salvaged = dj.salvage_listing(body)
    if expected is None:
        assert salvaged is None
        return
    assert [("unreadable" if dj.UNREADABLE in item else item) for item in salvaged] == expected


def test_an_unreadable_entry_without_a_uid_leaves_its_window_incomplete():
    from crawler.http import Answer
    from crawler.qido import page_of

    body = (
        b'[{"0020000D": {"vr": "UI", "Value": ["1.2.3"]}, "00080020": {"vr": "DA", "Value": ["20240101"]}},'
        b' {"x": tru}, {"0020000D": {"vr": "UI", "Value": ["1.2.4"]}, "x": tru}]'
    )

    class OnePage:
        """Answers every study search with ``body`` (a stand-in for the client: no server involved)."""

        max_limit = None

        def page_size(self, wanted: int) -> int:
            return wanted

        def get(self, kind: str, path: str, params=()):
            return page_of(Answer(200, {}, body, None), "http://pacs/dicom-web/studies", listing=kind == "studies")

    report = ListingReport(page_size=20)
    items = list(iter_studies(OnePage(), [Window("20240101", "20240101")], report, verify=False))
    assert [item.get("unreadable") is not None for item in items] == [False, True]
    assert items[1]["0020000D"]["Value"] == ["1.2.4"]
    assert report.incomplete == ["StudyDate 20240101: 1 listing entries could not be read, nor their studies named"]
    with pytest.raises(Exception, match="malformed JSON"):
        page_of(Answer(200, {}, body, None), "http://pacs/dicom-web/studies/1.2.3/instances")


def test_audit_writes_its_report_when_the_fhir_search_pages_to_another_host(tmp_path):
    import contextlib
    import io

    from crawler.cli import main
    from fixtures.audit_corpus import SearchableFakeFhir

    class OtherHostNext(SearchableFakeFhir):
        """A search whose next links name another host (``localhost`` for ``127.0.0.1``)."""

        def _send(self, h, status, answer, headers=()):  # type: ignore[no-untyped-def]
            if isinstance(answer, dict) and answer.get("type") == "searchset":
                for link in answer.get("link", []):
                    if link.get("relation") == "next":
                        link["url"] = link["url"].replace("127.0.0.1", "localhost")
            return super()._send(h, status, answer, headers)

    with FakePacs(n_studies=230, seed=12) as pacs, OtherHostNext() as fhir:
        first = sync_in_process(pacs, tmp_path, fhir_url=fhir.url, full=True, page_size=100, workers=4)
        assert first.exit_code == 0, first.errors
        fhir.reset_counts()
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            code = main(["audit", pacs.url, "--report", str(tmp_path / "report"), "--json", "--retries", "0", "--fhir-url", fhir.url])
        searches = [r.path for r in fhir.requests if r.path.startswith("/ImagingStudy?")]
    assert code == 1
    document = json.loads((tmp_path / "report" / "findings.json").read_text())
    findings = {f["code"]: f for f in document["findings"]}
    assert set(findings) == {"WINDOW_INCOMPLETE"}, findings
    assert any("another origin" in window and "localhost" in window for window in findings["WINDOW_INCOMPLETE"]["windows"])
    assert "MISSING_FROM_FHIR" in document["checked"] and "EXTRA_IN_FHIR" not in document["checked"]
    assert len(searches) == 1


def test_undated_studies_behind_a_cap_are_found_by_a_sweep_by_patient_id(tmp_path, caplog):
    caplog.set_level("INFO", logger="crawler")
    with FakePacs(n_studies=300, seed=13, no_date_fraction=0.2, max_results=40, newest_first=True) as pacs:
        result = sync_in_process(pacs, tmp_path, page_size=100, workers=4)
        truth = set(pacs.study_uids())
        undated = {pacs.study_uid(i) for i in range(pacs.n_dated, pacs.n_studies)}
        patient_ids = {pacs.patient_id(i) for i in range(pacs.n_studies)}
        searches = [r.query for r in pacs.requests if r.kind == "studies"]
    assert result.exit_code == 0, result.errors
    assert result.figures.windows_incomplete == 0
    assert result.figures.studies_new == len(truth) == 300
    assert len(undated) == 60
    swept = [q for q in searches if "00100020=" in q]
    assert swept and len(swept) < 2_000
    assert any("swept by PatientID" in r.getMessage() for r in caplog.records)
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert not any(pid[:4] in logged for pid in patient_ids)


def test_an_undated_sweep_over_its_request_bound_keeps_the_honest_exit_1(tmp_path, monkeypatch):
    from crawler import listing

    monkeypatch.setattr(listing, "SWEEP_MAX_REQUESTS", 10)
    with FakePacs(n_studies=300, seed=13, no_date_fraction=0.2, max_results=40, newest_first=True) as pacs:
        result = sync_in_process(pacs, tmp_path, page_size=100, workers=4)
        swept = [r.query for r in pacs.requests if r.kind == "studies" and "00100020=" in r.query]
    assert result.exit_code == 1
    assert result.figures.windows_incomplete == 1
    assert any("studies without StudyDate past the cap cannot be listed" in e and "stopped at 10 requests" in e for e in result.errors), result.errors
    assert 0 < len(swept) <= 10


def test_dask_runs_the_undated_sweep_too(tmp_path):
    pytest.importorskip("dask.distributed")
    with FakePacs(n_studies=300, seed=13, no_date_fraction=0.2, max_results=40, newest_first=True) as pacs:
        code, summary, stderr, _, _ = run_cli(
            pacs, tmp_path, "--executor", "dask", "--workers", "2", "--worker-threads", "2", "--page-size", "100", deadline=90
        )
    assert code == 0, stderr[-2000:]
    assert summary["studies_new"] == 300
    assert summary["windows_incomplete"] == 0


def test_audit_of_a_server_that_ignores_StudyDate_ends_with_the_window_reported(tmp_path):
    with FakePacs(n_studies=300, seed=14, ignore_filters=True, ignore_offset=True) as pacs:
        try:
            done = subprocess.run(
                [sys.executable, "-m", "crawler", "audit", pacs.url, "--report", str(tmp_path / "report"), "--page-size", "20", "--json"],
                capture_output=True, text=True, timeout=60, cwd=ROOT,
            )
        except subprocess.TimeoutExpired:
            pytest.fail(f"the audit was still running after 60 s ({pacs.counts()['studies']} study searches)")
        searches = pacs.counts()["studies"]
    assert done.returncode == 1, done.stderr[-2000:]
    document = json.loads((tmp_path / "report" / "findings.json").read_text())
    windows = next(f["windows"] for f in document["findings"] if f["code"] == "WINDOW_INCOMPLETE")
    assert any("ignores StudyDate" in window for window in windows)
    assert searches < 100 and len(done.stderr) < 20_000


def test_the_form_of_matching_keys_learned_is_kept_for_the_source(tmp_path):
    with FakePacs(n_studies=120, seed=15, keyword_only=True, max_results=50) as pacs:
        first = sync_in_process(pacs, tmp_path, page_size=100)
        assert first.exit_code == 0, first.errors
        assert any(re.search(r"(^|&)00080020=", r.query) for r in pacs.requests if r.kind == "studies")
        pacs.reset_counts()
        second = sync_in_process(pacs, tmp_path, page_size=100, full=True)
        queries = [r.query for r in pacs.requests if r.kind == "studies"]
    assert second.exit_code == 0, second.errors
    assert second.figures.studies_unchanged == 120
    assert not [q for q in queries if re.search(r"(^|&)00080020=", q)]
    assert [q for q in queries if re.search(r"(^|&)StudyDate=", q)]


def test_the_other_form_must_return_what_the_first_showed_of_the_window(tmp_path):
    """Tags ignored, keywords matching nothing: switching to keywords must not pass for a fix."""
    with FakePacs(n_studies=300, seed=16, keyword_only=True, keywords_match_nothing=True, max_results=50) as pacs:
        code, summary, stderr, _, _ = run_cli(pacs, tmp_path, "--page-size", "100")
    assert code == 1, stderr[-2000:]
    assert summary["windows_incomplete"] >= 1
    assert "ignores StudyDate" in stderr


def test_a_switch_of_form_found_by_the_silent_cap_check_is_verified_too(tmp_path):
    with FakePacs(n_studies=300, seed=17, keyword_only=True, keywords_match_nothing=True) as pacs:
        code, summary, stderr, _, _ = run_cli(pacs, tmp_path, "--page-size", "100")
    # uncapped: the full listing is whole, but neither form can be trusted for windows
    assert code == 1, stderr[-2000:]
    assert summary["studies_listed"] == 300
    assert "ignores StudyDate" in stderr


def test_dask_counts_repaired_listing_entries(tmp_path):
    pytest.importorskip("dask.distributed")
    with FakePacs(n_studies=40, seed=10, latin1_entries={3, 17}) as pacs:
        code, summary, stderr, _, _ = run_cli(pacs, tmp_path, "--executor", "dask", "--workers", "1", "--worker-threads", "2", deadline=90)
    assert code == 0, stderr[-2000:]
    assert summary["studies_new"] == 40
    assert summary["listing_entries_repaired"] >= 2

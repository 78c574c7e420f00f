"""Servers that are not Orthanc: no study-level instance search, no WADO-RS metadata, no counts.

The servers are the simulator of fixtures/fakepacs.py (a fake PACS, named as such): no real
server on this machine behaves so. The rule under test: such a server is synced completely, with
the fallback said once per run, remembered for the source, and counted in the summary.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest

from crawler.cli import main
from crawler.config import SyncConfig
from crawler.crawl import METADATA_UNAVAILABLE, SERIES_LEVEL_INSTANCES, CrawlOptions, Learned, MetadataMode, StudySummary, fetch_study
from crawler.dicomjson import Tag
from crawler.errors import FatalQidoError
from crawler.mapping.ids import normalise_base
from crawler.http import RetryPolicy
from crawler.qido import Page
from crawler.state import State
from crawler.sync import sync
from fixtures.fakepacs import Behaviour, FakePacs

FAST_RETRY = RetryPolicy(base_delay=0.01, max_delay=0.05, max_seconds=10)


def run(pacs: FakePacs, tmp_path: Path, **overrides: Any) -> Any:
    settings = dict(
        url=pacs.url, out=tmp_path / "out", state=tmp_path / "state.db", page_size=20, workers=3,
        retry=FAST_RETRY, timeout=(2.0, 5.0), crawl=CrawlOptions(metadata=MetadataMode.NEVER),
    )
    settings.update(overrides)
    return sync(SyncConfig(**settings))


def study_level_instance_searches(pacs: FakePacs) -> int:
    return sum(1 for r in pacs.requests if r.kind == "instances" and "/series/" not in r.path)


def written(result: Any) -> dict[str, dict[str, Any]]:
    lines = (Path(result.run_dir) / "ImagingStudy.ndjson").read_text().splitlines()
    return {s["identifier"][0]["value"][len("urn:oid:"):]: s for s in map(json.loads, lines)}


def remembered(tmp_path: Path, pacs: FakePacs) -> dict[str, str]:
    state = State(tmp_path / "state.db")
    try:
        return state.fallbacks(normalise_base(pacs.url))
    finally:
        state.close()


# --- item 12: instance searches only per series ---------------------------------------------


def test_a_server_without_study_level_instance_search_is_asked_series_by_series_and_remembers_it(tmp_path, caplog):
    with FakePacs(n_studies=15, seed=31, series_level_instances_only=True) as pacs:
        with caplog.at_level(logging.INFO, logger="crawler"):
            first = run(pacs, tmp_path)
        assert first.exit_code == 0, first.errors
        assert first.figures.studies_new == 15 and first.figures.instances_by_series is True
        assert study_level_instance_searches(pacs) <= 3   # one refused search per worker at most, then never again
        assert sum("series by series" in r.getMessage() for r in caplog.records) == 1
        for uid, study in written(first).items():
            assert (study["numberOfSeries"], study["numberOfInstances"]) == (pacs.n_series(uid), pacs.n_instances(uid))
        assert remembered(tmp_path, pacs) == {SERIES_LEVEL_INSTANCES: "HTTP 404 on studies/{uid}/instances"}

        pacs.add_instances(0, 1)
        pacs.reset_counts()
        second = run(pacs, tmp_path, since="19000101")   # not --full, which asks the server again
        assert second.exit_code == 0 and second.figures.studies_changed == 1
        assert study_level_instance_searches(pacs) == 0


def test_a_400_for_the_study_level_instance_search_leaves_the_page_limit_as_it_was():
    class Refusing:
        """Refuses study-level instance searches with 400 whatever the limit (halving it each time, as QidoClient does)."""

        max_limit = None

        def __init__(self) -> None:
            self.paths: list[str] = []

        def iter_pages(self, kind, path, params, page_size):
            self.paths.append(path)
            if kind == "instances" and "/series/" not in path:
                self.max_limit = 1   # what QidoClient.smaller_limit would have learned on its way down
                raise FatalQidoError("HTTP 400 from stand-in", status=400)
            if kind == "series":
                yield Page([{Tag.SeriesInstanceUID: {"vr": "UI", "Value": ["1.2.3.1"]}, Tag.Modality: {"vr": "CS", "Value": ["CT"]}}], 200)
            else:
                yield Page([{Tag.SOPInstanceUID: {"vr": "UI", "Value": ["1.2.3.1.1"]}, Tag.SeriesInstanceUID: {"vr": "UI", "Value": ["1.2.3.1"]},
                             Tag.SOPClassUID: {"vr": "UI", "Value": ["1.2.840.10008.5.1.4.1.1.2"]}}], 200)

    client = Refusing()
    learned = Learned()
    summary = StudySummary("1.2.3", 1, 1, {Tag.StudyInstanceUID: {"vr": "UI", "Value": ["1.2.3"]}})
    fetched = fetch_study(client, summary, CrawlOptions(metadata=MetadataMode.NEVER), learned)
    assert fetched.consistent and fetched.enumerated == 1
    assert client.max_limit is None
    assert learned.fallbacks == {SERIES_LEVEL_INSTANCES: "HTTP 400 on studies/{uid}/instances"}
    assert fetched.fallbacks == ((SERIES_LEVEL_INSTANCES, "HTTP 400 on studies/{uid}/instances"),)


def test_a_study_gone_between_listing_and_crawl_is_not_taken_for_a_missing_search(tmp_path):
    with FakePacs(n_studies=6, seed=32) as pacs:
        gone = pacs.study_uid(2)
        summary = StudySummary(gone, 1, 3, {Tag.StudyInstanceUID: {"vr": "UI", "Value": [gone]}})
        pacs.delete_study(2)
        from crawler.qido import QidoClient

        client = QidoClient(pacs.url, retry=FAST_RETRY)
        learned = Learned()
        try:
            with pytest.raises(FatalQidoError, match="404"):
                fetch_study(client, summary, CrawlOptions(metadata=MetadataMode.AUTO), learned)
            assert learned.fallbacks == {}
            pacs.behaviour = Behaviour(series_level_instances_only=True)   # no series listed for it either
            with pytest.raises(FatalQidoError, match="404"):
                fetch_study(client, summary, CrawlOptions(metadata=MetadataMode.NEVER), learned)
            assert learned.fallbacks == {}
        finally:
            client.close()


# --- item 13: no WADO-RS metadata -------------------------------------------------------------


@pytest.mark.parametrize("status", [404, 406, 501])
def test_a_server_without_metadata_is_mapped_from_qido_with_one_warning_and_remembers_it(status, tmp_path, caplog):
    with FakePacs(n_studies=12, seed=33, metadata_status=status) as pacs:
        with caplog.at_level(logging.WARNING, logger="crawler"):
            first = run(pacs, tmp_path, crawl=CrawlOptions(metadata=MetadataMode.AUTO))
        assert first.exit_code == 0, first.errors
        assert first.figures.studies_new == 12 and first.figures.metadata_unavailable is True
        assert first.summary()["metadata_unavailable"] is True
        warnings = [r.getMessage() for r in caplog.records if "WADO-RS metadata" in r.getMessage()]
        assert len(warnings) == 1 and f"HTTP {status}" in warnings[0] and "whatever the metadata setting" in warnings[0]
        assert pacs.counts()["metadata"] <= 3
        assert remembered(tmp_path, pacs) == {METADATA_UNAVAILABLE: f"HTTP {status} on WADO-RS metadata"}

        pacs.add_instances(1, 1)
        pacs.reset_counts()
        caplog.clear()
        second = run(pacs, tmp_path, since="19000101", crawl=CrawlOptions(metadata=MetadataMode.AUTO))
        assert second.exit_code == 0 and second.figures.studies_changed == 1 and second.figures.metadata_unavailable is True
        assert pacs.counts()["metadata"] == 0


def test_metadata_never_asks_no_metadata_and_says_nothing(tmp_path, caplog):
    with FakePacs(n_studies=5, seed=34, metadata_status=404) as pacs:
        with caplog.at_level(logging.WARNING, logger="crawler"):
            result = run(pacs, tmp_path, crawl=CrawlOptions(metadata=MetadataMode.NEVER))
        assert result.exit_code == 0 and result.figures.metadata_unavailable is False
        assert pacs.counts()["metadata"] == 0 and not [r for r in caplog.records if "metadata" in r.getMessage()]


def test_metadata_always_on_a_server_without_it_fails_the_studies(tmp_path):
    with FakePacs(n_studies=4, seed=35, metadata_status=404) as pacs:
        result = run(pacs, tmp_path, crawl=CrawlOptions(metadata=MetadataMode.ALWAYS))
        assert result.exit_code == 1 and result.figures.studies_failed == 4


# --- item 14: no counts -----------------------------------------------------------------------


def test_studies_without_counts_are_rechecked_not_changed(tmp_path):
    with FakePacs(n_studies=10, seed=36, no_study_counts=True) as pacs:
        first = run(pacs, tmp_path, full=True)
        assert first.exit_code == 0 and first.figures.studies_new == 10
        second = run(pacs, tmp_path, full=True)
        assert second.exit_code == 0
        f = second.figures
        assert (f.studies_rechecked, f.studies_changed, f.studies_new, f.resources_written) == (10, 0, 0, 0)
        assert second.run_dir is None and second.summary()["studies_rechecked"] == 10
        pacs.add_instances(3, 1)
        third = run(pacs, tmp_path, full=True)
        assert (third.figures.studies_rechecked, third.figures.studies_changed) == (9, 1)


def test_without_counts_the_number_just_listed_chooses_the_metadata_path():
    class StandIn:
        def __init__(self) -> None:
            self.paths: list[str] = []

        def iter_pages(self, kind, path, params, page_size):
            self.paths.append(path)
            yield Page([{Tag.SOPInstanceUID: {"vr": "UI", "Value": [f"1.2.3.1.{i}"]}, Tag.SeriesInstanceUID: {"vr": "UI", "Value": ["1.2.3.1"]},
                         Tag.Modality: {"vr": "CS", "Value": ["CT"]}} for i in range(3)], 200)

        def get(self, kind, path, params=(), keep=None):
            self.paths.append(path)
            return Page([], 200)

    client = StandIn()
    summary = StudySummary("1.2.3", None, None, {Tag.StudyInstanceUID: {"vr": "UI", "Value": ["1.2.3"]}})
    fetched = fetch_study(client, summary, CrawlOptions(metadata=MetadataMode.AUTO, metadata_max_instances=10), Learned(qido_lacks_sequences=True))
    assert fetched.path == "qido+metadata"
    assert client.paths == ["studies/1.2.3/instances", "studies/1.2.3/metadata"]


# --- acceptance: all three at once, through the CLI -------------------------------------------


def test_a_server_with_series_level_instances_no_metadata_and_no_counts_syncs_completely(tmp_path, capsys):
    behaviour = dict(series_level_instances_only=True, metadata_status=404, no_study_counts=True)
    with FakePacs(n_studies=20, seed=37, **behaviour) as pacs:
        args = ["sync", pacs.url, "--out", str(tmp_path / "out"), "--state", str(tmp_path / "state.db"), "--json", "--workers", "3"]
        code = main(args)
        summary = json.loads(capsys.readouterr().out)
        assert code == 0, summary
        assert summary["studies_new"] == 20 and summary["metadata_unavailable"] is True and summary["instances_by_series"] is True
        lines = (Path(summary["run_dir"]) / "ImagingStudy.ndjson").read_text().splitlines()
        studies = {s["identifier"][0]["value"][len("urn:oid:"):]: s for s in map(json.loads, lines)}
        assert set(studies) == set(pacs.study_uids())
        for uid, study in studies.items():
            assert (study["numberOfSeries"], study["numberOfInstances"]) == (pacs.n_series(uid), pacs.n_instances(uid))
            assert sum(len(s["instance"]) for s in study["series"]) == pacs.n_instances(uid)

        code = main([*args, "--full"])
        again = json.loads(capsys.readouterr().out)
        assert code == 0, again
        assert (again["resources_written"], again["run_dir"], again["studies_rechecked"], again["studies_changed"]) == (0, None, 20, 0)
        assert len(list((tmp_path / "out").iterdir())) == 1


def test_dask_workers_take_the_same_fallbacks_and_start_from_what_the_state_remembers(tmp_path):
    pytest.importorskip("dask.distributed")
    behaviour = dict(series_level_instances_only=True, metadata_status=404, no_study_counts=True)
    with FakePacs(n_studies=12, seed=38, **behaviour) as pacs:
        dask = dict(executor="dask", workers=1, worker_threads=2, crawl=CrawlOptions(metadata=MetadataMode.AUTO))
        first = run(pacs, tmp_path, **dask)
        assert first.exit_code == 0, first.errors
        assert first.figures.studies_new == 12 and first.figures.metadata_unavailable and first.figures.instances_by_series
        assert set(remembered(tmp_path, pacs)) == {SERIES_LEVEL_INSTANCES, METADATA_UNAVAILABLE}
        pacs.reset_counts()
        second = run(pacs, tmp_path, since="19000101", **dask)
        assert second.exit_code == 0 and second.figures.studies_rechecked == 12
        assert study_level_instance_searches(pacs) == 0 and pacs.counts()["metadata"] == 0


@pytest.mark.parametrize("executor", ["threads", "dask"])
def test_a_malformed_change_feed_leaves_the_listing_incomplete_with_either_executor(executor, tmp_path):
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    if executor == "dask":
        pytest.importorskip("dask.distributed")

    class NotAFeed(BaseHTTPRequestHandler):
        """A simulator of a broken Orthanc REST API: every answer is a JSON array."""

        def do_GET(self) -> None:  # noqa: N802
            body = b"[1, 2]"
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), NotAFeed)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with FakePacs(n_studies=6, seed=39) as pacs:
            extra = dict(executor="dask", workers=1, worker_threads=2) if executor == "dask" else {}
            result = run(pacs, tmp_path, changes="orthanc", orthanc_url=f"http://127.0.0.1:{server.server_address[1]}", **extra)
            assert result.exit_code == 1 and result.figures.studies_new == 6
            assert result.figures.windows_incomplete == 1
    finally:
        server.shutdown()
        server.server_close()

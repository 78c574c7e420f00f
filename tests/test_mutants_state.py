"""The state's queries that decide deletion, retries and the high-water mark, pinned row by row
(written to kill the mutants that survived `tox -e mutants`, docs/testing.md)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from crawler.state import State

SRC = "http://pacs/dicom-web"
OTHER = "http://other/dicom-web"


@pytest.fixture
def state(tmp_path: Path):
    s = State(tmp_path / "state.db")
    try:
        yield s
    finally:
        s.close()


def change(state: State, sql: str) -> None:
    """Change the state file behind State's back (rows as an older version left them)."""
    db = sqlite3.connect(state.path)
    try:
        db.execute(sql)
        db.commit()
    finally:
        db.close()


def synced(state: State, uid: str, run: int, date: str | None, source: str = SRC, resource: str | None = None) -> None:
    state.record_study(source, uid, run_id=run, status="synced", resource_id=resource or f"r-{uid}", n_series=2, n_instances=5,
                       study_hash=f"h-{uid}", resource_hash=f"rh-{uid}", study_date=date)


def test_iter_unseen_names_exactly_the_studies_not_listed_in_the_window(state: State):
    run1 = state.begin_run(SRC, "2026-01-01T00:00:00+00:00")
    for uid, date in [("1.5", "20200105"), ("1.1", "20200101"), ("1.9", "20200109"), ("1.0", None), ("1.3", "20200103")]:
        synced(state, uid, run1, date)
    synced(state, "2.1", run1, "20200103", source=OTHER)
    run2 = state.begin_run(SRC, "2026-01-02T00:00:00+00:00")
    state.mark_seen(SRC, "1.3", run2)
    state.record_study(SRC, "1.7", run_id=run1, status="failed", error="x", study_date="20200107")
    synced(state, "1.8", run1, "20200108")
    state.mark_gone(SRC, "1.8", run1)

    every = list(state.iter_unseen(SRC, run2, None, None))
    assert every == [("1.0", "r-1.0"), ("1.1", "r-1.1"), ("1.5", "r-1.5"), ("1.7", None), ("1.9", "r-1.9")]
    assert [u for u, _ in state.iter_unseen(SRC, run2, "20200105", "20200109")] == ["1.5", "1.7", "1.9"]
    assert [u for u, _ in state.iter_unseen(SRC, run2, "20200101", "20200101")] == ["1.1"]
    assert [u for u, _ in state.iter_unseen(SRC, run2, "20200106", None)] == ["1.7", "1.9"]
    assert [u for u, _ in state.iter_unseen(SRC, run2, None, "20200105")] == ["1.1", "1.5"]
    assert [u for u, _ in state.iter_unseen(SRC, run2, "20200102", "20200104")] == []
    assert list(state.iter_unseen(SRC, run1, None, None)) == [("1.3", "r-1.3")]
    assert [u for u, _ in state.iter_unseen(OTHER, run2, None, None)] == ["2.1"]


def test_a_study_seen_by_no_run_yet_is_unseen(state: State):
    run1 = state.begin_run(SRC, "2026-01-01T00:00:00+00:00")
    synced(state, "1.1", run1, "20200101")
    change(state, "UPDATE studies SET last_seen_run = NULL")
    assert [u for u, _ in state.iter_unseen(SRC, run1, None, None)] == ["1.1"]
    assert [u for u, _ in state.iter_unseen(SRC, run1, "20200101", None)] == ["1.1"]


def test_mark_gone_changes_that_study_only_and_clears_its_error(state: State):
    run1 = state.begin_run(SRC, "2026-01-01T00:00:00+00:00")
    state.record_study(SRC, "1.1", run_id=run1, status="failed", error="boom", study_date="20200101")
    synced(state, "1.2", run1, "20200102")
    synced(state, "1.1", run1, "20200101", source=OTHER)
    run2 = state.begin_run(SRC, "2026-01-02T00:00:00+00:00")
    state.mark_gone(SRC, "1.1", run2)
    row = state.study(SRC, "1.1")
    assert (row.status, row.last_error) == ("gone", None)
    assert row.last_run == run2
    assert state.study(SRC, "1.2").status == "synced"
    assert state.study(OTHER, "1.1").status == "synced"


def test_record_study_synced_then_failed_keeps_the_last_good_sync(state: State):
    run1 = state.begin_run(SRC, "2026-01-01T00:00:00+00:00")
    synced(state, "1.1", run1, "20200101")
    row = state.study(SRC, "1.1")
    assert (row.resource_id, row.n_series, row.n_instances, row.study_hash, row.resource_hash, row.status, row.last_error, row.last_seen_run) == (
        "r-1.1", 2, 5, "h-1.1", "rh-1.1", "synced", None, run1)
    run2 = state.begin_run(SRC, "2026-01-02T00:00:00+00:00")
    state.record_study(SRC, "1.1", run_id=run2, status="inconsistent", error="counts differ", study_date="20200102")
    row = state.study(SRC, "1.1")
    assert (row.resource_id, row.n_series, row.n_instances, row.study_hash, row.resource_hash) == ("r-1.1", 2, 5, "h-1.1", "rh-1.1")
    assert (row.status, row.last_error, row.last_seen_run) == ("inconsistent", "counts differ", run2)
    assert (row.last_run, row.study_date) == (run2, "20200102")
    run3 = state.begin_run(SRC, "2026-01-03T00:00:00+00:00")
    state.record_study(SRC, "1.1", run_id=run3, status="synced", resource_id="r-new", n_series=3, n_instances=7,
                       study_hash="h2", resource_hash="rh2", study_date="20200103")
    row = state.study(SRC, "1.1")
    assert (row.resource_id, row.n_series, row.n_instances, row.study_hash, row.resource_hash, row.status, row.last_error, row.last_seen_run) == (
        "r-new", 3, 7, "h2", "rh2", "synced", None, run3)
    assert (row.last_run, row.study_date) == (run3, "20200103")


def test_a_first_failure_is_recorded_with_its_error(state: State):
    run1 = state.begin_run(SRC, "2026-01-01T00:00:00+00:00")
    state.record_study(SRC, "1.1", run_id=run1, status="failed", error="boom", study_date="20200101")
    row = state.study(SRC, "1.1")
    assert (row.resource_id, row.study_hash, row.status, row.last_error, row.last_seen_run) == (None, None, "failed", "boom", run1)
    assert (row.last_run, row.study_date) == (run1, "20200101")


def test_last_mark_is_the_newest_mark_of_that_source(state: State):
    assert state.last_mark(SRC) is None
    run1 = state.begin_run(SRC, "2026-01-01T00:00:00+00:00")
    state.finish_run(run1, "2026-01-01T00:01:00+00:00", "ok", None, {}, "20260101")
    run2 = state.begin_run(SRC, "2026-01-02T00:00:00+00:00")
    state.finish_run(run2, "2026-01-02T00:01:00+00:00", "ok", None, {}, "20260102")
    run3 = state.begin_run(SRC, "2026-01-03T00:00:00+00:00")
    state.finish_run(run3, "2026-01-03T00:01:00+00:00", "partial", None, {}, None)
    other = state.begin_run(OTHER, "2026-01-04T00:00:00+00:00")
    state.finish_run(other, "2026-01-04T00:01:00+00:00", "ok", None, {}, "20260104")
    assert state.last_mark(SRC) == "20260102"
    assert state.last_mark(OTHER) == "20260104"
    assert state.last_mark("http://none") is None


def test_studies_to_retry_are_failed_or_inconsistent_not_listed_oldest_first(state: State):
    run1 = state.begin_run(SRC, "2026-01-01T00:00:00+00:00")
    run2 = state.begin_run(SRC, "2026-01-02T00:00:00+00:00")
    state.record_study(SRC, "1.4", run_id=run2, status="failed", error="x")
    state.record_study(SRC, "1.3", run_id=run1, status="inconsistent", error="x")
    state.record_study(SRC, "1.2", run_id=run1, status="failed", error="x")
    synced(state, "1.1", run1, None)
    state.record_study(SRC, "1.5", run_id=run1, status="failed", error="x")
    state.mark_gone(SRC, "1.5", run1)
    state.record_study(OTHER, "1.6", run_id=run1, status="failed", error="x")
    run3 = state.begin_run(SRC, "2026-01-03T00:00:00+00:00")
    assert state.studies_to_retry(SRC, run3, 10) == ["1.2", "1.3", "1.4"]
    assert state.studies_to_retry(SRC, run3, 2) == ["1.2", "1.3"]
    assert state.studies_to_retry(SRC, run3, 1) == ["1.2"]
    state.mark_seen(SRC, "1.2", run3)
    assert state.studies_to_retry(SRC, run3, 10) == ["1.3", "1.4"]
    change(state, "UPDATE studies SET last_seen_run = NULL WHERE study_uid = '1.3'")
    assert state.studies_to_retry(SRC, run3, 10) == ["1.3", "1.4"]

"""Change sources behind one cursor model: the Azure change feed (simulator: paging past 200,
sequence gaps, entries sharing a Timestamp, create/update/delete), Orthanc's log reset (the real
Orthanc), and the state's cursor (migrated from the Orthanc-only column)."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from crawler.changes import Change, azure_changes
from crawler.cli import main
from crawler.http import RetryPolicy
from crawler.qido import QidoClient
from crawler.state import State
from fixtures.fakeazure import AzureFeedPacs

ZONE = ["--timezone", "UTC"]


def _client(pacs: AzureFeedPacs) -> QidoClient:
    return QidoClient(pacs.url, retry=RetryPolicy(attempts=1))


def test_the_azure_feed_is_read_from_its_cursor_in_pages_without_losing_entries_that_share_a_timestamp():
    with AzureFeedPacs(n_studies=45, seed=61, hidden=(4, 7)) as pacs:
        assert len(pacs.log) > 300                     # one Timestamp for all of them: more than one page of 200
        client = _client(pacs)
        try:
            first = azure_changes(client, pacs.url, None)
            assert first.changes == () and first.cursor.endswith(f"|{pacs.log[-1]['Sequence']}")
            pacs.arrive(4)
            pacs.add_instances(9, 2)
            pacs.update_study(11)
            pacs.delete_study(12)
            read = azure_changes(client, pacs.url, first.cursor)
            expected = {pacs.study_uid(4): False, pacs.study_uid(9): False, pacs.study_uid(11): False, pacs.study_uid(12): True}
            assert {c.study_uid: c.deleted for c in read.changes} == expected
            assert read.cursor.endswith(f"|{pacs.log[-1]['Sequence']}")
            asked = [r.query for r in pacs.requests if r.kind == "changefeed"]
            assert all("limit=200" in q and "includeMetadata=false" in q for q in asked) and any("offset=200" in q for q in asked)
            again = azure_changes(client, pacs.url, read.cursor)        # nothing new: nothing named twice
            assert again.changes == () and again.cursor == read.cursor
            pacs.arrive(7)                                               # the same Timestamp as nothing before it
            assert azure_changes(client, pacs.url, read.cursor).changes == (Change(pacs.study_uid(7)),)
        finally:
            client.close()


def test_a_gap_or_an_empty_page_never_moves_the_cursor_past_an_unread_entry():
    with AzureFeedPacs(n_studies=3, seed=62, hidden=(1,)) as pacs:
        client = _client(pacs)
        try:
            start = azure_changes(client, pacs.url, None).cursor
            held_back = list(pacs.log)
            pacs.arrive(1)
            visible, pacs.log = pacs.log, held_back                     # the entries are not visible yet
            read = azure_changes(client, pacs.url, start)
            assert read.changes == () and read.cursor == start
            pacs.log = visible                                           # now they are
            assert azure_changes(client, pacs.url, read.cursor).changes == (Change(pacs.study_uid(1)),)
        finally:
            client.close()


def _read(path: Path, what):
    state = State.open(path, read_only=True)
    try:
        return what(state)
    finally:
        state.close()


def _sync(pacs_url: str, state: Path, out: Path, capsys, *extra: str) -> tuple[int, dict]:
    code = main(["sync", pacs_url, "--state", str(state), "--out", str(out), "--json", "--metadata", "never", "--retries", "0", *ZONE, *extra])
    captured = capsys.readouterr()
    return code, json.loads(captured.out) if captured.out.strip() else {"stderr": captured.err}


def test_a_sync_following_the_azure_feed_finds_late_arrivals_changes_and_deletions(tmp_path, capsys):
    state, out = tmp_path / "state.db", tmp_path / "out"
    with AzureFeedPacs(n_studies=20, seed=63, date_from="20000101", date_to="20261201", hidden=(3,)) as pacs:
        old = pacs.study_date(3)
        code, first = _sync(pacs.url, state, out, capsys, "--changes", "azure")
        assert (code, first["studies_new"]) == (0, 19)
        assert old is not None and old < "20260101"                       # outside an incremental window
        pacs.arrive(3)
        pacs.add_instances(5, 1)
        pacs.delete_study(6)
        code, second = _sync(pacs.url, state, out, capsys, "--changes", "azure", "--prune")
        assert code == 0, second
        assert (second["studies_new"], second["studies_changed"], second["studies_gone"]) == (1, 1, 1)
        assert second["scope"].startswith("since")
        deleted = [json.loads(line) for line in (Path(second["run_dir"]) / "deleted.ndjson").read_text().splitlines()]
        assert len(deleted) == 1
        code, third = _sync(pacs.url, state, out, capsys, "--changes", "azure")
        assert (code, third["studies_new"], third["studies_changed"], third["studies_gone"]) == (0, 0, 0, 0)
    rows = {row.study_uid: row.status for row in _read(state, lambda s: list(s.iter_study_rows()))}
    assert rows[pacs.study_uid(3)] == "synced" and rows[pacs.study_uid(6)] == "gone"


def test_the_cursor_moves_only_after_a_complete_listing(tmp_path, capsys):
    state, out = tmp_path / "state.db", tmp_path / "out"
    with AzureFeedPacs(n_studies=8, seed=64, hidden=(2,)) as pacs:
        assert _sync(pacs.url, state, out, capsys, "--changes", "azure")[0] == 0
        before = _read(state, lambda s: s.change_cursor(pacs.url, "azure"))
        assert before is not None
        pacs.arrive(2)
        pacs.behaviour = pacs.behaviour.__class__(fail_listing_from_offset=2, fail_status=404)
        code, failed = _sync(pacs.url, state, out, capsys, "--changes", "azure", "--full", "--page-size", "2")
        assert code == 1 and failed["windows_incomplete"] >= 1, failed
        assert _read(state, lambda s: s.change_cursor(pacs.url, "azure")) == before


def test_an_orthanc_state_keeps_its_change_position_through_the_migration(tmp_path):
    path = tmp_path / "state.db"
    state = State(path)
    state.set_changes_position("http://pacs/dicom-web", 42)
    state.commit()
    state.close()
    with sqlite3.connect(path) as db:                      # back to the columns of version 9
        db.execute("UPDATE sources SET changes_seq = 42, change_feed = NULL, change_cursor = NULL")
        db.execute("DELETE FROM migrations WHERE version = 10")
        db.execute("ALTER TABLE sources DROP COLUMN change_cursor")
        db.execute("ALTER TABLE sources DROP COLUMN change_feed")
    again = State(path)
    try:
        assert again.changes_position("http://pacs/dicom-web") == 42
        assert again.change_cursor("http://pacs/dicom-web", "orthanc") == "42"
        assert again.change_cursor("http://pacs/dicom-web", "azure") is None
    finally:
        again.close()


def test_a_reset_orthanc_change_log_makes_the_next_run_list_everything(tmp_path, capsys, monkeypatch):
    """Orthanc's log reset (a rebuilt database: positions start again below the cursor), simulated:
    the real Orthanc 1.10 keeps reporting its old Last after DELETE /changes, so a wiped log is
    not visible there (the weekly full listing finds what it lost)."""
    from crawler.changes import Changes

    state, out = tmp_path / "state.db", tmp_path / "out"
    positions = [40, 41, 3, 5]
    asked: list[int | None] = []

    def feed(client, rest, since, page=1000):
        asked.append(since)
        return Changes((), positions.pop(0))

    monkeypatch.setattr("crawler.changes.orthanc_changes", feed)
    with AzureFeedPacs(n_studies=6, seed=65) as pacs:
        for _ in range(2):
            assert _sync(pacs.url, state, out, capsys, "--changes", "orthanc")[0] == 0
        code, third = _sync(pacs.url, state, out, capsys, "--changes", "orthanc")
        assert code == 0, third
        assert third["scope"] == "full (the orthanc change log was reset)"
        assert (third["studies_listed"], third["studies_unchanged"]) == (6, 6)
        code, fourth = _sync(pacs.url, state, out, capsys, "--changes", "orthanc")
        assert code == 0 and fourth["scope"].startswith("since")
    assert asked == [None, 40, 41, 3]

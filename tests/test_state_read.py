"""Reading a state through ``State.open(..., read_only=True)`` (audit's way in), and the status
and outcome enums as the two dialects store them.

SQLite states are files in ``tmp_path``; PostgreSQL states are databases of the throw-away server
(fixtures/postgres.py, session fixture ``postgres_server``).
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest

from crawler.audit.copies import read_state
from crawler.audit.findings import CopyRow
from crawler.errors import StateError
from crawler.kinds import RunOutcome, StudyStatus
from crawler.state import MIGRATIONS, State, StudyRow

SRC = "http://pacs/dicom-web"
NEWEST = max(v for v, _, _ in MIGRATIONS)


def filled(where: str | Path) -> None:
    """A state with one study of each status, of two sources, and the source's facts."""
    state = State(where)
    try:
        run = state.begin_run(SRC, "2026-01-01T00:00:00+00:00")
        state.record_study(SRC, "1.2", run_id=run, status=StudyStatus.SYNCED, resource_id="r2", n_series=2, n_instances=5,
                           study_hash="h2", resource_hash="rh2", study_date="20200102")
        state.record_study(SRC, "1.1", run_id=run, status=StudyStatus.FAILED, error="boom", study_date="20200101")
        state.record_study(SRC, "1.3", run_id=run, status=StudyStatus.INCONSISTENT, error="counts differ")
        state.record_study(SRC, "1.4", run_id=run, status="synced", resource_id="r4", n_series=1, n_instances=1, study_hash="h4")
        state.mark_gone(SRC, "1.4", run)
        state.record_study("http://other/dicom-web", "1.2", run_id=run, status="synced", resource_id="o2", n_series=1, n_instances=1)
        state.set_source_facts(SRC, 100, 40)
        state.finish_run(run, "2026-01-01T00:01:00+00:00", RunOutcome.PARTIAL, None, {"studies_failed": 1})
    finally:
        state.close()


EXPECTED = [
    StudyRow("1.1", None, None, None, None, None, "failed", "boom", 1, 1, "20200101"),
    StudyRow("1.2", "r2", 2, 5, "h2", "rh2", "synced", None, 1, 1, "20200102"),
    StudyRow("1.3", None, None, None, None, None, "inconsistent", "counts differ", 1, 1, None),
    StudyRow("1.4", "r4", 1, 1, "h4", None, "gone", None, 1, 1, None),
]


def test_read_only_reads_what_was_written_and_changes_nothing(tmp_path):
    path = tmp_path / "state.db"
    filled(path)
    os.chmod(path, 0o400)
    before = path.read_bytes()
    state = State.open(path, read_only=True)
    try:
        assert list(state.iter_study_rows(SRC)) == EXPECTED
        assert [(r.study_uid, r.resource_id) for r in state.iter_study_rows()] == [
            ("1.2", "o2"), *[(r.study_uid, r.resource_id) for r in EXPECTED]]   # every source, ordered by source
        assert state.study(SRC, "1.2") == EXPECTED[1]
        assert state.source_facts(SRC) == (100, 40) and state.source_facts("http://none") == (None, 0)
        assert state.schema_version == NEWEST and state.counts_by_status() == {"failed": 1, "gone": 1, "inconsistent": 1, "synced": 2}
        with pytest.raises(StateError, match=r"^cannot read state .*state\.db: attempt to write a readonly database$"):
            state.record_study(SRC, "1.9", run_id=1, status=StudyStatus.FAILED, error="x")
    finally:
        state.close()
    assert path.read_bytes() == before and (path.stat().st_mode & 0o777) == 0o400
    assert not path.with_name("state.db.lock").exists()


def test_read_state_gives_audit_its_rows(tmp_path):
    filled(tmp_path / "state.db")
    rows, facts = read_state(tmp_path / "state.db", SRC)
    assert facts == (100, 40)
    assert rows == {
        "1.1": CopyRow(None, None, None, "failed", "20200101"),
        "1.2": CopyRow(2, 5, "h2", "synced", "20200102"),
        "1.3": CopyRow(None, None, None, "inconsistent", None),
        "1.4": CopyRow(1, 1, "h4", "gone", None),
    }


def _sql(path: Path, *statements: str) -> None:
    """Change a state file behind State's back (what an older or newer version would have left)."""
    db = sqlite3.connect(path)
    try:
        for statement in statements:
            db.execute(statement)
        db.commit()
    finally:
        db.close()


def test_a_state_a_newer_version_wrote_is_read_read_only_and_refused_otherwise(tmp_path):
    path = tmp_path / "state.db"
    filled(path)
    _sql(path, "INSERT INTO migrations (version, name) VALUES (999, 'from the future')",
         "ALTER TABLE studies ADD COLUMN from_the_future TEXT")
    state = State.open(path, read_only=True)
    try:
        assert state.schema_version == 999 and list(state.iter_study_rows(SRC)) == EXPECTED
    finally:
        state.close()
    with pytest.raises(StateError, match="written by a newer qido-crawler"):
        State.open(path)
    _sql(path, "DROP INDEX studies_by_date", "ALTER TABLE studies DROP COLUMN study_date")   # a newer schema this version cannot read
    state = State.open(path, read_only=True)
    try:
        with pytest.raises(StateError, match=r"^cannot read state .*: no such column: study_date$"):
            list(state.iter_study_rows(SRC))
    finally:
        state.close()


def test_a_state_an_older_version_wrote_is_read_as_it_is(tmp_path):
    """Schema 1 (no StudyDate, no last listing, no sources table): read-only reads it without
    migrating it; the writable open migrates it."""
    path = tmp_path / "state.db"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE migrations (version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP)")
    db.executescript(MIGRATIONS[0][2])
    db.execute("INSERT INTO migrations (version, name) VALUES (1, 'studies, resources and runs')")
    db.execute("INSERT INTO runs (id, source, started) VALUES (1, ?, '2026')", (SRC,))
    db.execute("INSERT INTO studies (source, study_uid, n_series, n_instances, study_hash, status, last_run) VALUES (?, '1.5', 1, 3, 'h', 'synced', 1)", (SRC,))
    db.commit()
    db.close()
    before = path.read_bytes()
    rows, facts = read_state(path, SRC)
    assert rows == {"1.5": CopyRow(1, 3, "h", "synced", None)} and facts == (None, 0)
    assert path.read_bytes() == before
    state = State.open(path)
    try:
        assert state.schema_version == NEWEST and state.study(SRC, "1.5").study_date is None
    finally:
        state.close()


@pytest.mark.parametrize("kind", ["missing", "a folder", "empty file", "another program's database", "not a database"])
def test_what_is_no_state_is_a_one_line_state_error_and_left_as_it_is(kind, tmp_path):
    path = tmp_path / "state.db"
    if kind == "a folder":
        path.mkdir()
    elif kind == "empty file":
        path.write_bytes(b"")
    elif kind == "another program's database":
        _sql(path, "CREATE TABLE invoices (number INTEGER PRIMARY KEY, amount TEXT)", "INSERT INTO invoices VALUES (1, '12.50')")
    elif kind == "not a database":
        path.write_bytes(b"this is not a SQLite database " * 200)
    before = path.read_bytes() if path.is_file() else None
    with pytest.raises(StateError) as caught:
        read_state(path, SRC)
    message = str(caught.value)
    assert str(path) in message and "\n" not in message, message
    assert (path.read_bytes() if path.is_file() else None) == before
    assert sorted(p.name for p in tmp_path.iterdir()) in (["state.db"], [], ["state.db", "state.db-shm", "state.db-wal"])


def test_a_read_only_state_takes_no_lock():
    with pytest.raises(ValueError):
        State("unused.db", lock=True, read_only=True)


# --- the enums as stored: plain text in both dialects ----------------------------------------


def test_sqlite_stores_the_enum_members_as_their_text(tmp_path):
    path = tmp_path / "state.db"
    filled(path)
    db = sqlite3.connect(path)
    try:
        stored = db.execute("SELECT study_uid, typeof(status), status FROM studies WHERE source = ? ORDER BY study_uid", (SRC,)).fetchall()
        outcome = db.execute("SELECT typeof(outcome), outcome FROM runs").fetchall()
    finally:
        db.close()
    assert stored == [("1.1", "text", "failed"), ("1.2", "text", "synced"), ("1.3", "text", "inconsistent"), ("1.4", "text", "gone")]
    assert outcome == [("text", "partial")]


def test_postgres_stores_the_enum_members_as_their_text_and_reads_read_only(postgres_server, tmp_path):
    url = postgres_server.create_database()
    database = url.rsplit("/", 1)[1]
    filled(url)
    assert postgres_server.sql("SELECT study_uid, status FROM studies WHERE source = 'http://pacs/dicom-web' ORDER BY study_uid", database) == [
        ("1.1", "failed"), ("1.2", "synced"), ("1.3", "inconsistent"), ("1.4", "gone")]
    assert postgres_server.sql("SELECT outcome FROM runs", database) == [("partial",)]
    filled(tmp_path / "state.db")
    assert read_state(url, SRC) == read_state(tmp_path / "state.db", SRC)
    state = State.open(url, read_only=True)
    try:
        assert list(state.iter_study_rows(SRC)) == EXPECTED
        with pytest.raises(StateError, match="read-only transaction"):
            state.set_source_facts(SRC, 1, 1)
    finally:
        state.close()
    assert postgres_server.sql("SELECT cap, verified_uncapped FROM sources", database) == [(100, 40)]


def test_postgres_read_only_does_not_make_a_state_in_an_empty_database(postgres_server):
    url = postgres_server.create_database()
    database = url.rsplit("/", 1)[1]
    with pytest.raises(StateError, match="is not a qido-crawler state") as caught:
        State.open(url, read_only=True)
    assert "\n" not in str(caught.value)
    assert postgres_server.sql("SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'", database) == [(0,)]

"""The SQLite state: what was synced from which PACS, with counts and hashes, and the runs.

Migrations are numbered and each is applied in its own transaction together with its record in
``migrations``. A run's study updates are written inside one transaction that is committed only
after the sinks have finished, so the state never says "synced" for what no sink holds.
"""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import StateError

MIGRATIONS: list[tuple[int, str, str]] = [
    (
        1,
        "studies, resources and runs",
        """
        CREATE TABLE runs (
            id INTEGER PRIMARY KEY,
            source TEXT NOT NULL,
            started TEXT NOT NULL,
            ended TEXT,
            outcome TEXT,
            folder TEXT,
            figures TEXT
        );
        CREATE TABLE studies (
            source TEXT NOT NULL,
            study_uid TEXT NOT NULL,
            resource_id TEXT,
            n_series INTEGER,
            n_instances INTEGER,
            study_hash TEXT,
            resource_hash TEXT,
            status TEXT NOT NULL,
            last_error TEXT,
            last_run INTEGER REFERENCES runs(id),
            PRIMARY KEY (source, study_uid)
        );
        CREATE TABLE resources (
            type TEXT NOT NULL,
            id TEXT NOT NULL,
            hash TEXT NOT NULL,
            body BLOB NOT NULL,
            PRIMARY KEY (type, id)
        );
        """,
    ),
    (
        2,
        "what was learned about each source",
        """
        CREATE TABLE sources (
            source TEXT PRIMARY KEY,
            cap INTEGER,
            verified_uncapped INTEGER NOT NULL DEFAULT 0
        );
        """,
    ),
    (
        3,
        "incremental runs: StudyDate and last listing per study, high-water mark and windows per run",
        """
        ALTER TABLE studies ADD COLUMN study_date TEXT;
        ALTER TABLE studies ADD COLUMN last_seen_run INTEGER;
        CREATE INDEX studies_by_date ON studies (source, study_date);
        ALTER TABLE runs ADD COLUMN mark TEXT;
        ALTER TABLE runs ADD COLUMN windows TEXT;
        ALTER TABLE runs ADD COLUMN pid INTEGER;
        """,
    ),
    (
        4,
        "position in the source's change feed",
        """
        ALTER TABLE sources ADD COLUMN changes_seq INTEGER;
        """,
    ),
]


@dataclass(frozen=True)
class StudyRow:
    study_uid: str
    resource_id: str | None
    n_series: int | None
    n_instances: int | None
    study_hash: str | None
    resource_hash: str | None
    status: str
    last_error: str | None
    last_seen_run: int | None = None


class StateLocked(StateError):
    """Another run holds the state: exit code 2."""


class State:
    """One state database; use from one thread.

    ``lock=True`` takes an exclusive lock (``<path>.lock``, flock) for the life of the object: a
    second run on the same state fails at once, and the lock of a run that was killed is
    released by the kernel with its process, so the next run simply takes it.
    """

    def __init__(self, path: str | Path, *, lock: bool = False) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StateError(f"cannot create the folder of state {self.path}: {exc.strerror}") from None
        self._lock_file = self._lock() if lock else None
        try:
            self.db = sqlite3.connect(self.path, isolation_level=None, timeout=30)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.execute("PRAGMA foreign_keys=ON")
            self._migrate()
        except sqlite3.Error as exc:
            raise StateError(f"cannot open state {self.path}: {exc}") from None

    def _lock(self) -> int:
        lock_path = self.path.with_name(self.path.name + ".lock")
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise StateError(f"cannot open lock {lock_path}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise StateLocked(f"another run (pid {holder}) is using the state {self.path}; try again when it has finished") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        return fd

    def close(self) -> None:
        self.db.close()
        if self._lock_file is not None:
            os.close(self._lock_file)
            self._lock_file = None

    def _migrate(self) -> None:
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS migrations (version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP)"
        )
        done = {row[0] for row in self.db.execute("SELECT version FROM migrations")}
        newest = max((v for v, _, _ in MIGRATIONS), default=0)
        if done and max(done) > newest:
            raise StateError(f"state {self.path} was written by a newer qido-crawler (schema {max(done)})")
        for version, name, sql in MIGRATIONS:
            if version in done:
                continue
            self.db.execute("BEGIN IMMEDIATE")
            try:
                for statement in sql.split(";"):
                    if statement.strip():
                        self.db.execute(statement)
                self.db.execute("INSERT INTO migrations (version, name) VALUES (?, ?)", (version, name))
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise

    @property
    def schema_version(self) -> int:
        return self.db.execute("SELECT COALESCE(MAX(version), 0) FROM migrations").fetchone()[0]

    def begin_run(self, source: str, started: str) -> int:
        cursor = self.db.execute("INSERT INTO runs (source, started, pid) VALUES (?, ?, ?)", (source, started, os.getpid()))
        return int(cursor.lastrowid)

    def checkpoint(self) -> None:
        """Commit what is written so far and carry on in a new transaction."""
        self.commit()
        self.begin()

    def begin(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def commit(self) -> None:
        if self.db.in_transaction:
            self.db.execute("COMMIT")

    def rollback(self) -> None:
        if self.db.in_transaction:
            self.db.execute("ROLLBACK")

    def finish_run(
        self, run_id: int, ended: str, outcome: str, folder: str | None, figures: dict[str, Any],
        mark: str | None = None, windows: list[str] | None = None,
    ) -> None:
        self.db.execute(
            "UPDATE runs SET ended = ?, outcome = ?, folder = ?, figures = ?, mark = ?, windows = ? WHERE id = ?",
            (ended, outcome, folder, json.dumps(figures, sort_keys=True), mark, json.dumps(windows) if windows is not None else None, run_id),
        )

    def study(self, source: str, study_uid: str) -> StudyRow | None:
        row = self.db.execute(
            "SELECT study_uid, resource_id, n_series, n_instances, study_hash, resource_hash, status, last_error, last_seen_run "
            "FROM studies WHERE source = ? AND study_uid = ?",
            (source, study_uid),
        ).fetchone()
        return StudyRow(*row) if row else None

    def record_study(
        self,
        source: str,
        study_uid: str,
        *,
        run_id: int,
        status: str,
        resource_id: str | None = None,
        n_series: int | None = None,
        n_instances: int | None = None,
        study_hash: str | None = None,
        resource_hash: str | None = None,
        error: str | None = None,
        study_date: str | None = None,
    ) -> None:
        """Insert or update a study. A failure keeps the hashes of the last good sync."""
        if status == "synced":
            self.db.execute(
                "INSERT INTO studies (source, study_uid, resource_id, n_series, n_instances, study_hash, resource_hash, status, "
                "last_error, last_run, last_seen_run, study_date) VALUES (?, ?, ?, ?, ?, ?, ?, 'synced', NULL, ?, ?, ?) "
                "ON CONFLICT (source, study_uid) DO UPDATE SET resource_id = excluded.resource_id, n_series = excluded.n_series, "
                "n_instances = excluded.n_instances, study_hash = excluded.study_hash, resource_hash = excluded.resource_hash, "
                "status = 'synced', last_error = NULL, last_run = excluded.last_run, last_seen_run = excluded.last_seen_run, "
                "study_date = excluded.study_date",
                (source, study_uid, resource_id, n_series, n_instances, study_hash, resource_hash, run_id, run_id, study_date),
            )
        else:
            self.db.execute(
                "INSERT INTO studies (source, study_uid, status, last_error, last_run, last_seen_run, study_date) VALUES (?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (source, study_uid) DO UPDATE SET status = excluded.status, last_error = excluded.last_error, "
                "last_run = excluded.last_run, last_seen_run = excluded.last_seen_run, study_date = excluded.study_date",
                (source, study_uid, status, error, run_id, run_id, study_date),
            )

    def mark_seen(self, source: str, study_uid: str, run_id: int) -> None:
        self.db.execute("UPDATE studies SET last_seen_run = ? WHERE source = ? AND study_uid = ?", (run_id, source, study_uid))

    def iter_unseen(self, source: str, run_id: int, since: str | None, until: str | None) -> Iterator[tuple[str, str | None]]:
        """(UID, resource id) of studies not listed by run ``run_id`` whose StudyDate lies in
        [since, until] (open ends unbounded; both None: every study, dated or not)."""
        sql = "SELECT study_uid, resource_id FROM studies WHERE source = ? AND status != 'gone' AND (last_seen_run IS NULL OR last_seen_run != ?)"
        args: list[Any] = [source, run_id]
        if since is not None or until is not None:
            sql += " AND study_date IS NOT NULL"
        if since is not None:
            sql += " AND study_date >= ?"
            args.append(since)
        if until is not None:
            sql += " AND study_date <= ?"
            args.append(until)
        yield from self.db.execute(sql + " ORDER BY study_uid", args).fetchall()

    def mark_gone(self, source: str, study_uid: str, run_id: int) -> None:
        self.db.execute(
            "UPDATE studies SET status = 'gone', last_error = NULL, last_run = ? WHERE source = ? AND study_uid = ?", (run_id, source, study_uid)
        )

    def drop_resource(self, resource_type: str, resource_id: str) -> None:
        self.db.execute("DELETE FROM resources WHERE type = ? AND id = ?", (resource_type, resource_id))

    def last_mark(self, source: str) -> str | None:
        """The high-water mark of the last run of ``source`` whose listing was complete."""
        row = self.db.execute("SELECT mark FROM runs WHERE source = ? AND mark IS NOT NULL ORDER BY id DESC LIMIT 1", (source,)).fetchone()
        return row[0] if row else None

    def close_interrupted_runs(self, run_id: int) -> int:
        cursor = self.db.execute("UPDATE runs SET outcome = 'interrupted', ended = started WHERE ended IS NULL AND id != ?", (run_id,))
        return cursor.rowcount

    def source_facts(self, source: str) -> tuple[int | None, int]:
        """(the server's result cap if one was found, the largest listing verified as uncapped)."""
        row = self.db.execute("SELECT cap, verified_uncapped FROM sources WHERE source = ?", (source,)).fetchone()
        return (row[0], row[1]) if row else (None, 0)

    def set_source_facts(self, source: str, cap: int | None, verified: int) -> None:
        self.db.execute(
            "INSERT INTO sources (source, cap, verified_uncapped) VALUES (?, ?, ?) "
            "ON CONFLICT (source) DO UPDATE SET cap = excluded.cap, verified_uncapped = excluded.verified_uncapped",
            (source, cap, verified),
        )

    def changes_position(self, source: str) -> int | None:
        row = self.db.execute("SELECT changes_seq FROM sources WHERE source = ?", (source,)).fetchone()
        return row[0] if row else None

    def set_changes_position(self, source: str, position: int) -> None:
        self.db.execute(
            "INSERT INTO sources (source, changes_seq) VALUES (?, ?) ON CONFLICT (source) DO UPDATE SET changes_seq = excluded.changes_seq",
            (source, position),
        )

    def resource_hash(self, resource_type: str, resource_id: str) -> str | None:
        row = self.db.execute("SELECT hash FROM resources WHERE type = ? AND id = ?", (resource_type, resource_id)).fetchone()
        return row[0] if row else None

    def put_resource(self, resource_type: str, resource_id: str, digest: str, body: bytes) -> None:
        self.db.execute(
            "INSERT INTO resources (type, id, hash, body) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (type, id) DO UPDATE SET hash = excluded.hash, body = excluded.body",
            (resource_type, resource_id, digest, zlib.compress(body, 1)),
        )

    def iter_resources(self) -> Iterator[tuple[str, str, bytes]]:
        """(type, id, JSON bytes) of every resource, ordered by type then id."""
        for resource_type, resource_id, body in self.db.execute("SELECT type, id, body FROM resources ORDER BY type, id"):
            yield resource_type, resource_id, zlib.decompress(body)

    def counts_by_status(self) -> dict[str, int]:
        return dict(self.db.execute("SELECT status, COUNT(*) FROM studies GROUP BY status ORDER BY status"))

    def last_runs(self, limit: int = 10) -> list[dict[str, Any]]:
        rows = self.db.execute(
            "SELECT id, source, started, ended, outcome, folder, figures FROM runs ORDER BY id DESC LIMIT ?", (limit,)
        ).fetchall()
        return [
            {"id": r[0], "source": r[1], "started": r[2], "ended": r[3], "outcome": r[4] or "interrupted", "folder": r[5], "figures": json.loads(r[6]) if r[6] else None}
            for r in rows
        ]

    def problems(self, limit: int = 50) -> list[tuple[str, str, str, str | None]]:
        return self.db.execute(
            "SELECT source, study_uid, status, last_error FROM studies WHERE status NOT IN ('synced') ORDER BY source, study_uid LIMIT ?",
            (limit,),
        ).fetchall()


def open_existing(path: str | Path) -> State:
    """Open a state that must already exist (for ``export`` and ``status``)."""
    if not Path(path).is_file():
        raise StateError(f"no state at {path}")
    return State(path)

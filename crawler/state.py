"""The SQLite state: what was synced from which PACS, with counts and hashes, and the runs.

Migrations are numbered and each is applied in its own transaction together with its record in
``migrations``. A run's study updates are written inside one transaction that is committed only
after the sinks have finished, so the state never says "synced" for what no sink holds.
"""

from __future__ import annotations

import json
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


class State:
    """One state database; use from one thread."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StateError(f"cannot create the folder of state {self.path}: {exc.strerror}") from None
        try:
            self.db = sqlite3.connect(self.path, isolation_level=None, timeout=30)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.execute("PRAGMA foreign_keys=ON")
            self._migrate()
        except sqlite3.Error as exc:
            raise StateError(f"cannot open state {self.path}: {exc}") from None

    def close(self) -> None:
        self.db.close()

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
        cursor = self.db.execute("INSERT INTO runs (source, started) VALUES (?, ?)", (source, started))
        return int(cursor.lastrowid)

    def begin(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def commit(self) -> None:
        if self.db.in_transaction:
            self.db.execute("COMMIT")

    def rollback(self) -> None:
        if self.db.in_transaction:
            self.db.execute("ROLLBACK")

    def finish_run(self, run_id: int, ended: str, outcome: str, folder: str | None, figures: dict[str, Any]) -> None:
        self.db.execute(
            "UPDATE runs SET ended = ?, outcome = ?, folder = ?, figures = ? WHERE id = ?",
            (ended, outcome, folder, json.dumps(figures, sort_keys=True), run_id),
        )

    def study(self, source: str, study_uid: str) -> StudyRow | None:
        row = self.db.execute(
            "SELECT study_uid, resource_id, n_series, n_instances, study_hash, resource_hash, status, last_error "
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
    ) -> None:
        """Insert or update a study. A failure keeps the hashes of the last good sync."""
        if status == "synced":
            self.db.execute(
                "INSERT INTO studies (source, study_uid, resource_id, n_series, n_instances, study_hash, resource_hash, status, last_error, last_run) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, 'synced', NULL, ?) "
                "ON CONFLICT (source, study_uid) DO UPDATE SET resource_id = excluded.resource_id, n_series = excluded.n_series, "
                "n_instances = excluded.n_instances, study_hash = excluded.study_hash, resource_hash = excluded.resource_hash, "
                "status = 'synced', last_error = NULL, last_run = excluded.last_run",
                (source, study_uid, resource_id, n_series, n_instances, study_hash, resource_hash, run_id),
            )
        else:
            self.db.execute(
                "INSERT INTO studies (source, study_uid, status, last_error, last_run) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (source, study_uid) DO UPDATE SET status = excluded.status, last_error = excluded.last_error, "
                "last_run = excluded.last_run",
                (source, study_uid, status, error, run_id),
            )

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

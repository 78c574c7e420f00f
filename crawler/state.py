"""The state: what was synced from which PACS, with counts and hashes, and the runs.

It lives in SQLite (a file path, the default) or in PostgreSQL (``postgresql://`` or
``postgres://`` URL). Both hold the same schema, built by the same numbered migrations written
in SQL both understand; every difference between the two (placeholders, column types, the id of
a new row, PRAGMAs, how a write transaction starts, the run lock) is in the ``_Sqlite`` and
``_Postgres`` dialects below and nowhere else.

Migrations are numbered and each is applied in its own transaction together with its record in
``migrations``. A run's study updates are written inside one transaction that is committed only
after the sinks have finished, so the state never says "synced" for what no sink holds.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import os
import re
import socket
import sqlite3
import uuid
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import quote

from .errors import ConfigError, StateError
from .files import FILE_MODE, make_folder, make_private
from .http import redact
from .kinds import StudyStatus

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
    (
        5,
        "who holds the run lock (PostgreSQL; SQLite keeps the holder in <state>.lock)",
        """
        CREATE TABLE run_lock (
            name TEXT PRIMARY KEY,
            pid INTEGER,
            host TEXT,
            since TEXT
        );
        """,
    ),
    (
        6,
        "this state's identity, which names its run folders",
        """
        CREATE TABLE state_info (
            key TEXT PRIMARY KEY,
            value TEXT NOT NULL
        );
        """,
    ),
    (
        7,
        "what was learned about each FHIR server",
        """
        CREATE TABLE fhir_servers (
            base TEXT PRIMARY KEY,
            max_entries INTEGER
        );
        CREATE TABLE fhir_ids (
            base TEXT NOT NULL,
            type TEXT NOT NULL,
            id TEXT NOT NULL,
            server_id TEXT NOT NULL,
            PRIMARY KEY (base, type, id)
        );
        """,
    ),
    (
        8,
        "per-source fallbacks",
        """
        CREATE TABLE source_fallbacks (
            source TEXT NOT NULL,
            name TEXT NOT NULL,
            reason TEXT NOT NULL,
            PRIMARY KEY (source, name)
        );
        """,
    ),
    (
        9,
        "the form of matching keys each source honours (tags or keywords)",
        """
        ALTER TABLE sources ADD COLUMN key_form TEXT;
        """,
    ),
    (
        10,
        "a change source's cursor, of any kind",
        """
        ALTER TABLE sources ADD COLUMN change_feed TEXT;
        ALTER TABLE sources ADD COLUMN change_cursor TEXT;
        UPDATE sources SET change_feed = 'orthanc', change_cursor = changes_seq || '' WHERE changes_seq IS NOT NULL;
        """,
    ),
]

MIGRATIONS_TABLE = "CREATE TABLE IF NOT EXISTS migrations (version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP)"


@dataclass(frozen=True)
class StudyRow:
    """One study as the state records it. ``status`` is the stored word: a ``StudyStatus``
    value (members compare equal to it)."""

    study_uid: str
    resource_id: str | None
    n_series: int | None
    n_instances: int | None
    study_hash: str | None
    resource_hash: str | None
    status: str
    last_error: str | None
    last_seen_run: int | None = None
    last_run: int | None = None
    study_date: str | None = None


_STUDY_COLUMNS = "study_uid, resource_id, n_series, n_instances, study_hash, resource_hash, status, last_error, last_seen_run, last_run, study_date"


@dataclass(frozen=True)
class RunRow:
    """One run as the state records it. ``outcome`` None: the run has not recorded its end
    (running, or killed); ``mark``, ``windows`` and ``pid`` are None in a state older than schema 3."""

    id: int
    source: str
    started: str
    ended: str | None
    outcome: str | None
    folder: str | None
    figures: dict[str, Any] | None
    mark: str | None
    windows: list[str] | None
    pid: int | None


@dataclass(frozen=True)
class StatusCount:
    """How many studies of a source have one status, and the oldest and newest run that set it."""

    count: int
    first_run: int | None
    last_run: int | None


class StateLocked(StateError):
    """Another run holds the state: exit code 2."""


class _Busy(Exception):
    """The run lock is held by someone else; the message says who (``pid N``)."""


POSTGRES_SCHEMES = ("postgresql", "postgres")
_WRITES = re.compile(r"\s*(INSERT|UPDATE|DELETE|CREATE|ALTER|DROP)\b", re.IGNORECASE)


def lock_name(source: str | None) -> str:
    """The ``run_lock`` row that labels the lock of the whole state (``run``) or of one source."""
    return "run" if source is None else f"run {_source_digest(source)}"


def postgres_url(location: str | os.PathLike[str]) -> str | None:
    """The PostgreSQL URL that ``location`` names, or None when it is a file path (SQLite).

    A URL that went through ``pathlib.Path`` (``postgresql:/user@host/db``) has lost one slash of
    its ``//``; it is put back. A URL without a host (``postgresql:///db``) does not survive that
    trip: name the host, or give a socket folder as ``?host=/run/postgresql``.
    """
    text = os.fspath(location)
    scheme, colon, rest = text.partition(":")
    if not colon or scheme.lower() not in POSTGRES_SCHEMES or not rest.startswith("/"):
        return None
    return text if rest.startswith("//") else f"{scheme}:/{rest}"


def state_location(location: str | os.PathLike[str]) -> Path | str:
    """What ``--state`` names: the PostgreSQL URL (a str) or the SQLite file (a Path)."""
    url = postgres_url(location)
    return url if url is not None else Path(location)


def _source_digest(source: str) -> str:
    """A short name for ``source`` in file names and lock keys (its URL may hold anything)."""
    return hashlib.blake2b(source.encode(), digest_size=6).hexdigest()


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


class _Sqlite:
    """SQLite in WAL mode, in one file; the run lock is ``flock`` on ``<path>.lock``."""

    begin_sql = "BEGIN IMMEDIATE"
    records_holder = False
    errors: tuple[type[BaseException], ...] = (sqlite3.Error,)
    lost: tuple[type[BaseException], ...] = ()

    def __init__(self, path: Path, *, read_only: bool = False) -> None:
        self.path = path
        self.shown = str(path)
        if read_only:
            return
        try:
            make_folder(path.parent)
        except OSError as exc:
            raise StateError(f"cannot create the folder of state {path}: {exc.strerror}") from None

    def connect_read_only(self) -> sqlite3.Connection:
        """The file as it is (``mode=ro``): nothing created, no mode changed, no PRAGMA that
        writes; a sync may write at the same time (WAL lets readers in)."""
        return sqlite3.connect(f"file:{quote(str(self.path.resolve()))}?mode=ro", uri=True, isolation_level=None, timeout=30)

    @staticmethod
    def has_table(db: sqlite3.Connection, name: str) -> bool:
        return db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)).fetchone() is not None

    def connect(self) -> sqlite3.Connection:
        self._refuse_foreign()
        # SQLite gives its -wal and -shm files the database file's mode: create it 0600 first
        try:
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT, FILE_MODE))
        except OSError:
            pass  # a read-only state; sqlite3 says what is wrong
        for suffix in ("", "-wal", "-shm", ".lock"):
            make_private(self.path.with_name(self.path.name + suffix))
        db = sqlite3.connect(self.path, isolation_level=None, timeout=30)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute("PRAGMA foreign_keys=ON")
        return db

    def _refuse_foreign(self) -> None:
        """A SQLite file of another program (tables, but not a state's) is left as it is: not
        migrated into a state, not switched to WAL, its mode not changed. Read-only look first."""
        if not self.path.is_file() or self.path.stat().st_size == 0:
            return
        try:
            probe = self.connect_read_only()
            try:
                tables = {row[0] for row in probe.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            finally:
                probe.close()
        except sqlite3.Error:
            return  # not a database, or damaged: connect() and the first query say so
        if tables and "migrations" not in tables:
            raise StateError(f"{self.shown} is a SQLite database of another program, not a qido-crawler state; it was left as it is")

    @staticmethod
    def sql(statement: str) -> str:
        return statement

    @staticmethod
    def ddl(statement: str) -> str:
        return statement

    @staticmethod
    def in_transaction(db: sqlite3.Connection) -> bool:
        return db.in_transaction

    @staticmethod
    def insert_id(db: sqlite3.Connection, sql: str, params: tuple[Any, ...]) -> int:
        row_id = db.execute(sql, params).lastrowid
        if row_id is None:  # not after an INSERT of one row
            raise sqlite3.InterfaceError(f"no row id after {sql[:40]!r}")
        return row_id

    @staticmethod
    def stream(db: sqlite3.Connection, sql: str, params: tuple[Any, ...]) -> Iterator[tuple[Any, ...]]:
        return iter(db.execute(sql, params))

    @contextmanager
    def migrating(self, db: sqlite3.Connection) -> Iterator[None]:
        yield  # BEGIN IMMEDIATE already makes migrating processes take turns

    def lock_path(self, source: str | None = None) -> Path:
        """``<state>.lock`` (the whole state), or the source's own ``<state>.<digest>.lock``."""
        if source is None:
            return self.path.with_name(self.path.name + ".lock")
        return self.path.with_name(f"{self.path.name}.{_source_digest(source)}.lock")

    def _flock(self, path: Path, how: int) -> int:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, FILE_MODE)
        except OSError as exc:
            raise StateError(f"cannot open lock {path}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, how | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise _Busy(f"pid {holder}") from None
        return fd

    def lock(self, source: str | None = None) -> tuple[int, ...]:
        """The whole state: an exclusive ``flock`` on ``<state>.lock``. One source: a shared one
        on it (runs of other sources share it; a whole-state lock, and an older qido-crawler's,
        waits for them all) and an exclusive one on the source's own file."""
        if source is None:
            fd = self._flock(self.lock_path(), fcntl.LOCK_EX)
            held: tuple[int, ...] = (fd,)
        else:
            shared = self._flock(self.lock_path(), fcntl.LOCK_SH)
            try:
                fd = self._flock(self.lock_path(source), fcntl.LOCK_EX)
            except BaseException:
                os.close(shared)
                raise
            held = (fd, shared)
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        return held

    @staticmethod
    def check_lock(handle: tuple[int, ...]) -> None:
        pass  # a flock is not lost while its file descriptor is open

    @staticmethod
    def unlock(handle: tuple[int, ...]) -> None:
        for fd in handle:
            os.close(fd)


# The column types of the migrations as PostgreSQL spells them, in order: the rowid alias of
# SQLite becomes an identity column; INTEGER becomes BIGINT (SQLite's integers are 64-bit);
# BLOB becomes BYTEA; TEXT compares and sorts by bytes as in SQLite (collation "C"), whatever
# the database's locale, so both order study UIDs, resource ids and dates alike.
_PG_DDL = (
    (re.compile(r"\bid INTEGER PRIMARY KEY\b"), "id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY"),
    (re.compile(r"\bINTEGER\b"), "BIGINT"),
    (re.compile(r"\bBLOB\b"), "BYTEA"),
    (re.compile(r"\bTEXT\b"), 'TEXT COLLATE "C"'),
)


@functools.lru_cache(maxsize=512)
def _pg_sql(statement: str) -> str:
    return statement.replace("?", "%s")


def _pg_ddl(statement: str) -> str:
    for pattern, replacement in _PG_DDL:
        statement = pattern.sub(replacement, statement)
    return statement


class _Postgres:
    """PostgreSQL through psycopg 3, in autocommit mode with explicit BEGIN/COMMIT (as SQLite).

    The run lock is a session-level advisory lock, ``pg_try_advisory_lock(key)``, held by a
    connection of its own that stays open, idle and outside any transaction, for the life of the
    ``State``. The key is a 64-bit hash of the database and schema the URL leads to, so states in
    different databases or schemas do not block each other. ``pg_try_advisory_lock`` answers at
    once (a second run fails with ``StateLocked`` without waiting), and the server releases the
    lock when that session ends: a clean close, or the process being killed (its kernel closes
    the socket and the server backend exits). Chosen over a row lock (``SELECT ... FOR UPDATE
    NOWAIT``), which would need a transaction left open for the whole run: that holds back
    VACUUM's horizon on the whole cluster for hours and is cut by
    ``idle_in_transaction_session_timeout``. The holder writes its pid and host into
    ``run_lock`` for the message of the runs it turns away; the lock is the truth, the row only
    a label. (A client machine that vanishes without closing its socket holds the lock until the
    server notices the dead connection: its ``tcp_keepalives_*`` settings. Session advisory
    locks need a session of their own: no pooler in transaction mode between.)
    """

    begin_sql = "BEGIN"
    records_holder = True

    def __init__(self, url: str) -> None:
        try:
            import psycopg
        except ImportError:
            raise ConfigError(
                "a PostgreSQL state needs psycopg 3: pip install 'qido-crawler[postgres]'"
            ) from None
        self.psycopg = psycopg
        self.url = url
        self.shown = redact(url, keep_user=True)
        self.errors: tuple[type[BaseException], ...] = (psycopg.Error,)
        self.lost: tuple[type[BaseException], ...] = (psycopg.OperationalError,)

    def connect(self) -> Any:
        from psycopg.conninfo import conninfo_to_dict

        given = conninfo_to_dict(self.url)
        # keepalives: an idle connection (the lock's) is not dropped by firewalls, and a dead one is noticed
        defaults: dict[str, Any] = {"application_name": "qido-crawler", "connect_timeout": 10, "keepalives": 1, "keepalives_idle": 60,
                    "keepalives_interval": 10, "keepalives_count": 6}
        return self.psycopg.connect(self.url, autocommit=True, **{k: v for k, v in defaults.items() if k not in given})

    def connect_read_only(self) -> Any:
        """A session whose every transaction is READ ONLY: the server refuses any write."""
        db = self.connect()
        try:
            db.execute("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY")
        except BaseException:
            db.close()
            raise
        return db

    @staticmethod
    def has_table(db: Any, name: str) -> bool:
        return bool(db.execute("SELECT to_regclass(%s) IS NOT NULL", (name,)).fetchone()[0])

    sql = staticmethod(_pg_sql)
    ddl = staticmethod(_pg_ddl)

    def in_transaction(self, db: Any) -> bool:
        status = self.psycopg.pq.TransactionStatus
        return db.info.transaction_status in (status.INTRANS, status.INERROR)

    @staticmethod
    def insert_id(db: Any, sql: str, params: tuple[Any, ...]) -> int:
        return int(db.execute(sql + " RETURNING id", params).fetchone()[0])

    @staticmethod
    def stream(db: Any, sql: str, params: tuple[Any, ...]) -> Iterator[tuple[Any, ...]]:
        rows: Iterator[tuple[Any, ...]] = db.cursor().stream(sql, params)  # row by row, not the whole table in memory
        return rows

    @staticmethod
    def key(db: Any, purpose: str) -> int:
        database, schema = db.execute("SELECT current_database(), COALESCE(current_schema(), '')").fetchone()
        digest = hashlib.blake2b(f"qido-crawler {purpose} {database}.{schema}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "big", signed=True)

    @contextmanager
    def migrating(self, db: Any) -> Iterator[None]:
        """Migrating processes take turns (``CREATE TABLE IF NOT EXISTS`` races otherwise)."""
        key = self.key(db, "migrate")
        db.execute("SELECT pg_advisory_lock(%s)", (key,))
        try:
            yield
        finally:
            try:
                db.execute("SELECT pg_advisory_unlock(%s)", (key,))
            except self.psycopg.Error:
                pass  # a broken session has released it

    def lock(self, source: str | None = None) -> Any:
        """The whole state: an exclusive advisory lock. One source: that lock shared (runs of
        other sources share it) and the source's own exclusive one."""
        db = self.connect()
        try:
            whole = self.key(db, "run")
            if source is None:
                taken = db.execute("SELECT pg_try_advisory_lock(%s)", (whole,)).fetchone()[0]
            else:
                taken = db.execute("SELECT pg_try_advisory_lock_shared(%s)", (whole,)).fetchone()[0] and db.execute(
                    "SELECT pg_try_advisory_lock(%s)", (self.key(db, f"run {_source_digest(source)}"),)).fetchone()[0]
            if taken:
                if db.info.server_version >= 140000:
                    db.execute("SET idle_session_timeout = 0")  # the lock's session idles for the whole run
                return db
            try:
                row = db.execute("SELECT pid, host FROM run_lock WHERE name = %s", (lock_name(source),)).fetchone()
                if row is None and source is not None:
                    row = db.execute("SELECT pid, host FROM run_lock WHERE name = 'run'").fetchone()
            except self.psycopg.errors.UndefinedTable:
                row = None
        except BaseException:
            db.close()
            raise
        db.close()
        raise _Busy(f"pid {row[0]} on {row[1]}" if row else "pid ?")

    def check_lock(self, handle: Any) -> None:
        """Before a commit: the lock's session is still there (else another run may hold the lock now)."""
        try:
            handle.execute("SELECT 1")
        except self.psycopg.Error as exc:
            raise StateError(f"lost the run lock on the state {self.shown} ({_one_line(exc)}); nothing more is committed") from None

    @staticmethod
    def unlock(handle: Any) -> None:
        # closing the session releases the lock too, but the server notices that a moment later;
        # unlocking first means the next run can take it at once
        try:
            handle.execute("SELECT pg_advisory_unlock_all()")
        except Exception:  # noqa: BLE001 - a dead lock connection has nothing left to release
            pass
        handle.close()


class State:
    """One state database; use from one thread.

    ``path`` is a file path (SQLite) or a ``postgresql://`` / ``postgres://`` URL (PostgreSQL).

    ``lock=True`` takes an exclusive lock for the life of the object: a second run on the same
    state fails at once with ``StateLocked``, and the lock of a run that was killed is released
    with its process, so the next run simply takes it. ``lock=SOURCE`` locks only that source:
    runs of other sources go on at the same time (they take turns only for the short write
    transactions of their checkpoints; see ``begin``), a whole-state lock waits for them all. SQLite: ``flock`` on ``<path>.lock``,
    released by the kernel. PostgreSQL: an advisory lock released by the server when the
    session ends (see ``_Postgres``).

    ``read_only=True`` (see :meth:`open`) neither migrates nor locks, and cannot write.
    """

    def __init__(self, path: str | os.PathLike[str], *, lock: bool | str = False, read_only: bool = False) -> None:
        if lock and read_only:
            raise ValueError("a read-only state takes no run lock")
        url = postgres_url(path)
        self.path: Path | str = url if url is not None else Path(path)
        self.read_only = read_only
        self._dialect: _Sqlite | _Postgres = _Postgres(url) if url is not None else _Sqlite(Path(path), read_only=read_only)
        self._lock: Any = None
        self._begin_pending = False
        self._seen: dict[tuple[str, str], int] = {}
        self._version = max(v for v, _, _ in MIGRATIONS)
        self._study_columns = _STUDY_COLUMNS
        try:
            if read_only:
                self.db = self._dialect.connect_read_only()
                self._check_readable()
                return
            if lock:
                source = lock if isinstance(lock, str) else None
                try:
                    self._lock = self._dialect.lock(source)
                except _Busy as busy:
                    what = "" if source is None else " for this source"
                    raise StateLocked(
                        f"another run ({busy}) is using the state {self._dialect.shown}{what}; try again when it has finished"
                    ) from None
            self.db = self._dialect.connect()
            self._migrate()
            if lock and self._dialect.records_holder:
                self._q(
                    "INSERT INTO run_lock (name, pid, host, since) VALUES (?, ?, ?, ?) "
                    "ON CONFLICT (name) DO UPDATE SET pid = excluded.pid, host = excluded.host, since = excluded.since",
                    (lock_name(lock if isinstance(lock, str) else None), os.getpid(), socket.gethostname(),
                     datetime.now(timezone.utc).replace(microsecond=0).isoformat()),
                )
        except self._dialect.errors as exc:
            self.close()
            raise StateError(f"cannot open state {self._dialect.shown}: {_one_line(exc)}") from None
        except BaseException:
            self.close()
            raise

    @classmethod
    def open(cls, location: str | os.PathLike[str], *, read_only: bool = False) -> State:
        """Open a state that must already exist (a SQLite file, or a PostgreSQL database), without
        the run lock: for ``export``, ``status`` and ``audit``.

        ``read_only=False`` is ``State(location)``: an older schema is migrated, a newer one is a
        StateError. ``read_only=True`` writes nothing: no migration, no lock, SQLite opened as a
        ``mode=ro`` URI (no file created, no mode changed), PostgreSQL in a session whose
        transactions are all READ ONLY. A state a newer qido-crawler wrote is read as it is
        (migrations only add tables and columns; a row the read methods need that is not there
        is a StateError), and one an older version wrote is read with the columns it has. A
        location that holds no state, a damaged file, a database that cannot be reached: StateError.
        """
        if postgres_url(location) is None and not Path(location).is_file():
            raise StateError(f"no state at {location}")
        return cls(location, read_only=read_only)

    def _check_readable(self) -> None:
        if not self._dialect.has_table(self.db, "migrations"):
            raise StateError(f"{self._dialect.shown} is not a qido-crawler state (it has no migrations table); it was left as it is")
        self._version = self.schema_version
        if self._version < 3:   # before StudyDate and the last listing were recorded
            self._study_columns = _STUDY_COLUMNS.replace("last_seen_run", "NULL").replace("study_date", "NULL")

    @property
    def dialect(self) -> str:
        """``sqlite`` or ``postgresql``."""
        return "postgresql" if isinstance(self._dialect, _Postgres) else "sqlite"

    def close(self) -> None:
        db = getattr(self, "db", None)
        if db is not None:
            db.close()
        if self._lock is not None:
            self._dialect.unlock(self._lock)
            self._lock = None

    def _q(self, sql: str, params: tuple[Any, ...] | list[Any] | None = None) -> Any:
        """Run one statement written with ``?`` placeholders; returns the cursor."""
        if self._begin_pending and _WRITES.match(sql):
            self._begin_now()
        with self._guard():
            if params is None:
                return self.db.execute(self._dialect.sql(sql))
            return self.db.execute(self._dialect.sql(sql), params)

    def _insert(self, sql: str, params: tuple[Any, ...]) -> int:
        """Run an INSERT written with ``?`` placeholders; returns the id of the new row."""
        if self._begin_pending:
            self._begin_now()
        with self._guard():
            return self._dialect.insert_id(self.db, self._dialect.sql(sql), params)

    @contextmanager
    def _guard(self) -> Iterator[None]:
        """A connection lost mid-run (PostgreSQL) or a damaged file (SQLite: a page found corrupt
        only when a statement reads it) is a StateError, not a traceback."""
        try:
            yield
        except self._dialect.lost as exc:
            raise StateError(f"lost the state {self._dialect.shown}: {_one_line(exc)}") from None
        except sqlite3.DatabaseError as exc:
            if not self.read_only and getattr(exc, "sqlite_errorname", None) not in ("SQLITE_CORRUPT", "SQLITE_NOTADB"):
                raise
            raise StateError(f"cannot read state {self._dialect.shown}: {_one_line(exc)}") from None
        except self._dialect.errors as exc:
            if not self.read_only:
                raise
            # a read-only reader meets a schema it does not know, or was refused a write
            raise StateError(f"cannot read state {self._dialect.shown}: {_one_line(exc)}") from None

    def _migrate(self) -> None:
        with self._dialect.migrating(self.db):
            self._q(self._dialect.ddl(MIGRATIONS_TABLE))
            done = {row[0] for row in self._q("SELECT version FROM migrations")}
            newest = max((v for v, _, _ in MIGRATIONS), default=0)
            if done and max(done) > newest:
                raise StateError(f"state {self._dialect.shown} was written by a newer qido-crawler (schema {max(done)})")
            for version, name, sql in MIGRATIONS:
                if version in done:
                    continue
                self._begin_now()
                try:
                    if self._q("SELECT 1 FROM migrations WHERE version = ?", (version,)).fetchone():
                        self.commit()   # another process, opening the state at the same time, applied it
                        continue
                    for statement in sql.split(";"):
                        if statement.strip():
                            self._q(self._dialect.ddl(statement))
                    applied = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S")  # as SQLite's CURRENT_TIMESTAMP
                    self._q("INSERT INTO migrations (version, name, applied) VALUES (?, ?, ?)", (version, name, applied))
                    self.commit()
                except BaseException:
                    self.rollback()
                    raise

    @property
    def schema_version(self) -> int:
        version: int = self._q("SELECT COALESCE(MAX(version), 0) FROM migrations").fetchone()[0]
        return version

    def begin_run(self, source: str, started: str) -> int:
        return self._insert("INSERT INTO runs (source, started, pid) VALUES (?, ?, ?)", (source, started, os.getpid()))

    def checkpoint(self) -> None:
        """Commit what is written so far and carry on in a new transaction."""
        self.commit()
        self.begin()

    def begin(self) -> None:
        """Start a transaction: what is written from now on is committed together or not at all.
        It begins for real at the first write, so that runs of other sources on the same state
        (SQLite has one writer at a time) wait only for the writes of a checkpoint, not for a
        whole crawl between two."""
        self._begin_pending = True

    def _begin_now(self) -> None:
        self._begin_pending = False
        self._q(self._dialect.begin_sql)

    def commit(self) -> None:
        self._write_seen()
        self._begin_pending = False
        if self._dialect.in_transaction(self.db):
            if self._lock is not None:
                self._dialect.check_lock(self._lock)
            self._q("COMMIT")

    def rollback(self) -> None:
        self._seen.clear()
        self._begin_pending = False
        if self._dialect.in_transaction(self.db):
            self._q("ROLLBACK")

    def finish_run(
        self, run_id: int, ended: str, outcome: str, folder: str | None, figures: dict[str, Any],
        mark: str | None = None, windows: list[str] | None = None,
    ) -> None:
        self._q(
            "UPDATE runs SET ended = ?, outcome = ?, folder = ?, figures = ?, mark = ?, windows = ? WHERE id = ?",
            (ended, outcome, folder, json.dumps(figures, sort_keys=True), mark, json.dumps(windows) if windows is not None else None, run_id),
        )

    def study(self, source: str, study_uid: str) -> StudyRow | None:
        row = self._q(f"SELECT {self._study_columns} FROM studies WHERE source = ? AND study_uid = ?", (source, study_uid)).fetchone()
        if not row:
            return None
        study = StudyRow(*row)
        seen = self._seen.get((source, study_uid))
        return study if seen is None else replace(study, last_seen_run=seen)

    def iter_study_rows(self, source: str | None = None) -> Iterator[StudyRow]:
        """Every study of ``source`` (of every source when None), ordered by source and UID."""
        with self._guard():   # a damaged page may be met only while fetching
            if source is None:
                rows = self._q(f"SELECT {self._study_columns} FROM studies ORDER BY source, study_uid").fetchall()
            else:
                rows = self._q(f"SELECT {self._study_columns} FROM studies WHERE source = ? ORDER BY study_uid", (source,)).fetchall()
        for row in rows:
            yield StudyRow(*row)

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
        # Mutants that only change the case of an SQL string here survive and are equivalent
        # (docs/testing.md): SQLite and PostgreSQL read keywords and unquoted names in any case,
        # and the strings whose case changes either hold no quoted literal or only lower-case ones.
        if status == StudyStatus.SYNCED:
            self._q(
                "INSERT INTO studies (source, study_uid, resource_id, n_series, n_instances, study_hash, resource_hash, status, "
                "last_error, last_run, last_seen_run, study_date) VALUES (?, ?, ?, ?, ?, ?, ?, 'synced', NULL, ?, ?, ?) "
                "ON CONFLICT (source, study_uid) DO UPDATE SET resource_id = excluded.resource_id, n_series = excluded.n_series, "
                "n_instances = excluded.n_instances, study_hash = excluded.study_hash, resource_hash = excluded.resource_hash, "
                "status = 'synced', last_error = NULL, last_run = excluded.last_run, last_seen_run = excluded.last_seen_run, "
                "study_date = excluded.study_date",
                (source, study_uid, resource_id, n_series, n_instances, study_hash, resource_hash, run_id, run_id, study_date),
            )
        else:
            self._q(
                "INSERT INTO studies (source, study_uid, status, last_error, last_run, last_seen_run, study_date) VALUES (?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (source, study_uid) DO UPDATE SET status = excluded.status, last_error = excluded.last_error, "
                "last_run = excluded.last_run, last_seen_run = excluded.last_seen_run, study_date = excluded.study_date",
                (source, study_uid, status, error, run_id, run_id, study_date),
            )

    def mark_seen(self, source: str, study_uid: str, run_id: int) -> None:
        """Record that run ``run_id`` listed the study: written with the next commit (or before
        the next question about what the run has not listed), all at once: the write transaction
        (and SQLite's one writer) is not taken while a run lists."""
        self._seen[source, study_uid] = run_id

    @property
    def seen_waiting(self) -> int:
        """How many studies marked seen wait to be written."""
        return len(self._seen)

    def _write_seen(self) -> None:
        if not self._seen:
            return
        if self._begin_pending:
            self._begin_now()
        with self._guard():
            self.db.cursor().executemany(self._dialect.sql("UPDATE studies SET last_seen_run = ? WHERE source = ? AND study_uid = ?"),
                                         [(run_id, source, uid) for (source, uid), run_id in self._seen.items()])
        self._seen.clear()

    def studies_to_retry(self, source: str, run_id: int, limit: int) -> list[str]:
        """UIDs of the source's failed or inconsistent studies that run ``run_id`` has not listed,
        those tried longest ago first, at most ``limit``."""
        self._write_seen()
        # case-changing mutants of this SQL are equivalent (see record_study)
        rows = self._q(
            "SELECT study_uid FROM studies WHERE source = ? AND status IN ('failed', 'inconsistent') "
            "AND (last_seen_run IS NULL OR last_seen_run != ?) ORDER BY last_run, study_uid LIMIT ?",
            (source, run_id, limit),
        ).fetchall()
        return [row[0] for row in rows]

    def iter_unseen(self, source: str, run_id: int, since: str | None, until: str | None) -> Iterator[tuple[str, str | None]]:
        """(UID, resource id) of studies not listed by run ``run_id`` whose StudyDate lies in
        [since, until] (open ends unbounded; both None: every study, dated or not)."""
        # equivalent mutants: changing the case of this SQL (see record_study), and 'or' -> 'and'
        # below, since with one bound set `study_date >= ?` or `<= ?` already excludes NULL dates
        self._write_seen()
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
        yield from self._q(sql + " ORDER BY study_uid", args).fetchall()

    def mark_gone(self, source: str, study_uid: str, run_id: int) -> None:
        # case-changing mutants of this SQL are equivalent (see record_study)
        self._q(
            "UPDATE studies SET status = 'gone', last_error = NULL, last_run = ? WHERE source = ? AND study_uid = ?", (run_id, source, study_uid)
        )

    def drop_resource(self, resource_type: str, resource_id: str) -> None:
        self._q("DELETE FROM resources WHERE type = ? AND id = ?", (resource_type, resource_id))

    def last_mark(self, source: str) -> str | None:
        """The high-water mark of the last run of ``source`` whose listing was complete."""
        # case-changing mutants of this SQL are equivalent (see record_study)
        row = self._q("SELECT mark FROM runs WHERE source = ? AND mark IS NOT NULL ORDER BY id DESC LIMIT 1", (source,)).fetchone()
        return row[0] if row else None

    def identity(self) -> str:
        """A random id made once per state (a copy of the state file has the same one): with the
        source, it makes run folder names that no other state's runs use."""
        row = self._q("SELECT value FROM state_info WHERE key = 'id'").fetchone()
        if row is None:
            self._q("INSERT INTO state_info (key, value) VALUES ('id', ?) ON CONFLICT (key) DO NOTHING", (uuid.uuid4().hex,))
            row = self._q("SELECT value FROM state_info WHERE key = 'id'").fetchone()
        identity: str = row[0]
        return identity

    def server_profile(self, source: str) -> tuple[str, str] | None:
        """The server profile the source's last run used and how it was chosen (given, detected,
        default); None before any run recorded one."""
        row = self._q("SELECT value FROM state_info WHERE key = ?", (f"server_profile {source}",)).fetchone()
        if row is None:
            return None
        name, _, how = str(row[0]).partition(" ")
        return name, how

    def included_tags(self, source: str) -> tuple[str, ...]:
        """The ``--include-tag`` signature (``tables.tags.signature``) of the source's last run
        that listed: its study hashes include it, so an audit asks for and hashes the same."""
        row = self._q("SELECT value FROM state_info WHERE key = ?", (f"include_tags {source}",)).fetchone()
        return tuple(json.loads(row[0])) if row else ()

    def set_included_tags(self, source: str, signature: tuple[str, ...]) -> None:
        self._q("INSERT INTO state_info (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (f"include_tags {source}", json.dumps(list(signature))))

    def set_server_profile(self, source: str, name: str, how: str) -> None:
        self._q("INSERT INTO state_info (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (f"server_profile {source}", f"{name} {how}"))

    def set_run_folder(self, run_id: int, folder: str) -> None:
        """Record the folder a run will write into before it makes it (outside the run's
        transaction), so that only this state ever recovers or removes it."""
        self._q("UPDATE runs SET folder = ? WHERE id = ?", (folder, run_id))

    def unfinished_folders(self, run_id: int, source: str) -> list[str]:
        """The folders recorded by earlier runs of ``source`` that did not end well (interrupted,
        failed): the only folders a run may complete or remove. Another source's are not: its
        run may be writing into one at this moment."""
        rows = self._q(
            "SELECT folder FROM runs WHERE folder IS NOT NULL AND id != ? AND source = ? "
            "AND (outcome IS NULL OR outcome NOT IN ('ok', 'partial')) ORDER BY id",
            (run_id, source),
        ).fetchall()
        return [row[0] for row in rows]

    def close_interrupted_runs(self, run_id: int, source: str) -> int:
        """Record the earlier runs of ``source`` that never ended as interrupted (the run lock
        of the source is held: none of them runs)."""
        cursor = self._q("UPDATE runs SET outcome = 'interrupted', ended = started WHERE ended IS NULL AND id != ? AND source = ?",
                         (run_id, source))
        closed: int = cursor.rowcount
        return closed

    def source_facts(self, source: str) -> tuple[int | None, int]:
        """(the server's result cap if one was found, the largest listing verified as uncapped)."""
        if self._version < 2:
            return None, 0
        row = self._q("SELECT cap, verified_uncapped FROM sources WHERE source = ?", (source,)).fetchone()
        return (row[0], row[1]) if row else (None, 0)

    def set_source_facts(self, source: str, cap: int | None, verified: int) -> None:
        self._q(
            "INSERT INTO sources (source, cap, verified_uncapped) VALUES (?, ?, ?) "
            "ON CONFLICT (source) DO UPDATE SET cap = excluded.cap, verified_uncapped = excluded.verified_uncapped",
            (source, cap, verified),
        )

    def key_form(self, source: str) -> str | None:
        """How the source takes matching keys, as learned by a listing: "tags", "keywords" or None."""
        row = self._q("SELECT key_form FROM sources WHERE source = ?", (source,)).fetchone()
        return row[0] if row else None

    def set_key_form(self, source: str, form: str) -> None:
        self._q(
            "INSERT INTO sources (source, key_form) VALUES (?, ?) ON CONFLICT (source) DO UPDATE SET key_form = excluded.key_form",
            (source, form),
        )

    def change_cursor(self, source: str, feed: str) -> str | None:
        """Where the source's change source ``feed`` was read up to; None when it never was (or a
        change source of another kind was: its cursor means nothing to this one)."""
        row = self._q("SELECT change_feed, change_cursor FROM sources WHERE source = ?", (source,)).fetchone()
        return row[1] if row and row[0] == feed else None

    def set_change_cursor(self, source: str, feed: str, cursor: str) -> None:
        self._q(
            "INSERT INTO sources (source, change_feed, change_cursor) VALUES (?, ?, ?) ON CONFLICT (source) DO UPDATE SET "
            "change_feed = excluded.change_feed, change_cursor = excluded.change_cursor",
            (source, feed, cursor),
        )

    def changes_position(self, source: str) -> int | None:
        """Orthanc's change log position for the source (see change_cursor)."""
        cursor = self.change_cursor(source, "orthanc")
        return int(cursor) if cursor is not None and cursor.isdigit() else None

    def set_changes_position(self, source: str, position: int) -> None:
        self.set_change_cursor(source, "orthanc", str(position))

    def fallbacks(self, source: str) -> dict[str, str]:
        """The fallbacks the source needed (name -> reason; see crawl.FALLBACKS)."""
        return dict(self._q("SELECT name, reason FROM source_fallbacks WHERE source = ?", (source,)).fetchall())

    def set_fallbacks(self, source: str, fallbacks: dict[str, str]) -> None:
        """Replace what the state remembers of the source's fallbacks."""
        self._q("DELETE FROM source_fallbacks WHERE source = ?", (source,))
        for name, reason in sorted(fallbacks.items()):
            self._q("INSERT INTO source_fallbacks (source, name, reason) VALUES (?, ?, ?)", (source, name, reason))

    def fhir_max_entries(self, base: str) -> int | None:
        """The entries per transaction Bundle a FHIR server was found to take (None: no limit found)."""
        row = self._q("SELECT max_entries FROM fhir_servers WHERE base = ?", (base,)).fetchone()
        return row[0] if row else None

    def set_fhir_max_entries(self, base: str, max_entries: int) -> None:
        self._q(
            "INSERT INTO fhir_servers (base, max_entries) VALUES (?, ?) ON CONFLICT (base) DO UPDATE SET max_entries = excluded.max_entries",
            (base, max_entries),
        )

    def fhir_server_id(self, base: str, resource_type: str, resource_id: str) -> str | None:
        """With --fhir-ids server: the id the FHIR server gave one of our resources."""
        row = self._q("SELECT server_id FROM fhir_ids WHERE base = ? AND type = ? AND id = ?", (base, resource_type, resource_id)).fetchone()
        return row[0] if row else None

    def set_fhir_server_id(self, base: str, resource_type: str, resource_id: str, server_id: str) -> None:
        self._q(
            "INSERT INTO fhir_ids (base, type, id, server_id) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (base, type, id) DO UPDATE SET server_id = excluded.server_id",
            (base, resource_type, resource_id, server_id),
        )

    def resource_hash(self, resource_type: str, resource_id: str) -> str | None:
        row = self._q("SELECT hash FROM resources WHERE type = ? AND id = ?", (resource_type, resource_id)).fetchone()
        return row[0] if row else None

    def put_resource(self, resource_type: str, resource_id: str, digest: str, body: bytes) -> None:
        self._q(
            "INSERT INTO resources (type, id, hash, body) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (type, id) DO UPDATE SET hash = excluded.hash, body = excluded.body",
            (resource_type, resource_id, digest, zlib.compress(body, 1)),
        )

    def iter_resources(self) -> Iterator[tuple[str, str, bytes]]:
        """(type, id, JSON bytes) of every resource, ordered by type then id."""
        with self._guard():
            rows = self._dialect.stream(self.db, self._dialect.sql("SELECT type, id, body FROM resources ORDER BY type, id"), ())
            for resource_type, resource_id, body in rows:
                yield resource_type, resource_id, zlib.decompress(body)

    def counts_by_status(self) -> dict[str, int]:
        return dict(self._q("SELECT status, COUNT(*) FROM studies GROUP BY status ORDER BY status"))

    def last_runs(self, limit: int = 10) -> list[dict[str, Any]]:
        rows = self._q(
            "SELECT id, source, started, ended, outcome, folder, figures FROM runs ORDER BY id DESC LIMIT ?", (limit,)
        ).fetchall()
        return [
            {"id": r[0], "source": r[1], "started": r[2], "ended": r[3], "outcome": r[4] or "interrupted", "folder": r[5], "figures": json.loads(r[6]) if r[6] else None}
            for r in rows
        ]

    def problems(self, limit: int = 50) -> list[tuple[str, str, str, str | None]]:
        rows: list[tuple[str, str, str, str | None]] = self._q(
            "SELECT source, study_uid, status, last_error FROM studies WHERE status NOT IN ('synced') ORDER BY source, study_uid LIMIT ?",
            (limit,),
        ).fetchall()
        return rows

    # --- what `status` reads (every one works on a state an older version wrote) ---

    def source_names(self) -> list[str]:
        """Every source the state knows of (by its runs, studies or learned facts), sorted."""
        tables = ["runs", "studies"] + (["sources"] if self._version >= 2 else [])
        sql = " UNION ".join(f"SELECT source FROM {table}" for table in tables)
        return [row[0] for row in self._q(f"SELECT source FROM ({sql}) AS known ORDER BY source")]

    def _runs(self, where: str, params: tuple[Any, ...]) -> list[RunRow]:
        extra = "mark, windows, pid" if self._version >= 3 else "NULL, NULL, NULL"
        rows = self._q(f"SELECT id, source, started, ended, outcome, folder, figures, {extra} FROM runs WHERE {where}", params).fetchall()
        return [
            RunRow(r[0], r[1], r[2], r[3], r[4], r[5], json.loads(r[6]) if r[6] else None, r[7], json.loads(r[8]) if r[8] else None, r[9])
            for r in rows
        ]

    def last_run(self, source: str) -> RunRow | None:
        """The newest run of ``source``, ended or not."""
        rows = self._runs("id = (SELECT MAX(id) FROM runs WHERE source = ?)", (source,))
        return rows[0] if rows else None

    def last_whole_run(self, source: str) -> tuple[int, str] | None:
        """(id, start) of the newest run of ``source`` that ended ok or partial."""
        row = self._q("SELECT id, started FROM runs WHERE id = (SELECT MAX(id) FROM runs WHERE source = ? AND outcome IN ('ok', 'partial'))",
                      (source,)).fetchone()
        return (int(row[0]), str(row[1])) if row else None

    def unended_runs(self, source: str) -> list[RunRow]:
        """Runs of ``source`` that never recorded their end: running now, or killed (the next run
        of that source closes them as interrupted and recovers their folders)."""
        return self._runs("source = ? AND ended IS NULL ORDER BY id", (source,))

    def change_feed(self, source: str) -> tuple[str, str] | None:
        """(change source, cursor) the source's change feed was last read up to, whatever its
        kind; in a state of schema 4 to 9, Orthanc's position in its own column."""
        if self._version >= 10:
            row = self._q("SELECT change_feed, change_cursor FROM sources WHERE source = ?", (source,)).fetchone()
            return (str(row[0]), str(row[1])) if row and row[0] is not None and row[1] is not None else None
        if self._version >= 4:
            row = self._q("SELECT changes_seq FROM sources WHERE source = ?", (source,)).fetchone()
            return ("orthanc", str(row[0])) if row and row[0] is not None else None
        return None

    def lock_holder(self, source: str | None = None) -> tuple[int, str] | None:
        """(pid, host) that the run lock last recorded: the running run, or the last one that held
        it (the label is not cleared on release). SQLite: the pid in ``<state>.lock``, on this
        host; PostgreSQL: the ``run_lock`` row. None when nothing is recorded. Read only: the lock
        itself is not tried (that could turn away a run starting at that moment)."""
        if isinstance(self._dialect, _Sqlite):
            try:
                text = self._dialect.lock_path(source).read_text(errors="replace").strip()
            except OSError:
                return None
            return (int(text), socket.gethostname()) if text.isdigit() else None
        if self._version < 5:
            return None
        row = self._q("SELECT pid, host FROM run_lock WHERE name = ?", (lock_name(source),)).fetchone()
        return (int(row[0]), str(row[1])) if row and row[0] is not None else None

    def status_counts(self, source: str) -> dict[str, StatusCount]:
        """Per study status of ``source``: how many, and the oldest and newest run that set it."""
        rows = self._q(
            "SELECT status, COUNT(*), MIN(last_run), MAX(last_run) FROM studies WHERE source = ? GROUP BY status ORDER BY status", (source,)
        ).fetchall()
        return {r[0]: StatusCount(r[1], r[2], r[3]) for r in rows}

    def oldest_failed(self, source: str) -> StudyRow | None:
        """The failed or inconsistent study of ``source`` tried longest ago (the next run's first retry)."""
        row = self._q(
            f"SELECT {self._study_columns} FROM studies WHERE source = ? AND status IN ('failed', 'inconsistent') "
            "ORDER BY last_run, study_uid LIMIT 1",
            (source,),
        ).fetchone()
        return StudyRow(*row) if row else None

    def gone_still_held(self, source: str) -> int:
        """Studies of ``source`` marked gone whose ImagingStudy the state still holds (no --prune
        run deleted them), so that ``export`` still writes them."""
        return int(self._q(
            "SELECT COUNT(*) FROM studies s JOIN resources r ON r.type = 'ImagingStudy' AND r.id = s.resource_id "
            "WHERE s.source = ? AND s.status = 'gone'",
            (source,),
        ).fetchone()[0])


def open_existing(path: str | os.PathLike[str]) -> State:
    """``State.open(path)``: kept until its last callers use that."""
    return State.open(path)

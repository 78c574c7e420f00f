"""``--delta URI``: three Delta Lake tables, ``URI/studies``, ``URI/series`` and ``URI/instances``,
kept equal to the current copy by merges (deltalake, delta-rs).

The studies added since the last checkpoint wait in memory (their rows; a study written twice
keeps its last rows). ``flush`` makes at most two Delta commits per table: the studies the table
does not hold yet are appended (no merge: a first sync reads nothing back), and a merge by key
updates or inserts the rows of the other changed studies and deletes the rows of those studies
that are no longer there (a removed series or instance; every row of a study gone from the
PACS). Which studies the table holds is read once per run from the ``studies`` table's keys and
kept as short digests; a study appended at a checkpoint the state did not record is found there
by the next run and merged, not appended twice. The state
is committed after the three commits, so a killed run leaves each table at a checkpoint the
state has recorded or at one it has not; the next run sends those studies again and the merge
gives the same rows. Object stores (``s3://``, ``az://``, ``gs://``...) take delta-rs's storage
options from the environment (docs/tables.md).
"""

from __future__ import annotations

import contextlib
import hashlib
import heapq
import logging
import os
from array import array
from bisect import bisect_left
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ..errors import SinkError
from ..files import make_folder
from ..tables.collect import Collector
from ..tables.rows import KEYS, TABLES, Row, StudyRows
from ..tables.tags import IncludeTag, TagValues
from .base import Resource


log = logging.getLogger("crawler")

COMMIT_ATTEMPTS = 5
"""Merges of one checkpoint tried this often when another writer's commit comes first."""

RECENT_DIGESTS = 65_536
"""Digests added to a ``Digests`` stay in a set until there are this many, or a quarter of the
sorted ones when that is more (so sorting them in costs O(1) a digest, amortised)."""


def local_path(uri: str) -> Path | None:
    """The folder of a local URI (a path or ``file://``), None for an object store."""
    parts = urlsplit(uri)
    if parts.scheme == "file":
        return Path(parts.path)
    if len(parts.scheme) <= 1:   # no scheme, or a Windows drive letter
        return Path(uri)
    return None


def table_uri(uri: str, name: str) -> str:
    return f"{uri.rstrip('/')}/{name}"


def _digest(uid: str) -> int:
    return int.from_bytes(hashlib.blake2b(uid.encode(), digest_size=8).digest(), "big")


class Digests:
    """A set of 64-bit digests in about 25 bytes each (a Python set of ints takes about 70): a
    sorted array of 8-byte digests, searched by bisection, and a set of the recently added ones,
    merged in when it grows."""

    def __init__(self) -> None:
        self._sorted = array("Q")
        self._recent: set[int] = set()

    def __contains__(self, digest: int) -> bool:
        if digest in self._recent:
            return True
        at = bisect_left(self._sorted, digest)
        return at < len(self._sorted) and self._sorted[at] == digest

    def __len__(self) -> int:
        return len(self._sorted) + len(self._recent)

    def update(self, digests: Iterable[int]) -> None:
        self._recent.update(digest for digest in digests if digest not in self)
        if len(self._recent) >= max(RECENT_DIGESTS, len(self._sorted) // 4):
            self._sorted = array("Q", heapq.merge(self._sorted, sorted(self._recent)))
            self._recent = set()


def _hooks() -> Any:
    """After a checkpoint's commits: Delta checkpoints as the table's interval says, but no
    clean-up of expired log files (it lists the whole log each time; ``finish`` does it once)."""
    from deltalake import PostCommitHookProperties

    return PostCommitHookProperties(create_checkpoint=True, cleanup_expired_logs=False)


def _first_line(exc: BaseException) -> str:
    """The first line of an error's text, at most 300 characters ("" when it has none)."""
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else ""


def _quoted(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


@contextlib.contextmanager
def private_files(uri: str) -> Iterator[None]:
    """While delta-rs writes a local table, files are created 0600 and folders 0700 (the umask
    of the process: delta-rs takes no modes)."""
    if local_path(uri) is None:
        yield
        return
    before = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(before)


class DeltaTables:
    """The three tables under ``uri`` for one run of ``source``."""

    def __init__(self, uri: str, source: str, run_id: int, endpoints: Mapping[str, str] | None = None,
                 storage_options: dict[str, str] | None = None, tags: Sequence[IncludeTag] = ()) -> None:
        self.uri = uri.rstrip("/")
        self.collector = Collector(source, run_id, endpoints, tags=tags)
        self.storage_options = storage_options
        self.pending: dict[str, StudyRows | None] = {}
        self.commits = 0
        self._open: dict[str, Any] = {}
        """Each table's DeltaTable once it exists: an append through it reads only the log entries
        added since, not the whole log again."""
        self._held: Digests | None = None
        """Digests of the Study Instance UIDs of this source that the studies table holds."""

    def add_tags(self, key: str, tags: TagValues) -> None:
        self.collector.tag_values[key] = tags

    def add(self, key: str, resources: Sequence[Resource]) -> None:
        rows = self.collector.rows(resources, None, key)
        if rows is not None:
            self.pending[rows.study["study_uid"]] = rows

    def delete(self, key: str, resource_type: str, resource_id: str) -> None:
        if resource_type == "ImagingStudy":
            self.pending[key] = None

    def error(self, body: bytes) -> None:
        """Errors go to the NDJSON folder and the log; the tables hold studies only."""

    def flush(self) -> dict[str, str]:
        if not self.pending:
            return {}
        from deltalake.exceptions import DeltaError

        folder = local_path(self.uri)
        try:
            if folder is not None:
                make_folder(folder)
            with private_files(self.uri):
                held = self._holds()
                digests = {uid: _digest(uid) for uid, study in self.pending.items() if study is not None}
                new = {uid for uid, digest in digests.items() if digest not in held}
                changed = [uid for uid in self.pending if uid not in new]
                for name in TABLES:
                    appended = [row for uid in new if (study := self.pending[uid]) is not None for row in study.table(name)]
                    if appended:
                        self._append(name, appended)
                    if changed:
                        rows = [row for uid in changed if (study := self.pending[uid]) is not None for row in study.table(name)]
                        self._commit(name, rows, changed)
                held.update(digests[uid] for uid in new)
        except OSError as exc:
            raise SinkError(f"cannot write the Delta tables at {self.uri}: {exc.strerror or exc}") from None
        except DeltaError as exc:
            raise SinkError(f"cannot write the Delta tables at {self.uri}: {type(exc).__name__}{self._said(exc)}") from None
        self.pending.clear()
        return {}

    def _holds(self) -> Digests:
        """The digests of this source's studies in the studies table (read at the first flush)."""
        if self._held is None:
            from deltalake import DeltaTable

            uri = table_uri(self.uri, "studies")
            self._held = Digests()
            if DeltaTable.is_deltatable(uri, storage_options=self.storage_options):
                from deltalake import QueryBuilder

                query = QueryBuilder().register("studies", DeltaTable(uri, storage_options=self.storage_options))
                for batch in query.execute(f"SELECT study_uid FROM studies WHERE source = {_quoted(self.collector.source)}"):
                    self._held.update(_digest(uid) for uid in batch.column(0).to_pylist())
        return self._held

    def _append(self, name: str, rows: list[Row]) -> None:
        """One commit that adds the rows of studies the tables do not hold yet."""
        from deltalake import DeltaTable, write_deltalake
        from deltalake.exceptions import CommitFailedError

        from ..tables.batches import table

        data = table(name, rows, tags=self.collector.tags)
        uri = table_uri(self.uri, name)
        for attempt in range(1, COMMIT_ATTEMPTS + 1):
            target = self._open.get(name, uri)
            try:
                # schema_mode="merge": a table made before an --include-tag was added gets its column
                write_deltalake(target, data, mode="append", schema_mode="merge", storage_options=None if target is not uri else self.storage_options,
                                post_commithook_properties=_hooks())
            except CommitFailedError:
                self._open.pop(name, None)
                if attempt == COMMIT_ATTEMPTS:
                    raise
                continue
            break
        if name not in self._open:
            self._open[name] = DeltaTable(uri, storage_options=self.storage_options)
        self.commits += 1

    def _commit(self, name: str, rows: list[Row], touched: list[str]) -> None:
        """One commit of table ``name``: ``rows`` are the current rows of the ``touched`` studies."""
        from deltalake import DeltaTable, write_deltalake
        from deltalake.exceptions import CommitFailedError

        from ..tables.batches import table

        uri = table_uri(self.uri, name)
        data = table(name, rows, tags=self.collector.tags)
        if not DeltaTable.is_deltatable(uri, storage_options=self.storage_options):
            if rows:
                write_deltalake(uri, data, mode="append", storage_options=self.storage_options, post_commithook_properties=_hooks())
                self.commits += 1
            return
        on = " AND ".join(f"t.{column} = s.{column}" for column in KEYS[name])
        mine = f"t.source = {_quoted(self.collector.source)} AND t.study_uid IN ({', '.join(_quoted(uid) for uid in touched)})"
        for attempt in range(1, COMMIT_ATTEMPTS + 1):
            merger: Any = DeltaTable(uri, storage_options=self.storage_options).merge(
                source=data, predicate=on, source_alias="s", target_alias="t", merge_schema=True, post_commithook_properties=_hooks())
            try:
                self._open.pop(name, None)   # a version of its own: the next append reads the table again
                merger.when_matched_update_all().when_not_matched_insert_all().when_not_matched_by_source_delete(mine).execute()
            except CommitFailedError:
                # another writer (e.g. another source of a --config file) committed first: the
                # merge is read again from the new version and done again (it is idempotent)
                if attempt == COMMIT_ATTEMPTS:
                    raise
                continue
            break
        self.commits += 1

    def finish(self) -> str | None:
        self.flush()
        if self.commits:
            self._clean_up_logs()
        return self.uri if self.commits else None

    def _clean_up_logs(self) -> None:
        """Once a run: the log files older than each table's log retention (30 days unless
        ``delta.logRetentionDuration`` says otherwise) go, as Delta writers do at a checkpoint,
        unless the table's ``delta.enableExpiredLogCleanup`` is false."""
        from deltalake import DeltaTable
        from deltalake.exceptions import DeltaError

        for name in TABLES:
            uri = table_uri(self.uri, name)
            try:
                table = DeltaTable(uri, storage_options=self.storage_options)
                if table.metadata().configuration.get("delta.enableExpiredLogCleanup", "true").lower() != "false":
                    table.cleanup_metadata()
            except (DeltaError, OSError) as exc:   # the tables are whole without it: said, not fatal
                log.warning("could not remove the expired log files of the Delta table %s: %s%s", uri, type(exc).__name__, self._said(exc))

    def _said(self, exc: BaseException) -> str:
        """": " and the first line of delta-rs's error for a local table; nothing for an object
        store, whose errors carry the text the store's server answered."""
        line = _first_line(exc) if local_path(self.uri) is not None else ""
        return f": {line}" if line else ""

    def abort(self) -> None:
        """What was not flushed is dropped: the state does not record it, the next run sends it."""
        self.pending.clear()

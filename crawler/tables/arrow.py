"""Rows to Arrow, and a Parquet file written a row group at a time (bounded memory)."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import IO

import pyarrow as pa
import pyarrow.parquet as pq

from ..files import open_private
from .rows import Row
from .schema import schema
from .tags import IncludeTag

ROWS_PER_GROUP = 20_000
"""Rows of one table held before they are written as a row group (an instances row is about
300 bytes in memory: a few MB per table)."""


def table(name: str, rows: list[Row], change_log: bool, tags: Sequence[IncludeTag] = ()) -> pa.Table:
    """``rows`` (dicts with every column of the schema, missing ones None) as an Arrow table."""
    target = schema(name, change_log, tags)
    return pa.Table.from_pylist(rows, schema=target)


class ParquetFileWriter:
    """One Parquet file written at ``path`` (created 0600) from rows added a few at a time; each
    ``ROWS_PER_GROUP`` rows become a row group. ``close`` writes the footer and syncs the file."""

    def __init__(self, path: Path, name: str, change_log: bool, rows_per_group: int = ROWS_PER_GROUP,
                 tags: Sequence[IncludeTag] = ()) -> None:
        self.path = path
        self.name = name
        self.change_log = change_log
        self.tags = tuple(tags)
        self.rows_per_group = rows_per_group
        self.rows: list[Row] = []
        self.count = 0
        self._handle: IO[bytes] = open_private(path, "wb")
        self._writer = pq.ParquetWriter(self._handle, schema(name, change_log, tags), compression="zstd")

    def add(self, rows: Iterable[Row]) -> None:
        self.rows.extend(rows)
        if len(self.rows) >= self.rows_per_group:
            self._write()

    def _write(self) -> None:
        if self.rows:
            self._writer.write_table(table(self.name, self.rows, self.change_log, self.tags))
            self.count += len(self.rows)
            self.rows = []

    def close(self) -> None:
        self._write()
        self._writer.close()
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self._handle.close()

    def discard(self) -> None:
        """Close without caring for the file (it is removed or left unreadable by its caller)."""
        self.rows = []
        try:
            self._writer.close()
        except Exception:   # a writer that failed half-way: its file is dropped anyway
            pass
        self._handle.close()


def merge(parts: list[Path], out: Path, name: str, change_log: bool) -> int:
    """Copy the row groups of ``parts`` (complete Parquet files), in order, into one new file
    ``out`` (written 0600 and synced), one row group in memory at a time. Returns the rows.
    The file has the parts' schema (the run's, with its ``--include-tag`` columns)."""
    count = 0
    with open_private(out, "wb") as handle:
        target = pq.ParquetFile(parts[0]).schema_arrow if parts else schema(name, change_log)
        writer = pq.ParquetWriter(handle, target, compression="zstd")
        for part in parts:
            source = pq.ParquetFile(part)
            for group in range(source.num_row_groups):
                chunk = source.read_row_group(group)
                writer.write_table(chunk)
                count += chunk.num_rows
        writer.close()
        handle.flush()
        os.fsync(handle.fileno())
    return count


def sync_folder(folder: Path) -> None:
    """Make the renames in ``folder`` durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

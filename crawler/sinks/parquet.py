"""``--parquet DIR``: a change log of the three tables, one Parquet file per table per run
(``DIR/studies/<run>.parquet``, ``DIR/series/...``, ``DIR/instances/...``).

Crash safety as the NDJSON folder's: rows are streamed into a hidden checkpoint part per table
(``.<run>.<n>.tmp``, row groups written as they fill); ``flush`` closes each part (its footer
written, synced) and renames it ``.<run>.<n>.part`` before the state is committed. ``finish``
merges the run's parts into ``<run>.parquet`` row group by row group. A killed run leaves parts:
the next run of the same state and source merges them (what the state recorded as sent is in
them) and removes the ``.tmp`` files (rows the state never recorded; they are sent again).
Readers see only ``*.parquet`` files; hidden files are skipped by DuckDB's globs, Spark and
pyarrow datasets.

Each run's rows of a study replace the study's earlier rows (its studies row, series and
instances); a study gone from the PACS (``--prune``) is one ``delete`` row in ``studies``.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from ..errors import SinkError
from ..files import make_folder
from ..tables.arrow import ParquetFileWriter, merge, sync_folder
from ..tables.collect import Collector
from ..tables.rows import TABLES
from ..tables.tags import IncludeTag, TagValues
from .base import Resource

log = logging.getLogger("crawler")

_PART = re.compile(r"^\.(?P<run>[0-9TZ]+-run\d+-(?P<tag>[0-9a-f]{8}))\.(?P<n>\d{5})\.(?P<kind>part|tmp)$")


def run_tag(run_name: str) -> str:
    """The state-and-source tag that ends a run name (see sync.run_folder_name)."""
    return run_name.rsplit("-", 1)[-1]


class ParquetLog:
    """The Parquet change log of one run at ``folder``; ``run_name`` names its files."""

    def __init__(self, folder: Path, run_name: str, source: str, run_id: int, endpoints: Mapping[str, str] | None = None,
                 tags: Sequence[IncludeTag] = ()) -> None:
        self.folder = Path(folder)
        self.run_name = run_name
        self.collector = Collector(source, run_id, endpoints, tags=tags)
        self.checkpoints = 0
        self._writers: dict[str, ParquetFileWriter] = {}
        self.rows = dict.fromkeys(TABLES, 0)

    def _writer(self, name: str) -> ParquetFileWriter:
        writer = self._writers.get(name)
        if writer is None:
            try:
                make_folder(self.folder / name)
                writer = ParquetFileWriter(self._part(name, "tmp"), name, change_log=True, tags=self.collector.tags)
            except OSError as exc:
                raise SinkError(f"cannot write to {self.folder / name}: {exc.strerror}") from None
            self._writers[name] = writer
        return writer

    def _part(self, name: str, kind: str) -> Path:
        return self.folder / name / f".{self.run_name}.{self.checkpoints:05d}.{kind}"

    def add_tags(self, key: str, tags: TagValues) -> None:
        self.collector.tag_values[key] = tags

    def add(self, key: str, resources: Sequence[Resource]) -> None:
        rows = self.collector.rows(resources, "upsert", key)
        if rows is None:
            return
        try:
            for name in TABLES:
                table_rows = rows.table(name)
                if table_rows:
                    self._writer(name).add(table_rows)
        except OSError as exc:
            raise SinkError(f"cannot write to {self.folder}: {exc.strerror}") from None

    def delete(self, key: str, resource_type: str, resource_id: str) -> None:
        if resource_type == "ImagingStudy":
            self._writer("studies").add([self.collector.deletion(key, resource_id)])

    def error(self, body: bytes) -> None:
        """Errors go to the NDJSON folder and the log; the tables hold studies only."""

    def flush(self) -> dict[str, str]:
        if not self._writers:
            return {}
        try:
            for name, writer in self._writers.items():
                writer.close()
                self.rows[name] += writer.count
                os.replace(writer.path, self._part(name, "part"))
                sync_folder(self.folder / name)
        except OSError as exc:
            raise SinkError(f"cannot write to {self.folder}: {exc.strerror}") from None
        self._writers.clear()
        self.checkpoints += 1
        return {}

    def finish(self) -> str | None:
        self.flush()
        try:
            done = complete_run(self.folder, self.run_name)
        except OSError as exc:
            raise SinkError(f"cannot finish {self.folder}: {exc.strerror}") from None
        return str(self.folder) if done else None

    def abort(self) -> None:
        """Keep what the last checkpoint holds (the state knows it was sent), drop the rest."""
        for writer in self._writers.values():
            writer.discard()
            writer.path.unlink(missing_ok=True)
        self._writers.clear()
        try:
            complete_run(self.folder, self.run_name)
        except OSError as exc:
            log.warning("could not finish the Parquet files of run %s (the next run will): %s", self.run_name, exc.strerror)


def _parts(folder: Path) -> dict[tuple[str, str], list[tuple[str, Path]]]:
    """{(run, table): [(kind, path)]} of the hidden part files under ``folder``'s tables."""
    found: dict[tuple[str, str], list[tuple[str, Path]]] = {}
    for name in TABLES:
        table = folder / name
        if not table.is_dir():
            continue
        for path in sorted(table.iterdir()):
            match = _PART.match(path.name)
            if match:
                found.setdefault((match["run"], name), []).append((match["kind"], path))
    return found


def complete_run(folder: Path, run_name: str) -> bool:
    """Merge ``run_name``'s checkpoint parts into one ``<run>.parquet`` per table and remove them
    and its unfinished ``.tmp`` files. True when a file was written."""
    wrote = False
    for (run, name), files in _parts(folder).items():
        if run != run_name:
            continue
        parts = [path for kind, path in files if kind == "part"]
        final = folder / name / f"{run}.parquet"
        if parts and not final.exists():
            # a final file is renamed into place only once every part is in it: parts beside it
            # are left over from a kill while they were being removed
            staging = folder / name / f".{run}.parquet.tmp"
            merge(parts, staging, name, change_log=True)
            os.replace(staging, final)
            sync_folder(folder / name)
            wrote = True
        for _, path in files:
            path.unlink()
    return wrote


def recover(folder: Path, tag: str, current: str) -> list[str]:
    """Finish the runs of this state and source (``tag``) that were killed: their parts merged,
    their unfinished files removed. Other jobs' files (another tag) are left alone. Returns the
    runs finished."""
    runs = sorted({run for run, _ in _parts(folder) if run_tag(run) == tag and run != current})
    for run in runs:
        for name in TABLES:
            (folder / name / f".{run}.parquet.tmp").unlink(missing_ok=True)
        complete_run(folder, run)
    return runs

"""``export --format parquet``: the current snapshot of the three tables from what the state
holds, one file per table (``OUT/studies.parquet``, ``OUT/series.parquet``,
``OUT/instances.parquet``), written as ``.part`` and renamed when complete.

The snapshot has the Delta tables' columns (no ``change``); ``run_id`` and ``synced_at`` are
null, since the state does not keep which run wrote each resource.
"""

from __future__ import annotations

import os
from pathlib import Path

import orjson

from ..errors import SinkError
from ..files import make_folder
from ..state import State
from ..sync import check_out
from .arrow import ParquetFileWriter
from .rows import TABLES, study_rows


def export_tables(state_path: Path | str, out: Path) -> dict[str, int]:
    """Write the snapshot of every study the state holds into ``out`` (empty or new); returns
    the rows per table."""
    check_out(out)
    state = State.open(state_path)
    try:
        if out.exists() and any(out.iterdir()):
            raise SinkError(f"{out} is not empty")
        try:
            make_folder(out)
        except OSError as exc:
            raise SinkError(f"cannot write to {out}: {exc.strerror}") from None
        sources = {row.resource_id: source for source in state.source_names()
                   for row in state.iter_study_rows(source) if row.resource_id}
        endpoints: dict[str, str] = {}
        writers = {name: ParquetFileWriter(out / f"{name}.parquet.part", name, change_log=False) for name in TABLES}
        try:
            for resource_type, resource_id, body in state.iter_resources():
                if resource_type == "Endpoint":
                    address = orjson.loads(body).get("address")
                    if isinstance(address, str):
                        endpoints[f"Endpoint/{resource_id}"] = address
                elif resource_type == "ImagingStudy" and resource_id in sources:
                    rows = study_rows(orjson.loads(body), sources[resource_id], endpoints)
                    for name in TABLES:
                        writers[name].add(rows.table(name))
            for writer in writers.values():
                writer.close()
        except BaseException:
            for writer in writers.values():
                writer.discard()
                writer.path.unlink(missing_ok=True)
            raise
        for name, writer in writers.items():
            os.replace(writer.path, out / f"{name}.parquet")
        return {name: writer.count for name, writer in writers.items()}
    finally:
        state.close()

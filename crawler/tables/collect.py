"""What both table sinks do with what the sync hands them: a study's resources to rows, each
study stamped with the run and a time (strictly increasing within a run, so that the latest
rows of a study are the last ones even when a watch writes a study twice in one run)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any
from datetime import datetime, timedelta, timezone

import orjson

from ..sinks.base import Resource
from .rows import StudyRows, study_rows
from .tags import IncludeTag, TagValues, at_level


class Collector:
    def __init__(self, source: str, run_id: int, endpoints: Mapping[str, str] | None = None,
                 clock: Callable[[], datetime] = lambda: datetime.now(timezone.utc), tags: Sequence[IncludeTag] = ()) -> None:
        self.source = source
        self.tags = tuple(tags)
        self.tag_values: dict[str, TagValues] = {}
        """Values of ``tags`` handed over by ``TakesTags.add_tags``, by study, until its rows are made."""
        self.clock = clock
        self.run_id = run_id
        self.endpoints: dict[str, str] = dict(endpoints or {})
        self._last: datetime | None = None

    def stamp(self) -> datetime:
        now = self.clock()
        if self._last is not None and now <= self._last:
            now = self._last + timedelta(microseconds=1)
        self._last = now
        return now

    def rows(self, resources: Sequence[Resource], change: str | None, key: str | None = None) -> StudyRows | None:
        """The rows of the ImagingStudy among ``resources`` (None when only shared resources
        changed), with ``run_id``, ``synced_at``, for a change log ``change``, and the columns of
        the ``--include-tag`` tags (the values given for ``key``; null without)."""
        study = None
        for resource_type, resource_id, body in resources:
            if resource_type == "Endpoint":
                address = orjson.loads(body).get("address")
                if isinstance(address, str):
                    self.endpoints[f"Endpoint/{resource_id}"] = address
            elif resource_type == "ImagingStudy":
                study = orjson.loads(body)
        if study is None:
            return None
        rows = study_rows(study, self.source, self.endpoints)
        values = self.tag_values.pop(key, None) if key is not None else None
        if self.tags:
            self._add_tags(rows, values or TagValues())
        meta = self.meta(change)
        for row in (rows.study, *rows.series, *rows.instances):
            row.update(meta)
        return rows

    def _add_tags(self, rows: StudyRows, values: TagValues) -> None:
        def put(row: dict[str, Any], level: str, found: Mapping[str, Any]) -> None:
            for tag in at_level(self.tags, level):
                row[tag.column] = found.get(tag.column)

        put(rows.study, "study", values.study)
        for row in rows.series:
            put(row, "series", values.series.get(row["series_uid"], {}))
        for row in rows.instances:
            put(row, "instance", values.instances.get(row["sop_uid"], {}))

    def deletion(self, study_uid: str, resource_id: str) -> dict[str, object]:
        """The ``studies`` row of a change log that says a study is gone."""
        return {"source": self.source, "study_uid": study_uid, "fhir_id": resource_id, **self.meta("delete")}

    def meta(self, change: str | None) -> dict[str, object]:
        meta: dict[str, object] = {"run_id": self.run_id, "synced_at": self.stamp()}
        if change is not None:
            meta["change"] = change
        return meta

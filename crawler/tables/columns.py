"""The columns of the three tables, in a small type language of their own (docs/tables.md
describes each column). Pure: no Arrow library. ``schema`` turns them into pyarrow schemas (the
Parquet sink, the export); ``batches`` builds arro3 tables from them (the Delta sink), so that
writing Delta tables does not load pyarrow.

Types: ``string``, ``int16``, ``int32``, ``int64``, ``float64``, ``date32``, ``timestamp``
(microseconds, UTC), the structs ``code`` and ``performer`` (of string fields), and ``list<T>``.
``change_log`` columns (the Parquet sink) carry ``change`` (``upsert``/``delete``); the snapshot
columns (the Delta tables, ``export --format parquet``) do not.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .rows import KEYS, TABLES
from .tags import FIXED_COLUMNS, IncludeTag

STRUCTS: dict[str, tuple[str, ...]] = {
    "code": ("system", "code", "display", "text"),
    "performer": ("function", "type", "display", "identifier"),
}
"""The string fields of each struct type."""


@dataclass(frozen=True)
class Column:
    name: str
    type: str
    nullable: bool = True


def element(type_: str) -> str | None:
    """The element type of ``list<T>``; None for any other type."""
    return type_[5:-1] if type_.startswith("list<") and type_.endswith(">") else None


def _key(name: str) -> Column:
    return Column(name, "string", nullable=False)


_META = (Column("run_id", "int64"), Column("synced_at", "timestamp"))

SNAPSHOT: dict[str, tuple[Column, ...]] = {
    "studies": (
        _key("source"), _key("study_uid"),
        Column("fhir_id", "string"),
        Column("patient_id", "string"),
        Column("patient_id_issuer", "string"),
        Column("accession", "string"),
        Column("accession_issuer", "string"),
        Column("study_date", "date32"),
        Column("study_datetime", "timestamp"),
        Column("study_tz_offset", "int16"),
        Column("modalities", "list<string>"),
        Column("description", "string"),
        Column("n_series", "int32"),
        Column("n_instances", "int32"),
        Column("referrer", "string"),
        Column("procedure_codes", "list<code>"),
        Column("reason_codes", "list<code>"),
        Column("endpoint", "string"),
        *_META,
    ),
    "series": (
        _key("source"), _key("study_uid"), _key("series_uid"),
        Column("number", "int32"),
        Column("modality", "string"),
        Column("description", "string"),
        Column("body_site", "code"),
        Column("laterality", "code"),
        Column("n_instances", "int32"),
        Column("series_date", "date32"),
        Column("started", "timestamp"),
        Column("started_tz_offset", "int16"),
        Column("performers", "list<performer>"),
        *_META,
    ),
    "instances": (
        _key("source"), _key("study_uid"), _key("series_uid"), _key("sop_uid"),
        Column("sop_class_uid", "string"),
        Column("sop_class_name", "string"),
        Column("number", "int32"),
        Column("title", "string"),
        *_META,
    ),
}

CHANGE = Column("change", "string", nullable=False)


def columns(name: str, change_log: bool, tags: Sequence[IncludeTag] = ()) -> tuple[Column, ...]:
    """Table ``name``'s columns: the fixed ones, then the columns of the ``--include-tag`` tags at
    its level, then (``change_log``) ``change``, then ``run_id`` and ``synced_at``."""
    fixed = SNAPSHOT[name]
    extra = tuple(Column(tag.column, tag.arrow_type) for tag in tags if tag.table == name)
    return (*fixed[:-len(_META)], *extra, *((CHANGE,) if change_log else ()), *_META)


assert tuple(SNAPSHOT) == TABLES
assert all({c.name for c in columns(name, True)} == FIXED_COLUMNS[name] for name in TABLES)
assert all(tuple(c.name for c in SNAPSHOT[name][:len(KEYS[name])]) == KEYS[name] for name in TABLES)

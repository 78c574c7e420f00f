"""The Arrow schemas of the three tables (docs/tables.md describes each column).

``CHANGE_LOG`` schemas (the Parquet sink) carry ``change`` (``upsert``/``delete``); the snapshot
schemas (the Delta tables, ``export --format parquet``) do not. Importing this module imports
pyarrow: only the table sinks and the export do.
"""

from __future__ import annotations

from collections.abc import Sequence

import pyarrow as pa

from .rows import KEYS, TABLES
from .tags import FIXED_COLUMNS, IncludeTag

UTC_MICROS = pa.timestamp("us", tz="UTC")
CODE = pa.struct([("system", pa.string()), ("code", pa.string()), ("display", pa.string()), ("text", pa.string())])
PERFORMER = pa.struct([("function", pa.string()), ("type", pa.string()), ("display", pa.string()), ("identifier", pa.string())])

_META = [("run_id", pa.int64()), ("synced_at", UTC_MICROS)]

SNAPSHOT: dict[str, pa.Schema] = {
    "studies": pa.schema([
        pa.field("source", pa.string(), nullable=False),
        pa.field("study_uid", pa.string(), nullable=False),
        ("fhir_id", pa.string()),
        ("patient_id", pa.string()),
        ("patient_id_issuer", pa.string()),
        ("accession", pa.string()),
        ("accession_issuer", pa.string()),
        ("study_date", pa.date32()),
        ("study_datetime", UTC_MICROS),
        ("study_tz_offset", pa.int16()),
        ("modalities", pa.list_(pa.string())),
        ("description", pa.string()),
        ("n_series", pa.int32()),
        ("n_instances", pa.int32()),
        ("referrer", pa.string()),
        ("procedure_codes", pa.list_(CODE)),
        ("reason_codes", pa.list_(CODE)),
        ("endpoint", pa.string()),
        *_META,
    ]),
    "series": pa.schema([
        pa.field("source", pa.string(), nullable=False),
        pa.field("study_uid", pa.string(), nullable=False),
        pa.field("series_uid", pa.string(), nullable=False),
        ("number", pa.int32()),
        ("modality", pa.string()),
        ("description", pa.string()),
        ("body_site", CODE),
        ("laterality", CODE),
        ("n_instances", pa.int32()),
        ("series_date", pa.date32()),
        ("started", UTC_MICROS),
        ("started_tz_offset", pa.int16()),
        ("performers", pa.list_(PERFORMER)),
        *_META,
    ]),
    "instances": pa.schema([
        pa.field("source", pa.string(), nullable=False),
        pa.field("study_uid", pa.string(), nullable=False),
        pa.field("series_uid", pa.string(), nullable=False),
        pa.field("sop_uid", pa.string(), nullable=False),
        ("sop_class_uid", pa.string()),
        ("sop_class_name", pa.string()),
        ("number", pa.int32()),
        ("title", pa.string()),
        *_META,
    ]),
}

CHANGE_LOG: dict[str, pa.Schema] = {
    name: schema.insert(schema.get_field_index("run_id"), pa.field("change", pa.string(), nullable=False))
    for name, schema in SNAPSHOT.items()
}

_TAG_TYPES = {"date32": pa.date32(), "timestamp": UTC_MICROS, "int64": pa.int64(), "float64": pa.float64(), "string": pa.string()}


def tag_type(tag: IncludeTag) -> pa.DataType:
    """The Arrow type of an ``--include-tag`` column (see tables.tags)."""
    base = _TAG_TYPES[tag.arrow_type.removeprefix("list<").removesuffix(">")]
    return pa.list_(base) if tag.multiple else base


def with_tags(schema: pa.Schema, name: str, tags: Sequence[IncludeTag]) -> pa.Schema:
    """``schema`` (of table ``name``) with the columns of the tags at its level, after the fixed
    columns and before ``change``, ``run_id`` and ``synced_at``."""
    at = schema.get_field_index("change" if "change" in schema.names else "run_id")
    for tag in tags:
        if tag.table == name:
            schema = schema.insert(at, pa.field(tag.column, tag_type(tag)))
            at += 1
    return schema


assert tuple(SNAPSHOT) == TABLES
assert all(set(CHANGE_LOG[name].names) == FIXED_COLUMNS[name] for name in TABLES)
assert all(SNAPSHOT[name].names[:len(KEYS[name])] == list(KEYS[name]) for name in TABLES)

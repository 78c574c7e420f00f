"""The pyarrow schemas of the three tables, made from ``columns`` (the Parquet sink and the
export use them). Importing this module imports pyarrow."""

from __future__ import annotations

from collections.abc import Sequence

import pyarrow as pa

from .columns import STRUCTS, columns, element
from .rows import TABLES
from .tags import IncludeTag

_PLAIN = {
    "string": pa.string(), "int16": pa.int16(), "int32": pa.int32(), "int64": pa.int64(), "float64": pa.float64(),
    "date32": pa.date32(), "timestamp": pa.timestamp("us", tz="UTC"),
}


def arrow_type(type_: str) -> pa.DataType:
    inner = element(type_)
    if inner is not None:
        return pa.list_(arrow_type(inner))
    if type_ in STRUCTS:
        return pa.struct([(name, pa.string()) for name in STRUCTS[type_]])
    return _PLAIN[type_]


def schema(name: str, change_log: bool, tags: Sequence[IncludeTag] = ()) -> pa.Schema:
    """Table ``name``'s schema, with the columns of ``tags`` (``--include-tag``) at its level."""
    return pa.schema([pa.field(c.name, arrow_type(c.type), nullable=c.nullable) for c in columns(name, change_log, tags)])


SNAPSHOT: dict[str, pa.Schema] = {name: schema(name, False) for name in TABLES}
CHANGE_LOG: dict[str, pa.Schema] = {name: schema(name, True) for name in TABLES}

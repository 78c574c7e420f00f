"""Rows to an Arrow table, built column by column with arro3-core: the Arrow library deltalake
itself depends on. The Delta sink writes these, so a ``--delta`` run never loads pyarrow (about
40 MB of memory less, docs/tables.md)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import date, datetime, timedelta, timezone
from typing import Any

from arro3.core import Array, DataType, Field, Schema, Table, list_array, struct_array

from .columns import STRUCTS, columns, element
from .rows import Row
from .tags import IncludeTag

_EPOCH_DAY = date(1970, 1, 1).toordinal()
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_MICROSECOND = timedelta(microseconds=1)

_PLAIN = {
    "string": DataType.string(), "int16": DataType.int16(), "int32": DataType.int32(), "int64": DataType.int64(),
    "float64": DataType.float64(), "date32": DataType.date32(), "timestamp": DataType.timestamp("us", tz="UTC"),
}


def data_type(type_: str) -> DataType:
    """The Arrow type of a column type of ``columns`` (a list's element is named ``item``, as
    pyarrow names it)."""
    inner = element(type_)
    if inner is not None:
        return DataType.list(Field("item", data_type(inner), nullable=True))
    if type_ in STRUCTS:
        return DataType.struct([Field(name, DataType.string(), nullable=True) for name in STRUCTS[type_]])
    return _PLAIN[type_]


def _micros(value: datetime) -> int:
    """An instant as microseconds since the epoch (a time without a zone is taken as UTC, as
    pyarrow takes it)."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return (value - _EPOCH) // _MICROSECOND


def _mask(values: Sequence[Any]) -> Array | None:
    nulls = [value is None for value in values]
    return Array(nulls, DataType.bool()) if any(nulls) else None


def array(values: Sequence[Any], type_: str) -> Array:
    """``values`` (Python values of the rows, None for null) as an Arrow array of ``type_``."""
    inner = element(type_)
    if inner is not None:
        offsets = [0]
        flat: list[Any] = []
        for value in values:
            if value is not None:
                flat.extend(value)
            offsets.append(len(flat))
        return list_array(Array(offsets, DataType.int32()), array(flat, inner), type=data_type(type_), mask=_mask(values))
    if type_ in STRUCTS:
        names = STRUCTS[type_]
        children = [Array([None if value is None else value.get(name) for value in values], DataType.string()) for name in names]
        return struct_array(children, fields=[Field(name, DataType.string(), nullable=True) for name in names],
                            type=data_type(type_), mask=_mask(values))
    if type_ == "date32":
        days = [None if value is None else value.toordinal() - _EPOCH_DAY for value in values]
        return Array(days, DataType.int32()).cast(_PLAIN["date32"])
    if type_ == "timestamp":
        micros = [None if value is None else _micros(value) for value in values]
        return Array(micros, DataType.int64()).cast(_PLAIN["timestamp"])
    return Array(values, _PLAIN[type_])


def table(name: str, rows: Sequence[Row], tags: Sequence[IncludeTag] = ()) -> Table:
    """``rows`` of table ``name`` (missing columns are null) as an Arrow table of its snapshot
    columns and the ``--include-tag`` columns at its level."""
    spec = columns(name, False, tags)
    arrays = [array([row.get(column.name) for row in rows], column.type) for column in spec]
    schema = Schema([Field(column.name, data_type(column.type), nullable=column.nullable) for column in spec])
    return Table.from_arrays(arrays, schema=schema)

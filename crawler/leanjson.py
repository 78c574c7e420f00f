"""Decoding WADO-RS metadata answers, keeping only the attributes the mapping reads.

A study's metadata holds every attribute of every instance: about 4 kB of JSON per instance on
Orthanc, of which the mapping reads a fifth, and only a few per instance once its series is
known. Parsing it all into Python objects, and freeing them again, was most of the crawler's
CPU on the metadata path. Here msgspec checks the whole answer but only slices out each
attribute's JSON text; the texts kept are parsed with orjson, each distinct text once per
answer (a series' and the study's attributes repeat in every instance: their instances share one
parsed value, which the mapping never changes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgspec
import orjson

_DECODER = msgspec.json.Decoder(list[dict[str, msgspec.Raw]])


class NotDatasets(ValueError):
    """The answer is JSON, but not an array of objects."""


@dataclass(frozen=True)
class Selection:
    """What to keep of each object: ``keep`` of the first object of each group (objects whose
    ``group`` attribute has the same JSON text), ``keep_in_group`` of the others."""

    keep: frozenset[str]
    group: str | None = None
    keep_in_group: frozenset[str] = frozenset()


def datasets(body: bytes, selection: Selection) -> list[dict[str, Any]]:
    """The array of JSON objects in ``body``, each with only the keys ``selection`` keeps, in
    the order they came.

    Raises ``orjson.JSONDecodeError`` when ``body`` is not JSON (or nests deeper than the
    decoder goes) and ``NotDatasets`` when it is not an array of objects: either way the answer
    is refused, as after a full parse. The two may differ from a full parse's on a body that is
    both (``{"a": [1`` is "not an array" here), and what is dropped is checked for JSON syntax
    only, so a number too large for a double or an invalid UTF-8 sequence there passes."""
    try:
        items = _DECODER.decode(body)
    except msgspec.ValidationError as exc:
        raise NotDatasets(str(exc)) from None
    except (msgspec.DecodeError, RecursionError) as exc:
        raise orjson.JSONDecodeError(str(exc) or "nested too deeply", "", 0) from None
    loads = orjson.loads
    keep, group, keep_in_group = selection.keep, selection.group, selection.keep_in_group
    parsed: dict[bytes, Any] = {}
    groups: set[bytes | None] = set()
    out = []
    for item in items:
        tags = keep
        if group is not None:
            raw = item.get(group)
            key = bytes(raw) if raw is not None else None
            if key in groups:
                tags = keep_in_group
            else:
                groups.add(key)
        kept = {}
        for tag, raw in item.items():
            if tag in tags:
                text = bytes(raw)
                value = parsed.get(text)
                if value is None:
                    value = parsed[text] = loads(text)
                kept[tag] = value
        out.append(kept)
    return out

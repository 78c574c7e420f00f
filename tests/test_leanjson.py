"""The lean metadata decoder: the datasets it keeps are exactly what a full parse gives, the
mapping reads no attribute it drops (of the first instance of a series or of the others), and
bad answers fail as they did with a full parse."""

from __future__ import annotations

import json
import re
from pathlib import Path

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import crawler.mapping
from crawler import leanjson
from crawler.crawl import METADATA, fetch_study_metadata
from crawler.dicomjson import Tag
from crawler.errors import FatalQidoError
from crawler.mapping import StudyInput, map_resources
from crawler.mapping.tags import INSTANCE_TAGS, READ_TAGS
from crawler.http import Answer
from crawler.qido import page_of

FILTER = leanjson.Selection(READ_TAGS)
from fixtures.golden import OPTIONS, load, recordings

MAPPING = Path(crawler.mapping.__file__).parent


def test_every_attribute_the_mapping_names_is_kept():
    named = set()
    for path in MAPPING.glob("*.py"):
        named |= set(re.findall(r"\bTag\.(\w+)", path.read_text()))
    assert named, "no Tag found in the mapping modules"
    missing = sorted(name for name in named if getattr(Tag, name) not in READ_TAGS)
    assert not missing, f"attributes the mapping reads but the metadata decoder drops: {missing}"


def test_what_every_instance_keeps_is_read_from_the_first_too():
    assert INSTANCE_TAGS < READ_TAGS


@pytest.mark.parametrize("path", recordings(), ids=lambda p: p.stem)
def test_recorded_metadata_maps_the_same_when_decoded_lean(path):
    recording = load(path)
    full = map_resources(StudyInput(recording["study"], recording["metadata"]), OPTIONS).resources()
    for body in (orjson.dumps(recording["metadata"]), json.dumps(recording["metadata"], indent=2).encode()):
        lean = leanjson.datasets(body, METADATA)
        assert len(lean) == len(recording["metadata"])
        assert map_resources(StudyInput(recording["study"], lean), OPTIONS).resources() == full


SERIES_LEVEL = sorted(READ_TAGS - INSTANCE_TAGS)


@pytest.mark.parametrize("path", recordings(), ids=lambda p: p.stem)
@pytest.mark.parametrize("change", ["drop", "alter"])
def test_instances_that_disagree_with_the_first_of_their_series_map_the_same(path, change):
    """The mapping takes a series' attributes from its first instance: what later instances say
    about them (nothing, or something else) changes nothing, so the decoder may drop it."""
    recording = load(path)
    instances = recording["metadata"]
    seen = set()
    for instance in instances:
        series = json.dumps(instance.get(Tag.SeriesInstanceUID), sort_keys=True)
        if series in seen:
            for tag in SERIES_LEVEL:
                if change == "drop":
                    instance.pop(tag, None)
                else:
                    instance[tag] = {"vr": "LO", "Value": [f"other {tag}"]}
        seen.add(series)
    full = map_resources(StudyInput(recording["study"], instances), OPTIONS).resources()
    lean = leanjson.datasets(orjson.dumps(instances), METADATA)
    assert map_resources(StudyInput(recording["study"], lean), OPTIONS).resources() == full
    assert full == map_resources(StudyInput(recording["study"], load(path)["metadata"]), OPTIONS).resources()


def test_drops_what_is_not_kept_and_parses_repeated_text_once():
    series = {"vr": "LO", "Value": ["Axial"]}
    body = orjson.dumps([
        {Tag.SeriesDescription: series, Tag.SOPInstanceUID: {"vr": "UI", "Value": ["1.2.1"]}, "7FE00010": {"vr": "OW", "BulkDataURI": "x"}},
        {Tag.SeriesDescription: series, Tag.SOPInstanceUID: {"vr": "UI", "Value": ["1.2.2"]}, "00280010": {"vr": "US", "Value": [512]}},
    ])  # fmt: skip
    first, second = leanjson.datasets(body, FILTER)
    assert first == {Tag.SeriesDescription: series, Tag.SOPInstanceUID: {"vr": "UI", "Value": ["1.2.1"]}}
    assert second == {Tag.SeriesDescription: series, Tag.SOPInstanceUID: {"vr": "UI", "Value": ["1.2.2"]}}
    assert first[Tag.SeriesDescription] is second[Tag.SeriesDescription]


def test_kept_attributes_stay_in_the_order_they_came():
    tags = [Tag.StudyDate, Tag.SOPInstanceUID, Tag.PatientName, Tag.Modality, Tag.SeriesInstanceUID]
    for order in (tags, tags[::-1], tags[2:] + tags[:2]):
        item = {tag: {"vr": "CS", "Value": ["X"]} for tag in order}
        assert list(leanjson.datasets(orjson.dumps([item]), FILTER)[0]) == order


def test_later_instances_of_a_series_keep_their_own_attributes_only():
    def instance(series: str, number: int) -> dict:
        return {
            Tag.SeriesInstanceUID: {"vr": "UI", "Value": [series]},
            Tag.SeriesDescription: {"vr": "LO", "Value": [f"series {series}"]},
            Tag.SOPInstanceUID: {"vr": "UI", "Value": [f"{series}.{number}"]},
            Tag.InstanceNumber: {"vr": "IS", "Value": [number]},
        }

    items = [instance("1.1", 1), instance("1.2", 1), instance("1.1", 2), {Tag.SOPInstanceUID: {"vr": "UI", "Value": ["9"]}}, {}]
    got = leanjson.datasets(orjson.dumps(items), METADATA)
    assert got[0] == items[0] and got[1] == items[1] and got[3] == items[3]
    assert got[2] == {k: v for k, v in items[2].items() if k != Tag.SeriesDescription}
    assert got[4] == {}


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=4), children, max_size=3),
    max_leaves=8,
)
keys = st.sampled_from([Tag.StudyDate, Tag.SOPInstanceUID, Tag.PatientName, "00280010", "7FE00010", "", "é"])


@settings(max_examples=300, deadline=None)
@given(st.lists(st.dictionaries(keys, json_values, max_size=5), max_size=4), st.booleans())
def test_same_as_a_full_parse_filtered(items, pretty):
    body = json.dumps(items, indent=2 if pretty else None, ensure_ascii=False).encode()
    expected = [{k: v for k, v in item.items() if k in READ_TAGS} for item in orjson.loads(body)]
    assert leanjson.datasets(body, FILTER) == expected


@settings(max_examples=300, deadline=None)
@given(st.lists(st.dictionaries(keys, json_values, max_size=5), max_size=6))
def test_same_as_a_full_parse_selected_by_group(items):
    selection = leanjson.Selection(frozenset({Tag.StudyDate, Tag.SOPInstanceUID, Tag.PatientName, "é"}), Tag.PatientName, frozenset({Tag.SOPInstanceUID}))
    body = json.dumps(items, ensure_ascii=False).encode()
    expected, seen = [], set()
    for item in orjson.loads(body):
        key = json.dumps(item[Tag.PatientName], ensure_ascii=False) if Tag.PatientName in item else None
        keep = selection.keep_in_group if key in seen else selection.keep
        seen.add(key)
        expected.append({k: v for k, v in item.items() if k in keep})
    assert leanjson.datasets(body, selection) == expected


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"[{", "malformed JSON"),
        (b'[{"00080018": {"vr": "UI", "Value": ["1"]},}]', "malformed JSON"),
        (b'[{"00080018": "\xff"}]', "not UTF-8 at byte 15"),
        (b'{"00080018": {}}', "not a JSON array of objects"),
        (b"[1, 2]", "not a JSON array of objects"),
        (b'[{"00080018": {}}, []]', "not a JSON array of objects"),
        (b'[{"7FE00010": ' + b"[" * 5000 + b"]" * 5000 + b"}]", "malformed JSON"),
    ],
    ids=["truncated", "trailing-comma", "bad-utf8", "object", "numbers", "not-all-objects", "deep"],
)
def test_bad_answers_fail_as_with_a_full_parse(body, message):
    url = "http://pacs/dicom-web/studies/1.2.3/metadata"
    for keep in (None, FILTER, METADATA):
        with pytest.raises(FatalQidoError, match=message):
            page_of(Answer(200, {}, body, None), url, keep)


def test_live_study_metadata_is_decoded_lean(pacs, corpus_study_uids):
    from crawler.qido import QidoClient

    client = QidoClient(pacs.dicomweb)
    try:
        for uid in sorted(corpus_study_uids)[:6]:
            full = pacs.session.get(f"{pacs.dicomweb}/studies/{uid}/metadata", timeout=30).json()
            lean = fetch_study_metadata(client, uid)
            assert lean == leanjson.datasets(orjson.dumps(full), METADATA)
            assert lean[0] == {k: v for k, v in full[0].items() if k in READ_TAGS}
            assert all(set(item) <= READ_TAGS for item in lean)
    finally:
        client.close()

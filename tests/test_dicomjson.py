from __future__ import annotations

import pytest

from crawler import dicomjson as dj
from crawler.dicomjson import Tag
from crawler.mapping.dates import fhir_datetime
from zoneinfo import ZoneInfo


def el(vr: str, *values) -> dict:
    return {"vr": vr, "Value": list(values)} if values else {"vr": vr}


def test_numbers_as_numbers_or_strings():
    assert dj.integer({Tag.SeriesNumber: el("IS", 3)}, Tag.SeriesNumber) == 3
    assert dj.integer({Tag.SeriesNumber: el("IS", " 3 ")}, Tag.SeriesNumber) == 3
    assert dj.integer({Tag.SeriesNumber: el("IS", "3.0")}, Tag.SeriesNumber) == 3
    assert dj.integer({Tag.SeriesNumber: el("IS")}, Tag.SeriesNumber) is None
    assert dj.integer({}, Tag.SeriesNumber) is None
    with pytest.raises(ValueError, match="not a number"):
        dj.integer({Tag.SeriesNumber: el("IS", "three")}, Tag.SeriesNumber)
    with pytest.raises(ValueError, match="not an integer"):
        dj.integer({Tag.SeriesNumber: el("IS", {"x": 1})}, Tag.SeriesNumber)


def test_nulls_and_multi_values():
    ds = {Tag.ModalitiesInStudy: el("CS", "CT", None, "SR", "")}
    assert dj.strings(ds, Tag.ModalitiesInStudy) == ["CT", "SR"]
    assert dj.string({Tag.Modality: {"vr": "CS", "Value": [None]}}, Tag.Modality) is None


def test_person_names_object_and_bare_string():
    ds = {Tag.PatientName: el("PN", {"Alphabetic": "Doe^Jane^Q^Dr^Jr"})}
    assert dj.person_name(ds, Tag.PatientName) == "Dr Jane Q Doe, Jr"
    assert dj.person_name({Tag.PatientName: el("PN", "Doe^John")}, Tag.PatientName) == "John Doe"
    assert dj.person_name({Tag.PatientName: el("PN", {"Ideographic": "山田^太郎"})}, Tag.PatientName) == "太郎 山田"
    assert dj.person_names({Tag.OperatorsName: el("PN", {"Alphabetic": "A^B"}, {"Alphabetic": "C^D"})}, Tag.OperatorsName) == ["B A", "D C"]


def test_element_that_is_not_an_object_is_a_value_error():
    with pytest.raises(ValueError):
        dj.string({Tag.Modality: "CT"}, Tag.Modality)


def test_keyword_names_tags():
    assert dj.keyword(Tag.StudyDate) == "StudyDate (0008,0020)"
    assert dj.keyword("7FE00010") == "(7FE0,0010)"


@pytest.mark.parametrize(
    ("date", "time", "offset", "expected"),
    [
        ("20240131", None, None, "2024-01-31"),
        ("1997.04.24", None, None, "1997-04-24"),
        ("202401", None, None, "2024-01"),
        ("20240131", "101530.123", "+0100", "2024-01-31T10:15:30.123+01:00"),
        ("20240131", "1015", "-0500", "2024-01-31T10:15:00-05:00"),
        ("20240131", "10", "+0000", "2024-01-31T10:00:00+00:00"),
        ("20240131", "10:15:30", "+0530", "2024-01-31T10:15:30+05:30"),
        ("20240131", "101530", None, "2024-01-31T10:15:30+01:00"),
        ("20240731", "101530", None, "2024-07-31T10:15:30+02:00"),
        (None, "101530", None, None),
    ],
)
def test_fhir_datetime(date, time, offset, expected):
    assert fhir_datetime(date, time, offset, ZoneInfo("Europe/Berlin")) == expected


@pytest.mark.parametrize(("date", "time", "offset"), [("2024013", None, None), ("20241301", None, None), ("20240230", None, None), ("20240101", "25", None), ("20240101", "10", "+01")])
def test_fhir_datetime_rejects(date, time, offset):
    with pytest.raises(ValueError):
        fhir_datetime(date, time, offset, None)

"""The planner's windows, pinned value by value: what is asked, how a capped window is split and
whether a study is stray decide which studies a listing covers (docs/testing.md)."""

from __future__ import annotations

import pytest

from crawler.errors import ConfigError
from crawler.planner import FIRST_DAY, LAST_DAY, Window, parse_day, plan, tm_range


def test_parse_day_accepts_calendar_dates_only():
    assert parse_day("20240229", "--since") == "20240229"
    for bad in ["2024022", "202402290", "2024-02-29", "", "abcdefgh"]:
        with pytest.raises(ConfigError, match=r"^--since takes a date as YYYYMMDD, not "):
            parse_day(bad, "--since")
    with pytest.raises(ConfigError, match=r"^--until: 20230229 is not a calendar date$"):
        parse_day("20230229", "--until")
    with pytest.raises(ConfigError, match="not a calendar date"):
        parse_day("20241301", "--until")
    with pytest.raises(ConfigError, match="not a calendar date"):
        parse_day("20240132", "--until")


def test_plan_is_one_window_and_refuses_a_reversed_range():
    assert plan() == [Window()]
    assert plan("20200101", None) == [Window("20200101", None)]
    assert plan(None, "20200101") == [Window(None, "20200101")]
    assert plan("20200101", "20200101") == [Window("20200101", "20200101")]
    with pytest.raises(ConfigError, match=r"^the window starts \(20200102\) after it ends \(20200101\)$"):
        plan("20200102", "20200101")


def test_params_as_tags_and_keywords():
    assert Window().params() == [] and Window().params(keywords=True) == []
    assert Window("20200101", "20200131").params() == [("00080020", "20200101-20200131")]
    assert Window("20200101", "20200131").params(keywords=True) == [("StudyDate", "20200101-20200131")]
    assert Window("20200101", None).params() == [("00080020", "20200101-")]
    assert Window(None, "20200101").params() == [("00080020", "-20200101")]
    assert Window("20200101", "20200101").params() == [("00080020", "20200101")]
    assert Window("20200101", "20200101", 3661, 7322).params() == [("00080020", "20200101"), ("00080030", "010101-020202")]
    assert Window("20200101", "20200101", 0, 86399).params(keywords=True) == [("StudyDate", "20200101"), ("StudyTime", "000000-235959")]
    assert Window("20200101", "20200101", 3600, 7199).params() == [("00080020", "20200101"), ("00080030", "010000-015959")]
    assert Window("20200101", "20200101", 5, None).params() == [("00080020", "20200101")]
    assert Window("20200101", "20200101", None, 5).params() == [("00080020", "20200101")]


def test_keys_split_key_and_text():
    assert Window().keys == ()
    assert Window("20200101", None).keys == ("StudyDate",)
    assert Window("20200101", "20200101", 0, 10).keys == ("StudyDate", "StudyTime")
    assert Window("20200101", "20200101").split_key == "StudyTime"
    assert Window("20200101", "20200102").split_key == "StudyDate"
    assert Window(None, None).split_key == "StudyDate"
    assert str(Window()) == "all studies"
    assert str(Window("20200101", None)) == "StudyDate 20200101-"
    assert str(Window(None, "20200101")) == "StudyDate -20200101"
    assert str(Window("20200101", "20200102")) == "StudyDate 20200101-20200102"
    assert str(Window("20200101", "20200101")) == "StudyDate 20200101"
    assert str(Window("20200101", "20200101", 0, 59)) == "StudyDate 20200101 StudyTime 000000-000059"
    assert str(Window("20200101", "20200101", 0, None)) == "StudyDate 20200101"


def test_stray_names_the_key_a_returned_study_does_not_match():
    w = Window("20200105", "20200110")
    assert w.stray("20200104", None) == "StudyDate"
    assert w.stray("20200111", "120000") == "StudyDate"
    assert w.stray("20200105", None) is None
    assert w.stray("20200110", None) is None
    assert w.stray(None, None) is None
    assert Window().stray("19000101", None) is None
    assert Window("20200105", None).stray("20200104", None) == "StudyDate"
    assert Window("20200105", None).stray("20991231", None) is None
    assert Window(None, "20200105").stray("20200106", None) == "StudyDate"
    assert Window(None, "20200105").stray("19000101", None) is None
    day = Window("20200105", "20200105", 3600, 7199)
    assert day.stray("20200105", "005959") == "StudyTime"
    assert day.stray("20200105", "020000") == "StudyTime"
    assert day.stray("20200105", "010000") is None
    assert day.stray("20200105", "015959.9") is None
    assert day.stray("20200105", "015959") is None
    assert day.stray("20200105", "00") == "StudyTime"
    assert day.stray("20200105", "01") is None
    assert day.stray("20200105", "0059") == "StudyTime"
    assert day.stray("20200105", "02") == "StudyTime"
    assert Window("20200105", "20200105", 0, 3600).stray("20200105", "01") is None
    assert Window("20200105", "20200105", 7199, 86399).stray("20200105", "01") is None
    assert day.stray("20200105", "garbage") is None
    assert day.stray("20200105", None) is None
    assert Window("20200105", "20200105", 3600, None).stray("20200105", "000000") is None
    assert Window("20200105", "20200105", None, 3600).stray("20200105", "230000") is None


def test_split_halves_days_then_seconds():
    assert Window("20200101", "20200131").split() == [Window("20200101", "20200116"), Window("20200117", "20200131")]
    assert Window("20200101", "20200102").split() == [Window("20200101", "20200101"), Window("20200102", "20200102")]
    assert Window("20200101", "20200103").split() == [Window("20200101", "20200102"), Window("20200103", "20200103")]
    assert Window("20200228", "20200301").split() == [Window("20200228", "20200229"), Window("20200301", "20200301")]
    assert Window("20200101", "20200101").split() == [Window("20200101", "20200101", 0, 43199), Window("20200101", "20200101", 43200, 86399)]
    assert Window("20200101", "20200101", 10, 13).split() == [Window("20200101", "20200101", 10, 11), Window("20200101", "20200101", 12, 13)]
    assert Window("20200101", "20200101", 10, 11).split() == [Window("20200101", "20200101", 10, 10), Window("20200101", "20200101", 11, 11)]
    assert Window("20200101", "20200101", 10, 10).split() == []
    assert Window("20200101", "20200101", 10, None).split() == [Window("20200101", "20200101", 10, 43204), Window("20200101", "20200101", 43205, 86399)]
    assert Window("20200101", "20200101", None, 9).split() == [Window("20200101", "20200101", 0, 4), Window("20200101", "20200101", 5, 9)]
    assert Window("20200101", "20200101").splittable
    assert not Window("20200101", "20200101", 7, 7).splittable


def test_split_of_open_ends_bounds_them_with_edge_windows():
    assert Window().split() == [Window(None, "18991231"), Window(FIRST_DAY, LAST_DAY), Window("21000101", None)]
    assert Window("20200101", None).split() == [Window("20200101", LAST_DAY), Window("21000101", None)]
    assert Window(None, "20200101").split() == [Window(None, "18991231"), Window(FIRST_DAY, "20200101")]
    assert Window(None, "18991231").split() == []
    assert Window("21000101", None).split() == []
    assert Window(None, FIRST_DAY).split() == [Window(None, "18991231"), Window(FIRST_DAY, FIRST_DAY)]
    assert Window(LAST_DAY, None).split() == [Window(LAST_DAY, LAST_DAY), Window("21000101", None)]
    assert Window(None, "18991231").splittable is False


def test_split_at_a_day():
    assert Window("20200101", "20200131").split_at("20200110") == [Window("20200101", "20200110"), Window("20200111", "20200131")]
    assert Window(None, None).split_at("20201231") == [Window(None, "20201231"), Window("20210101", None)]


@pytest.mark.parametrize(
    "value, expected",
    [
        ("01", (3600, 7199)), ("0102", (3720, 3779)), ("010203", (3723, 3723)), ("010203.5", (3723, 3723)),
        (" 0102 ", (3720, 3779)), ("235959", (86399, 86399)), ("235960", (86399, 86399)), ("000000", (0, 0)),
        ("23", (82800, 86399)), ("2359", (86340, 86399)),
        ("24", None), ("2360", None), ("235961", None), ("1", None), ("123", None), ("12345", None), ("1234567", None),
        ("12a4", None), ("", None), (None, None), (".5", None), ("010203.5.5", (3723, 3723)),
    ],
)
def test_tm_range(value, expected):
    assert tm_range(value) == expected

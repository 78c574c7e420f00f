"""DICOM DA/TM + offset -> FHIR dateTime, with the PACS's zone when the data carries none."""

from __future__ import annotations

from datetime import datetime, timezone, tzinfo
from functools import lru_cache

from ..dicomjson import parse_date, parse_offset, parse_time

_LAST_DAY = {
    "01": "31", "02": "29", "03": "31", "04": "30", "05": "31", "06": "30",
    "07": "31", "08": "31", "09": "30", "10": "31", "11": "30", "12": "31",
}  # fmt: skip


def fhir_datetime(date: str | None, time: str | None, offset: str | None, zone: tzinfo | None) -> str | None:
    """FHIR ``dateTime`` for a DICOM date and time.

    A time needs a UTC offset in FHIR: it comes from Timezone Offset From UTC when the data has
    one, else from ``zone`` (the PACS's IANA zone), else from this machine's local zone. With no
    time the result keeps the date's own precision (``YYYY``, ``YYYY-MM`` or ``YYYY-MM-DD``).
    """
    if not date:
        return None
    if offset or not time:
        found = _plain_datetime(date, time, offset)
        if found is not None:
            return found
    year, month, day = parse_date(date)
    if month is None:
        return f"{year:04d}"
    if day is None:
        return f"{year:04d}-{month:02d}"
    try:
        datetime(year, month, day)
    except ValueError:
        raise ValueError("not a calendar date") from None
    day_text = f"{year:04d}-{month:02d}-{day:02d}"
    if not time:
        return day_text
    hour, minute, second, fraction = parse_time(time)
    local = datetime(year, month, day, hour, minute, second)
    if offset:
        minutes = parse_offset(offset)
    elif zone is not None:
        minutes = int(local.replace(tzinfo=zone).utcoffset().total_seconds() // 60)  # type: ignore[union-attr]
    else:
        minutes = int(local.astimezone().utcoffset().total_seconds() // 60)  # type: ignore[union-attr]
    sign = "-" if minutes < 0 else "+"
    minutes = abs(minutes)
    fraction_text = f".{fraction}" if fraction else ""
    return f"{day_text}T{hour:02d}:{minute:02d}:{second:02d}{fraction_text}{sign}{minutes // 60:02d}:{minutes % 60:02d}"


def _plain_datetime(date: str, time: str | None, offset: str | None) -> str | None:
    """The result for the usual forms (``YYYYMMDD``, ``HHMMSS[.F]``, ``+HHMM``) by slicing, or
    None for anything else (including invalid values), which the general parser then handles.
    Fields are compared as text: for ASCII digits of the same length that orders them as numbers."""
    day = _plain_date(date)
    if day is None or not time:
        return day
    size = len(time)
    if size < 6 or size > 13 or size == 7 or not (time.isascii() and time[:6].isdigit()):
        return None
    if size > 6 and (time[6] != "." or not time[7:].isdigit()):
        return None
    hour, minute, second = time[:2], time[2:4], time[4:6]
    if hour > "23" or minute > "59" or second > "60":
        return None
    suffix = _offset_suffix(offset) if offset else None
    if suffix is None:
        return None
    return f"{day}T{hour}:{minute}:{'59' if second == '60' else second}{time[6:]}{suffix}"


@lru_cache(maxsize=1024)
def _plain_date(date: str) -> str | None:
    """``YYYY-MM-DD`` for a valid ``YYYYMMDD``, else None. The studies of a crawl share dates."""
    if len(date) != 8 or not (date.isascii() and date.isdigit()):
        return None
    year, month, day = date[:4], date[4:6], date[6:]
    last_day = _LAST_DAY.get(month)
    if last_day is None or year == "0000" or not "01" <= day <= last_day:
        return None
    if month == "02" and day == "29" and not _leap(int(year)):
        return None
    return f"{year}-{month}-{day}"


def _leap(year: int) -> bool:
    return year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)


@lru_cache(maxsize=256)
def _offset_suffix(offset: str) -> str | None:
    """``+01:00`` for ``+0100``; None when ``offset`` is not a valid Timezone Offset From UTC."""
    try:
        minutes = parse_offset(offset)
    except ValueError:
        return None
    sign = "-" if minutes < 0 else "+"
    minutes = abs(minutes)
    return f"{sign}{minutes // 60:02d}:{minutes % 60:02d}"


def utc_now() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")

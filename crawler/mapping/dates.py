"""DICOM DA/TM + offset -> FHIR dateTime, with the PACS's zone when the data carries none."""

from __future__ import annotations

from datetime import datetime, timezone, tzinfo

from ..dicomjson import parse_date, parse_offset, parse_time


def fhir_datetime(date: str | None, time: str | None, offset: str | None, zone: tzinfo | None) -> str | None:
    """FHIR ``dateTime`` for a DICOM date and time.

    A time needs a UTC offset in FHIR: it comes from Timezone Offset From UTC when the data has
    one, else from ``zone`` (the PACS's IANA zone), else from this machine's local zone. With no
    time the result keeps the date's own precision (``YYYY``, ``YYYY-MM`` or ``YYYY-MM-DD``).
    """
    if not date:
        return None
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


def utc_now() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")



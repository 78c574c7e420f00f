"""Which queries cover the study space: StudyDate windows, split in halves under server caps.

Pure: windows are values, splitting is arithmetic on days and seconds. A window is split by
date down to single days, then a single day by StudyTime ranges down to one second.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date, timedelta

from .dicomjson import Tag
from .errors import ConfigError

_DAY = re.compile(r"^\d{8}$")
FIRST_DAY = "19000101"
LAST_DAY = "20991231"
DAY_SECONDS = 86400


def parse_day(text: str, option: str) -> str:
    """Validate a ``YYYYMMDD`` option value."""
    # the mutant 'text or "XXXX"' is equivalent: neither string is a date
    if not _DAY.match(text or ""):
        raise ConfigError(f"{option} takes a date as YYYYMMDD, not {text!r}")
    try:
        date(int(text[:4]), int(text[4:6]), int(text[6:]))
    except ValueError:
        raise ConfigError(f"{option}: {text} is not a calendar date") from None
    return text


def _day(text: str) -> date:
    return date(int(text[:4]), int(text[4:6]), int(text[6:]))


def _text(day: date) -> str:
    return day.strftime("%Y%m%d")


def _hms(seconds: int) -> str:
    return f"{seconds // 3600:02d}{seconds // 60 % 60:02d}{seconds % 60:02d}"


@dataclass(frozen=True)
class Window:
    """A StudyDate range (inclusive ``YYYYMMDD``; open ends unbounded) and, within a single day, a
    StudyTime range in seconds of the day (inclusive). No bounds at all: every study, including
    those without a StudyDate."""

    since: str | None = None
    until: str | None = None
    time_from: int | None = None
    time_to: int | None = None

    @property
    def unfiltered(self) -> bool:
        return self.since is None and self.until is None

    def params(self, keywords: bool = False) -> list[tuple[str, str]]:
        """The matching keys, as tags (``00080020``) or, with ``keywords``, as keywords
        (``StudyDate``): PS3.18 allows both, and some servers honour only one."""
        if self.unfiltered:
            return []
        date_key, time_key = ("StudyDate", "StudyTime") if keywords else (Tag.StudyDate, Tag.StudyTime)
        if self.since is not None and self.since == self.until:
            out = [(date_key, self.since)]
        else:
            out = [(date_key, f"{self.since or ''}-{self.until or ''}")]
        if self.time_from is not None and self.time_to is not None:
            out.append((time_key, f"{_hms(self.time_from)}-{_hms(self.time_to)}"))
        return out

    @property
    def keys(self) -> tuple[str, ...]:
        """The matching keys this window relies on, by keyword."""
        if self.unfiltered:
            return ()
        return ("StudyDate", "StudyTime") if self.time_from is not None else ("StudyDate",)

    @property
    def split_key(self) -> str:
        """The matching key that tells this window's parts apart."""
        return "StudyTime" if self.since is not None and self.since == self.until else "StudyDate"

    def stray(self, study_date: str | None, study_time: str | None) -> str | None:
        """Which matching key a study returned for this window does not match: "StudyDate",
        "StudyTime", or None. A study without a StudyDate (or, in a time range, without a
        readable StudyTime) is never stray: servers may match empty values."""
        if self.unfiltered or study_date is None:
            return None
        if (self.since is not None and study_date < self.since) or (self.until is not None and study_date > self.until):
            return "StudyDate"
        if self.time_from is None or self.time_to is None:
            return None
        seconds = tm_range(study_time)
        if seconds is not None and (seconds[1] < self.time_from or seconds[0] > self.time_to):
            return "StudyTime"
        return None

    def __str__(self) -> str:
        if self.unfiltered:
            return "all studies"
        text = f"StudyDate {self.since or ''}-{self.until or ''}" if self.since != self.until else f"StudyDate {self.since}"
        if self.time_from is not None and self.time_to is not None:
            text += f" StudyTime {_hms(self.time_from)}-{_hms(self.time_to)}"
        return text

    def split(self) -> list[Window]:
        """Smaller windows that together cover this one's dated studies; [] when it cannot be split.

        Open ends become bounded ranges (with unsplittable edge windows before FIRST_DAY and
        after LAST_DAY); a single day is split by StudyTime. Studies without a StudyDate (or,
        within a day, without a StudyTime) are only matched by the unsplit window.
        """
        if self.since is None or self.until is None:
            if (self.since is None and self.until is not None and self.until < FIRST_DAY) or (
                self.until is None and self.since is not None and self.since > LAST_DAY
            ):
                return []
            since = self.since or FIRST_DAY
            until = self.until or LAST_DAY
            out = []
            if self.since is None:
                out.append(Window(None, _text(_day(since) - timedelta(days=1))))
            out.append(Window(since, until))
            if self.until is None:
                # equivalent mutant: dropping the None (until defaults to None)
                out.append(Window(_text(_day(until) + timedelta(days=1)), None))
            return out
        first, last = _day(self.since), _day(self.until)
        if first < last:
            # equivalent mutant: '/ 2' (a date plus a timedelta counts whole days only)
            middle = first + (last - first) // 2
            return [Window(self.since, _text(middle)), Window(_text(middle + timedelta(days=1)), self.until)]
        low = 0 if self.time_from is None else self.time_from
        high = DAY_SECONDS - 1 if self.time_to is None else self.time_to
        if low >= high:
            return []
        half = (low + high) // 2
        return [Window(self.since, self.until, low, half), Window(self.since, self.until, half + 1, high)]

    def split_at(self, day: str) -> list[Window]:
        """Two windows: up to and including ``day``, and after it (open ends kept open)."""
        return [Window(self.since, day), Window(_text(_day(day) + timedelta(days=1)), self.until)]

    @property
    def splittable(self) -> bool:
        return bool(self.split())


def tm_range(value: str | None) -> tuple[int, int] | None:
    """The whole seconds of the day a TM value (``HH``, ``HHMM``, ``HHMMSS[.F]``) spans, first
    and last; None when unreadable."""
    if not value:
        return None
    # equivalent mutants: any maxsplit (or none) gives the same first part
    whole = value.split(".", 1)[0].strip()
    if len(whole) not in (2, 4, 6) or not whole.isdigit():
        return None
    # equivalent mutant: whole[4:7] is whole[4:6], as whole has at most 6 characters
    hours, minutes, seconds = int(whole[:2]), int(whole[2:4] or 0), int(whole[4:6] or 0)
    if hours > 23 or minutes > 59 or seconds > 60:
        return None
    first = hours * 3600 + minutes * 60 + min(seconds, 59)
    return first, first + {2: 3599, 4: 59, 6: 0}[len(whole)]


def plan(since: str | None = None, until: str | None = None) -> list[Window]:
    if since and until and since > until:
        raise ConfigError(f"the window starts ({since}) after it ends ({until})", setting="since")
    return [Window(since, until)]

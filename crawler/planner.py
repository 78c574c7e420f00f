"""Which queries cover the study space: StudyDate windows."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date

from .dicomjson import Tag
from .errors import ConfigError

_DAY = re.compile(r"^\d{8}$")


def parse_day(text: str, option: str) -> str:
    """Validate a ``YYYYMMDD`` option value."""
    if not _DAY.match(text or ""):
        raise ConfigError(f"{option} takes a date as YYYYMMDD, not {text!r}")
    try:
        date(int(text[:4]), int(text[4:6]), int(text[6:]))
    except ValueError:
        raise ConfigError(f"{option}: {text} is not a calendar date") from None
    return text


@dataclass(frozen=True)
class Window:
    """A StudyDate range (inclusive, ``YYYYMMDD``); open ends are unbounded. Both None: every study."""

    since: str | None = None
    until: str | None = None

    def params(self) -> list[tuple[str, str]]:
        if self.since is None and self.until is None:
            return []
        if self.since == self.until:
            return [(Tag.StudyDate, self.since or "")]
        return [(Tag.StudyDate, f"{self.since or ''}-{self.until or ''}")]

    def __str__(self) -> str:
        if self.since is None and self.until is None:
            return "all dates"
        return f"{self.since or '...'}-{self.until or '...'}"


def plan(since: str | None = None, until: str | None = None) -> list[Window]:
    if since and until and since > until:
        raise ConfigError(f"--since {since} is after --until {until}")
    return [Window(since, until)]

"""UIDs (DICOM PS3.5 9.1): the one place that says what a UID may look like.

Two rules. ``valid_uid`` is the standard's, which the audit reports against (``INVALID_UID``).
``path_uid`` is the check every UID passes before it is put into a request path: digits in
components separated by single dots, 1-64 characters. It is more tolerant than the standard
(real archives hold UIDs with leading zeros in a component, which the standard forbids), but
nothing it accepts can leave its path segment: no ``/``, ``?``, ``#``, ``%``, ``..`` or other
character a URL or a server would read as structure.
"""

from __future__ import annotations

import re

MAX_LENGTH = 64
_COMPONENT = re.compile(r"0|[1-9][0-9]*")
_PATH_SAFE = re.compile(r"[0-9]+(?:\.[0-9]+)*")
INVALID = f"not a valid UID (digits in components separated by single dots, 1-{MAX_LENGTH} characters)"


def valid_uid(value: object) -> bool:
    """PS3.5 9.1: 1-64 characters; components of digits separated by single dots; no empty
    component; no leading zero in a component of more than one digit."""
    if not isinstance(value, str) or not 1 <= len(value) <= MAX_LENGTH:
        return False
    return all(_COMPONENT.fullmatch(part) for part in value.split("."))


def path_uid(value: object) -> str:
    """``value`` when it may go into a request path as a UID; ValueError (without the value,
    which may be anything a server sent) otherwise."""
    if not isinstance(value, str) or not 1 <= len(value) <= MAX_LENGTH or not _PATH_SAFE.fullmatch(value):
        raise ValueError(INVALID)
    return value


def shown(value: str) -> str:
    """A UID for a message: as it is when it may go into a path, else its escaped form, cut short
    (what a server sent as a UID can hold anything, line breaks included)."""
    try:
        return path_uid(value)
    except ValueError:
        text = ascii(value)
        return text if len(text) <= 80 else text[:77] + "..."

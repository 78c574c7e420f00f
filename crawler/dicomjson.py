"""Typed readers of the DICOM JSON model (PS3.18 F.2), lenient towards what real servers send.

Every reader takes one dataset (a dict keyed by 8-hex-digit tags) and a tag, and returns plain
Python values. Known server mistakes (IS/DS as strings, a bare string for a PN, ``null`` inside a
value list, a missing ``Value``) are accepted; values of the wrong type raise ``ValueError`` with
a reason that never contains the value itself, so that callers can name the attribute without
leaking patient data.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

Dataset = Mapping[str, Any]


class Tag:
    """Tags used by the crawler, named by their DICOM keywords."""

    SpecificCharacterSet = "00080005"
    ImageType = "00080008"
    SOPClassUID = "00080016"
    SOPInstanceUID = "00080018"
    StudyDate = "00080020"
    SeriesDate = "00080021"
    StudyTime = "00080030"
    SeriesTime = "00080031"
    AccessionNumber = "00080050"
    IssuerOfAccessionNumberSequence = "00080051"
    QueryRetrieveLevel = "00080052"
    RetrieveAETitle = "00080054"
    InstanceAvailability = "00080056"
    Modality = "00080060"
    ModalitiesInStudy = "00080061"
    Manufacturer = "00080070"
    InstitutionName = "00080080"
    ReferringPhysicianName = "00080090"
    ReferringPhysicianIdentificationSequence = "00080096"
    TimezoneOffsetFromUTC = "00080201"
    StudyDescription = "00081030"
    ProcedureCodeSequence = "00081032"
    SeriesDescription = "0008103E"
    InstitutionalDepartmentName = "00081040"
    InstitutionalDepartmentTypeCodeSequence = "00081041"
    PerformingPhysicianName = "00081050"
    PerformingPhysicianIdentificationSequence = "00081052"
    OperatorsName = "00081070"
    OperatorIdentificationSequence = "00081072"
    ManufacturerModelName = "00081090"
    RetrieveURL = "00081190"
    AnatomicRegionSequence = "00082218"
    PatientName = "00100010"
    PatientID = "00100020"
    IssuerOfPatientID = "00100021"
    IssuerOfPatientIDQualifiersSequence = "00100024"
    PatientBirthDate = "00100030"
    PatientSex = "00100040"
    BodyPartExamined = "00180015"
    StudyInstanceUID = "0020000D"
    SeriesInstanceUID = "0020000E"
    StudyID = "00200010"
    SeriesNumber = "00200011"
    InstanceNumber = "00200013"
    Laterality = "00200060"
    NumberOfStudyRelatedSeries = "00201206"
    NumberOfStudyRelatedInstances = "00201208"
    NumberOfSeriesRelatedInstances = "00201209"
    ReasonForTheRequestedProcedure = "00401002"
    ReasonForRequestedProcedureCodeSequence = "0040100A"
    SpecimenIdentifier = "00400551"
    SpecimenUID = "00400554"
    SpecimenDescriptionSequence = "00400560"
    IssuerOfTheSpecimenIdentifierSequence = "00400562"
    DocumentTitle = "00420010"
    CodeValue = "00080100"
    CodingSchemeDesignator = "00080102"
    CodingSchemeVersion = "00080103"
    CodeMeaning = "00080104"
    LongCodeValue = "00080119"
    URNCodeValue = "00080120"
    LocalNamespaceEntityID = "00400031"
    UniversalEntityID = "00400032"
    UniversalEntityIDType = "00400033"
    PersonIdentificationCodeSequence = "00401101"


KEYWORDS: dict[str, str] = {
    value: name for name, value in vars(Tag).items() if not name.startswith("_") and isinstance(value, str)
}


def keyword(tag: str) -> str:
    """``StudyDate (0008,0020)`` for a tag, for messages."""
    tag = tag.upper()
    name = KEYWORDS.get(tag)
    label = f"({tag[:4]},{tag[4:]})"
    return f"{name} {label}" if name else label


def values(ds: Dataset, tag: str) -> list[Any]:
    """The attribute's values without ``null`` entries; ``[]`` when absent or empty."""
    element = ds.get(tag)
    if element is None:
        return []
    if type(element) is not dict and not isinstance(element, Mapping):
        raise ValueError(f"element is a {type(element).__name__}, not an object")
    raw = element.get("Value")
    if raw is None:
        return []
    if type(raw) is not list:
        return [raw]
    return [item for item in raw if item is not None] if None in raw else raw


def first(ds: Dataset, tag: str) -> Any:
    found = values(ds, tag)
    return found[0] if found else None


def _text(item: Any) -> str | None:
    if isinstance(item, bool):
        raise ValueError("value is a boolean, not a string")
    if isinstance(item, str):
        text = item.strip()
    elif isinstance(item, (int, float)):
        text = str(item)
    else:
        raise ValueError(f"value is a {type(item).__name__}, not a string")
    return text or None


def strings(ds: Dataset, tag: str) -> list[str]:
    """String values (numbers are accepted and turned into text); blanks dropped."""
    out = []
    for item in values(ds, tag):
        text = _text(item)
        if text is not None:
            out.append(text)
    return out


def string(ds: Dataset, tag: str) -> str | None:
    """The first non-blank value as text (what ``strings(ds, tag)[0]`` gives, without the lists)."""
    element = ds.get(tag)
    if element is None:
        return None
    if type(element) is not dict and not isinstance(element, Mapping):
        raise ValueError(f"element is a {type(element).__name__}, not an object")
    raw = element.get("Value")
    if raw is None:
        return None
    for item in raw if type(raw) is list else (raw,):
        if item is None:
            continue
        text = (item.strip() or None) if type(item) is str else _text(item)
        if text is not None:
            return text
    return None


def integer(ds: Dataset, tag: str) -> int | None:
    """IS/US/UL value as int, whether sent as a number or as a string."""
    item = first(ds, tag)
    if item is None:
        return None
    if isinstance(item, bool):
        raise ValueError("value is a boolean, not an integer")
    if isinstance(item, int):
        return item
    if isinstance(item, float):
        if item.is_integer():
            return int(item)
        raise ValueError("value is not a whole number")
    if isinstance(item, str):
        text = item.strip()
        if not text:
            return None
        try:
            return int(text)
        except ValueError:
            try:
                number = float(text)
            except ValueError:
                raise ValueError("value is not a number") from None
            if number.is_integer():
                return int(number)
            raise ValueError("value is not a whole number") from None
    raise ValueError(f"value is a {type(item).__name__}, not an integer")


def sequence(ds: Dataset, tag: str) -> list[Dataset]:
    items = values(ds, tag)
    for item in items:
        if not isinstance(item, Mapping):
            raise ValueError(f"sequence item is a {type(item).__name__}, not an object")
    return items


def person_names(ds: Dataset, tag: str) -> list[str]:
    """Readable names ("Given Middle Family") from PN values.

    Accepts the PS3.18 object form (Alphabetic, else Ideographic, else Phonetic) and the bare
    string some servers send instead.
    """
    out = []
    for item in values(ds, tag):
        if isinstance(item, Mapping):
            raw = item.get("Alphabetic") or item.get("Ideographic") or item.get("Phonetic")
            if raw is None:
                continue
            if not isinstance(raw, str):
                raise ValueError(f"name component group is a {type(raw).__name__}, not a string")
        elif isinstance(item, str):
            raw = item
        else:
            raise ValueError(f"value is a {type(item).__name__}, not a person name")
        name = readable_name(raw)
        if name:
            out.append(name)
    return out


def person_name(ds: Dataset, tag: str) -> str | None:
    found = person_names(ds, tag)
    return found[0] if found else None


def readable_name(pn: str) -> str:
    """``Family^Given^Middle^Prefix^Suffix`` -> ``Prefix Given Middle Family, Suffix``."""
    family, given, middle, prefix, suffix = (pn.partition("=")[0] + "^^^^").split("^")[:5]
    name = " ".join(filter(None, (prefix.strip(), given.strip(), middle.strip(), family.strip())))
    suffix = suffix.strip()
    if suffix:
        name = f"{name}, {suffix}" if name else suffix
    return name


_DATE = re.compile(r"^([0-9]{4})(?:\.?([0-9]{2})(?:\.?([0-9]{2}))?)?$")
_TIME = re.compile(r"^([0-9]{2})(?::?([0-9]{2})(?::?([0-9]{2})(?:\.([0-9]{1,6}))?)?)?$")
_OFFSET = re.compile(r"^([+-])([0-9]{2})([0-9]{2})$")
_UID = re.compile(r"^[0-9A-Za-z.\-]{1,64}$")


def parse_date(text: str) -> tuple[int, int | None, int | None]:
    """DA (also the old ``1997.04.24`` form and reduced precision) -> (year, month, day)."""
    match = _DATE.match(text.strip())
    if not match:
        raise ValueError("not a DICOM date")
    year, month, day = (int(g) if g else None for g in match.groups())
    if not year:
        raise ValueError("year 0000 is not a date")
    if month is not None and not 1 <= month <= 12:
        raise ValueError("month out of range")
    if day is not None and not 1 <= day <= 31:
        raise ValueError("day out of range")
    return year, month, day


def parse_time(text: str) -> tuple[int, int, int, str]:
    """TM (also the old ``hh:mm:ss`` form, missing minutes or seconds) -> (h, m, s, fraction)."""
    match = _TIME.match(text.strip())
    if not match:
        raise ValueError("not a DICOM time")
    hour, minute, second, fraction = match.groups()
    h, m, s = int(hour), int(minute or 0), int(second or 0)
    if h > 23 or m > 59 or s > 60:
        raise ValueError("time out of range")
    return h, m, min(s, 59), fraction or ""


def parse_offset(text: str) -> int:
    """Timezone Offset From UTC ``+hhmm`` / ``-hhmm`` -> minutes east of UTC."""
    match = _OFFSET.match(text.strip())
    if not match:
        raise ValueError("not a UTC offset (+hhmm or -hhmm)")
    sign, hours, minutes = match.groups()
    total = int(hours) * 60 + int(minutes)
    if int(minutes) > 59 or total > 14 * 60:
        raise ValueError("UTC offset out of range")
    return -total if sign == "-" else total


def uid(ds: Dataset, tag: str) -> str | None:
    """A UID value (trailing NUL padding removed); ValueError when it cannot be one."""
    value = string(ds, tag)
    if value is None:
        return None
    value = value.rstrip("\x00").strip()
    if not value:
        return None
    if not _UID.match(value):
        raise ValueError("not a valid UID (digits and dots, at most 64 characters)")
    return value


def code(ds: Dataset, tag: str) -> str | None:
    """A code value with runs of whitespace collapsed to one space (as FHIR codes require)."""
    value = string(ds, tag)
    return " ".join(value.split()) or None if value is not None else None


def codes(ds: Dataset, tag: str) -> list[str]:
    return [c for v in strings(ds, tag) if (c := " ".join(v.split()))]


def count(ds: Dataset, tag: str) -> int | None:
    """A non-negative integer that fits FHIR's unsignedInt (0 .. 2**31-1)."""
    value = integer(ds, tag)
    if value is not None and not 0 <= value <= 2**31 - 1:
        raise ValueError("out of range for a count or number (0 .. 2147483647)")
    return value


def uid_list(items: Iterable[Dataset], tag: str) -> list[str]:
    return [uid for item in items if (uid := string(item, tag))]


# --- listings that do not decode as a whole ------------------------------------------------

UNREADABLE = "unreadable"
"""Key of the stand-in for a listing entry that could not be decoded: ``{UNREADABLE: reason}``,
with the entry's Study Instance UID under its tag when it could be read from the raw bytes."""
REPAIRED = "repaired"
"""Key added to a listing entry whose text was not UTF-8 and was decoded with U+FFFD in place of
the bad bytes: the byte offset of the first one in the answer."""

_TOKENS = re.compile(rb'"(?:[^"\\]|\\.)*"?|[\[\]{}]', re.S)
_RAW_UID = re.compile(rb'"0020000[dD]"\s*:\s*\{[^{}]*?"Value"\s*:\s*\[\s*"([0-9.]{1,64})"')


def json_problem(body: bytes, exc: ValueError) -> str:
    """What is wrong with a body that did not decode, without its content: ``not UTF-8 at
    byte N`` for an encoding problem, else ``malformed JSON`` (at the parser's position)."""
    try:
        body.decode("utf-8")
    except UnicodeDecodeError as bad:
        return f"not UTF-8 at byte {bad.start}"
    position = getattr(exc, "pos", None)
    return f"malformed JSON near byte {position}" if position else "malformed JSON"


def _entry(body: bytes, start: int, end: int) -> dict[str, Any]:
    import orjson

    raw = body[start:end]
    try:
        item = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as bad:
            try:
                item = orjson.loads(raw.decode("utf-8", errors="replace"))
            except orjson.JSONDecodeError:
                pass
            else:
                if type(item) is dict:
                    item[REPAIRED] = start + bad.start
                    return item
            return _unreadable(raw, f"not UTF-8 at byte {start + bad.start}")
        return _unreadable(raw, f"malformed JSON near byte {start + (getattr(exc, 'pos', 0) or 0)}")
    return item if type(item) is dict else _unreadable(raw, f"not a JSON object at byte {start}")


def _unreadable(raw: bytes, reason: str) -> dict[str, Any]:
    found = _RAW_UID.search(raw)
    entry: dict[str, Any] = {UNREADABLE: reason}
    if found:
        entry[Tag.StudyInstanceUID] = {"vr": "UI", "Value": [found.group(1).decode("ascii")]}
    return entry


def salvage_listing(body: bytes) -> list[dict[str, Any]] | None:
    """The entries of a listing answer that does not decode as a whole, each decoded alone:
    an entry whose only fault is bytes that are not UTF-8 is decoded with U+FFFD in their place
    (marked ``REPAIRED``); an entry that is not JSON becomes an ``UNREADABLE`` stand-in (with its
    Study Instance UID when the raw bytes show one). None when the answer is not a JSON array at
    all, or ends inside it (an answer cut short is refused whole, as before)."""
    depth = 0
    start: int | None = None
    last = 0
    out: list[dict[str, Any]] = []

    def between(end: int, first: bool) -> None:
        """What lies between two entries must be a comma (nothing before the first)."""
        gap = body[last:end].strip()
        if gap != (b"" if first else b","):
            out.append(_unreadable(b"", f"something other than an object near byte {last}"))

    for match in _TOKENS.finditer(body):
        token = match.group()[:1]
        if token == b'"':
            if depth == 0:
                return None
            continue
        if token in b"[{":
            if depth == 0:
                if token != b"[":
                    return None
                last = match.end()
            if depth == 1:
                between(match.start(), not out)
                start = match.start()
            depth += 1
            continue
        depth -= 1
        if depth == 1 and start is not None:
            out.append(_entry(body, start, match.end()))
            start, last = None, match.end()
        elif depth <= 0:
            if depth == 0:
                gap = body[last:match.start()].strip()
                if gap:
                    out.append(_unreadable(b"", f"something other than an object near byte {last}"))
            break
    if depth != 0 or (not out and body.strip()[:1] != b"["):
        return None
    return out

"""dcm4chee-arc's study receive time as a change source: a QIDO-RS study search for the studies
received since the cursor (see the package's docstring).

What the archive does, from dcm4chee-arc-light's sources (github.com/dcm4che/dcm4chee-arc-light;
its conformance statement, dcm4chee-arc-cs, lists no private matching keys) and dcm4che's:

- ``StudyReceiveDateTime`` is a query parameter of the study search of its own
  (dcm4chee-arc-query-util ``QueryAttributes``), stored as the private attribute Study Receive
  Date Time, tag ``(7777,xx20)`` of the private creator ``DCM4CHEE Archive 5``, VR DT
  (dcm4che-dict ``arcelements.xml``; the UI's ``dcm4chee-arc-dict-names.js``). It is matched
  against the study's ``created_time`` (``QueryBuilder``), which is set once, when the study's
  first instance is stored, and never updated (entity ``Study``: ``@PrePersist``,
  ``updatable = false``).
- The value is a DICOM range split at its first ``-`` (dcm4che ``Attributes.splitRange``):
  ``A-B`` matches ``A <= t <= B``, ``A-`` matches ``t >= A``, ``-B`` matches ``t <= B`` and a
  single value ``t = A``; the start is floored and the end ceiled to their precision. A value
  without a UTC offset is read in the archive's time zone. A value that does not parse is
  logged and ignored: the search then matches every study (``Attributes.getDateRange``). Since
  a negative UTC offset (``-0500``) holds a ``-``, the lower bound is always sent in UTC
  (``+0000``), or, when the archive answers times without an offset, as it answered them.
- The search returns the archive's private study attributes only when a key of that private
  creator was given or ``includefield=all`` (``QueryAttributes.isIncludePrivate``), filtered to
  the return keys, which include the query keys: the ``StudyReceiveDateTime`` key itself makes
  ``(7777,xx20)`` come back, with the creator ``(7777,0010)``, formatted to milliseconds with the
  archive's UTC offset (``AbstractQuery.setDTwTZ``; older versions answer without the offset).
  The reader finds the creator's block rather than assuming ``xx`` = ``10``.
- Study Update Date Time ``(7777,xx21)`` (the study's ``updated_time``) is returned with
  ``includefield=all`` but is no matching key; nor is the standard Study Update DateTime
  ``(0008,041F)`` (PS3.6: DT, VM 1), which neither dcm4chee-arc's query builder nor the study
  matching attributes of its conformance statement (dcm4chee-arc-cs
  ``study-attribute-matching.csv``) name. A key the archive does not match on is kept as a
  return key and ignored, so a search on it would answer every study: it is not sent. Changes
  to a study received before the cursor (a series added, a corrected name) and deletions are
  therefore not seen here; the weekly ``--full`` run finds them.
- A search that matches more studies than the archive's Query Max Number of Results (off by
  default) is refused with 413 whatever the limit asked (dcm4chee-arc-qido ``QidoRS``): after a
  busy spell the span is then read in halves (closed ranges ``A-B``), so that the read does not
  fail every run from then on.

The cursor is the newest receive time seen, as text in the form sent back (UTC with ``+0000``,
or the archive's local time when it answers without an offset). Each read asks for
``StudyReceiveDateTime=<cursor - OVERLAP>-`` (open-ended: the archive's clock, not this
machine's, decides what "now" is), so a study whose receive time was stamped before the cursor
but that became visible only later (its storage transaction still open during the last read) is
not missed; the studies read twice are skipped by the run as unchanged. A first read (no
cursor) asks nothing and starts from this machine's clock: the first run lists everything, and
until the first study arrives the two clocks must agree within ``OVERLAP``. A receive time past
this machine's clock plus ``OVERLAP`` (an archive's clock that jumped ahead) names its study but
carries the cursor no further than that, so that it cannot pass over the studies received after.
"""

from __future__ import annotations

import logging
import re
from datetime import datetime, timedelta, timezone
from typing import Any

from ..errors import FatalQidoError
from ..http import redact
from ..qido import QidoClient
from ..uids import path_uid
from .model import Change, ChangesRead

log = logging.getLogger("crawler")

OVERLAP = timedelta(minutes=5)
"""How far before the cursor each read starts again."""
DCM4CHEE_PAGE = 100
PRIVATE_CREATOR = "DCM4CHEE Archive 5"
RECEIVE_KEY = "StudyReceiveDateTime"
RECEIVE_ELEMENT = 0x20
"""Study Receive Date Time is ``(7777,xx20)`` in the block the private creator reserves."""
_TICK = timedelta(milliseconds=1)
"""The archive's precision: the sides of split spans are this far apart."""
_DT = re.compile(r"(\d{4})(\d{2})?(\d{2})?(\d{2})?(\d{2})?(\d{2})?(?:\.(\d{1,6}))?([+-]\d{4})?")
_CREATOR = re.compile(r"777700[1-9A-F][0-9A-F]", re.IGNORECASE)


def parse_dt(text: str) -> datetime | None:
    """A DICOM DT (PS3.5 6.2: ``YYYY[MM[DD[HH[MM[SS[.F{1,6}]]]]]][&ZZXX]``) as a datetime: in UTC
    when it carries an offset, naive (the archive's local time) when it does not; None when it
    is no DT."""
    found = _DT.fullmatch(text.strip())
    if found is None:
        return None
    year, month, day, hour, minute, second, fraction, zone = found.groups()
    try:
        moment = datetime(int(year), int(month or 1), int(day or 1), int(hour or 0), int(minute or 0), int(second or 0),
                          int((fraction or "0").ljust(6, "0")))
        if zone is None:
            return moment
        offset = timedelta(hours=int(zone[1:3]), minutes=int(zone[3:5]))
        return (moment - offset if zone[0] == "+" else moment + offset).replace(tzinfo=timezone.utc)
    except ValueError:
        return None


def format_dt(moment: datetime) -> str:
    """``YYYYMMDDHHMMSS.FFF`` (milliseconds, as the archive stores them), with ``+0000`` when
    ``moment`` is in UTC; floored, so that a lower bound never moves past a receive time."""
    text = moment.strftime("%Y%m%d%H%M%S.%f")[:-3]
    return text + "+0000" if moment.tzinfo is not None else text


def receive_text(item: dict[str, Any]) -> str | None:
    """The Study Receive Date Time of one study of the answer as written (``""`` when absent),
    found under the block its private creator reserves; None when the answer carries no block
    of that creator (the archive did not take the key)."""
    for tag, element in item.items():
        if not _CREATOR.fullmatch(tag) or not isinstance(element, dict):
            continue
        values = element.get("Value")
        if not isinstance(values, list) or not values or not isinstance(values[0], str) or values[0].strip() != PRIVATE_CREATOR:
            continue
        received = item.get(f"7777{int(tag[6:8], 16):02X}{RECEIVE_ELEMENT:02X}")
        value = received.get("Value") if isinstance(received, dict) else None
        return value[0] if isinstance(value, list) and value and isinstance(value[0], str) else ""
    return None


def _study_uid(item: dict[str, Any]) -> str | None:
    element = item.get("0020000D")
    values = element.get("Value") if isinstance(element, dict) else None
    if not isinstance(values, list) or not values or not isinstance(values[0], str):
        return None
    try:
        return path_uid(values[0].strip())
    except ValueError:
        return None


def _newer(moment: datetime, than: datetime | None) -> bool:
    """Comparable times compare; a time the archive stamped replaces one of the other kind
    (UTC against the archive's local time), which only a first cursor from this machine's clock
    and an archive answering without offsets can bring together."""
    if than is None or (moment.tzinfo is None) != (than.tzinfo is None):
        return True
    return moment > than


def dcm4chee_changes(client: QidoClient, base: str, cursor: str | None, page_size: int = DCM4CHEE_PAGE) -> ChangesRead:
    """The studies dcm4chee-arc received since ``cursor`` (less OVERLAP), by a paged study search
    through ``client`` (``base``: the archive's QIDO-RS base, the client's). ``cursor`` None: where
    the archive stands now, with no changes. A stored cursor that is no DT (not one this reader
    wrote) makes the run list everything once. An answer that names studies without their
    receive time is no dcm4chee-arc answer to this search (it matched every study): a
    FatalQidoError, and the cursor stays."""
    now = datetime.now(timezone.utc)
    if cursor is None:
        return ChangesRead((), format_dt(now))
    start = parse_dt(cursor)
    if start is None:
        return ChangesRead((), format_dt(now), reset=True)
    read = _Read(client, page_size)
    read.newest = start
    horizon = _horizon(start, now)
    read.since(start - OVERLAP, horizon)
    newest = read.newest
    if newest is not None and (newest.tzinfo is None) == (horizon.tzinfo is None) and newest > horizon:
        log.warning("dcm4chee: a study received at %s by the archive's clock, after this machine's (%s): the cursor stops there", format_dt(newest), format_dt(horizon))
        newest = horizon
    return ChangesRead(tuple(Change(uid) for uid in read.changes), format_dt(newest) if newest is not None else cursor)


def _horizon(start: datetime, now: datetime) -> datetime:
    """A time no receive time the archive has stamped yet is past, in the form of ``start``:
    this machine's clock plus OVERLAP (for a clock running ahead), or for an archive that writes
    its local time without an offset, UTC plus 14 hours (the largest offset) plus OVERLAP."""
    if start.tzinfo is not None:
        return now + OVERLAP
    return now.replace(tzinfo=None) + timedelta(hours=14) + OVERLAP


class _Read:
    """One read: the studies named and the newest receive time seen, over one or more searches."""

    def __init__(self, client: QidoClient, page_size: int) -> None:
        self.client, self.page_size = client, page_size
        self.changes: dict[str, None] = {}
        self.newest: datetime | None = None

    def since(self, low: datetime, horizon: datetime) -> None:
        """Receive times from ``low`` on. dcm4chee-arc refuses (413) a search that matches more
        studies than its Query Max Number of Results, whatever the limit asked (QidoRS): then
        the span up to ``horizon`` is read in halves, and what lies beyond it by one more search."""
        try:
            self.search(f"{format_dt(low)}-")
        except FatalQidoError as exc:
            if exc.status != 413 or low >= horizon:
                raise
            self.span(low, horizon)
            self.search(f"{format_dt(horizon + _TICK)}-")

    def span(self, low: datetime, high: datetime) -> None:
        try:
            self.search(f"{format_dt(low)}-{format_dt(high)}")
        except FatalQidoError as exc:
            if exc.status != 413 or high - low < 2 * _TICK:
                raise
            middle = low + (high - low) / 2
            middle -= timedelta(microseconds=middle.microsecond % 1000)
            self.span(low, middle)
            self.span(middle + _TICK, high)

    def search(self, value: str) -> None:
        params = [(RECEIVE_KEY, value)]
        for page in self.client.iter_pages("changes", "studies", params, self.page_size):
            for item in page.items:
                text = receive_text(item)
                if text is None:
                    shown = redact(self.client.url("studies", params))
                    raise FatalQidoError(f"answer from {shown}: a study without its {RECEIVE_KEY}: the server does not match on it (is it dcm4chee-arc?)", url=shown)
                uid = _study_uid(item)
                if uid is not None:
                    self.changes[uid] = None
                received = parse_dt(text)
                if received is not None and _newer(received, self.newest):
                    self.newest = received

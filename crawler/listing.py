"""Listing every study of the PACS: windows paged, caps detected, capped windows split.

Servers cap search results in different ways: a Warning header (dcm4chee's "There are N
additional results that can be requested", or the 2013 text "The number of results exceeded the
maximum supported by the server"), a 413, a 400 past an offset limit, an offset they ignore, or
silently (Orthanc with ``LimitFindResults`` returns N+1 results for any larger match). A window
that hits a cap is split (see planner.Window.split) until every window is under it. Silent caps
cannot be seen in one answer, so the first window of a run is checked by listing its two halves
(split at the median StudyDate seen) for a study it did not return; the cap learned that way
applies to every later window. The state keeps both facts per source, so later runs skip the
check while the listing stays within what was verified.

Servers may also ignore what they are asked. Every study a filtered window returns is checked
against the window (StudyDate, and StudyTime in a time range): a server that ignores the filter
would otherwise look capped in every part and be split down to single seconds, from 1900 to
2099. On the first stray study the other form of the matching keys is tried once (keywords
``StudyDate=`` instead of tags ``00080020=``; PS3.18 allows both and some servers honour one),
and kept if it works: its answers match, and the day of a study the server just showed, asked
for in that form, lists that study (a server may answer a form it does not know with nothing,
which would otherwise pass for an empty window). Otherwise the window is not split any further
and is reported incomplete, and windows relying on the ignored key are not listed. A page longer than ``limit``
(a server that ignores it) is the server's whole answer, not a sign of a cap. Warnings that could
recur per window are bounded (see notices).
"""

from __future__ import annotations

import logging
import re
from array import array
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from . import dicomjson as dj
from .crawl import STUDY_FIELDS, includefields
from .dicomjson import Tag
from .errors import FatalQidoError, QidoError, SourceUnreachable
from .notices import Notices
from .planner import Window
from .qido import QidoClient
from .uids import shown

log = logging.getLogger("crawler")
TRUNCATION = re.compile(r"additional results|exceeded the maximum", re.IGNORECASE)
VERIFY_MAX = 50_000


_RANK = {None: 0, "StudyTime": 1, "StudyDate": 2}


@dataclass
class Filters:
    """How the source takes the StudyDate/StudyTime matching keys, learned during a run."""

    keywords: bool = False
    """Send the keys as keywords (``StudyDate=``) rather than tags (``00080020=``)."""
    tried: bool = False
    """The other form was tried (once per run)."""
    trying: str | None = None
    """While the other form's first page is awaited: the key the first form did not match."""
    ignored: set[str] = field(default_factory=set)
    """Keys the server ignores in the form kept: windows that rely on them are not listed."""

    def stray(self, missed: str) -> bool:
        """A window's listing returned a study that does not match the key ``missed``: True when
        the window is to be listed again (with the other form), False when it is given up. When
        the other form does no better, the first is kept."""
        if not self.tried:
            self.tried, self.trying = True, missed
            self.keywords = not self.keywords
            return True
        if self.trying is not None:
            if _RANK[missed] >= _RANK[self.trying]:
                self.keywords = not self.keywords
            missed = min(missed, self.trying, key=_RANK.__getitem__)
            self.trying = None
        self.ignored.add(missed)
        return False

    def matched(self) -> None:
        """A page matched its window: the form in use is kept."""
        self.trying = None

    def lost(self, key: str) -> None:
        """The other form, just tried, did not return studies of the window that the first form
        returned: the first form is kept, and ``key`` is ignored in it."""
        self.keywords = not self.keywords
        self.trying = None
        self.ignored.add(key)

    def merge(self, other: Filters) -> None:
        """What a listing task (distributed) learned: the first task to try the other form
        decides the form; ignored keys add up."""
        if other.tried and not self.tried:
            self.keywords, self.tried = other.keywords, True
        self.ignored |= other.ignored


@dataclass
class ListingReport:
    """How the listing went: windows listed and split, the cap in force, what could not be listed."""

    windows_listed: int = 0
    windows_complete: int = 0
    windows_split: int = 0
    page_size: int = 100
    cap: int | None = None
    verified: int = 0
    incomplete: list[str] = field(default_factory=list)
    filters: Filters = field(default_factory=Filters)
    notices: Notices = field(default_factory=lambda: Notices(log))
    repaired: int = 0
    """Listing entries that were not UTF-8, listed with U+FFFD in place of the bad bytes."""
    fields: tuple[str, ...] = ()
    """Tags asked for besides ``STUDY_FIELDS`` (the study-level ``--include-tag`` tags)."""


@dataclass
class WindowListing:
    """One window's listing as it goes: how many studies, whether and why it stopped at a cap."""

    window: Window
    total: int = 0
    capped: str | None = None
    ignored: str | None = None
    """The matching key the server ignored for this window (its listing was given up)."""
    unreadable: int = 0
    """Listing entries that could not be read, nor their study named."""
    undated_seen: dict[str, str] | None = None
    """Kept for the unfiltered window (from its first SAMPLE studies): the Patient ID of each
    study without a StudyDate it returned, by Study UID, for the undated sweep to check itself."""
    id_chars: set[str] | None = None
    """Kept with ``undated_seen``: the characters seen in Patient IDs, for the sweep's alphabet."""
    undated: int = 0
    untimed: int = 0
    dates: array[int] | None = None
    """StudyDates (as YYYYMMDD ints) and UID hashes of the first window, for the silent-cap check:
    compact arrays, since a window may hold up to VERIFY_MAX studies."""
    uids: array[int] = field(default_factory=lambda: array("q"))
    budget: int | None = None
    """At most this many studies for one listing (a task's share of the work); a window over it
    is split like a capped one, unless it is a single day or cannot be split."""


def study_date(item: Mapping[str, Any]) -> str | None:
    """The result's StudyDate when it is a plain YYYYMMDD date, else None."""
    try:
        value = dj.string(item, Tag.StudyDate)
    except ValueError:
        return None
    return value if value and len(value) == 8 and value.isdigit() else None


def _text(item: Mapping[str, Any], tag: str) -> str | None:
    """The attribute's first value as text; None when absent or wrongly typed (the crawl of the
    study reports what is wrong with it)."""
    try:
        return dj.string(item, tag)
    except ValueError:
        return None


def _stray(window: Window, items: list[dict[str, Any]]) -> str | None:
    """The matching key that a study among ``items`` does not match, if any."""
    if window.unfiltered:
        return None
    for item in items:
        day = study_date(item)
        if day is None:
            continue
        # equivalent mutants on the StudyTime lines: the only caller, _probe, passes halves from
        # Window.split_at, which have no StudyTime range, so Window.stray never reads the time
        try:
            time = dj.string(item, Tag.StudyTime) if window.time_from is not None else None
        except ValueError:
            time = None
        missed = window.stray(day, time)
        if missed:
            return missed
    return None


def _mended(items: list[dict[str, Any]], state: WindowListing, report: ListingReport) -> None:
    """Entries of an answer that was decoded entry by entry (dicomjson.salvage_listing): those
    decoded with U+FFFD are listed, with a bounded warning naming the study; unreadable ones
    that name their study stay in the page, for the run to fail that study alone; unreadable
    ones that do not are dropped, and leave the window incomplete."""
    if not any(dj.REPAIRED in item or dj.UNREADABLE in item for item in items):
        return
    kept = []
    for item in items:
        offset = item.pop(dj.REPAIRED, None)
        if offset is not None:
            report.repaired += 1
            uid = _text(item, Tag.StudyInstanceUID)
            report.notices.emit(
                "listing entries not UTF-8",
                f"study {shown(uid) if uid else '(no Study Instance UID)'}: listing entry not UTF-8 at byte {offset}; "
                "listed with U+FFFD in place of the bad bytes",
            )
        if dj.UNREADABLE in item and not _text(item, Tag.StudyInstanceUID):
            state.unreadable += 1
            report.notices.emit("unreadable listing entries", f"{state.window}: a listing entry could not be read: {item[dj.UNREADABLE]}", logging.ERROR)
            continue
        kept.append(item)
    items[:] = kept


def _form_works(client: QidoClient, report: ListingReport, items: list[dict[str, Any]], pages: int = 10) -> bool:
    """Whether the form of matching keys now in use finds a study the server just showed: the
    day of a dated study among ``items``, asked for in that form, must list it. (A server may
    answer an unknown form with nothing at all, which no window could tell from an empty one.)"""
    for item in items:
        day, uid = study_date(item), _text(item, Tag.StudyInstanceUID)
        if day is not None and uid:
            break
    else:
        return True
    page_size = client.page_size(report.page_size)
    params: list[tuple[str, str | int]] = [*Window(day, day).params(report.filters.keywords), ("limit", page_size)]
    offset = 0
    for _ in range(pages):
        found = client.get("studies", "studies", params + ([("offset", offset)] if offset else [])).items
        if any(_text(other, Tag.StudyInstanceUID) == uid for other in found):
            return True
        if len(found) < page_size:
            return False
        offset += len(found)
    return True


def _form(report: ListingReport) -> str:
    return "keywords (StudyDate=)" if report.filters.keywords else "tags (00080020=)"


def list_window(
    client: QidoClient, state: WindowListing, report: ListingReport, max_offset: int, extra: Sequence[tuple[str, str]] = ()
) -> Iterator[list[dict[str, Any]]]:
    """The study-level results of ``state.window`` (and the matching keys ``extra``), a page at
    a time, until the window ends or hits a cap (then ``state.capped`` says which) or the server
    ignores its filter (then ``state.ignored`` names the matching key)."""
    window = state.window
    cap = report.cap
    filters = report.filters
    offset = 0
    # equivalent mutants: "" for None (previous is compared only past the first page, once set)
    # and None for False (long_pages is read only as a flag)
    previous: list[Any] | None = None
    long_pages = False
    while True:
        if offset > max_offset:
            state.capped = f"more results than the largest offset asked for ({max_offset})"
            return
        page_size = client.page_size(report.page_size)
        params: list[tuple[str, str | int]] = [
            *window.params(filters.keywords), *extra, *includefields(STUDY_FIELDS + report.fields), ("limit", page_size)
        ]
        if offset:
            params.append(("offset", offset))
        try:
            page = client.get("studies", "studies", params)
        except FatalQidoError as exc:
            if client.smaller_limit(exc, page_size, offset):
                log.info("HTTP 400 for limit=%d: trying limit=%d", page_size, client.max_limit)
                continue
            if exc.status == 413:
                state.capped = "HTTP 413 (query matches too much)"
                return
            if exc.status == 400 and offset > 0:
                state.capped = f"HTTP 400 at offset {offset}"
                return
            raise
        if offset and page.items and page.items == previous:
            if not long_pages:
                state.capped = "the server ignores offset"
            return
        _mended(page.items, state, report)
        if state.undated_seen is not None:
            _sample(state, page.items)
        filtered = not window.unfiltered
        missed = None
        for item in page.items:
            day = study_date(item)
            if day is None:
                state.undated += 1
            else:
                time = _text(item, Tag.StudyTime)
                if not time:
                    state.untimed += 1
                if filtered and missed is None:
                    missed = window.stray(day, time)
            if state.dates is not None:
                if day is not None:
                    state.dates.append(int(day))
                uid = _text(item, Tag.StudyInstanceUID)
                if uid:
                    state.uids.append(hash(uid))
                if len(state.dates) > VERIFY_MAX:
                    state.dates = None
                    # equivalent mutants: None or array("Q") (without dates, uids is never used)
                    state.uids = array("q")
        if missed:
            if filters.stray(missed):
                report.notices.emit(
                    "filter warnings",
                    f"{window}: the server returned studies that do not match {missed} sent as "
                    f"{'tags' if filters.keywords else 'keywords'}: trying {_form(report)} for this run",
                )
                if not _form_works(client, report, page.items):
                    filters.lost(missed)
                    state.ignored = missed
                    return
                offset, previous, long_pages = 0, None, False
                state.total = state.undated = state.untimed = 0
                if state.dates is not None:   # equivalent mutant: array("l") (YYYYMMDD fits either)
                    state.dates, state.uids = array("L"), array("q")
                continue
            state.ignored = missed
            return
        if page.items and filtered:
            filters.matched()
        yield page.items
        state.total += len(page.items)
        if len(page.items) > page_size and not long_pages:
            long_pages = True
            report.notices.emit(
                "paging warnings", f"{window}: the server answered {len(page.items)} studies to limit={page_size}: "
                "it ignores limit, so its pages are taken as they come, not as a cap", logging.INFO,
            )
        if page.warning and TRUNCATION.search(page.warning):
            state.capped = "the server says its results were truncated (Warning header)"
            return
        if cap is not None and state.total >= cap and not long_pages:
            state.capped = f"{state.total} results, at the server's cap"
            return
        if len(page.items) < page_size:
            return
        if state.budget is not None and state.total >= state.budget and window.since != window.until and window.splittable:
            state.capped = f"more than {state.budget} studies for one task"
            return
        previous = page.items
        offset += len(page.items)


def _probe(
    client: QidoClient, window: Window, dates: array[int], uid_hashes: array[int], page_size: int, filters: Filters
) -> bool | tuple[str, list[dict[str, Any]]]:
    """True when a half of ``window`` holds a study that the window's own listing did not
    return; the matching key a half's studies do not match (and those studies) when the server
    ignores it."""
    ordered = sorted(dates)
    median = f"{ordered[(len(ordered) - 1) // 2]:08d}"
    uids = set(uid_hashes)
    for half in window.split_at(median):
        offset = 0
        previous: list[Any] | None = None
        while True:
            params: list[tuple[str, str | int]] = [*half.params(filters.keywords), ("limit", page_size)]
            if offset:
                params.append(("offset", offset))
            items = client.get("studies", "studies", params).items
            missed = _stray(half, items)
            if missed:
                return missed, items
            for item in items:
                uid = _text(item, Tag.StudyInstanceUID)
                if uid and hash(uid) not in uids:
                    log.info("%s returned %d studies but %s holds others: the server caps results silently", window, len(uids), half)
                    return True
            if len(items) < page_size or len(items) > page_size or items == previous:
                break  # the end, or a server that ignores limit or offset: no more pages to ask for
            previous = items
            offset += len(items)
    return False


@dataclass
class UndatedRisk:
    """Whether studies without a StudyDate may have been lost past a cap of the unfiltered window."""

    at_risk: str | None = None
    elsewhere: bool = False
    seen: dict[str, str] = field(default_factory=dict)
    """Studies without a StudyDate the capped unfiltered window returned: Patient ID by UID."""
    chars: set[str] = field(default_factory=set)

    @property
    def sweep_needed(self) -> bool:
        return bool(self.at_risk) and not self.elsewhere

    def close(self, report: ListingReport) -> None:
        if self.at_risk and not self.elsewhere:
            report.incomplete.append(self.at_risk)


def verify_cap(client: QidoClient, state: WindowListing, report: ListingReport) -> None:
    """The silent-cap check of a window listed with ``state.dates`` kept (see the module docstring)."""
    if state.capped is None and state.ignored is None and state.dates and state.total > max(report.verified, 1) and state.window.splittable:
        found = _probe(client, state.window, state.dates, state.uids, client.page_size(report.page_size), report.filters)
        while isinstance(found, tuple):
            missed, items = found
            if not report.filters.stray(missed):
                state.ignored = missed
                return
            report.notices.emit("filter warnings", f"{state.window}: the server returned studies that do not match {missed}: trying {_form(report)} for this run")
            if not _form_works(client, report, items):
                report.filters.lost(missed)
                state.ignored = missed
                return
            found = _probe(client, state.window, state.dates, state.uids, client.page_size(report.page_size), report.filters)
        if found:
            # equivalent mutants of the min(...) branch: state.dates is kept only while no cap
            # is known (iter_study_pages, the Dask list task), so report.cap is None here
            report.cap = state.total if report.cap is None else min(report.cap, state.total)
            state.capped = f"{state.total} results, a silent cap"
        else:
            report.verified = max(report.verified, state.total)


def follow_up(state: WindowListing, report: ListingReport, undated: UndatedRisk, page_size: int, *, parts_listed: bool = False) -> list[Window]:
    """After a window was listed: the windows that must be listed instead (its parts when it was
    capped), with what cannot be listed recorded in ``report``. With ``parts_listed`` the parts
    are listed anyway (the undated sweep of a full listing, beside the dated windows), so a cap
    only puts the studies without a StudyDate at risk."""
    if state.undated and not state.window.unfiltered:
        undated.elsewhere = True
    if state.unreadable:
        report.incomplete.append(f"{state.window}: {state.unreadable} listing entries could not be read, nor their studies named")
    if state.ignored is not None:
        report.incomplete.append(f"{state.window}: the server ignores {state.ignored}, as a tag and as a keyword; not split further")
        return []
    if state.capped is None:
        report.windows_complete += 1
        return []
    if parts_listed:
        if state.undated:
            undated.at_risk = f"{state.window}: {state.capped}; studies without StudyDate past the cap cannot be listed"
            undated.seen, undated.chars = state.undated_seen or {}, state.id_chars or set()
        return []
    if state.capped == "the server ignores offset":
        report.cap = min(report.cap or page_size, page_size)
    children = state.window.split()
    if not children:
        report.incomplete.append(f"{state.window}: {state.capped}; cannot be split further")
        return []
    if state.window.split_key in report.filters.ignored:
        report.incomplete.append(f"{state.window}: {state.capped}; not split: the server ignores {state.window.split_key}")
        return []
    log.info("%s: %s; split into %d windows", state.window, state.capped, len(children))
    report.windows_split += 1
    if state.window.unfiltered and state.undated:
        undated.at_risk = f"{state.window}: {state.capped}; studies without StudyDate past the cap cannot be listed"
        undated.seen, undated.chars = state.undated_seen or {}, state.id_chars or set()
    elif state.window.since is not None and state.window.since == state.window.until and state.window.time_from is None and state.untimed:
        report.incomplete.append(f"{state.window}: {state.capped}; studies without StudyTime on that day past the cap cannot be listed")
    return children


def iter_studies(
    client: QidoClient,
    windows: Sequence[Window],
    report: ListingReport,
    *,
    max_offset: int = 1_000_000,
    verify: bool = True,
) -> Iterator[dict[str, Any]]:
    """Every study-level result in ``windows``, splitting capped windows; may yield a study twice
    (a capped window's studies are listed again by its parts), so callers merge by UID."""
    for page in iter_study_pages(client, windows, report, max_offset=max_offset, verify=verify):
        yield from page


def iter_study_pages(
    client: QidoClient,
    windows: Sequence[Window],
    report: ListingReport,
    *,
    max_offset: int = 1_000_000,
    verify: bool = True,
) -> Iterator[list[dict[str, Any]]]:
    """``iter_studies`` a page of results at a time. (Every caller passes ``max_offset``: a
    mutant of its default is equivalent.)"""
    queue = deque(windows)
    first = True
    undated = UndatedRisk()
    while queue:
        state = WindowListing(queue.popleft())
        ignored = [key for key in state.window.keys if key in report.filters.ignored]
        if ignored:
            report.incomplete.append(f"{state.window}: not listed: the server ignores {ignored[0]}")
            continue
        if first and verify and report.cap is None:
            state.dates = array("L")   # equivalent mutant: "l" (YYYYMMDD fits either)
        if state.window.unfiltered:
            state.undated_seen, state.id_chars = {}, set()
        report.windows_listed += 1
        try:
            yield from list_window(client, state, report, max_offset)
        except SourceUnreachable:
            raise
        except QidoError as exc:
            if exc.status in (401, 403):
                raise
            report.incomplete.append(f"{state.window}: {exc}")
            log.error("listing of %s stopped: %s", state.window, exc)
            first = False   # equivalent mutants: None for False, here and below (read as a flag)
            continue
        verify_cap(client, state, report)
        first = False
        queue.extendleft(reversed(follow_up(state, report, undated, client.page_size(report.page_size))))
    if undated.sweep_needed:
        yield from sweep_undated(client, undated, report, max_offset)
    undated.close(report)


# --- the undated sweep ------------------------------------------------------------------------

SAMPLE = 10_000
SWEEP_MAX_REQUESTS = 2_000
SWEEP_MAX_LENGTH = 16
_BASE = frozenset("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ")


def _alphabet(*sets: frozenset[str] | set[str]) -> list[str]:
    """The characters a prefix may end with: letters, digits and ``-._``, which travel in a
    query string as they are (servers that do not percent-decode values, like Orthanc 1.10,
    would match anything else literally), and are neither wildcards nor separators."""
    return sorted(c for c in set().union(*sets) if c.isascii() and (c.isalnum() or c in "-._"))


def _sample(state: WindowListing, items: list[dict[str, Any]]) -> None:
    seen, chars = state.undated_seen, state.id_chars
    if seen is None or chars is None or state.total >= SAMPLE:
        return
    for item in items:
        pid = _text(item, Tag.PatientID) or ""
        chars.update(pid)
        if study_date(item) is None:
            uid = _text(item, Tag.StudyInstanceUID)
            if uid:
                seen[uid] = pid


def sweep_undated(client: QidoClient, undated: UndatedRisk, report: ListingReport, max_offset: int) -> Iterator[list[dict[str, Any]]]:
    """The studies without a StudyDate that a capped unfiltered listing could not reach, listed
    by Patient ID prefix (``PatientID=A*``: wildcard matching, PS3.4 C.2.2.2.4; UIDs cannot be
    matched by wildcard), a part split by one more character while it is capped.

    Best effort: the alphabet at each position is 0-9 A-Z plus the letters, digits and ``-._``
    seen in the Patient IDs listed; studies without a Patient ID, or with another character at
    a position that must be split, cannot be reached. The sweep checks itself
    by the undated studies the capped listing did return: if one of them is not found, a part is
    still capped, the server ignores PatientID, or more than SWEEP_MAX_REQUESTS are needed, the
    undated studies stay reported as at risk. Patient IDs and prefixes are patient data: only
    counts are logged."""
    key = "PatientID" if report.filters.keywords else Tag.PatientID
    queue: deque[tuple[str, bool]] = deque((c, False) for c in _alphabet(_BASE, undated.chars))
    found: set[str] = set()
    requests = parts = 0
    failure: str | None = None
    if any(not pid for pid in undated.seen.values()):
        failure = "studies without StudyDate and without PatientID cannot be swept by PatientID"
    while queue and failure is None:
        prefix, exact = queue.popleft()
        if requests >= SWEEP_MAX_REQUESTS:
            failure = f"the sweep by PatientID stopped at {SWEEP_MAX_REQUESTS} requests ({len(queue) + 1} parts left)"
            break
        parts += 1
        state = WindowListing(Window())
        sample: set[str] = set()
        requests += 1
        try:
            for number, page in enumerate(list_window(client, state, report, max_offset, [(key, prefix if exact else prefix + "*")])):
                requests += number > 0
                kept = []
                for item in page:
                    # equivalent mutant: `or "XXXX"` (a study without PatientID comes only from a server
                    # that ignores the key, which the first part, "-*" to "0*", already shows)
                    pid = _text(item, Tag.PatientID) or ""
                    # servers may match case-insensitively: parts then overlap, merged by UID
                    if (pid.upper() != prefix.upper()) if exact else not pid.upper().startswith(prefix.upper()):
                        failure = "the server ignores PatientID (or its wildcards)"
                        break
                    if len(pid) > len(prefix):
                        sample.add(pid[len(prefix)])
                    if study_date(item) is None:
                        uid = _text(item, Tag.StudyInstanceUID)
                        if uid:
                            found.add(uid)
                        kept.append(item)
                if kept:
                    yield kept
                if failure:
                    break
        except QidoError as exc:
            if exc.status in (401, 403) or isinstance(exc, SourceUnreachable):
                raise
            failure = f"a part of the sweep by PatientID failed: {exc}"
        if failure or state.capped is None:
            continue
        if exact:
            failure = "more studies share one PatientID than the server answers at once"
        elif len(prefix) >= SWEEP_MAX_LENGTH:
            failure = f"a part of the sweep by PatientID is still capped at {SWEEP_MAX_LENGTH} characters"
        else:
            children = [(prefix + c, False) for c in _alphabet(_BASE, undated.chars, sample)]
            queue.extendleft(reversed([(prefix, True), *children]))
    missed = sum(1 for uid in undated.seen if uid not in found)
    if failure is None and missed:
        failure = f"the sweep by PatientID did not find {missed} of the {len(undated.seen)} studies without StudyDate listed before"
    if failure is None:
        log.info("studies without StudyDate past the cap: swept by PatientID in %d parts (%d requests), %d found", parts, requests, len(found))
        undated.at_risk = None   # equivalent mutant: "" (at_risk is only read as a flag)
    else:
        log.info("studies without StudyDate past the cap: the sweep by PatientID gave up after %d parts (%d requests, %d found)", parts, requests, len(found))
        undated.at_risk = f"{undated.at_risk} ({failure})"


def listing_failed(exc: QidoError, report: ListingReport, *, started: bool) -> None:
    """The one rule for a listing that fails part-way, for every executor and for the audit: a
    source that cannot be reached before anything was listed or answered, or that refuses the
    credentials (401/403), ends the run (SourceUnreachable); any other failure leaves the listing
    incomplete (nothing is marked gone) and the run goes on with what was listed."""
    if isinstance(exc, SourceUnreachable):
        if not started:
            raise exc
        report.incomplete.append("listing stopped: the source could not be reached any more")
    elif exc.status in (401, 403):
        raise SourceUnreachable(f"{exc}: check the credentials", url=exc.url, status=exc.status) from None
    else:
        report.incomplete.append(f"listing stopped: {exc}")


def check_listed(report: ListingReport, listed: int) -> None:
    """SourceUnreachable when no study could be listed at all because every window failed (not
    when the server ignores a filter: that is an incomplete listing, reported as such)."""
    if listed == 0 and report.incomplete and report.windows_complete == 0 and not report.filters.ignored:
        raise SourceUnreachable(f"no study could be listed: {report.incomplete[0]}")

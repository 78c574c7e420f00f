"""``sync --dry-run``: what a sync would do, found by listing only.

The windows a real run would list are listed with the same engine (caps found, windows split,
filters checked); each listed study is compared with the state by the same rule a real run uses
(see run.unchanged); studies the state holds in the listed windows that the listing no longer
shows are asked for by UID, as a real run does before it marks one gone. Nothing is written: the
state is opened read-only (or not at all when there is none yet), no output folder or FHIR
server is touched, and no instance or metadata request is made. The requests a real run would
add to crawl the new and changed studies are estimated from the counts the server reports.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from . import dicomjson as dj
from .config import SyncConfig
from .crawl import METADATA_UNAVAILABLE, MetadataMode, summarise, tag_fields
from .dicomjson import Tag
from .errors import QidoError, StateError
from .figures import EXIT_OK, EXIT_PARTIAL
from .listing import ListingReport, check_listed, iter_study_pages, listing_failed
from .kinds import StudyStatus
from .mapping.ids import normalise_base
from .planner import Window
from .qido import QidoClient, client_from
from .run import RETRY_PER_RUN, unchanged
from .tables.tags import signature
from .state import State
from .sync import choose_windows
from .uids import shown


@dataclass
class DryRunResult:
    """What a sync would do now. ``requests`` are those the dry run made (listing and UID
    searches only); ``crawl_requests`` estimates what a real run would add for the studies it
    would crawl (instance searches, one page per ``instance_page_size`` reported instances, and
    with ``metadata`` not ``never`` one WADO-RS metadata request per study: an upper bound, as
    a server whose QIDO-RS answers hold every attribute needs none)."""

    scope: str
    studies_listed: int = 0
    studies_new: int = 0
    studies_changed: int = 0
    studies_unchanged: int = 0
    studies_gone: int = 0
    studies_not_listed: int = 0
    """Held by the state in the windows, not listed, but still on the server (a cap or filter the
    listing missed): a real run would report its listing incomplete and mark none gone."""
    studies_to_retry: int = 0
    """Failed or inconsistent before and outside the windows: a real run asks for each by UID."""
    entries_unusable: int = 0
    windows_incomplete: int = 0
    crawl_requests: int = 0
    requests: dict[str, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    exit_code: int = EXIT_OK

    def summary(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if k != "errors"}


def dry_run(config: SyncConfig) -> DryRunResult:
    """List, compare with the state, and report; write nothing. Raises SourceUnreachable as a
    sync would, and StateError for a state that exists but cannot be read."""
    source = normalise_base(config.url)
    state = _read_only(config)
    client = client_from(config)
    try:
        mark = state.last_mark(source) if state is not None else None
        windows, scope, _ = choose_windows(config, mark)
        result = DryRunResult(scope)
        known_cap, verified = state.source_facts(source) if state is not None else (None, 0)
        report = ListingReport(cap=config.max_results or known_cap, verified=verified, page_size=config.page_size,
                               fields=tag_fields(config.crawl.tags, "study"))
        if state is not None:
            report.filters.keywords = state.key_form(source) == "keywords"
        listed: set[str] = set()
        metadata_known_missing = state is not None and METADATA_UNAVAILABLE in state.fallbacks(source)
        metadata = 0 if config.crawl.metadata is MetadataMode.NEVER or metadata_known_missing else 1
        try:
            for page in iter_study_pages(client, windows, report, max_offset=config.max_offset):
                for item in page:
                    _consider(item, state, source, config.crawl.instance_page_size, metadata, listed, result, signature(config.crawl.tags))
        except QidoError as exc:
            listing_failed(exc, report, started=bool(listed) or client.answered)
        check_listed(report, result.studies_listed)
        result.windows_incomplete = len(report.incomplete)
        result.errors.extend(f"not listed completely: {message}" for message in report.incomplete)
        if state is not None and not report.incomplete and not result.entries_unusable:
            for window in windows:
                for uid in _unlisted(state, source, window.since, window.until, listed):
                    _gone_or_missed(client, uid, result)
        if state is not None and windows != [Window()]:
            failed = [row.study_uid for row in state.iter_study_rows(source) if row.status in (StudyStatus.FAILED, StudyStatus.INCONSISTENT)]
            result.studies_to_retry = min(len([uid for uid in failed if uid not in listed]), RETRY_PER_RUN)
        result.requests = client.counts.as_dict()
        incomplete = result.windows_incomplete or result.studies_not_listed or result.entries_unusable
        result.exit_code = EXIT_PARTIAL if incomplete else EXIT_OK
        report.notices.close()
        return result
    finally:
        client.close()
        if state is not None:
            state.close()


def _read_only(config: SyncConfig) -> State | None:
    """The state, read-only; None when there is none yet (a first run: everything is new)."""
    try:
        return State.open(config.state, read_only=True)
    except StateError:
        if isinstance(config.state, str) or config.state.exists():
            raise
        return None


def _consider(item: dict[str, Any], state: State | None, source: str, page_size: int, metadata: int, listed: set[str],
              result: DryRunResult, tags: tuple[str, ...] = ()) -> None:
    """One listed study, compared with the state; ``metadata``: the metadata requests a real run
    would make per study crawled (0 or 1)."""
    if dj.UNREADABLE in item:
        result.entries_unusable += 1
        result.errors.append(f"study {dj.first(item, Tag.StudyInstanceUID)}: listing entry unreadable: {item[dj.UNREADABLE]}")
        return
    try:
        summary = summarise(item)
    except ValueError as exc:
        result.entries_unusable += 1
        result.errors.append(f"listing entry: {exc}")
        return
    if summary.uid in listed:
        return
    listed.add(summary.uid)
    result.studies_listed += 1
    row = state.study(source, summary.uid) if state is not None else None
    if row is not None and unchanged(row, summary, tags):
        result.studies_unchanged += 1
        return
    if row is None:
        result.studies_new += 1
    else:
        result.studies_changed += 1
    # a real run's instance searches, and its metadata request unless metadata is never read
    # (or the server is known to have none)
    result.crawl_requests += max(1, math.ceil((summary.n_instances or 0) / page_size)) + metadata


def _unlisted(state: State, source: str, since: str | None, until: str | None, listed: set[str]) -> list[str]:
    """UIDs of the studies the state holds (not gone) with a StudyDate in [since, until] (both None:
    every study) that the listing did not show."""
    out = []
    for row in state.iter_study_rows(source):
        if row.status == StudyStatus.GONE or row.study_uid in listed:
            continue
        if since is not None or until is not None:
            day = row.study_date
            if day is None or (since is not None and day < since) or (until is not None and day > until):
                continue
        out.append(row.study_uid)
    return out


def _gone_or_missed(client: QidoClient, uid: str, result: DryRunResult) -> None:
    """Ask for one unlisted study by UID, as a real run does before it marks it gone."""
    try:
        items = client.get("studies", "studies", [(Tag.StudyInstanceUID, uid)]).items
    except QidoError as exc:
        result.studies_not_listed += 1
        result.errors.append(f"study {shown(uid)}: not listed, and the search for it failed: {exc}")
        return
    if items:
        result.studies_not_listed += 1
        result.errors.append(f"study {shown(uid)}: not listed, but the server still has it")
    else:
        result.studies_gone += 1

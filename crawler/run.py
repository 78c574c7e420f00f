"""One sync run, from its first listing to its commit: the diff of each listed study against the
state, the studies named besides the listing (change feed, retries), the executor that lists and
crawls, delete detection, and the end of the run. What is held between checkpoints, and how it is
recorded, is the ledger's (see ledger); where studies are crawled is the executor's (see
executors)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import datetime, timezone
from typing import Any

from . import dicomjson as dj
from .changes import Change, orthanc_base, read_changes
from .config import SyncConfig
from .crawl import (
    METADATA_UNAVAILABLE, SERIES_LEVEL_INSTANCES, STUDY_FIELDS, Learned, StudySummary, includefields, summarise, tag_fields,
)
from .dicomjson import Tag
from .errors import CrawlerError, QidoError, SourceUnreachable
from .executors import executor
from .figures import EXIT_OK, EXIT_PARTIAL, Figures, RunProgress, SyncResult
from .kinds import ChangeSource, Executor, RunOutcome, StudyStatus
from .ledger import Ledger
from .listing import ListingReport, check_listed, listing_failed
from .mapping import MappingOptions
from .mapping.ids import normalise_base
from .notices import Notices
from .planner import Window
from .qido import QidoClient
from .sinks import NdjsonFolder, Sink
from .state import State, StudyRow
from .tables.tags import signature
from .worker import Candidate, CrawlJob, Outcome, study_hash

log = logging.getLogger("crawler")


class Stopped(Exception):
    """A watch was told to stop during a run that lists (see SyncRun.stop)."""


SEEN_PER_CHECKPOINT = 5000
"""A listing of unchanged studies checkpoints this often, so that what it marks seen is written in
short transactions (see State.mark_seen)."""
RETRY_PER_RUN = 1000
"""Failed studies outside the run's windows asked for again per run (one request each)."""


def unchanged(row: StudyRow, summary: StudySummary, tags: tuple[str, ...] = ()) -> bool:
    """Whether a listed study is as the state recorded it, and need not be crawled: synced, the
    same reported counts (the server reports them), the same study-level attributes and
    ``--include-tag`` tags (their ``signature``)."""
    return (
        row.status == StudyStatus.SYNCED
        and row.n_series == summary.n_series
        and row.n_instances == summary.n_instances
        and summary.n_instances is not None
        and row.study_hash == study_hash(dict(summary.attributes), tags)
    )


def change_base(config: SyncConfig, client: QidoClient) -> str:
    """Where ``config.changes`` is read: Orthanc's REST base, or the DICOMweb base (Azure)."""
    if config.changes == ChangeSource.ORTHANC:
        return normalise_base(config.orthanc_url) if config.orthanc_url else orthanc_base(client.base_url)
    return client.base_url


def now_utc() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


class SyncRun:
    """One run's moving parts (``run`` is the whole job, in order) and the seam its executor
    drives (``consider``, ``take``, ``changed_items``: see executors.CrawlRun)."""

    def __init__(self, config: SyncConfig, client: QidoClient, state: State, source: str, mapping: MappingOptions,
                 sinks: list[Sink], ndjson: NdjsonFolder | None, run_id: int,
                 progress: Callable[[RunProgress], None] | None = None, started_clock: float | None = None) -> None:
        self.remembered = {} if config.full else state.fallbacks(source)
        """Fallbacks earlier runs learned for the source (a --full run asks the server again)."""
        if self.remembered:
            starting = {**dict(config.crawl.fallbacks), **self.remembered}
            config = replace(config, crawl=replace(config.crawl, fallbacks=tuple(sorted(starting.items()))))
        self.config = config
        self.client = client
        self.state = state
        self.source = source
        self.ndjson = ndjson
        self.sinks = sinks
        self.run_id = run_id
        self.progress = progress
        self.started_clock = time.monotonic() if started_clock is None else started_clock
        self.crawled = 0
        self.to_crawl = 0
        self.listing_complete = False
        self.job = CrawlJob(config.crawl, mapping, config.fhir_version, config.validate)
        self.learned = Learned.of(config.crawl)
        self.figures = Figures()
        self.errors: list[str] = []
        self.notices: Notices | None = None
        self.ledger = Ledger(state, source, run_id, sinks, self.figures, self._error)
        self.fallbacks_used: dict[str, str] = {}
        self.crawled_ok = 0
        self.listing_errors = 0
        self.changes: tuple[Change, ...] = ()
        self.change_cursor: str | None = None
        """Where the change source was read up to: stored when the run's listing is complete."""
        self.full_listing = False
        self.polled: set[str] | None = None
        """In a watch's poll (see ``poll``): the studies considered in this poll. A run of
        polls crawls a study again each time the change source names it."""
        self.retry_in_poll = False
        self.stop: threading.Event | None = None
        """When set, a run that lists (a watch's full listing) stops at the next study: Stopped."""

    def run(self, windows: list[Window], scope: str, moves_mark: bool, today: str, started_clock: float) -> SyncResult:
        state = self.state
        self.full_listing = windows == [Window()]
        state.begin()
        try:
            report = self._new_report()
            windows, scope = self._read_changes(windows, scope, report)
            self._list_and_crawl(windows, report)
            listing_clean = not report.incomplete and not self.listing_errors
            if listing_clean:
                listing_clean = self._find_gone(windows)
                if listing_clean and self.change_cursor is not None and self.config.changes is not None:
                    state.set_change_cursor(self.source, self.config.changes, self.change_cursor)
            return self.finish(scope, today if moves_mark and listing_clean else None, [str(w) for w in windows])
        except BaseException as exc:
            if isinstance(exc, Stopped):
                self._keep_held()
            self.abort(exc)
            raise

    def _keep_held(self) -> None:
        """Told to stop: the studies crawled whole since the last checkpoint are recorded by one
        more (a failing one leaves the state at the last)."""
        try:
            self.ledger.checkpoint()
        except CrawlerError as exc:
            log.warning("stopping: the last checkpoint failed (%s); the state stands at the one before", exc)

    def finish(self, scope: str, mark: str | None, windows: list[str]) -> SyncResult:
        """The end of a run: a last checkpoint, the run folder finished with its manifest (none
        made when nothing was written), the run recorded, committed."""
        self.ledger.checkpoint()
        run_dir = self.ndjson.finish() if self.ndjson else None
        for sink in self.sinks:
            if sink is not self.ndjson:
                sink.finish()
        f = self.figures
        exit_code = EXIT_PARTIAL if (f.studies_failed or f.studies_inconsistent or f.windows_incomplete) else EXIT_OK
        result = SyncResult(f, self.client.counts.as_dict(), time.monotonic() - self.started_clock, self.run_id, run_dir, exit_code,
                            scope, self.errors)
        outcome = RunOutcome.PARTIAL if exit_code else RunOutcome.OK
        self.state.finish_run(self.run_id, now_utc(), outcome, run_dir, result.summary(), mark, windows)
        self.state.commit()
        return result

    def abort(self, exc: BaseException) -> None:
        """A run that cannot go on: the sinks keep what the last checkpoint holds (the run folder
        is cut back to it), the state rolls back to it, the run is recorded as failed."""
        for sink in self.sinks:
            sink.abort()
        self.state.rollback()
        failed = RunOutcome.UNREACHABLE if isinstance(exc, SourceUnreachable) else RunOutcome.FAILED
        error = str(exc) if isinstance(exc, CrawlerError) else type(exc).__name__
        kept = str(self.ndjson.folder.absolute()) if self.ndjson and self.ndjson.folder.is_dir() else None
        self.state.finish_run(self.run_id, now_utc(), failed, kept, {**vars(self.figures), "error": error})

    def poll(self, changes: tuple[Change, ...], cursor: str, *, retry: bool = False) -> bool:
        """One poll of a watch: crawl the studies ``changes`` names (asked for by UID; one the
        server no longer has is gone), and with ``retry`` those earlier runs failed, then a
        checkpoint that stores ``cursor`` with them. The cursor is not stored when a study named
        could not be asked for (the next poll reads the same changes again), nor when told to
        stop (``stop``: Stopped, after a checkpoint of the studies crawled so far). Returns
        whether it was stored. The state must be in the run's transaction (``state.begin()``)."""
        self.changes = changes
        self.polled = set()
        self.retry_in_poll = retry
        report = self._new_report()
        try:
            executor(Executor(self.config.executor))(self, [], report)
        except Stopped:
            self.ledger.checkpoint()   # what was crawled whole is kept; the cursor is not stored
            raise
        self.figures.warnings_not_shown += report.notices.close()
        for message in report.incomplete:
            # the watch says so once per kind of failure; each poll's own line is for -vv
            self._error(f"not every study the change source named could be asked for: {message}", level=logging.DEBUG,
                        kind="change source polls incomplete")
        # an unusable entry is counted failed and passed over, as in a listing: asking again
        # would not mend it, and the cursor would never move past it
        stored = not report.incomplete and self.config.changes is not None
        if stored and self.config.changes is not None:
            self.state.set_change_cursor(self.source, self.config.changes, cursor)
        self.ledger.checkpoint()
        return stored

    def _new_report(self) -> ListingReport:
        known_cap, verified = self.state.source_facts(self.source)
        report = ListingReport(cap=self.config.max_results or known_cap, verified=verified, page_size=self.config.page_size,
                               fields=tag_fields(self.config.crawl.tags, "study"))
        report.filters.keywords = self.state.key_form(self.source) == "keywords"
        self.notices = report.notices
        return report

    def _read_changes(self, windows: list[Window], scope: str, report: ListingReport) -> tuple[list[Window], str]:
        """With a change source: read it from the stored cursor before the listing starts (a change
        made while the run lists is read by the next run). A source whose log was reset since the
        cursor makes this run list everything; a source that cannot be read leaves the listing
        incomplete (the cursor stays, the mark too) and the run goes on with its windows."""
        kind = self.config.changes
        if kind is None:
            return windows, scope
        base = change_base(self.config, self.client)
        cursor = None if self.full_listing else self.state.change_cursor(self.source, kind)
        try:
            read = read_changes(kind, self.client, base, cursor)
        except QidoError as exc:
            listing_failed(exc, report, started=self.client.answered)
            return windows, scope
        self.change_cursor = read.cursor
        if read.reset and not self.full_listing:
            log.warning("the %s change log was reset since the last run: this run lists every study", kind)
            self.full_listing = True
            return [Window()], f"full (the {kind} change log was reset)"
        self.changes = read.changes
        return windows, scope

    def _list_and_crawl(self, windows: list[Window], report: ListingReport) -> None:
        config, state, figures = self.config, self.state, self.figures
        known_cap, _ = state.source_facts(self.source)
        executor(config.executor)(self, windows, report)
        check_listed(report, figures.studies_listed)
        state.set_source_facts(self.source, report.cap if config.max_results is None else known_cap, report.verified)
        state.set_server_profile(self.source, config.server_profile, config.server_profile_how)
        state.set_included_tags(self.source, signature(config.crawl.tags))
        if report.filters.tried:
            state.set_key_form(self.source, "keywords" if report.filters.keywords else "tags")
        if config.full and self.crawled_ok:
            state.set_fallbacks(self.source, self.fallbacks_used)
        elif self.fallbacks_used.keys() - self.remembered.keys():
            state.set_fallbacks(self.source, {**self.remembered, **self.fallbacks_used})
        figures.windows_incomplete = len(report.incomplete)
        figures.windows_split = report.windows_split
        for message in report.incomplete:
            self._error(f"not listed completely: {message}", level=logging.ERROR, kind="windows not listed completely")
        figures.listing_entries_repaired = report.repaired
        figures.warnings_not_shown = report.notices.close()

    def consider(self, item: dict[str, Any]) -> Candidate | None:
        """A listed study: counted and marked seen; a Candidate when it must be crawled, None when
        it is unchanged, listed already or unusable."""
        figures, state = self.figures, self.state
        self._check_stop()
        problem = item.get(dj.UNREADABLE)
        if problem is not None:
            figures.studies_failed += 1
            # listing_errors is read only as a flag (run): its '= 1' and '+= 2' mutants here and
            # below are equivalent ('-= 1' is not: the two kinds of entries would cancel out)
            self.listing_errors += 1
            self._error(f"study {dj.first(item, Tag.StudyInstanceUID)}: listing entry unreadable: {problem}", kind="unusable listing entries")
            return None
        try:
            summary = summarise(item)
        except ValueError as exc:
            figures.studies_failed += 1
            self.listing_errors += 1
            self._error(f"listing entry: {exc}", kind="unusable listing entries")
            return None
        row = state.study(self.source, summary.uid)
        if self._listed_already(summary.uid, row):
            return None
        if self.polled is not None:
            self.polled.add(summary.uid)
        figures.studies_listed += 1
        if row is not None:
            state.mark_seen(self.source, summary.uid, self.run_id)
            if state.seen_waiting >= SEEN_PER_CHECKPOINT:
                self.ledger.checkpoint()
        else:
            self.ledger.listed(summary.uid)
        # in a watch's poll the change source has said the study changed, and its listing entry
        # may not show how (a corrected patient name, an instance replaced): it is crawled, and
        # only resources that differ are written
        if row is not None and self.polled is None and unchanged(row, summary, signature(self.config.crawl.tags)):
            figures.studies_unchanged += 1
            self._report()
            return None
        self.to_crawl += 1
        return Candidate(summary, row is not None)

    def take(self, outcome: Outcome, known: bool) -> None:
        """A crawled study: held for the next checkpoint, which comes when enough are held or
        enough time has passed."""
        self._check_stop()
        self._note_fallbacks(outcome)
        self.ledger.hold(outcome, known)
        self.crawled += 1
        if self.ledger.due(self.config.checkpoint_every, self.config.checkpoint_seconds):
            self.ledger.checkpoint()
        self._report()

    def listing_finished(self) -> None:
        """Every study to crawl has been found: from now on the progress has a total."""
        self.listing_complete = True
        self._report()

    def _check_stop(self) -> None:
        if self.stop is not None and self.stop.is_set():
            raise Stopped("stopped before the listing was complete; the state stands at the last checkpoint")

    def _report(self) -> None:
        if self.progress is None:
            return
        counts = self.client.counts
        self.progress(RunProgress(self.figures, self.crawled, self.to_crawl if self.listing_complete else None,
                                  counts.total, counts.retries, time.monotonic() - self.started_clock))

    def changed_items(self) -> Iterator[dict[str, Any]]:
        """The studies to crawl that the windows' listing did not show: those Orthanc's change feed
        names (with --changes orthanc), then those an earlier run failed (see ``_retried_items``)."""
        yield from self._fed_items()
        if self.polled is None or self.retry_in_poll:
            yield from self._retried_items()

    def _listed_already(self, uid: str, row: StudyRow | None) -> bool:
        """Whether this run has listed the study already (a watch's poll: this poll has)."""
        if uid in self.ledger.unrecorded:
            return True
        if self.polled is not None:
            return uid in self.polled
        return row is not None and row.last_seen_run == self.run_id

    def _retried_items(self) -> Iterator[dict[str, Any]]:
        """Studies the state holds as failed or inconsistent that this run has not listed (their
        StudyDate is outside an incremental window): each asked for by UID, so that a study the
        server or a sink refused is sent again by the next run, not only by the next --full one.
        At most RETRY_PER_RUN per run, the longest untried first."""
        if self.full_listing:
            return
        for uid in self.state.studies_to_retry(self.source, self.run_id, RETRY_PER_RUN):
            if uid not in self.ledger.unrecorded:
                yield from self._listing_of(uid)

    def _listing_of(self, uid: str) -> list[dict[str, Any]]:
        """What a listing shows of one study, asked for by its Study Instance UID."""
        fields = STUDY_FIELDS + tag_fields(self.config.crawl.tags, "study")
        return self.client.get("studies", "studies", [(Tag.StudyInstanceUID, uid), *includefields(fields)]).items

    def _fed_items(self) -> Iterator[dict[str, Any]]:
        """The studies the change source named that the listing did not show, each asked for by
        UID; one the server no longer has (a deletion) is gone at once, as a study a complete
        listing no longer shows."""
        for change in self.changes:
            uid = change.study_uid
            row = self.state.study(self.source, uid)
            if self._listed_already(uid, row):
                continue
            items = self._listing_of(uid)
            if items:
                yield from items
            elif row is not None and row.status != StudyStatus.GONE:
                self._gone(uid, row.resource_id, "the change source named it, and the server no longer has it")

    def _error(self, message: str, level: int = logging.WARNING, kind: str | None = None) -> None:
        """Record and log a problem; one of a ``kind`` that can recur per study or window is
        logged only among the first of its kind (see notices)."""
        self.errors.append(message)
        if kind is None or self.notices is None:
            log.log(level, "%s", message)
        else:
            self.notices.emit(kind, message, level)

    def _note_fallbacks(self, outcome: Outcome) -> None:
        """Count what the study shows about the server; say once per run which fallbacks it needs."""
        self.figures.series_without_modality += outcome.series_without_modality
        self.crawled_ok += outcome.status == StudyStatus.SYNCED
        for name, reason in outcome.fallbacks:
            if name in self.fallbacks_used:
                continue
            self.fallbacks_used[name] = reason
            since = "; learned by an earlier run" if name in self.remembered else ""
            if name == METADATA_UNAVAILABLE:
                self.figures.metadata_unavailable = True
                log.warning("the server has no WADO-RS metadata (%s%s): studies are mapped from QIDO-RS alone, without the "
                            "rows that need sequences (shown whatever the metadata setting)", reason, since)
            elif name == SERIES_LEVEL_INSTANCES:
                self.figures.instances_by_series = True
                log.info("the server refuses study-level instance searches (%s%s): instances are asked for series by series", reason, since)

    def _find_gone(self, windows: list[Window]) -> bool:
        """Studies the state holds in the listed windows that the listing no longer showed and
        that the server, asked by UID, no longer has: marked gone, and with --prune sent to the
        sinks as deletions (recorded at the checkpoint). False when the server still has one: the
        listing missed studies (a cap it did not announce, a new cap the state had verified
        absent, studies without StudyDate past a cap) and is counted incomplete."""
        missed = 0
        for window in windows:
            for uid, resource_id in list(self.state.iter_unseen(self.source, self.run_id, window.since, window.until)):
                if not self._absent(uid):
                    missed += 1
                    continue
                self._gone(uid, resource_id)
        if missed:
            # the mutant '= 1' is equivalent: run() calls this only after a listing with no
            # incomplete window, so the count is 0 here
            self.figures.windows_incomplete += 1
            self._error(f"not listed completely: the listing missed {missed} studies the server still has; none of them is marked gone",
                        level=logging.ERROR)
        return not missed

    def _gone(self, uid: str, resource_id: str | None, why: str = "") -> None:
        """A study the server no longer has: marked gone, and with --prune deleted from the sinks
        (marked gone at the checkpoint, if every sink accepted the deletion)."""
        self.figures.studies_gone += 1
        log.warning("study %s is no longer in the PACS%s%s", uid, f" ({why})" if why else "", "; deleting it" if self.config.prune else "")
        if self.config.prune and resource_id:
            self.ledger.delete(uid, resource_id)
        else:
            self.state.mark_gone(self.source, uid, self.run_id)

    def _absent(self, uid: str) -> bool:
        """Whether the server answers a search for this Study Instance UID with no study at all (a
        deletion never rests on the listing alone; an answer holding other studies means the
        server ignores the key, and proves nothing)."""
        try:
            items = self.client.get("studies", "studies", [(Tag.StudyInstanceUID, uid)]).items
        except QidoError as exc:
            self._error(f"study {uid}: not listed, and the search for it failed: {exc}", kind="studies not listed")
            return False
        if items:
            self._error(f"study {uid}: not listed, but the server still has it", kind="studies not listed")
            return False
        return True

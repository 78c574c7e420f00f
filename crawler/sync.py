"""The job: plan -> list -> crawl changed studies -> map -> diff against state -> sinks -> commit.

Crash safety: the state and the sinks move forward together at checkpoints. Between
checkpoints the crawled studies are held back; at a checkpoint every sink flushes (NDJSON:
synced to disk with its sizes recorded; FHIR server: transactions answered), the studies a sink
refused are recorded as failed, the rest as synced, and only then is the state committed. A run
killed anywhere leaves the state at its last checkpoint and a run folder that the next run cuts
back to the same point, so nothing the state calls synced is missing from the output, and no
study is written twice into one run's output.
"""

from __future__ import annotations

import functools
import gc
import hashlib
import logging
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import orjson

from . import dicomjson as dj
from .config import SyncConfig
from .changes import orthanc_base, orthanc_changes
from .crawl import METADATA_UNAVAILABLE, SERIES_LEVEL_INSTANCES, STUDY_FIELDS, VOLATILE, Learned, StudySummary, fetch_study, includefields, summarise
from .dicomjson import Tag
from .errors import ConfigError, CrawlerError, MappingError, QidoError, SinkError, SourceUnreachable
from .listing import ListingReport, iter_study_pages
from .mapping import MappingOptions, endpoint, map_resources
from .notices import Notices
from .mapping.ids import normalise_base
from .mapping.validate import check_available, validate
from .uids import shown as _shown
from .planner import Window, plan
from .qido import QidoClient, client_from, redact
from .readahead import read_ahead
from .sinks import NdjsonFolder, Sink
from .sinks.ndjson import recover
from .state import State

log = logging.getLogger("crawler")

EXIT_OK, EXIT_PARTIAL, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3
Resource = tuple[str, str, bytes]
LISTING_AHEAD = 1000
"""Listed studies held ahead of the crawl, at most this many plus one page (a few MB): enough
for the crawl threads to stay busy while the listing pauses (see readahead)."""
RETRY_PER_RUN = 1000
"""Failed studies outside the run's windows asked for again per run (one request each)."""


def digest(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


def study_hash(attributes: dict[str, Any]) -> str:
    """Hash of the study-level attributes that matter (not the server's URLs or availability)."""
    kept = {k: v for k, v in attributes.items() if k not in VOLATILE}
    return digest(orjson.dumps(kept, option=orjson.OPT_SORT_KEYS))


@dataclass
class Figures:
    studies_listed: int = 0
    studies_new: int = 0
    studies_changed: int = 0
    studies_unchanged: int = 0
    studies_failed: int = 0
    studies_inconsistent: int = 0
    studies_rechecked: int = 0
    """Crawled again (e.g. the server reports no counts to skip them by) with no resource changed."""
    studies_gone: int = 0
    resources_written: int = 0
    """Resources of the studies every sink accepted (recorded in the state)."""
    resources_refused: int = 0
    """Resources of the studies a sink refused: not recorded, sent again by the next run (the
    NDJSON folder may hold them, with an OperationOutcome line naming the study)."""
    resources_deleted: int = 0
    windows_incomplete: int = 0
    windows_split: int = 0
    warnings_not_shown: int = 0
    """Warnings past the first 20 of their kind (see notices): counted, not logged."""
    listing_entries_repaired: int = 0
    """Listing entries that were not UTF-8, listed with U+FFFD in place of the bad bytes."""
    series_without_modality: int = 0
    metadata_unavailable: bool = False
    """The server has no WADO-RS metadata: studies were mapped from QIDO-RS alone."""
    instances_by_series: bool = False
    """The server refuses study-level instance searches: instances were asked for series by series."""


@dataclass
class SyncResult:
    figures: Figures
    requests: dict[str, int]
    seconds: float
    run_id: int
    run_dir: str | None
    exit_code: int
    scope: str = ""
    errors: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {
            **vars(self.figures),
            "requests": self.requests,
            "seconds": round(self.seconds, 3),
            "run_id": self.run_id,
            "run_dir": self.run_dir,
            "scope": self.scope,
            "exit_code": self.exit_code,
        }


@dataclass(frozen=True)
class Outcome:
    summary: StudySummary
    resources: tuple[Resource, ...] = ()
    status: str = "synced"
    error: str | None = None
    path: str | None = None
    fallbacks: tuple[tuple[str, str], ...] = ()
    series_without_modality: int = 0

    @property
    def study(self) -> Resource:
        return self.resources[-1]


def convert(resource: dict[str, Any], version: str) -> dict[str, Any]:
    if version == "R5":
        return resource
    from .mapping import r4

    return {"ImagingStudy": r4.to_r4, "Endpoint": r4.endpoint_r4, "Patient": r4.patient_r4}[resource["resourceType"]](resource)


def _crawl_one(client: QidoClient, summary: StudySummary, config: SyncConfig, options: MappingOptions, learned: Learned) -> Outcome:
    """Fetch, check and map one study (runs in a worker thread; no state, no sinks).

    Whatever goes wrong with one study is that study's failure: an exception nobody expected is
    named by its type only (its text may hold what a server sent, patient data included)."""
    try:
        fetched = fetch_study(client, summary, config.crawl, learned)
        if not fetched.consistent:
            return Outcome(
                summary,
                status="inconsistent",
                error=f"study {summary.uid}: server reports {summary.n_instances} instances, {fetched.enumerated} listed (asked twice)",
                path=fetched.path,
                fallbacks=fetched.fallbacks,
            )
        mapped = map_resources(fetched.data, options)
        without_modality = sum(1 for s in mapped.study.get("series", ()) if "coding" not in s.get("modality", {}))
        resources = [convert(r, config.fhir_version) for r in mapped.resources()]
        if config.validate:
            for resource in (convert(endpoint(options.wado_base or options.source), config.fhir_version), *resources):
                validate(resource, config.fhir_version, summary.uid)
        serialised = tuple((r["resourceType"], r["id"], orjson.dumps(r)) for r in resources)
        return Outcome(summary, (_endpoint(options.wado_base or options.source, config.fhir_version), *serialised), path=fetched.path,
                       fallbacks=fetched.fallbacks, series_without_modality=without_modality)
    except MappingError as exc:
        return Outcome(summary, status="failed", error=str(exc))
    except QidoError as exc:
        return Outcome(summary, status="failed", error=f"study {_shown(summary.uid)}: {exc}")
    except Exception as exc:  # noqa: BLE001 - one study's surprise must not end the run
        return Outcome(summary, status="failed", error=f"study {_shown(summary.uid)}: unexpected error while crawling it ({type(exc).__name__})")


@functools.lru_cache(maxsize=8)
def _endpoint(base: str, version: str) -> Resource:
    """The Endpoint every study of a run references, built and serialised once."""
    resource = convert(endpoint(base), version)
    return resource["resourceType"], resource["id"], orjson.dumps(resource)


def _result(entry: tuple[Future[Outcome], bool]) -> tuple[Outcome, bool]:
    return entry[0].result(), entry[1]


def _outcome_body(message: str) -> bytes:
    return orjson.dumps(
        {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "processing", "diagnostics": message}]}
    )


def _study_date(summary: StudySummary) -> str | None:
    try:
        value = dj.string(summary.attributes, Tag.StudyDate)
    except ValueError:
        return None
    return value if value and len(value) == 8 and value.isdigit() else None


@dataclass
class _Held:
    """A crawled study waiting for the next checkpoint."""

    outcome: Outcome
    known: bool
    send: list[tuple[Resource, str]]
    """The resources the sinks were given, each with its digest."""
    study_digest: str


def choose_windows(config: SyncConfig, state: State, source: str, today: str) -> tuple[list[Window], str, bool]:
    """(windows, a description, whether a complete listing moves the high-water mark)."""
    if config.full:
        return [Window()], "full", True
    if config.since or config.until:
        windows = plan(config.since, config.until)
        return windows, str(windows[0]), False
    mark = state.last_mark(source)
    if mark is None:
        return [Window()], "full (first run)", True
    day = datetime.strptime(mark, "%Y%m%d") - timedelta(days=config.lookback)
    since = day.strftime("%Y%m%d")
    return plan(since, None), f"since {since} (mark {mark} - {config.lookback} days)", True


def _check_out(out: Path | None) -> None:
    if out is not None and out.exists() and not out.is_dir():
        raise ConfigError(f"the output folder {out} is a file")


def run_folder_name(started: datetime, run_id: int, state_identity: str, source: str) -> str:
    """``<UTC time>-run<N>-<tag>``: the tag (8 hex digits of a hash of the state's identity and the
    source) keeps the runs of two jobs that share an output folder apart, even in the same second
    with the same run number."""
    tag = hashlib.sha256(f"{state_identity}\n{source}".encode()).hexdigest()[:8]
    return f"{started.strftime('%Y%m%dT%H%M%SZ')}-run{run_id}-{tag}"


def _today(config: SyncConfig, started: datetime) -> str:
    return started.astimezone(config.zone).strftime("%Y%m%d") if config.zone else started.astimezone().strftime("%Y%m%d")


def sync(config: SyncConfig, progress: Callable[[Figures], None] | None = None, sinks: list[Sink] | None = None) -> SyncResult:
    """Run one sync. Per-study problems are counted and reported, not raised; configuration,
    state and reachability problems raise CrawlerError subclasses.

    ``sinks`` adds sinks besides the NDJSON folder of ``config.out`` (e.g. a FHIR server).
    """
    started_clock = time.monotonic()
    _check_out(config.out)
    if config.validate:
        check_available(config.fhir_version)
    client = client_from(config)
    source = normalise_base(config.url)
    wado_base = normalise_base(config.wado_url or config.url)
    options = MappingOptions(
        source=source, wado_base=wado_base, zone=config.zone, issuer_systems=config.issuer_systems, patients=config.patients
    )
    outputs = list(sinks or [])
    if config.fhir_url:
        from .sinks.fhir import FhirServer

        fhir = FhirServer(
            config.fhir_url,
            fhir_version=config.fhir_version,
            batch_size=config.fhir_batch_size,
            token=config.fhir_token,
            auth=(config.fhir_user, config.fhir_password) if config.fhir_user is not None and config.fhir_password is not None else None,
            timeout=config.timeout,
            retry=replace(config.retry, attempts=config.retries + 1),
            verify=config.verify,
            server_text=config.log_server_text,
            max_answer=config.max_response_mb * 2**20,
            written_types=("Endpoint", "ImagingStudy", *(("Patient",) if config.patients else ())),
            ids=config.fhir_ids,
        )
        fhir.check()
        outputs.append(fhir)
    state = State(config.state, lock=True)
    for output in outputs:
        learned = state.fhir_max_entries(output.base_url) if hasattr(output, "learned_max_entries") else None
        if learned is not None and learned < output.max_entries:
            output.max_entries = learned
        if getattr(output, "ids", None) == "server":
            output.server_id_lookup = functools.partial(state.fhir_server_id, output.base_url)
    thresholds = gc.get_threshold()
    # a run allocates millions of short-lived dicts (parsed answers, resources): the default
    # collection thresholds spend a quarter of the crawler's CPU scanning them
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)
    try:
        return _Run(config, client, state, source, options, progress, outputs).run(started_clock)
    finally:
        gc.set_threshold(*thresholds)
        gc.unfreeze()
        state.close()
        client.close()


class _Run:
    """One sync run's moving parts; ``run`` is the whole job, in order."""

    def __init__(self, config: SyncConfig, client: QidoClient, state: State, source: str, options: MappingOptions,
                 progress: Callable[[Figures], None] | None, sinks: list[Sink]) -> None:
        self.config = config
        self.client = client
        self.state = state
        self.source = source
        self.options = options
        self.progress = progress
        self.sinks = sinks
        self.ndjson: NdjsonFolder | None = None
        self.figures = Figures()
        self.errors: list[str] = []
        self.held: list[_Held] = []
        self.deleting: list[tuple[str, str]] = []
        self.last_checkpoint = time.monotonic()
        self.pending: set[str] = set()
        """UIDs listed in this run that the state does not hold yet (until the next checkpoint)."""
        self.remembered = {} if config.full else state.fallbacks(source)
        """Fallbacks earlier runs learned for the source (a --full run asks the server again)."""
        if self.remembered:
            self.config = replace(config, crawl=replace(config.crawl, fallbacks=tuple(sorted(self.remembered.items()))))
        self.learned = Learned.of(self.config.crawl)
        self.fallbacks_used: dict[str, str] = {}
        self.crawled_ok = 0
        self.stored: dict[tuple[str, str], str | None] = {}

    def run(self, started_clock: float) -> SyncResult:
        config, state = self.config, self.state
        started = datetime.now(timezone.utc).replace(microsecond=0)
        self.run_id = run_id = state.begin_run(self.source, started.isoformat())
        if state.close_interrupted_runs(run_id):
            log.info("an earlier run was interrupted; its state stands at its last checkpoint")
        # choose_windows does not read its `today` (yet): the mutant passing None is equivalent
        windows, scope, moves_mark = choose_windows(config, state, self.source, _today(config, started))
        self.full_listing = windows == [Window()]
        completed, removed = recover(state.unfinished_folders(run_id))
        for folder in completed:
            log.warning("completed interrupted run folder %s at its last checkpoint", folder)
        for folder in removed:
            log.info("removed interrupted run folder %s (it had reached no checkpoint)", folder)
        if config.out is not None:
            folder = config.out / run_folder_name(started, run_id, state.identity(), self.source)
            state.set_run_folder(run_id, str(folder.absolute()))
            self.ndjson = NdjsonFolder(
                folder,
                transaction_time=started.isoformat().replace("+00:00", "Z"),
                request=f"{redact(self.client.base_url)}/studies",
                fresh=True,
            )
            self.sinks.insert(0, self.ndjson)
        state.begin()
        try:
            report = self._list_and_crawl(windows)
            listing_clean = not report.incomplete and not self.listing_errors
            if listing_clean:
                listing_clean = self._find_gone(windows)
                if listing_clean and self.changes_position is not None:
                    state.set_changes_position(self.source, self.changes_position)
            self._checkpoint()
            run_dir = self.ndjson.finish() if self.ndjson else None
            for sink in self.sinks:
                if sink is not self.ndjson:
                    sink.finish()
            f = self.figures
            exit_code = EXIT_PARTIAL if (f.studies_failed or f.studies_inconsistent or f.windows_incomplete) else EXIT_OK
            result = SyncResult(f, self.client.counts.as_dict(), time.monotonic() - started_clock, run_id, run_dir, exit_code, scope, self.errors)
            mark = _today(config, started) if moves_mark and listing_clean else None
            state.finish_run(run_id, _now(), "partial" if exit_code else "ok", run_dir, result.summary(), mark, [str(w) for w in windows])
            state.commit()
            return result
        except BaseException as exc:
            for sink in self.sinks:
                sink.abort()
            state.rollback()
            outcome = "unreachable" if isinstance(exc, SourceUnreachable) else "failed"
            error = str(exc) if isinstance(exc, CrawlerError) else type(exc).__name__
            kept = str(self.ndjson.folder.absolute()) if self.ndjson and self.ndjson.folder.is_dir() else None
            state.finish_run(run_id, _now(), outcome, kept, {**vars(self.figures), "error": error})
            raise

    listing_errors = 0
    changes_position: int | None = None
    full_listing = False

    def _list_and_crawl(self, windows: list[Window]) -> ListingReport:
        config, state, figures = self.config, self.state, self.figures
        known_cap, verified = state.source_facts(self.source)
        report = ListingReport(cap=config.max_results or known_cap, verified=verified, page_size=config.page_size)
        report.filters.keywords = state.key_form(self.source) == "keywords"
        self.notices = report.notices
        if config.executor == "dask":
            from .distributed import Coordinator

            Coordinator(self, report).list_and_crawl(windows)
        else:
            self._crawl_in_threads(windows, report)
        if figures.studies_listed == 0 and report.incomplete and report.windows_complete == 0 and not report.filters.ignored:
            raise SourceUnreachable(f"no study could be listed: {report.incomplete[0]}")
        state.set_source_facts(self.source, report.cap if config.max_results is None else known_cap, report.verified)
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
        return report

    def _crawl_in_threads(self, windows: list[Window], report: ListingReport) -> None:
        config, figures = self.config, self.figures
        in_flight: deque[tuple[Future[Outcome], bool]] = deque()
        with ThreadPoolExecutor(max_workers=config.workers, thread_name_prefix="crawl") as pool:
            try:
                for item in self._listing(windows, report):
                    chosen = self._consider(item)
                    if chosen is None:
                        continue
                    summary, known = chosen
                    in_flight.append((pool.submit(_crawl_one, self.client, summary, config, self.options, self.learned), known))
                    while len(in_flight) > config.workers * 4:
                        self._take(*_result(in_flight.popleft()))
            except SourceUnreachable:
                if figures.studies_listed == 0 and not self.client.answered:
                    raise
                report.incomplete.append("listing stopped: the source could not be reached any more")
            except QidoError as exc:
                if exc.status in (401, 403):
                    raise SourceUnreachable(f"{exc}: check --user/--password or --token", url=exc.url, status=exc.status) from None
                report.incomplete.append(f"listing stopped: {exc}")
            while in_flight:
                self._take(*_result(in_flight.popleft()))

    def _consider(self, item: dict[str, Any]) -> tuple[StudySummary, bool] | None:
        """A listed study: counted and marked seen; returned (with whether the state knew it) when
        it must be crawled, None when it is unchanged, listed already or unusable."""
        figures, state = self.figures, self.state
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
        if summary.uid in self.pending or (row is not None and row.last_seen_run == self.run_id):
            return None
        figures.studies_listed += 1
        if row is not None:
            state.mark_seen(self.source, summary.uid, self.run_id)
        else:
            self.pending.add(summary.uid)
        if (
            row is not None
            and row.status == "synced"
            and row.n_series == summary.n_series
            and row.n_instances == summary.n_instances
            and summary.n_instances is not None
            and row.study_hash == study_hash(dict(summary.attributes))
        ):
            figures.studies_unchanged += 1
            if self.progress:
                self.progress(figures)
            return None
        return summary, row is not None

    def _take(self, outcome: Outcome, known: bool) -> None:
        """A crawled study: held for the next checkpoint, which comes when enough are held or
        enough time has passed."""
        self._hold(outcome, known)
        if self.progress:
            self.progress(self.figures)
        if len(self.held) >= self.config.checkpoint_every or time.monotonic() - self.last_checkpoint > self.config.checkpoint_seconds:
            self._checkpoint()

    def _listing(self, windows: list[Window], report: ListingReport) -> Iterator[dict[str, Any]]:
        """The windows' studies (listed by a thread of their own, up to LISTING_AHEAD ahead),
        then (with --changes orthanc) those the change feed names. Pages, not studies, pass
        between the threads: a hand-over per study cost more CPU than the listing saved."""
        pages = iter_study_pages(self.client, windows, report, max_offset=self.config.max_offset)
        for page in read_ahead(pages, LISTING_AHEAD, "listing", weight=len):
            yield from page
        yield from self._changed_items()

    def _changed_items(self) -> Iterator[dict[str, Any]]:
        """The studies to crawl that the windows' listing did not show: those Orthanc's change feed
        names (with --changes orthanc), then those an earlier run failed (see ``_retried_items``)."""
        yield from self._fed_items()
        yield from self._retried_items()

    def _retried_items(self) -> Iterator[dict[str, Any]]:
        """Studies the state holds as failed or inconsistent that this run has not listed (their
        StudyDate is outside an incremental window): each asked for by UID, so that a study the
        server or a sink refused is sent again by the next run, not only by the next --full one.
        At most RETRY_PER_RUN per run, the longest untried first."""
        if self.full_listing:
            return
        for uid in self.state.studies_to_retry(self.source, self.run_id, RETRY_PER_RUN):
            if uid not in self.pending:
                yield from self._listing_of(uid)

    def _listing_of(self, uid: str) -> list[dict[str, Any]]:
        """What a listing shows of one study, asked for by its Study Instance UID."""
        return self.client.get("studies", "studies", [(Tag.StudyInstanceUID, uid), *includefields(STUDY_FIELDS)]).items

    def _fed_items(self) -> Iterator[dict[str, Any]]:
        """With --changes orthanc: the studies Orthanc's change feed names that the listing did not show."""
        if self.config.changes != "orthanc":
            return
        rest = normalise_base(self.config.orthanc_url) if self.config.orthanc_url else orthanc_base(self.client.base_url)
        since = None if self.full_listing else self.state.changes_position(self.source)
        changes = orthanc_changes(self.client, rest, since)
        self.changes_position = changes.last
        for uid in changes.study_uids:
            row = self.state.study(self.source, uid)
            if uid not in self.pending and (row is None or row.last_seen_run != self.run_id):
                yield from self._listing_of(uid)

    notices: Notices | None = None

    def _error(self, message: str, level: int = logging.WARNING, kind: str | None = None) -> None:
        """Record and log a problem; one of a ``kind`` that can recur per study or window is
        logged only among the first of its kind (see notices)."""
        self.errors.append(message)
        if kind is None or self.notices is None:
            log.log(level, "%s", message)
        else:
            self.notices.emit(kind, message, level)

    def _hold(self, outcome: Outcome, known: bool) -> None:
        """Hand a crawled study's changed resources to the sinks; its state waits for the checkpoint."""
        self._note_fallbacks(outcome)
        if outcome.status != "synced":
            self.figures.studies_failed += outcome.status == "failed"
            self.figures.studies_inconsistent += outcome.status == "inconsistent"
            self._error(outcome.error or f"study {outcome.summary.uid}: {outcome.status}")
            for sink in self.sinks:
                sink.error(_outcome_body(outcome.error or ""))
            self.state.record_study(
                self.source, outcome.summary.uid, run_id=self.run_id, status=outcome.status, error=outcome.error,
                study_date=_study_date(outcome.summary),
            )
            self.pending.discard(outcome.summary.uid)
            return
        digests = [digest(r[2]) for r in outcome.resources]
        send = [(r, d) for r, d in zip(outcome.resources, digests) if self._stored_hash(r[0], r[1]) != d or self._unknown_to_server(r)]
        if send:
            for sink in self.sinks:
                sink.add(outcome.summary.uid, [r for r, _ in send])
        self.held.append(_Held(outcome, known, send, digests[-1]))

    def _note_fallbacks(self, outcome: Outcome) -> None:
        """Count what the study shows about the server; say once per run which fallbacks it needs."""
        self.figures.series_without_modality += outcome.series_without_modality
        self.crawled_ok += outcome.status == "synced"
        for name, reason in outcome.fallbacks:
            if name in self.fallbacks_used:
                continue
            self.fallbacks_used[name] = reason
            since = "; learned by an earlier run" if name in self.remembered else ""
            if name == METADATA_UNAVAILABLE:
                self.figures.metadata_unavailable = True
                log.warning("the server has no WADO-RS metadata (%s%s): studies are mapped from QIDO-RS alone, without the "
                            "rows that need sequences; --metadata never silences this", reason, since)
            elif name == SERIES_LEVEL_INSTANCES:
                self.figures.instances_by_series = True
                log.info("the server refuses study-level instance searches (%s%s): instances are asked for series by series", reason, since)

    def _unknown_to_server(self, resource: Resource) -> bool:
        """With --fhir-ids server: a resource the FHIR server holds under no id the state knows
        (e.g. sent before without the option) is sent again, so that references to it resolve."""
        return any(sink.unknown_to_server(resource[0], resource[1]) for sink in self.sinks if getattr(sink, "ids", None) == "server")

    def _stored_hash(self, resource_type: str, resource_id: str) -> str | None:
        """The state's hash of a resource; the Endpoint's (the same in every study) kept in memory."""
        if resource_type != "Endpoint":
            return self.state.resource_hash(resource_type, resource_id)
        key = (resource_type, resource_id)
        if key not in self.stored:
            self.stored[key] = self.state.resource_hash(resource_type, resource_id)
        return self.stored[key]

    def _checkpoint(self) -> None:
        """Flush every sink, record what they took, commit."""
        refused: dict[str, str] = {}
        for sink in self.sinks:
            refused.update(sink.flush())
        figures, state = self.figures, self.state
        recorded: set[tuple[str, str, str]] = set()
        unrecorded: set[tuple[str, str, str]] = set()
        for held in self.held:
            summary = held.outcome.summary
            if summary.uid in refused:
                figures.studies_failed += 1
                unrecorded.update((t, i, d) for (t, i, _), d in held.send)
                message = f"study {summary.uid}: not accepted: {refused[summary.uid]}"
                self._error(message)
                for sink in self.sinks:
                    sink.error(_outcome_body(message))
                state.record_study(self.source, summary.uid, run_id=self.run_id, status="failed", error=message, study_date=_study_date(summary))
                continue
            if not held.known:
                figures.studies_new += 1
            elif any(resource_type != "Endpoint" for (resource_type, _, _), _ in held.send):
                figures.studies_changed += 1
            else:
                figures.studies_rechecked += 1
            for (resource_type, resource_id, body), body_digest in held.send:
                if (resource_type, resource_id, body_digest) not in recorded:
                    recorded.add((resource_type, resource_id, body_digest))
                    state.put_resource(resource_type, resource_id, body_digest, body)
                    if (resource_type, resource_id) in self.stored:
                        self.stored[resource_type, resource_id] = body_digest
                    figures.resources_written += 1
            _, study_resource_id, _ = held.outcome.study
            state.record_study(
                self.source, summary.uid, run_id=self.run_id, status="synced", resource_id=study_resource_id,
                n_series=summary.n_series, n_instances=summary.n_instances, study_hash=study_hash(dict(summary.attributes)),
                resource_hash=held.study_digest, study_date=_study_date(summary),
            )
        figures.resources_refused += len(unrecorded - recorded)
        self.pending.difference_update(held.outcome.summary.uid for held in self.held)
        self.held.clear()
        for uid, resource_id in self.deleting:
            if uid in refused:
                figures.studies_failed += 1
                message = f"study {uid}: deletion not accepted: {refused[uid]}"
                self._error(message)
                for sink in self.sinks:
                    sink.error(_outcome_body(message))
                continue
            state.mark_gone(self.source, uid, self.run_id)
            state.drop_resource("ImagingStudy", resource_id)
            figures.resources_deleted += 1
        self.deleting.clear()
        for sink in self.sinks:
            learned = getattr(sink, "learned_max_entries", None)
            if learned is not None:
                state.set_fhir_max_entries(sink.base_url, learned)
            if hasattr(sink, "take_server_ids"):
                for (resource_type, resource_id), server_id in sink.take_server_ids().items():
                    state.set_fhir_server_id(sink.base_url, resource_type, resource_id, server_id)
        state.checkpoint()
        self.last_checkpoint = time.monotonic()

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
                self.figures.studies_gone += 1
                log.warning("study %s is no longer in the PACS%s", uid, "; deleting it" if self.config.prune else "")
                if self.config.prune and resource_id:
                    for sink in self.sinks:
                        sink.delete(uid, "ImagingStudy", resource_id)
                    self.deleting.append((uid, resource_id))
                else:
                    self.state.mark_gone(self.source, uid, self.run_id)
        if missed:
            # the mutant '= 1' is equivalent: run() calls this only after a listing with no
            # incomplete window, so the count is 0 here
            self.figures.windows_incomplete += 1
            self._error(f"not listed completely: the listing missed {missed} studies the server still has; none of them is marked gone",
                        level=logging.ERROR)
        return not missed

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


def _now() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


def iter_export(state: State) -> Iterator[tuple[str, bytes]]:
    for resource_type, _, body in state.iter_resources():
        yield resource_type, body


def export(state_path: Path, out: Path) -> dict[str, int]:
    """Write every resource the state holds into ``out`` in the run-folder layout."""
    from .state import open_existing

    _check_out(out)
    state = open_existing(state_path)
    try:
        if out.exists() and any(out.iterdir()):
            raise SinkError(f"{out} is not empty")
        sink = NdjsonFolder(out, transaction_time=_now().replace("+00:00", "Z"), request="export", always=True)
        counts: dict[str, int] = {}
        for resource_type, body in iter_export(state):
            sink.write(resource_type, body)
            counts[resource_type] = counts.get(resource_type, 0) + 1
        sink.finish()
        return counts
    finally:
        state.close()

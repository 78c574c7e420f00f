"""The audit run: list the whole PACS (or a StudyDate window) with the sync's listing engine,
read every study's series and instances, compare with the state and a FHIR server if asked,
and write the report. The pure part is in ``findings``; the files in ``report``.

Per study: one series-level query ``/studies/{uid}/series`` (Modality and (0020,1209): the
series count and the series' modalities) and one paged instance-level query
``/studies/{uid}/instances`` (Series and SOP Instance UIDs, grouped by series); only when the
server leaves the Series Instance UID out at instance level are the instances asked series by
series. Studies are read by ``workers`` threads; the listing, the collector and the report stay
on the calling thread.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .. import dicomjson as dj
from ..config import AuditConfig
from ..crawl import includefields, summarise
from ..dicomjson import Tag
from ..errors import ConfigError, QidoError, SourceUnreachable
from ..files import make_folder
from ..listing import ListingReport, check_listed, iter_studies, listing_failed
from ..mapping.ids import normalise_base
from ..planner import Window, plan
from ..http import redact
from ..auth import for_fhir
from ..auth.smart import READ_SCOPE
from ..qido import QidoClient, client_from
from ..figures import EXIT_OK, EXIT_PARTIAL
from ..worker import study_hash
from ..uids import path_uid, shown
from .copies import FhirReader, included_tags, read_state
from .findings import Collector, CopyRow, Evaluation, InstanceRow, SeriesRow, evaluate, instance_rows, series_rows, totals
from .report import write_report

log = logging.getLogger("crawler")

SERIES_KEYS = (Tag.SeriesInstanceUID, Tag.Modality, Tag.NumberOfSeriesRelatedInstances)
INSTANCE_KEYS = (Tag.SeriesInstanceUID, Tag.SOPInstanceUID)


@dataclass
class AuditProgress:
    """What ``audit``'s ``progress`` receives as the audit runs (one object, updated in place):
    studies listed, read (asked for their series and instances, readable or not) and unreadable;
    once the listing is over (complete, or cut short by an error), ``to_read`` (every listed
    study) and from it ``fraction`` and ``eta``; the source's requests and retries so far, and the seconds since the audit began."""

    studies_listed: int = 0
    studies_read: int = 0
    studies_unreadable: int = 0
    listing_complete: bool = False
    requests: int = 0
    retries: int = 0
    elapsed: float = 0.0

    @property
    def to_read(self) -> int | None:
        return self.studies_listed if self.listing_complete else None

    @property
    def rate(self) -> float:
        """Studies read per second so far."""
        return self.studies_read / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def fraction(self) -> float | None:
        if self.to_read is None:
            return None
        return 1.0 if self.to_read == 0 else min(self.studies_read / self.to_read, 1.0)

    @property
    def eta(self) -> float | None:
        """Seconds left at the rate so far, once the listing is complete and a study is read."""
        if self.to_read is None or not self.studies_read:
            return None
        return max(self.to_read - self.studies_read, 0) / self.rate


@dataclass
class AuditResult:
    source: str
    generated: str
    scope: str
    evaluation: Evaluation
    totals: dict[str, int]
    windows: dict[str, Any]
    requests: dict[str, int]
    seconds: float
    report_dir: Path
    files: list[str]
    exit_code: int

    def summary(self) -> dict[str, Any]:
        """The ``--json`` object."""
        return {
            "source": self.source,
            "generated": self.generated,
            "scope": self.scope,
            "report_dir": str(self.report_dir),
            "files": self.files,
            "totals": self.totals,
            "findings": {f.code: f.count for f in self.evaluation.findings},
            "findings_by_severity": {
                severity: sum(1 for f in self.evaluation.findings if f.severity.value == severity) for severity in ("error", "warning", "info")
            },
            "windows_incomplete": len(self.windows["incomplete"]),
            "windows_split": self.windows["split"],
            "requests": self.requests,
            "seconds": round(self.seconds, 3),
            "exit_code": self.exit_code,
        }


def read_study(client: QidoClient, uid: str, page_size: int, instance_page_size: int,
               by_series: bool = False) -> tuple[list[SeriesRow], list[InstanceRow]]:
    """The rows of one study's series and instances (runs in a worker thread); with ``by_series``
    the instances are asked series by series (a server whose instance searches need a series).
    ValueError when a UID is not safe in a request path (see uids.path_uid): nothing is asked with it."""
    path = f"studies/{path_uid(uid)}"
    series: list[SeriesRow] = []
    for page in client.iter_pages("series", f"{path}/series", includefields(SERIES_KEYS), page_size):
        series.extend(series_rows(page.items))
    instances: list[InstanceRow] = []
    if not by_series:
        for page in client.iter_pages("instances", f"{path}/instances", includefields(INSTANCE_KEYS), instance_page_size):
            instances.extend(instance_rows(page.items))
    if by_series or any(row.series_uid is None for row in instances):
        instances = []
        for row in series:
            if row.uid is None:
                continue
            series_path = f"{path}/series/{path_uid(row.uid)}/instances"
            for page in client.iter_pages("instances", series_path, includefields(INSTANCE_KEYS), instance_page_size):
                instances.extend(InstanceRow(row.uid, r.uid) for r in instance_rows(page.items))
    return series, instances


def _read(client: QidoClient, uid: str, config: AuditConfig) -> tuple[str, tuple[list[SeriesRow], list[InstanceRow]] | None, str | None]:
    try:
        return uid, read_study(client, uid, config.page_size, config.instance_page_size, config.instances_by_series), None
    except SourceUnreachable as exc:
        return uid, None, f"study {uid}: {exc}"
    except QidoError as exc:
        return uid, None, f"study {uid}: {exc}"
    except ValueError as exc:
        return uid, None, f"study {shown(uid)}: a Study or Series Instance UID is {exc}; not asked"


def audit(config: AuditConfig, progress: Callable[[AuditProgress], None] | None = None) -> AuditResult:
    """Run one audit and write its report. Findings are results, not errors; configuration and
    reachability problems raise CrawlerError subclasses (ConfigError, StateError,
    SourceUnreachable, SinkError)."""
    started_clock = time.monotonic()
    source = normalise_base(config.url)
    if config.report.exists() and not config.report.is_dir():
        raise ConfigError(f"the report folder {config.report} is a file", setting="report")
    try:
        make_folder(config.report)
    except OSError as exc:
        raise ConfigError(f"cannot create the report folder {config.report}: {exc.strerror or exc}", setting="report") from None
    state_rows: dict[str, CopyRow] | None = None
    known_cap, verified = None, 0
    tags: tuple[str, ...] = ()
    if config.state is not None:
        state_rows, (known_cap, verified) = read_state(config.state, source)
        tags = included_tags(config.state, source)
    client = client_from(config)
    fhir: FhirReader | None = None
    if config.fhir_url:
        fhir = FhirReader(
            config.fhir_url,
            auth=(config.fhir_user, config.fhir_password) if config.fhir_user is not None and config.fhir_password is not None else None,
            token=config.fhir_token,
            verify=config.verify,
            timeout=config.timeout,
            retries=config.retries,
            retry=config.retry,
            credentials=for_fhir(config, READ_SCOPE),
        )
    try:
        generated = datetime.now(timezone.utc).replace(microsecond=0)
        today = (generated.astimezone(config.zone) if config.zone else generated.astimezone()).date()
        windows = plan(config.since, config.until)
        scope = "all studies" if windows == [Window()] else str(windows[0])
        collector = Collector()
        figures = AuditProgress()
        # the listing asks for the study-level tags the sync included, and hashes as the sync did
        report = ListingReport(cap=config.max_results or known_cap, verified=verified, page_size=config.page_size,
                               fields=tuple(t.partition(":")[0] for t in tags if t.endswith(":study")))
        _crawl(client, config, windows, report, collector, figures, progress, started_clock, tags)
        fhir_rows = fhir.rows(source, collector.studies) if fhir is not None else None
        if fhir is not None:
            report.incomplete.extend(fhir.problems)
        evaluation = evaluate(
            collector.studies,
            today=today,
            incomplete=report.incomplete,
            state=state_rows,
            fhir=fhir_rows,
            since=config.since,
            until=config.until,
            fhir_extras=fhir.searched if fhir is not None else True,
        )
        figures_total = totals(collector.studies)
        window_info = {
            "listed": report.windows_listed,
            "complete": report.windows_complete,
            "split": report.windows_split,
            "cap": report.cap,
            "incomplete": sorted(report.incomplete),
        }
        requests = client.counts.as_dict()
        if fhir is not None:
            requests["fhir"] = fhir.requests
        exit_code = EXIT_PARTIAL if evaluation.errors else EXIT_OK
        files = write_report(
            config.report,
            source=redact(config.url),
            generated=generated.isoformat().replace("+00:00", "Z"),
            scope=scope,
            today=today,
            studies=collector.studies,
            evaluation=evaluation,
            totals=figures_total,
            windows=window_info,
            include_phi=config.include_phi,
            compared={"state": _shown_state(config.state), "fhir": redact(config.fhir_url) if config.fhir_url else None},
        )
        return AuditResult(
            source=redact(config.url),
            generated=generated.isoformat().replace("+00:00", "Z"),
            scope=scope,
            evaluation=evaluation,
            totals=figures_total,
            windows=window_info,
            requests=requests,
            seconds=time.monotonic() - started_clock,
            report_dir=config.report,
            files=files,
            exit_code=exit_code,
        )
    finally:
        client.close()
        if fhir is not None:
            fhir.close()


def _crawl(
    client: QidoClient,
    config: AuditConfig,
    windows: list[Window],
    report: ListingReport,
    collector: Collector,
    figures: AuditProgress,
    progress: Callable[[AuditProgress], None] | None,
    started_clock: float,
    tags: tuple[str, ...] = (),
) -> None:
    """List the windows and read every study once (the same listing engine as sync: caps found
    and windows split the same way)."""
    in_flight: deque[Future[tuple[str, Any, str | None]]] = deque()

    def report_progress() -> None:
        if progress:
            counts = client.counts.as_dict()
            figures.requests, figures.retries = counts["total"], counts["retries"]
            figures.elapsed = time.monotonic() - started_clock
            progress(figures)

    def done(future: Future[tuple[str, Any, str | None]]) -> None:
        uid, rows, error = future.result()
        if error is not None:
            collector.failed(uid, error)
            figures.studies_unreadable += 1
            log.warning("%s", error)
        else:
            collector.crawled(uid, *rows)
        figures.studies_read += 1
        report_progress()

    with ThreadPoolExecutor(max_workers=config.workers, thread_name_prefix="audit") as pool:
        try:
            for item in iter_studies(client, windows, report, max_offset=config.max_offset):
                if dj.UNREADABLE in item:
                    report.incomplete.append(f"study {dj.first(item, Tag.StudyInstanceUID)}: listing entry unreadable: {item[dj.UNREADABLE]}")
                    continue
                try:
                    summary = summarise(item)
                except ValueError as exc:
                    report.incomplete.append(f"a listing entry could not be used: {exc}")
                    continue
                facts = collector.listed(item, study_hash(dict(summary.attributes), tags))
                if facts is None:
                    continue
                figures.studies_listed += 1
                in_flight.append(pool.submit(_read, client, summary.uid, config))
                while len(in_flight) > config.workers * 4:
                    done(in_flight.popleft())
                report_progress()
        except QidoError as exc:
            listing_failed(exc, report, started=figures.studies_listed > 0 or client.answered)
        finally:
            figures.listing_complete = True
            report_progress()
            while in_flight:
                done(in_flight.popleft())
    check_listed(report, figures.studies_listed)
    for message in report.incomplete:
        report.notices.emit("windows not listed completely", f"not listed completely: {message}", logging.ERROR)
    report.notices.close()


def _shown_state(state: Path | str | None) -> str | None:
    """The state as the report names it: a PostgreSQL URL without its password."""
    if state is None:
        return None
    return redact(state, keep_user=True) if isinstance(state, str) else str(state)

"""The job: plan -> list -> crawl changed studies -> map -> diff against state -> sinks -> commit."""

from __future__ import annotations

import hashlib
import logging
import re
import shutil
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import orjson

from .config import SyncConfig
from .crawl import VOLATILE, Learned, StudySummary, fetch_study, summarise
from .listing import ListingReport, iter_studies
from .errors import CrawlerError, MappingError, QidoError, SinkError, SourceUnreachable
from .mapping import MappingOptions, endpoint, map_resources
from .mapping.validate import check_available, validate
from .mapping.ids import normalise_base
from .planner import plan
from .qido import QidoClient, redact, token_from_command
from .sinks import NdjsonFolder
from .state import State

log = logging.getLogger("crawler")
RUN_FOLDER = re.compile(r"^\d{8}T\d{6}Z-run\d+$")

EXIT_OK, EXIT_PARTIAL, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3


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
    resources_written: int = 0
    windows_incomplete: int = 0
    windows_split: int = 0


@dataclass
class SyncResult:
    figures: Figures
    requests: dict[str, int]
    seconds: float
    run_id: int
    run_dir: str | None
    exit_code: int
    errors: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {
            **vars(self.figures),
            "requests": self.requests,
            "seconds": round(self.seconds, 3),
            "run_id": self.run_id,
            "run_dir": self.run_dir,
            "exit_code": self.exit_code,
        }


@dataclass(frozen=True)
class Outcome:
    summary: StudySummary
    resources: tuple[tuple[str, str, bytes], ...] = ()
    status: str = "synced"
    error: str | None = None
    path: str | None = None

    @property
    def study(self) -> tuple[str, str, bytes]:
        return self.resources[-1]


def convert(resource: dict[str, Any], version: str) -> dict[str, Any]:
    if version == "R5":
        return resource
    from .mapping import r4

    return {"ImagingStudy": r4.to_r4, "Endpoint": r4.endpoint_r4, "Patient": r4.patient_r4}[resource["resourceType"]](resource)


def _crawl_one(client: QidoClient, summary: StudySummary, config: SyncConfig, options: MappingOptions, learned: Learned) -> Outcome:
    try:
        fetched = fetch_study(client, summary, config.crawl, learned)
        if not fetched.consistent:
            return Outcome(
                summary,
                status="inconsistent",
                error=f"study {summary.uid}: server reports {summary.n_instances} instances, {fetched.enumerated} listed (asked twice)",
                path=fetched.path,
            )
        resources = [convert(r, config.fhir_version) for r in map_resources(fetched.data, options).resources()]
        if config.validate:
            for resource in resources:
                validate(resource, config.fhir_version, summary.uid)
        return Outcome(summary, tuple((r["resourceType"], r["id"], orjson.dumps(r)) for r in resources), path=fetched.path)
    except MappingError as exc:
        return Outcome(summary, status="failed", error=str(exc))
    except QidoError as exc:
        return Outcome(summary, status="failed", error=f"study {summary.uid}: {exc}")


def _outcome_body(message: str) -> bytes:
    return orjson.dumps(
        {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "processing", "diagnostics": message}]}
    )


def clean_interrupted(out: Path) -> list[Path]:
    """Remove run folders that an interrupted run left without a manifest (the state never recorded them)."""
    removed = []
    if out.is_dir():
        for child in sorted(out.iterdir()):
            if child.is_dir() and RUN_FOLDER.match(child.name) and not (child / "manifest.json").exists():
                shutil.rmtree(child, ignore_errors=True)
                removed.append(child)
    return removed


def sync(config: SyncConfig, progress: Callable[[Figures], None] | None = None) -> SyncResult:
    """Run one sync. Per-study problems are counted and reported, not raised; configuration and
    state problems raise CrawlerError subclasses."""
    started_clock = time.monotonic()
    client = QidoClient(
        config.url,
        auth=(config.user, config.password) if config.user is not None and config.password is not None else None,
        token=config.token,
        timeout=config.timeout,
        retry=replace(config.retry, attempts=config.retries + 1),
        pool_size=config.workers + 1,
        verify=config.verify,
        token_provider=token_from_command(config.token_command) if config.token_command else None,
        headers=config.headers,
        max_rps=config.max_rps,
    )
    source = normalise_base(config.url)
    wado_base = normalise_base(config.wado_url or config.url)
    options = MappingOptions(
        source=source, wado_base=wado_base, zone=config.zone, issuer_systems=config.issuer_systems, patients=config.patients
    )
    if config.validate:
        check_available(config.fhir_version)
    learned = Learned()
    windows = plan(config.since, config.until)
    state = State(config.state)
    started = datetime.now(timezone.utc).replace(microsecond=0)
    run_id = state.begin_run(source, started.isoformat())
    sink = None
    if config.out is not None:
        for removed in clean_interrupted(config.out):
            log.info("removed interrupted run folder %s", removed)
        sink = NdjsonFolder(
            config.out / f"{started.strftime('%Y%m%dT%H%M%SZ')}-run{run_id}",
            transaction_time=started.isoformat().replace("+00:00", "Z"),
            request=f"{redact(client.base_url)}/studies",
        )
    figures = Figures()
    errors: list[str] = []
    exit_code = EXIT_OK
    seen: set[str] = set()

    def store(resource_type: str, resource_id: str, body: bytes) -> bool:
        body_digest = digest(body)
        if state.resource_hash(resource_type, resource_id) == body_digest:
            return False
        if sink is not None:
            sink.write(resource_type, body)
        state.put_resource(resource_type, resource_id, body_digest, body)
        figures.resources_written += 1
        return True

    def finish(outcome: Outcome, known: bool) -> None:
        summary = outcome.summary
        if outcome.status != "synced":
            figures.studies_failed += outcome.status == "failed"
            figures.studies_inconsistent += outcome.status == "inconsistent"
            errors.append(outcome.error or f"study {summary.uid}: {outcome.status}")
            log.warning("%s", outcome.error)
            if sink is not None:
                sink.error(_outcome_body(outcome.error or ""))
            state.record_study(source, summary.uid, run_id=run_id, status=outcome.status, error=outcome.error)
            return
        if known:
            figures.studies_changed += 1
        else:
            figures.studies_new += 1
        for resource_type, resource_id, body in outcome.resources:
            store(resource_type, resource_id, body)
        _, study_resource_id, study_body = outcome.study
        state.record_study(
            source,
            summary.uid,
            run_id=run_id,
            status="synced",
            resource_id=study_resource_id,
            n_series=summary.n_series,
            n_instances=summary.n_instances,
            study_hash=study_hash(dict(summary.attributes)),
            resource_hash=digest(study_body),
        )

    state.begin()
    try:
        endpoint_resource = endpoint(wado_base)
        endpoint_written = False
        pending: deque[tuple[Future[Outcome], bool]] = deque()
        with ThreadPoolExecutor(max_workers=config.workers, thread_name_prefix="crawl") as pool:

            def drain(limit: int) -> None:
                while len(pending) > limit:
                    future, known = pending.popleft()
                    finish(future.result(), known)
                    if progress:
                        progress(figures)

            known_cap, verified = state.source_facts(source)
            report = ListingReport(cap=config.max_results or known_cap, verified=verified, page_size=config.page_size)
            try:
                for item in iter_studies(client, windows, report, max_offset=config.max_offset):
                    try:
                        summary = summarise(item)
                    except ValueError as exc:
                        figures.studies_failed += 1
                        message = f"listing entry: {exc}"
                        errors.append(message)
                        log.warning("%s", message)
                        continue
                    if summary.uid in seen:
                        continue
                    seen.add(summary.uid)
                    figures.studies_listed += 1
                    row = state.study(source, summary.uid)
                    if (
                        row is not None
                        and row.status == "synced"
                        and row.n_series == summary.n_series
                        and row.n_instances == summary.n_instances
                        and summary.n_instances is not None
                        and row.study_hash == study_hash(dict(summary.attributes))
                    ):
                        figures.studies_unchanged += 1
                        if progress:
                            progress(figures)
                        continue
                    if not endpoint_written:
                        store("Endpoint", endpoint_resource["id"], orjson.dumps(convert(endpoint_resource, config.fhir_version)))
                        endpoint_written = True
                    pending.append((pool.submit(_crawl_one, client, summary, config, options, learned), row is not None))
                    drain(config.workers * 4)
            except SourceUnreachable:
                if figures.studies_listed == 0 and not client.answered:
                    raise
                report.incomplete.append("listing stopped: the source could not be reached any more")
            except QidoError as exc:
                if exc.status in (401, 403):
                    raise SourceUnreachable(f"{exc}: check --user/--password or --token", url=exc.url, status=exc.status) from None
                report.incomplete.append(f"listing stopped: {exc}")
            if figures.studies_listed == 0 and report.incomplete and report.windows_complete == 0:
                raise SourceUnreachable(f"no study could be listed: {report.incomplete[0]}")
            state.set_source_facts(source, report.cap if config.max_results is None else known_cap, report.verified)
            figures.windows_incomplete = len(report.incomplete)
            figures.windows_split = report.windows_split
            for message in report.incomplete:
                errors.append(f"not listed completely: {message}")
                log.error("not listed completely: %s", message)
            drain(0)
        run_dir = sink.finish() if sink is not None else None
        if figures.studies_failed or figures.studies_inconsistent or figures.windows_incomplete:
            exit_code = EXIT_PARTIAL
        result = SyncResult(figures, client.counts.as_dict(), time.monotonic() - started_clock, run_id, run_dir, exit_code, errors)
        state.finish_run(run_id, _now(), "partial" if exit_code else "ok", run_dir, result.summary())
        state.commit()
        return result
    except BaseException as exc:
        if sink is not None:
            sink.abort()
        state.rollback()
        outcome = "unreachable" if isinstance(exc, SourceUnreachable) else "failed"
        state.finish_run(run_id, _now(), outcome, None, {**vars(figures), "error": str(exc) if isinstance(exc, CrawlerError) else type(exc).__name__})
        raise
    finally:
        state.close()
        client.close()


def _now() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


def iter_export(state: State) -> Iterator[tuple[str, bytes]]:
    for resource_type, _, body in state.iter_resources():
        yield resource_type, body


def export(state_path: Path, out: Path) -> dict[str, int]:
    """Write every resource the state holds into ``out`` in the run-folder layout."""
    from .state import open_existing

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

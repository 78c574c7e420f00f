"""The job's entry points: ``sync()`` sets up the client, the sinks, the state and the run folder,
then runs one ``SyncRun`` (see run); ``export()`` writes what the state holds.

Crash safety: the state and the sinks move forward together at checkpoints (see ledger). A run
killed anywhere leaves the state at its last checkpoint and a run folder that the next run cuts
back to the same point, so nothing the state calls synced is missing from the output, and no
study is written twice into one run's output.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

from .config import SyncConfig
from .errors import ConfigError, SinkError
from .figures import RunProgress, SyncResult
from .mapping import MappingOptions
from .mapping.ids import endpoint_id, normalise_base
from .mapping.validate import check_available
from .http import redact
from .planner import Window, plan
from .qido import client_from
from .run import SyncRun, now_utc
from .sinks import NdjsonFolder, Sink
from .sinks.base import learns_max_entries, uses_server_ids
from .sinks.ndjson import recover
from .state import State

log = logging.getLogger("crawler")


def choose_windows(config: SyncConfig, mark: str | None) -> tuple[list[Window], str, bool]:
    """(windows, a description, whether a complete listing moves the high-water mark), given the
    source's high-water mark (None: no run of it listed completely yet)."""
    if config.full:
        return [Window()], "full", True
    if config.since or config.until:
        windows = plan(config.since, config.until)
        return windows, str(windows[0]), False
    if mark is None:
        return [Window()], "full (first run)", True
    day = datetime.strptime(mark, "%Y%m%d") - timedelta(days=config.lookback)
    since = day.strftime("%Y%m%d")
    return plan(since, None), f"since {since} (mark {mark} - {config.lookback} days)", True


def check_out(out: Path | None) -> None:
    if out is not None and out.exists() and not out.is_dir():
        raise ConfigError(f"the output folder {out} is a file")


def run_folder_name(started: datetime, run_id: int, state_identity: str, source: str) -> str:
    """``<UTC time>-run<N>-<tag>``: the tag (8 hex digits of a hash of the state's identity and the
    source) keeps the runs of two jobs that share an output folder apart, even in the same second
    with the same run number."""
    tag = hashlib.sha256(f"{state_identity}\n{source}".encode()).hexdigest()[:8]
    return f"{started.strftime('%Y%m%dT%H%M%SZ')}-run{run_id}-{tag}"


def run_day(config: SyncConfig, started: datetime) -> str:
    return started.astimezone(config.zone).strftime("%Y%m%d") if config.zone else started.astimezone().strftime("%Y%m%d")


def sync(config: SyncConfig, progress: Callable[[RunProgress], None] | None = None, sinks: list[Sink] | None = None) -> SyncResult:
    """Run one sync. Per-study problems are counted and reported, not raised; configuration,
    state and reachability problems raise CrawlerError subclasses.

    ``sinks`` adds sinks besides the NDJSON folder of ``config.out`` (e.g. a FHIR server).
    """
    started_clock = time.monotonic()
    check_out(config.out)
    if config.validate:
        check_available(config.fhir_version)
    client = client_from(config)
    source = normalise_base(config.url)
    wado_base = normalise_base(config.wado_url or config.url)
    mapping = MappingOptions(
        source=source, wado_base=wado_base, zone=config.zone, issuer_systems=config.issuer_systems, patients=config.patients
    )
    outputs = list(sinks or [])
    if config.fhir_url:
        outputs.append(fhir_server(config, config.fhir_url))
    state = State(config.state, lock=source)
    try:
        for output in outputs:
            if learns_max_entries(output):
                learned = state.fhir_max_entries(output.base_url)
                if learned is not None and learned < output.max_entries:
                    output.max_entries = learned
            if uses_server_ids(output):
                output.server_id_lookup = functools.partial(state.fhir_server_id, output.base_url)
        started = datetime.now(timezone.utc).replace(microsecond=0)
        run_id = state.begin_run(source, started.isoformat())
        if state.close_interrupted_runs(run_id, source):
            log.info("an earlier run was interrupted; its state stands at its last checkpoint")
        today = run_day(config, started)
        windows, scope, moves_mark = choose_windows(config, state.last_mark(source))
        completed, removed = recover(state.unfinished_folders(run_id, source))
        for folder in completed:
            log.warning("completed interrupted run folder %s at its last checkpoint", folder)
        for folder in removed:
            log.info("removed interrupted run folder %s (it had reached no checkpoint)", folder)
        ndjson = None
        if config.out is not None:
            folder = config.out / run_folder_name(started, run_id, state.identity(), source)
            state.set_run_folder(run_id, str(folder.absolute()))
            ndjson = NdjsonFolder(
                folder,
                transaction_time=started.isoformat().replace("+00:00", "Z"),
                request=f"{redact(client.base_url)}/studies",
                fresh=True,
            )
            outputs.insert(0, ndjson)
        outputs.extend(table_sinks(config, run_folder_name(started, run_id, state.identity(), source), run_id, source, wado_base))
        run = SyncRun(config, client, state, source, mapping, outputs, ndjson, run_id, progress, started_clock)
        return run.run(windows, scope, moves_mark, today, started_clock)
    finally:
        state.close()
        client.close()


def fhir_server(config: SyncConfig, url: str) -> Sink:
    """The FHIR server sink at ``url`` (``config.fhir_url``), its capabilities checked."""
    from .auth import for_fhir
    from .auth.smart import write_scope
    from .sinks.fhir import FhirServer

    written = ("Endpoint", "ImagingStudy", *(("Patient",) if config.patients else ()))
    fhir = FhirServer(
        url,
        fhir_version=config.fhir_version,
        batch_size=config.fhir_batch_size,
        token=config.fhir_token,
        auth=(config.fhir_user, config.fhir_password) if config.fhir_user is not None and config.fhir_password is not None else None,
        timeout=config.timeout,
        retry=config.retry,
        verify=config.verify,
        server_text=config.log_server_text,
        max_answer=config.max_response_mb * 2**20,
        written_types=written,
        ids=config.fhir_ids,
        credentials=for_fhir(config, write_scope(written)),
    )
    fhir.check()
    return fhir


def table_sinks(config: SyncConfig, run_name: str, run_id: int, source: str, wado_base: str) -> list[Sink]:
    """The ``--parquet`` and ``--delta`` sinks of one run (pyarrow and deltalake are imported only
    here); a Parquet log's files left by a killed run of the same state and source are finished
    first (see sinks.parquet)."""
    if config.parquet is None and config.delta is None:
        return []
    endpoints = {f"Endpoint/{endpoint_id(wado_base)}": wado_base}
    sinks: list[Sink] = []
    if config.parquet is not None:
        from .sinks.parquet import ParquetLog, recover as finish_killed, run_tag

        try:
            for run in finish_killed(config.parquet, run_tag(run_name), run_name):
                log.warning("finished the Parquet files of interrupted run %s at its last checkpoint", run)
        except OSError as exc:
            raise SinkError(f"cannot finish the interrupted runs' Parquet files in {config.parquet}: {exc.strerror or exc}") from None
        sinks.append(ParquetLog(config.parquet, run_name, source, run_id, endpoints, tags=config.crawl.tags))
    if config.delta is not None:
        from .sinks.delta import DeltaTables

        sinks.append(DeltaTables(config.delta, source, run_id, endpoints, tags=config.crawl.tags))
    return sinks


def iter_export(state: State) -> Iterator[tuple[str, bytes]]:
    for resource_type, _, body in state.iter_resources():
        yield resource_type, body


def export(state_path: Path, out: Path) -> dict[str, int]:
    """Write every resource the state holds into ``out`` in the run-folder layout."""
    check_out(out)
    state = State.open(state_path)
    try:
        if out.exists() and any(out.iterdir()):
            raise SinkError(f"{out} is not empty")
        sink = NdjsonFolder(out, transaction_time=now_utc().replace("+00:00", "Z"), request="export", always=True)
        counts: dict[str, int] = {}
        for resource_type, body in iter_export(state):
            sink.write(resource_type, body)
            counts[resource_type] = counts.get(resource_type, 0) + 1
        sink.finish()
        return counts
    finally:
        state.close()

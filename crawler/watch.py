"""``qido-crawler watch``: follow a change source and keep the outputs within seconds of the PACS.

On a state with no complete listing of the source (or no cursor of its change source), a full
listing first, as a first ``sync`` does. Then, every ``interval``, the change source is read from
the stored cursor, up to changes ``stable_after`` old (a study still being received waits; the
cursor stops before the first change that is not that old), the studies it names are crawled by
UID, and a checkpoint records them with the cursor. The polls of one ``roll_every`` period are
one run (one run folder, finished with its manifest at the end of the period; none made when
nothing was written, and no run at all for a period without changes). Every
``reconcile_every``, and when the change log was reset, a complete listing (a ``--full`` run)
finds what the change source does not tell (deletions on Orthanc, lost changes).

Crash safety is ``sync``'s: state and outputs move together at checkpoints (see ledger); the
next start completes an interrupted run folder at its last checkpoint and reads the changes
again from the stored cursor. Transient failures while watching (server down, 5xx, a FHIR server
that refuses) end the period's run at its last checkpoint and are tried again later, with
backoff; they are counted and logged once per kind. Failures before the source answered once are
raised, as ``sync`` raises them.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from typing import Any

from .changes import read_changes
from .config import SyncConfig
from .errors import ConfigError, QidoError, SinkError, SourceUnreachable
from .figures import SyncResult
from .http import redact
from .kinds import ChangeSource
from .mapping import MappingOptions
from .mapping.ids import normalise_base
from .mapping.validate import check_available
from .metrics import MetricsServer, WatchFigures
from .notices import Notices
from .planner import Window
from .qido import client_from
from .run import Stopped, SyncRun, change_base
from .sinks import NdjsonFolder, Sink
from .sinks.ndjson import recover
from .state import State
from .sync import check_out, fhir_server, run_day, run_folder_name, table_sinks

log = logging.getLogger("crawler")


def backoff(failures: int, interval: float, longest: float) -> float:
    """The wait after ``failures`` failed attempts in a row: one interval after the first, twice
    as long after each further one, at most ``longest``."""
    return min(interval * float(2 ** min(max(failures, 1) - 1, 30)), longest)


@dataclass(frozen=True)
class WatchOptions:
    """How often to poll, how old a change must be, how long a run lasts, how often to reconcile
    (all in seconds); ``max_backoff``: the longest wait after repeated failures;
    ``metrics_port``: serve ``/metrics`` and ``/healthz`` there (see metrics; 0: any free port),
    on ``metrics_address`` (default: every interface)."""

    interval: float = 10.0
    stable_after: float = 60.0
    roll_every: float = 300.0
    reconcile_every: float = 86400.0
    max_backoff: float = 300.0
    metrics_port: int | None = None
    metrics_address: str = ""
    roll_studies: int | None = None
    """Also finish the current run once it has written (or deleted, or failed) this many studies."""
    exit_after: float | None = None
    """Stop as a SIGTERM stops it (the open run finished, exit 0) once the watch has run this long:
    for a supervisor that starts it again, which bounds what a long-lived process accumulates
    (delta-rs's memory per commit)."""

    def __post_init__(self) -> None:
        for name in ("interval", "roll_every", "reconcile_every", "max_backoff", "exit_after"):
            value = getattr(self, name)
            if name == "exit_after" and value is None:
                continue
            if not isinstance(value, (int, float)) or value <= 0:
                raise ConfigError(f"the watch's {name.replace('_', ' ')} must be a number of seconds > 0, not {value!r}", setting=name)
        if not isinstance(self.stable_after, (int, float)) or self.stable_after < 0:
            raise ConfigError(f"the watch's stable after must be a number of seconds >= 0, not {self.stable_after!r}", setting="stable_after")
        if self.roll_studies is not None and (type(self.roll_studies) is not int or self.roll_studies < 1):
            raise ConfigError(f"the watch's roll studies must be a number of studies >= 1, not {self.roll_studies!r}", setting="roll_studies")
        if self.metrics_port is not None and (type(self.metrics_port) is not int or not 0 <= self.metrics_port <= 65535):
            raise ConfigError(f"the metrics port must be a TCP port number, not {self.metrics_port!r}", setting="metrics_port")


@dataclass
class WatchResult:
    """What a watch did, from its start to its stop."""

    polls: int = 0
    poll_errors: int = 0
    """Polls, listings and run ends that failed (tried again later)."""
    runs: int = 0
    """Runs ended (the first listing, reconciliations, periods of polls), well or not."""
    run_dirs: list[str] = field(default_factory=list)
    """The run folders finished (each with its manifest)."""
    reconciliations: int = 0
    reconciled: int = 0
    """Studies the reconciliations found new, changed or gone: what the change source had not told."""
    studies_synced: int = 0
    studies_failed: int = 0
    studies_gone: int = 0
    cursor: str | None = None
    newest_change: datetime | None = None
    """When the newest change the watch has processed was made (the source's own time)."""
    last_poll: datetime | None = None
    """When the change source was last read successfully."""
    requests: int = 0
    retries: int = 0
    exit_code: int = 0

    def summary(self) -> dict[str, Any]:
        out = {k: v for k, v in vars(self).items()}
        for name in ("newest_change", "last_poll"):
            moment = out[name]
            out[name] = moment.isoformat() if moment is not None else None
        return out


class Watcher:
    """One watch: its client, state (locked for the whole watch), and the run of the current
    period. Use ``run()`` once, from the thread that made it (the state is used from one thread);
    ``figures()`` may be read from any."""

    def __init__(self, config: SyncConfig, options: WatchOptions, stop: threading.Event | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if config.changes is None:
            raise ConfigError("watch follows a change source: name one (orthanc or azure)", setting="changes")
        if config.out is None and config.fhir_url is None and config.parquet is None and config.delta is None:
            raise ConfigError("watch needs an output: an output folder, a FHIR server or tables", setting="out")
        if config.since or config.until:
            raise ConfigError("watch lists every study when it lists: it takes no since or until", setting="since")
        check_out(config.out)
        if config.validate:
            check_available(config.fhir_version)
        self.config = replace(config, full=False)
        self.options = options
        self.stop = stop or threading.Event()
        self.clock = clock
        self.kind = ChangeSource(config.changes)
        self.source = normalise_base(config.url)
        self.mapping = MappingOptions(
            source=self.source, wado_base=normalise_base(config.wado_url or config.url), zone=config.zone,
            issuer_systems=config.issuer_systems, patients=config.patients,
        )
        self.result = WatchResult()
        self.notices = Notices(log, limit=1)
        self.period: SyncRun | None = None
        self.current: SyncRun | None = None
        """The run under way (a period's, or a complete listing): its figures count in the metrics."""
        self.metrics: MetricsServer | None = None
        self.period_started = 0.0
        self.retry_due = True
        self.reconcile_due = False
        self.next_reconcile = 0.0
        self.failures = 0
        self.answered = False
        """The source has answered once: from then on, failures are tried again, not raised."""
        self.client = client_from(config)
        try:
            self.state = State(config.state, lock=self.source)
        except BaseException:
            self.client.close()
            raise
        self.base = change_base(self.config, self.client)

    # --- the loop --------------------------------------------------------------------------

    def run(self) -> WatchResult:
        began = self.clock()
        try:
            if self.options.metrics_port is not None:
                self.metrics = MetricsServer(self.options.metrics_port, self.figures, self.options.metrics_address)
                log.info("metrics on port %d: /metrics, /healthz", self.metrics.port)
            self._recover()
            if self.state.last_mark(self.source) is None or self.state.change_cursor(self.source, self.kind) is None:
                try:
                    if not self._full_run(first=True):
                        self.reconcile_due = True
                except Stopped:
                    return self._result()
            self.next_reconcile = self.clock() + self.options.reconcile_every
            ends = None if self.options.exit_after is None else began + self.options.exit_after
            while not self.stop.is_set():
                delay = self._step()
                if ends is not None:
                    if self.clock() >= ends:
                        log.info("watch: ran for its --exit-after; finishing the open run folder and stopping")
                        break
                    delay = min(delay, ends - self.clock())
                if self.stop.wait(delay):
                    break
            self._end_period()
            return self._result()
        except BaseException as exc:
            if self.period is not None:
                self._abort_period(exc)
            raise
        finally:
            if self.metrics is not None:
                self.metrics.close()
            self.state.close()
            self.client.close()

    def figures(self) -> WatchFigures:
        """The metrics' figures now (read from the metrics server's thread: plain reads only)."""
        r, live = self.result, self.current
        f = live.figures if live is not None else None
        return WatchFigures(
            source=redact(self.source), feed=str(self.kind), cursor=r.cursor, newest_change=r.newest_change, last_poll=r.last_poll,
            polls=r.polls, poll_errors=r.poll_errors, failing=self.failures, runs=r.runs, reconciliations=r.reconciliations,
            reconciled=r.reconciled,
            studies={
                "synced": r.studies_synced + (f.studies_new + f.studies_changed if f else 0),
                "failed": r.studies_failed + (f.studies_failed + f.studies_inconsistent if f else 0),
                "gone": r.studies_gone + (f.studies_gone if f else 0),
            },
            requests=self.client.counts.as_dict(),
        )

    def _step(self) -> float:
        """One poll (or a reconciliation, when due); the seconds to wait before the next."""
        try:
            if self.reconcile_due or self.clock() >= self.next_reconcile:
                self._end_period()
                if not self._full_run(first=False):
                    self.reconcile_due = True
                    return self._failed("the listing was incomplete")
            elif not self._poll():
                return self._failed("not every study the change source named could be asked for; its changes are read again",
                                    "incomplete poll")
            if self.period is not None and self._period_full():
                self._end_period()
        except Stopped:
            return 0.0
        except (QidoError, SinkError) as exc:
            if not self.answered:
                if isinstance(exc, QidoError) and not isinstance(exc, SourceUnreachable):
                    raise SourceUnreachable(f"{exc}", url=exc.url, status=exc.status) from None
                raise
            self._abort_period(exc)
            return self._failed(str(exc), type(exc).__name__)
        if self.failures:
            log.info("watch: the source and the outputs answer again after %d failed attempts", self.failures)
        self.failures = 0
        self.answered = True
        return self.options.interval

    def _period_full(self) -> bool:
        """Whether the current run has lasted ``roll_every``, or holds ``roll_studies`` studies."""
        assert self.period is not None
        if self.clock() - self.period_started >= self.options.roll_every:
            return True
        f = self.period.figures
        held = f.studies_new + f.studies_changed + f.studies_gone + f.studies_failed + f.studies_inconsistent
        return self.options.roll_studies is not None and held >= self.options.roll_studies

    def _failed(self, why: str, kind: str = "incomplete listing") -> float:
        """A failed attempt: counted, logged once per kind; the backoff before the next."""
        self.failures += 1
        self.result.poll_errors += 1
        delay = backoff(self.failures, self.options.interval, self.options.max_backoff)
        self.notices.emit(kind, f"watch: {why}; trying again in {delay:g} s (logged once per kind; counted)", logging.WARNING)
        return delay

    def _poll(self) -> bool:
        """Read the change source and crawl what it names; False when a study it named could not
        be asked for (the cursor stayed)."""
        kind, state = self.kind, self.state
        cursor = state.change_cursor(self.source, kind)
        if cursor is None:
            self.reconcile_due = True
            return True
        stable_before = datetime.now(timezone.utc) - timedelta(seconds=self.options.stable_after)
        read = read_changes(kind, self.client, self.base, cursor, stable_before=stable_before)
        self.result.polls += 1
        self.result.last_poll = datetime.now(timezone.utc)
        self.answered = True
        if read.reset:
            log.warning("the %s change log was reset since the cursor: the watch lists every study once", kind)
            self.reconcile_due = True
            return True
        if not read.changes and not (self.period is not None and self.retry_due):
            if read.cursor != cursor:
                state.set_change_cursor(self.source, kind, read.cursor)
                if self.period is not None:
                    self.period.ledger.checkpoint()
            self._processed(read.cursor, read.newest)
            return True
        if self.period is None:
            self._open_period()
        assert self.period is not None
        retry, self.retry_due = self.retry_due, False
        if not self.period.poll(read.changes, read.cursor, retry=retry):
            return False
        self._processed(read.cursor, read.newest)
        return True

    def _processed(self, cursor: str, newest: datetime | None) -> None:
        self.result.cursor = cursor
        if newest is not None and (self.result.newest_change is None or newest > self.result.newest_change):
            self.result.newest_change = newest

    # --- runs ------------------------------------------------------------------------------

    def _recover(self) -> None:
        """Complete (or remove) the run folders of this state's interrupted runs (see sync)."""
        if self.state.close_interrupted_runs(0, self.source):
            log.info("an earlier run was interrupted; its state stands at its last checkpoint")
        completed, removed = recover(self.state.unfinished_folders(0, self.source))
        for folder in completed:
            log.warning("completed interrupted run folder %s at its last checkpoint", folder)
        for folder in removed:
            log.info("removed interrupted run folder %s (it had reached no checkpoint)", folder)

    def _new_run(self, config: SyncConfig) -> SyncRun:
        """A run of the state (recorded before its folder is made), with its outputs."""
        started = datetime.now(timezone.utc).replace(microsecond=0)
        run_id = self.state.begin_run(self.source, started.isoformat())
        outputs: list[Sink] = []
        if config.fhir_url:
            outputs.append(self._fhir())
        ndjson = None
        if config.out is not None:
            folder = config.out / run_folder_name(started, run_id, self.state.identity(), self.source)
            self.state.set_run_folder(run_id, str(folder.absolute()))
            ndjson = NdjsonFolder(folder, transaction_time=started.isoformat().replace("+00:00", "Z"),
                                  request=f"{redact(self.client.base_url)}/studies", fresh=True)
            outputs.insert(0, ndjson)
        outputs.extend(table_sinks(config, run_folder_name(started, run_id, self.state.identity(), self.source), run_id,
                                   self.source, normalise_base(config.wado_url or config.url)))
        self.current = SyncRun(config, self.client, self.state, self.source, self.mapping, outputs, ndjson, run_id)
        return self.current

    def _fhir(self) -> Sink:
        assert self.config.fhir_url is not None
        fhir: Any = fhir_server(self.config, self.config.fhir_url)
        learned = self.state.fhir_max_entries(fhir.base_url) if hasattr(fhir, "learned_max_entries") else None
        if learned is not None and learned < fhir.max_entries:
            fhir.max_entries = learned
        if getattr(fhir, "ids", None) == "server":
            fhir.server_id_lookup = functools.partial(self.state.fhir_server_id, fhir.base_url)
        sink: Sink = fhir
        return sink

    def _full_run(self, first: bool) -> bool:
        """A complete listing (the first, or a reconciliation): a run of its own that stores the
        change source's cursor as read before it listed. Stopped when told to stop. False when
        the listing was incomplete (the cursor and the mark stay; tried again later)."""
        config = self.config if first else replace(self.config, full=True)
        run = self._new_run(config)
        run.stop = self.stop
        started = datetime.now(timezone.utc)
        scope = "full (first run)" if first else "full (reconciliation)"
        try:
            result = run.run([Window()], scope, True, run_day(config, started), run.started_clock)
        except BaseException:
            self._count(run, None)
            raise
        self.answered = True
        self.reconcile_due = False
        self.next_reconcile = self.clock() + self.options.reconcile_every
        if not first:
            f = result.figures
            self.result.reconciliations += 1
            self.result.reconciled += f.studies_new + f.studies_changed + f.studies_gone
            if f.studies_new or f.studies_changed or f.studies_gone:
                log.warning("reconciliation: %d new, %d changed, %d gone that the change source had not named",
                            f.studies_new, f.studies_changed, f.studies_gone)
        self._count(run, result)
        cursor = self.state.change_cursor(self.source, self.kind)
        if cursor is not None:
            self.result.cursor = cursor
        return not result.figures.windows_incomplete

    def _open_period(self) -> None:
        self.period = self._new_run(self.config)
        self.period.stop = self.stop
        self.period_started = self.clock()
        self.retry_due = True
        self.state.begin()

    def _end_period(self) -> None:
        period, self.period = self.period, None
        if period is None:
            return
        try:
            result = period.finish("changes", None, [])
        except BaseException as exc:
            period.abort(exc)
            self._count(period, None)
            raise
        self._count(period, result)

    def _abort_period(self, exc: BaseException) -> None:
        period, self.period = self.period, None
        if period is None:
            return
        period.abort(exc)
        self._count(period, None)

    def _count(self, run: SyncRun, result: SyncResult | None) -> None:
        if self.current is run:
            self.current = None
        f = run.figures
        self.result.runs += 1
        self.result.studies_synced += f.studies_new + f.studies_changed
        self.result.studies_failed += f.studies_failed + f.studies_inconsistent
        self.result.studies_gone += f.studies_gone
        if result is not None and result.run_dir:
            self.result.run_dirs.append(result.run_dir)
        elif result is None and run.ndjson is not None and (run.ndjson.folder / "manifest.json").exists():
            self.result.run_dirs.append(str(run.ndjson.folder))   # cut back to its last checkpoint

    def _result(self) -> WatchResult:
        counts = self.client.counts.as_dict()
        self.result.requests = int(counts.get("total", 0))
        self.result.retries = int(counts.get("retries", 0))
        return self.result


def watch(config: SyncConfig, options: WatchOptions, stop: threading.Event | None = None) -> WatchResult:
    """Follow ``config.changes`` until ``stop`` is set (see the module's docstring). Errors before
    the source answered once raise as ``sync``'s do; later ones are tried again."""
    return Watcher(config, options, stop).run()

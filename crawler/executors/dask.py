"""Crawling on a Dask cluster (``--executor dask``): windows and study batches as tasks.

The coordinator (the process running the sync) plans, diffs against the state, writes the sinks
and commits exactly as with the thread pool; the cluster's workers only talk to the PACS:

- a *listing task* lists one window, every page, and returns its studies and whether it hit a
  cap. A window over the server's cap, or spanning more than one day and holding more than a
  task's share (``task_size``), comes back to the coordinator, which feeds its parts back to the
  cluster as new listing tasks;
- a *crawl task* fetches, checks and maps a batch of the studies the coordinator found new or
  changed, and returns their resources (already serialised) or their errors.

Studies without a StudyDate match only an unfiltered query, so a full listing runs one extra
task that lists the unfiltered window and keeps only those, while the dated part of the study
space is listed in parallel windows.

A worker that dies has its tasks run again by the scheduler (up to its ``allowed_failures``);
the state records only what came back, so a lost task can never be recorded as synced. Workers
keep one client (pooled connections) per run, dropped when the run ends.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import uuid
from array import array
from collections import Counter, deque
from copy import deepcopy
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

from .. import worker
from ..config import SyncConfig
from ..crawl import Learned, StudySummary, tag_fields
from ..errors import ConfigError, QidoError, SourceUnreachable
from ..kinds import StudyStatus
from ..listing import (
    Filters, ListingReport, UndatedRisk, WindowListing, follow_up, list_window, listing_failed, study_date, sweep_undated, verify_cap,
)
from ..planner import Window
from ..http import RequestCounts
from ..qido import QidoClient, client_from
from ..worker import Candidate, CrawlJob, Outcome
from .seam import CrawlRun

log = logging.getLogger("crawler")

BATCH = 8
"""Studies per crawl task: enough to make the scheduler's cost per task small against the
requests, few enough to spread a window's studies over every worker thread."""

_RUNS: dict[str, tuple[QidoClient, Learned]] = {}
_RUNS_LOCK = threading.Lock()


def task_size(config: SyncConfig) -> int:
    return max(10 * config.page_size, 1000)


def _worker_client(key: str, config: SyncConfig) -> tuple[QidoClient, Learned]:
    """The run's client in this worker process, with a pooled connection for each of its threads
    (``workers`` is the number of processes here: a pool that small closed and reopened
    connections all the time)."""
    with _RUNS_LOCK:
        if key not in _RUNS:
            _RUNS[key] = (client_from(replace(config, workers=_threads_here(config))), Learned.of(config.crawl))
        return _RUNS[key]


def _threads_here(config: SyncConfig) -> int:
    """How many tasks this worker process runs at once (``worker_threads`` outside a worker)."""
    try:
        from distributed import get_worker

        return max(int(get_worker().state.nthreads), 1)
    except (ImportError, ValueError, AttributeError):
        return config.worker_threads


def _task_client(key: str, config: SyncConfig) -> tuple[QidoClient, Learned]:
    """The run's pooled client, with request counts of the task's own."""
    client, learned = _worker_client(key, config)
    return client.for_task(), learned


def _forget(key: str) -> None:
    with _RUNS_LOCK:
        entry = _RUNS.pop(key, None)
    if entry:
        entry[0].close()


@dataclass
class Counted:
    """What a task asked of the PACS."""

    requests: dict[str, int] = field(default_factory=dict)
    retries: int = 0
    answered: bool = False

    @classmethod
    def of(cls, client: QidoClient) -> Counted:
        counts = client.counts.as_dict()
        retries = counts.pop("retries", 0)
        counts.pop("total", None)
        return cls(counts, retries, client.answered)


@dataclass
class Listed:
    """A listing task's answer."""

    window: Window
    items: list[dict[str, Any]]
    state: WindowListing
    cap: int | None
    verified: int
    max_limit: int | None
    counted: Counted
    error: str | None = None
    status: int | None = None
    unreachable: bool = False
    filters: Filters | None = None
    repaired: int = 0


def list_task(key: str, config: SyncConfig, window: Window, cap: int | None, verified: int, verify: bool,
              budget: int | None, undated_only: bool, max_limit: int | None = None, filters: Filters | None = None) -> Listed:
    """List one window (runs on a worker); ``max_limit`` is the largest page size the server
    accepted in any task so far, so a task does not learn it again with a refused request;
    ``filters`` how the server takes the matching keys, as learned so far (see listing)."""
    client, _ = _task_client(key, config)
    client.learn_max_limit(max_limit)
    report = ListingReport(cap=cap, verified=verified, page_size=config.page_size, filters=deepcopy(filters or Filters()),
                           fields=tag_fields(config.crawl.tags, "study"))
    state = WindowListing(window, budget=budget)
    if verify and cap is None:
        state.dates = array("L")
    if window.unfiltered:
        state.undated_seen, state.id_chars = {}, set()
    items: list[dict[str, Any]] = []
    error, status, unreachable = None, None, False
    try:
        for page in list_window(client, state, report, config.max_offset):
            items.extend(page if not undated_only else (item for item in page if study_date(item) is None))
        verify_cap(client, state, report)
    except QidoError as exc:
        error, status, unreachable = str(exc), exc.status, isinstance(exc, SourceUnreachable)
    state.dates, state.uids = None, array("q")
    return Listed(window, items, state, report.cap, report.verified, client.max_limit, Counted.of(client), error, status, unreachable, report.filters, report.repaired)


def crawl_task(key: str, config: SyncConfig, job: CrawlJob, summaries: list[StudySummary]) -> tuple[list[Outcome], Counted]:
    """Fetch, check and map a batch of studies (runs on a worker)."""
    client, learned = _task_client(key, config)
    outcomes = [worker.crawl_one(client, summary, job, learned) for summary in summaries]
    return outcomes, Counted.of(client)


def _worker_config(config: SyncConfig) -> SyncConfig:
    """What the workers need: no FHIR server credentials, no state location."""
    return replace(config, fhir_url=None, fhir_user=None, fhir_password=None, fhir_token=None, out=None)


def connect(config: SyncConfig) -> tuple[Any, Any]:
    """(a dask.distributed Client, the LocalCluster it owns or None). A local cluster returns
    as soon as its first worker is up; the others join while it works (see ``capacity``)."""
    try:
        from dask.distributed import Client, LocalCluster
    except ImportError:
        raise ConfigError("the dask executor needs Dask: pip install 'qido-crawler[dask]'", setting="executor") from None
    if config.scheduler:
        try:
            return Client(config.scheduler, timeout=30, set_as_default=False), None
        except (OSError, TimeoutError) as exc:
            raise ConfigError(f"cannot reach the Dask scheduler at {config.scheduler}: {exc}", setting="scheduler") from None
    cluster = LocalCluster(
        n_workers=1, threads_per_worker=config.worker_threads, processes=True,
        # the scheduler's HTTP server on a free loopback port (not 8787, to collide on), no dashboard
        dashboard_address="127.0.0.1:0", scheduler_kwargs={"dashboard": False}, silence_logs=logging.ERROR,
    )
    if config.workers > 1:
        cluster.scale(config.workers)
    return Client(cluster, set_as_default=False), cluster


def capacity(config: SyncConfig, client: Any) -> tuple[int, int]:
    """(worker processes, threads) the run can count on: a local cluster's as configured (its
    workers may still be starting), an existing cluster's as its scheduler knows them now."""
    if not config.scheduler:
        return config.workers, config.workers * config.worker_threads
    nthreads = client.nthreads()
    return max(len(nthreads), 1), max(sum(nthreads.values()), 1)


PRELOAD = ["distributed", "crawler.executors.dask"]


@contextlib.contextmanager
def forked_workers() -> Iterator[None]:
    """While a local cluster lives: worker processes forked from a server process that imported
    Dask and the crawler once (multiprocessing's forkserver), rather than each started afresh
    and importing both (spawn, Dask's default): on 2 cores, 4 workers are up and ready in about
    1.5 s instead of 3, which a short sync feels. Dask's setting is changed for that time only,
    and only where forkserver exists and the setting is spawn."""
    import multiprocessing

    import dask
    from distributed.utils import get_mp_context

    key = "distributed.worker.multiprocessing-method"
    if dask.config.get(key) != "spawn" or "forkserver" not in multiprocessing.get_all_start_methods():
        yield
        return
    with dask.config.set({key: "forkserver"}):
        get_mp_context().set_forkserver_preload(PRELOAD)
        yield


def spread(windows: list[Window], parts: int) -> list[Window]:
    """``windows`` with those spanning several (bounded) days split in halves, round by round,
    until there are ``parts`` windows or none can be split so: the cluster lists them in
    parallel from the start, rather than one task listing a task's share of studies before the
    first parts come back. Single days and open-ended windows are left whole."""
    out = list(windows)
    while len(out) < parts:
        result: list[Window] = []
        for i, window in enumerate(out):
            room = parts - (len(result) + len(out) - i)
            multi_day = window.since is not None and window.until is not None and window.since != window.until and window.time_from is None
            halves = window.split() if room > 0 and multi_day else []
            result.extend(halves or [window])
        if len(result) == len(out):
            break
        out = result
    return out


def list_and_crawl(run: CrawlRun, windows: list[Window], report: ListingReport) -> None:
    Coordinator(run, report).list_and_crawl(windows)


class Coordinator:
    """Feeds windows and changed studies to the cluster and hands what comes back to the run."""

    def __init__(self, run: CrawlRun, report: ListingReport) -> None:
        self.run = run
        self.report = report
        self.key = uuid.uuid4().hex
        self.config = _worker_config(run.config)
        self.budget = task_size(run.config)
        self.undated = UndatedRisk()
        self.completed: list[tuple[Window, int]] = []
        """Windows listed complete while no cap was known, with their totals: re-listed in parts
        when a later silent-cap check finds a cap they reached."""
        self.waiting: deque[Candidate] = deque()
        self.windows: deque[tuple[Window, bool]] = deque()
        self.listed_any = False
        self.answered = False
        self.unreachable: str | None = None
        self.refused: str | None = None
        self.threads = 1

    def list_and_crawl(self, windows: list[Window]) -> None:
        with contextlib.nullcontext() if self.run.config.scheduler else forked_workers():
            self._list_and_crawl(windows)

    def _list_and_crawl(self, windows: list[Window]) -> None:
        client, cluster = connect(self.run.config)
        try:
            processes, threads = capacity(self.run.config, client)
            self.threads = threads
            if self.config.max_rps:
                # each worker process paces its own requests: share the limit out among them
                self.config = replace(self.config, max_rps=self.config.max_rps / processes)
            if windows == [Window()]:
                self.windows.append((Window(), True))
                self.windows.extend((w, False) for w in spread(Window().split(), threads))
            else:
                self.windows.extend((w, False) for w in spread(windows, threads))
            self._pump(client)
            if self.undated.sweep_needed and not self.unreachable:
                for page in sweep_undated(self.run.client, self.undated, self.report, self.config.max_offset):
                    for item in page:
                        self._consider(item)
                self._pump(client)
            self.undated.close(self.report)
            if not self.unreachable:
                try:
                    for item in self.run.changed_items():
                        self._consider(item)
                except QidoError as exc:
                    listing_failed(exc, self.report, started=self.listed_any or self.answered)
                self.run.listing_finished()
                self._pump(client)
        finally:
            try:
                client.run(_forget, self.key)
            except Exception:  # noqa: BLE001 - workers may be gone, and their clients with them
                pass
            client.close()
            if cluster is not None:
                cluster.close()
        if self.refused or (self.unreachable and not self.listed_any):
            raise SourceUnreachable(self.refused or self.unreachable or "")

    def _pump(self, client: Any) -> None:
        """Keep the cluster busy until every window is listed and every changed study crawled;
        listing waits while enough studies wait to be crawled, so memory stays bounded."""
        from dask.distributed import as_completed

        threads = self.threads
        running = as_completed(loop=client.loop)
        jobs: dict[Any, tuple[str, Any]] = {}
        listing = crawling = 0

        def submit() -> None:
            nonlocal listing, crawling
            while self.waiting and crawling < 2 * threads:
                batch = [self.waiting.popleft() for _ in range(min(BATCH, len(self.waiting)))]
                future = client.submit(crawl_task, self.key, self.config, self.run.job, [c.summary for c in batch], pure=False)
                jobs[future] = ("crawl", batch)
                running.add(future)
                crawling += 1
            while self.windows and listing < threads and len(self.waiting) < 4 * BATCH * threads and not self.unreachable:
                window, undated_only = self.windows.popleft()
                ignored = [key for key in window.keys if key in self.report.filters.ignored]
                if ignored:
                    self.report.incomplete.append(f"{window}: not listed: the server ignores {ignored[0]}")
                    continue
                verify = self.report.cap is None and not self.report.verified
                future = client.submit(
                    list_task, self.key, self.config, window, self.report.cap, self.report.verified, verify,
                    None if undated_only else self.budget, undated_only, self.run.client.max_limit, self.report.filters, pure=False,
                )
                jobs[future] = ("list", (window, undated_only))
                running.add(future)
                listing += 1
                self.report.windows_listed += 1

        submit()
        for future in running:
            kind, payload = jobs.pop(future)
            if kind == "list":
                listing -= 1
                self._listed(future, *payload)
            else:
                crawling -= 1
                self._crawled(future, payload)
            future.release()
            submit()

    def _count(self, counted: Counted) -> None:
        self.run.client.counts.merge(RequestCounts(Counter(counted.requests), counted.retries))
        self.answered = self.answered or counted.answered

    def _consider(self, item: dict[str, Any]) -> None:
        chosen = self.run.consider(item)
        if chosen is not None:
            self.waiting.append(chosen)

    def _listed(self, future: Any, window: Window, undated_only: bool) -> None:
        report = self.report
        try:
            listed: Listed = future.result()
        except Exception as exc:  # noqa: BLE001 - a task that failed for good (e.g. its workers kept dying)
            report.incomplete.append(f"{window}: the listing task failed: {type(exc).__name__}: {exc}")
            return
        self._count(listed.counted)
        if listed.filters is not None:
            self.report.filters.merge(listed.filters)
        self.report.repaired += listed.repaired
        self.run.client.learn_max_limit(listed.max_limit)
        for item in listed.items:
            self._consider(item)
        if listed.error is not None:
            if listed.status in (401, 403):
                self.refused = self.unreachable = f"{listed.error}: check the credentials"
            elif listed.unreachable and not self.answered:
                self.unreachable = listed.error
            report.incomplete.append(f"{window}: {listed.error}")
            log.error("listing of %s stopped: %s", window, listed.error)
            return
        self.listed_any = True
        state = listed.state
        if listed.cap is not None and (report.cap is None or listed.cap < report.cap):
            report.cap = listed.cap
            self._relist_capped()
        report.verified = max(report.verified, listed.verified)
        if state.capped is None and report.cap is not None and state.total >= report.cap and state.window.splittable:
            state.capped = f"{state.total} results, at the server's cap"
        children = follow_up(state, report, self.undated, self.run.client.page_size(report.page_size), parts_listed=undated_only)
        if undated_only:
            return
        if state.capped is None and report.cap is None:
            self.completed.append((window, state.total))
        self.windows.extendleft((w, False) for w in reversed(children))

    def _relist_capped(self) -> None:
        """A cap found now: windows listed complete before may have reached it silently."""
        cap = self.report.cap
        assert cap is not None
        for window, total in self.completed:
            if total >= cap and window.splittable:
                log.info("%s returned %d studies, the cap found since: listing it in parts", window, total)
                self.report.windows_complete -= 1
                self.report.windows_split += 1
                self.windows.extend((w, False) for w in window.split())
        self.completed.clear()

    def _crawled(self, future: Any, batch: list[Candidate]) -> None:
        try:
            outcomes, counted = future.result()
        except Exception as exc:  # noqa: BLE001 - the batch is reported failed, not lost
            outcomes = [Outcome(c.summary, status=StudyStatus.FAILED, error=f"study {c.summary.uid}: the crawl task failed: {type(exc).__name__}")
                        for c in batch]
        else:
            self._count(counted)
        for outcome, candidate in zip(outcomes, batch):
            self.run.take(outcome, candidate.known)

"""The thread-pool executor (``--executor threads``, the default): the listing runs ahead in a
thread of its own, the studies to crawl go to ``workers`` threads, and what they return is taken
by the calling thread in the order it was listed."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from ..errors import QidoError
from ..listing import ListingReport, iter_study_pages, listing_failed
from ..planner import Window
from ..readahead import read_ahead
from ..worker import Candidate, Outcome, crawl_one
from .seam import CrawlRun

LISTING_AHEAD = 1000
"""Listed studies held ahead of the crawl, at most this many plus one page (a few MB): enough
for the crawl threads to stay busy while the listing pauses (see readahead)."""


def listed(run: CrawlRun, windows: list[Window], report: ListingReport) -> Iterator[dict[str, Any]]:
    """The windows' studies (listed by a thread of their own, up to LISTING_AHEAD ahead), then
    those the run names besides (change feed, retries). Pages, not studies, pass between the
    threads: a hand-over per study cost more CPU than the listing saved."""
    pages = iter_study_pages(run.client, windows, report, max_offset=run.config.max_offset)
    for page in read_ahead(pages, LISTING_AHEAD, "listing", weight=len):
        yield from page
    yield from run.changed_items()


PENDING = 32
"""Studies found to crawl that wait for a free crawl thread, at most. The listing goes on while
they wait, so a run whose studies to crawl fit here and in the read-ahead knows their total (for
the progress) as soon as its listing ends; a larger one learns it when that much is left. Kept
small: each waiting study holds its listing entry, and memory must not grow with the archive
(tests/test_scale.py)."""


def list_and_crawl(run: CrawlRun, windows: list[Window], report: ListingReport) -> None:
    workers = run.config.workers
    in_flight: deque[tuple[Future[Outcome], bool]] = deque()
    pending: deque[Candidate] = deque()
    considered = 0

    def take_oldest() -> None:
        future, known = in_flight.popleft()
        run.take(future.result(), known)

    def submit(pool: ThreadPoolExecutor) -> None:
        while pending and len(in_flight) <= workers * 4:
            chosen = pending.popleft()
            in_flight.append((pool.submit(crawl_one, run.client, chosen.summary, run.job, run.learned), chosen.known))

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="crawl") as pool:
        try:
            for item in listed(run, windows, report):
                considered += 1
                chosen = run.consider(item)
                if chosen is not None:
                    pending.append(chosen)
                submit(pool)
                while in_flight and in_flight[0][0].done():
                    take_oldest()
                    submit(pool)
                while len(pending) >= PENDING:
                    submit(pool)
                    take_oldest()
        except QidoError as exc:
            listing_failed(exc, report, started=considered > 0 or run.client.answered)
        run.listing_finished()
        while pending or in_flight:
            submit(pool)
            take_oldest()

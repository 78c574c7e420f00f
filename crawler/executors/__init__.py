"""Executors: what drives a sync run's listing and crawl.

A run offers its executor a small seam (``CrawlRun``): ``consider`` a listed study (diffed
against the state: a ``Candidate`` to crawl, or None), ``take`` a crawled study's ``Outcome``
(held for the next checkpoint), and ``changed_items``, the studies to crawl that the windows'
listing does not show. The executor decides where listing and crawling happen: this process's
thread pool (``threads``) or a Dask cluster (``dask``). The run keeps the state, the sinks and
the checkpoints, so every executor gives the same guarantees.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Protocol

from ..config import SyncConfig
from ..crawl import Learned
from ..kinds import Executor
from ..listing import ListingReport
from ..planner import Window
from ..qido import QidoClient
from ..worker import Candidate, CrawlJob, Outcome


class CrawlRun(Protocol):
    """What a sync run offers the executor that drives it."""

    config: SyncConfig
    client: QidoClient
    """The run's own client: the listing's requests and their counts."""
    job: CrawlJob
    learned: Learned

    def consider(self, item: dict[str, Any]) -> Candidate | None:
        """A listed study: counted and marked seen; a Candidate when it must be crawled."""

    def take(self, outcome: Outcome, known: bool) -> None:
        """A crawled study (in any order): held for the next checkpoint, which may come now."""

    def changed_items(self) -> Iterator[dict[str, Any]]:
        """Listing entries of studies to crawl that the windows do not show (change feed, retries)."""


ListAndCrawl = Callable[[CrawlRun, list[Window], ListingReport], None]
"""An executor: list ``windows`` into ``report``, offer every listed study to the run and hand
it every crawled one; raises SourceUnreachable when the run cannot go on."""


def executor(kind: Executor) -> ListAndCrawl:
    if kind == Executor.DASK:
        from .dask import list_and_crawl
    else:
        from .threads import list_and_crawl
    return list_and_crawl

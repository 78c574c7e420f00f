"""The seam between a sync run and the executor that drives it (see the package's docstring)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Protocol

from ..config import SyncConfig
from ..crawl import Learned
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

    def listing_finished(self) -> None:
        """Called once every study to crawl has been offered to ``consider``."""

    def changed_items(self) -> Iterator[dict[str, Any]]:
        """Listing entries of studies to crawl that the windows do not show (change feed, retries)."""


ListAndCrawl = Callable[[CrawlRun, list[Window], ListingReport], None]
"""An executor: list ``windows`` into ``report``, offer every listed study to the run and hand
it every crawled one; raises SourceUnreachable when the run cannot go on."""


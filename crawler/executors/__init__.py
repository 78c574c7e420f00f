"""Executors: what drives a sync run's listing and crawl.

A run offers its executor a small seam (``CrawlRun``): ``consider`` a listed study (diffed
against the state: a ``Candidate`` to crawl, or None), ``take`` a crawled study's ``Outcome``
(held for the next checkpoint), and ``changed_items``, the studies to crawl that the windows'
listing does not show. The executor decides where listing and crawling happen: this process's
thread pool (``threads``) or a Dask cluster (``dask``). The run keeps the state, the sinks and
the checkpoints, so every executor gives the same guarantees.
"""

from __future__ import annotations

from ..kinds import Executor
from .seam import CrawlRun, ListAndCrawl

__all__ = ["CrawlRun", "ListAndCrawl", "executor"]


def executor(kind: Executor) -> ListAndCrawl:
    """The executor of ``kind``; Dask is imported only when it is chosen."""
    if kind == Executor.DASK:
        from .dask import list_and_crawl
    else:
        from .threads import list_and_crawl
    return list_and_crawl

"""What a sync run reports: its figures while it runs, and its result at the end."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

EXIT_OK, EXIT_PARTIAL, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3


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
class RunProgress:
    """What a progress display of a running sync shows; handed to ``sync``'s ``progress``.

    ``crawled`` moves as studies finish (fetched, checked and mapped, or failed); ``saved`` only
    at checkpoints, when the outputs and the state have taken them: a display names both, so
    that nobody reads a checkpoint as the work done. ``to_crawl`` is known once the listing is
    complete (every study to crawl has been found), and only then gives a percentage."""

    figures: Figures
    crawled: int
    to_crawl: int | None
    requests: int
    retries: int
    elapsed: float

    @property
    def saved(self) -> int:
        f = self.figures
        return f.studies_new + f.studies_changed + f.studies_rechecked

    @property
    def listing_complete(self) -> bool:
        return self.to_crawl is not None

    @property
    def rate(self) -> float:
        """Studies crawled per second so far."""
        return self.crawled / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def fraction(self) -> float | None:
        """Share of the studies to crawl that are crawled, once the listing is complete."""
        if self.to_crawl is None:
            return None
        return 1.0 if self.to_crawl == 0 else min(self.crawled / self.to_crawl, 1.0)

    @property
    def eta(self) -> float | None:
        """Seconds left at the rate so far, once the listing is complete and a study is crawled."""
        if self.to_crawl is None or not self.crawled:
            return None
        return max(self.to_crawl - self.crawled, 0) / self.rate

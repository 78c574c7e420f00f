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

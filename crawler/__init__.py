"""qido-crawler: crawl a PACS over DICOMweb QIDO-RS and keep a FHIR ImagingStudy copy of it.

The public API (see docs/api.md)::

    from crawler import SyncConfig, sync
    result = sync(SyncConfig(url="http://localhost:8042/dicom-web", out=Path("out")))

The names below load on first use, so that ``import crawler`` (and ``python -m crawler map``)
does not pay for the HTTP client, the state and the sinks until they are needed.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

from .errors import (
    ConfigError,
    CrawlerError,
    FatalQidoError,
    MappingError,
    QidoError,
    RetriableQidoError,
    SinkError,
    SourceUnreachable,
    StateError,
)
from .kinds import ChangeSource, Executor, FhirVersion, RunOutcome, StudyStatus

if TYPE_CHECKING:
    from .audit import AuditResult, audit
    from .config import AuditConfig, Connection, SyncConfig
    from .mapping import MappingOptions, StudyInput, map_study
    from .dryrun import DryRunResult, dry_run
    from .figures import RunProgress, SyncResult
    from .sync import export, sync
    from .watch import WatchOptions, WatchResult, watch

__version__ = "0.1.0"

_LAZY = {
    "sync": ".sync",
    "export": ".sync",
    "SyncResult": ".figures",
    "RunProgress": ".figures",
    "dry_run": ".dryrun",
    "watch": ".watch",
    "WatchOptions": ".watch",
    "WatchResult": ".watch",
    "DryRunResult": ".dryrun",
    "audit": ".audit",
    "AuditResult": ".audit",
    "SyncConfig": ".config",
    "AuditConfig": ".config",
    "Connection": ".config",
    "map_study": ".mapping",
    "MappingOptions": ".mapping",
    "StudyInput": ".mapping",
}

__all__ = [
    "AuditConfig",
    "AuditResult",
    "ChangeSource",
    "ConfigError",
    "Connection",
    "CrawlerError",
    "DryRunResult",
    "Executor",
    "FatalQidoError",
    "FhirVersion",
    "MappingError",
    "MappingOptions",
    "QidoError",
    "RetriableQidoError",
    "RunOutcome",
    "RunProgress",
    "SinkError",
    "SourceUnreachable",
    "StateError",
    "StudyInput",
    "StudyStatus",
    "SyncConfig",
    "SyncResult",
    "WatchOptions",
    "WatchResult",
    "__version__",
    "audit",
    "dry_run",
    "export",
    "map_study",
    "sync",
    "watch",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


class _Package(types.ModuleType):
    """This package, whose names ``sync`` and ``audit`` stay the functions: importing the
    submodules of the same names (``crawler.sync``, ``crawler.audit``) would otherwise bind the
    modules to them, and ``from crawler import sync`` would then depend on what was imported
    first. The submodules stay importable by their full names."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _LAZY and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

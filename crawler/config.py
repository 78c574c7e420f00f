"""Settings of a sync, as one frozen dataclass built by the CLI or by library callers."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import tzinfo
from collections.abc import Mapping
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from .crawl import CrawlOptions
from .errors import ConfigError
from .qido import RetryPolicy, check_header_value
from .state import state_location

DEFAULT_STATE = "qido-crawler.db"


@dataclass(frozen=True)
class SyncConfig:
    """Everything a sync needs to know. ``url`` is the DICOMweb base (QIDO paths are appended)."""

    url: str
    out: Path | None = None
    state: Path | str = Path(DEFAULT_STATE)
    """A SQLite file, or a ``postgresql://`` / ``postgres://`` URL (kept as a str)."""
    since: str | None = None
    until: str | None = None
    full: bool = False
    lookback: int = 7
    prune: bool = False
    checkpoint_every: int = 1000
    changes: str | None = None
    fhir_url: str | None = None
    fhir_batch_size: int = 100
    fhir_user: str | None = None
    fhir_password: str | None = field(default=None, repr=False)
    fhir_token: str | None = field(default=None, repr=False)
    fhir_ids: str = "ours"
    """``ours``: PUT [type]/[id] with the crawler's ids (the server must allow update as create);
    ``server``: conditional updates by identifier, the server's ids kept in the state."""
    log_server_text: bool = False
    """Keep the free text of the FHIR server's OperationOutcomes in logs and the state (it may
    hold patient data); by default only the HTTP status, issue codes and element paths."""
    orthanc_url: str | None = None
    checkpoint_seconds: float = 60.0
    page_size: int = 100
    max_offset: int = 1_000_000
    max_results: int | None = None
    workers: int = 4
    wado_url: str | None = None
    zone: tzinfo | None = None
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)
    token_command: str | None = field(default=None, repr=False)
    headers: Mapping[str, str] = field(default_factory=dict, repr=False)
    max_rps: float | None = None
    timeout: tuple[float, float] = (10.0, 120.0)
    max_response_mb: int = 240
    """Answers larger than this (on the wire or decoded) are refused (see qido.MAX_BODY)."""
    retries: int = 4
    retry: RetryPolicy = RetryPolicy()
    verify: bool | str = True
    crawl: CrawlOptions = CrawlOptions()
    fhir_version: str = "R5"
    patients: bool = False
    validate: bool = False
    issuer_systems: Mapping[str, str] = field(default_factory=dict)
    executor: str = "threads"
    """``threads`` (this process) or ``dask`` (a Dask cluster: see crawler.distributed)."""
    scheduler: str | None = None
    """With ``dask``: the address of a running scheduler; None starts a local cluster of
    ``workers`` processes with ``worker_threads`` threads each."""
    worker_threads: int = 4

    def __post_init__(self) -> None:
        object.__setattr__(self, "state", state_location(self.state))
        if self.fhir_version not in ("R5", "R4"):
            raise ConfigError(f"--fhir-version must be R5 or R4, not {self.fhir_version!r}")
        if self.full and (self.since or self.until):
            raise ConfigError("--full lists everything: it takes no --since/--until")
        if self.changes not in (None, "orthanc"):
            raise ConfigError(f"--changes knows only 'orthanc', not {self.changes!r}")
        if not isinstance(self.lookback, int) or self.lookback < 0:
            raise ConfigError(f"--lookback must be a number of days >= 0, not {self.lookback!r}")
        if self.max_results is not None and self.max_results < 1:
            raise ConfigError(f"max-results must be at least 1, not {self.max_results}")
        if (self.fhir_user is None) != (self.fhir_password is None):
            raise ConfigError("--fhir-user and --fhir-password go together")
        if self.fhir_token is not None:
            check_header_value("the FHIR bearer token (--fhir-token or QIDO_CRAWLER_FHIR_TOKEN)", self.fhir_token)
        if self.executor not in ("threads", "dask"):
            raise ConfigError(f"--executor must be threads or dask, not {self.executor!r}")
        if self.scheduler and self.executor != "dask":
            raise ConfigError("--scheduler goes with --executor dask")
        for name in ("page_size", "workers", "worker_threads", "retries", "max_offset", "checkpoint_every", "fhir_batch_size", "max_response_mb"):
            value = getattr(self, name)
            minimum = 0 if name == "retries" else 1
            if not isinstance(value, int) or value < minimum:
                raise ConfigError(f"{name.replace('_', '-')} must be an integer >= {minimum}, not {value!r}")
        if (self.user is None) != (self.password is None):
            raise ConfigError("--user and --password go together")
        if (self.token or self.token_command) and self.user:
            raise ConfigError("use either --user/--password or --token/--token-command, not both")
        if self.token and self.token_command:
            raise ConfigError("use either --token or --token-command, not both")
        if self.max_rps is not None and self.max_rps <= 0:
            raise ConfigError(f"--max-rps must be above 0, not {self.max_rps}")


def zone(name: str | None) -> tzinfo | None:
    """An IANA zone by name; None (this machine's local zone) for None or empty."""
    if not name:
        return None
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigError(f"unknown time zone {name!r} (use an IANA name such as Europe/Berlin)") from None

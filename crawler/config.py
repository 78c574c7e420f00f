"""Settings of a sync and of an audit: one ``Connection`` (how to reach the DICOMweb server) that
``SyncConfig`` and ``AuditConfig`` extend with their own fields. Built by the CLI or by library
callers; validated once, here.

Messages name settings in words and carry the field at fault in ``ConfigError.setting``; a front
end (the CLI) names its own option for it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import KW_ONLY, dataclass, field, fields, replace
from datetime import tzinfo
from importlib.util import find_spec
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from .auth import check_kind
from .crawl import CrawlOptions
from .errors import ConfigError
from .http import RetryPolicy, check_header_value
from .kinds import ChangeSource, Executor, FhirVersion
from .state import state_location

DEFAULT_STATE = "qido-crawler.db"


@dataclass(frozen=True)
class Connection:
    """How to reach one DICOMweb server. ``url`` is its base (QIDO paths are appended).

    ``retries`` is the one count of retries of a failed request (attempts = retries + 1);
    ``retry`` gives the waits between them, and its ``attempts`` is set from ``retries`` here,
    so that whoever reads ``retry`` sees the same count."""

    url: str
    _: KW_ONLY
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)
    token_command: str | None = field(default=None, repr=False)
    headers: Mapping[str, str] = field(default_factory=dict, repr=False)
    max_rps: float | None = None
    timeout: tuple[float, float] = (10.0, 120.0)
    """Seconds to connect, and for the whole answer."""
    max_response_mb: int = 240
    """Answers larger than this (on the wire or decoded) are refused (see http.MAX_BODY)."""
    retries: int = 4
    retry: RetryPolicy = RetryPolicy()
    verify: bool | str = True
    """Verify TLS certificates (True), not (False), or against this CA bundle file."""
    auth: str | None = None
    """The kind of credentials (``crawler.auth.SOURCE_KINDS``); None: inferred from those given."""
    auth_options: Mapping[str, Any] = field(default_factory=dict, repr=False)
    """The settings of the kinds that need more than a user, password or token (``--oauth-<key>``:
    ``token_url``, ``client_id``, ``client_secret_env``, ...); names of secrets, never secrets."""

    def __post_init__(self) -> None:
        if not isinstance(self.url, str) or not self.url:
            raise ConfigError("the DICOMweb base URL is missing", setting="url")
        check_kind(self.auth)
        if (self.user is None) != (self.password is None):
            raise ConfigError("the user and password go together", setting="user")
        if (self.token or self.token_command) and self.user:
            raise ConfigError("use either a user and password or a bearer token, not both", setting="token" if self.token else "token_command")
        if self.token and self.token_command:
            raise ConfigError("use either a token or a command that prints one, not both", setting="token")
        if self.max_rps is not None and not self.max_rps > 0:
            raise ConfigError(f"the request rate must be above 0 per second, not {self.max_rps}", setting="max_rps")
        if len(self.timeout) != 2 or not all(isinstance(t, (int, float)) and t > 0 for t in self.timeout):
            raise ConfigError(f"the timeouts must be two numbers of seconds above 0 (connect, answer), not {self.timeout!r}", setting="timeout")
        _check_count(self, "retries", 0)
        _check_count(self, "max_response_mb", 1)
        if self.retry.attempts != self.retries + 1:
            object.__setattr__(self, "retry", replace(self.retry, attempts=self.retries + 1))

    @property
    def connection(self) -> Connection:
        """These settings as a plain ``Connection`` (itself when it is one)."""
        if type(self) is Connection:
            return self
        return Connection(**{f.name: getattr(self, f.name) for f in fields(Connection)})


@dataclass(frozen=True, kw_only=True)
class SyncConfig(Connection):
    """Everything a sync needs to know: the connection, then the sync's own settings. Every field
    but ``url`` is keyword only."""

    out: Path | None = None
    parquet: Path | None = None
    """A folder for the Parquet change log of the tables (see sinks.parquet), or None."""
    delta: str | None = None
    """A base URI for the three Delta Lake tables (see sinks.delta), or None."""
    state: Path | str = Path(DEFAULT_STATE)
    """A SQLite file, or a ``postgresql://`` / ``postgres://`` URL (kept as a str)."""
    since: str | None = None
    until: str | None = None
    full: bool = False
    lookback: int = 7
    prune: bool = False
    checkpoint_every: int = 1000
    changes: ChangeSource | None = None
    """A change feed to read beside the listing (``orthanc``), or None. This and the other
    enum settings (``fhir_version``, ``executor``) also take the plain string, made the member here."""
    fhir_url: str | None = None
    fhir_batch_size: int = 100
    fhir_user: str | None = None
    fhir_password: str | None = field(default=None, repr=False)
    fhir_token: str | None = field(default=None, repr=False)
    fhir_auth: str | None = None
    fhir_auth_options: Mapping[str, Any] = field(default_factory=dict, repr=False)
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
    crawl: CrawlOptions = CrawlOptions()
    fhir_version: FhirVersion = FhirVersion.R5
    patients: bool = False
    validate: bool = False
    issuer_systems: Mapping[str, str] = field(default_factory=dict)
    executor: Executor = Executor.THREADS
    """``threads`` (this process) or ``dask`` (a Dask cluster: see crawler.distributed)."""
    scheduler: str | None = None
    """With ``dask``: the address of a running scheduler; None starts a local cluster of
    ``workers`` processes with ``worker_threads`` threads each."""
    worker_threads: int = 4
    server_profile: str = "generic"
    """The server profile whose defaults the settings were made from (see profiles), for the
    summary and the state; ``server_profile_how``: given, detected (from the URL) or default."""
    server_profile_how: str = "default"
    include_tags: tuple[str, ...] = ()
    """``--include-tag``: DICOM attributes (keyword or tag, optional ``:level``) written as typed
    columns of the tables (see tables.tags); parsed into ``crawl.tags``."""
    include_phi: bool = False
    """Allow ``include_tags`` that identify a patient, a person or an institution."""

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "state", state_location(self.state))
        object.__setattr__(self, "fhir_version", FhirVersion.of(self.fhir_version, "fhir_version"))
        object.__setattr__(self, "executor", Executor.of(self.executor, "executor"))
        if self.changes is not None:
            object.__setattr__(self, "changes", ChangeSource.of(self.changes, "changes"))
        if self.full and (self.since or self.until):
            raise ConfigError("a full listing covers every day: it takes no since or until", setting="full")
        if not isinstance(self.lookback, int) or self.lookback < 0:
            raise ConfigError(f"the lookback must be a number of days >= 0, not {self.lookback!r}", setting="lookback")
        if self.max_results is not None and (not isinstance(self.max_results, int) or self.max_results < 1):
            raise ConfigError(f"the server's cap on results must be at least 1, not {self.max_results!r}", setting="max_results")
        _check_fhir_auth(self.fhir_user, self.fhir_password, self.fhir_token)
        check_kind(self.fhir_auth, fhir=True)
        _check_fhir_credentials_need_a_server(self.fhir_url, self.fhir_auth, self.fhir_auth_options)
        if self.fhir_ids not in ("ours", "server"):
            raise ConfigError(f"the FHIR ids must be ours or server, not {self.fhir_ids!r}", setting="fhir_ids")
        if self.parquet is not None and self.parquet.exists() and not self.parquet.is_dir():
            raise ConfigError(f"the Parquet folder {self.parquet} is a file", setting="parquet")
        if self.parquet is not None or self.delta is not None:
            needed = (["pyarrow"] if self.parquet is not None else []) + (["deltalake"] if self.delta is not None else [])
            missing = [name for name in needed if find_spec(name) is None]
            if missing:
                raise ConfigError(f"the tables need {' and '.join(missing)}: pip install 'qido-crawler[tables]'",
                                  setting="parquet" if self.parquet is not None else "delta")
        if self.scheduler and self.executor != Executor.DASK:
            raise ConfigError("a scheduler address goes with the dask executor", setting="scheduler")
        for name in ("page_size", "workers", "worker_threads", "max_offset", "checkpoint_every", "fhir_batch_size"):
            _check_count(self, name, 1)
        self._check_tags()

    def _check_tags(self) -> None:
        """``include_tags`` parsed into ``crawl.tags`` (the crawl asks for them, the table sinks
        write them); refused when no table is written, or a tag cannot be a column."""
        given: object = self.include_tags
        if isinstance(given, str):
            object.__setattr__(self, "include_tags", (given,))
        if not self.include_tags:
            object.__setattr__(self, "crawl", replace(self.crawl, tags=()))
            return
        if self.parquet is None and self.delta is None:
            raise ConfigError("the included tags are columns of the tables: they need a Parquet folder or Delta tables",
                              setting="include_tags")
        from .tables.tags import FIXED_COLUMNS, TagError, parse_all

        try:
            tags = parse_all(self.include_tags, self.include_phi, FIXED_COLUMNS)
        except TagError as exc:
            raise ConfigError(str(exc), setting="include_tags") from None
        object.__setattr__(self, "crawl", replace(self.crawl, tags=tags))


@dataclass(frozen=True, kw_only=True)
class AuditConfig(Connection):
    """Settings of an audit: the connection, then the audit's own. ``report`` is the folder
    written. Every field but ``url`` is keyword only."""

    report: Path
    state: Path | str | None = None
    fhir_url: str | None = None
    fhir_user: str | None = None
    fhir_password: str | None = field(default=None, repr=False)
    fhir_token: str | None = field(default=None, repr=False)
    fhir_auth: str | None = None
    fhir_auth_options: Mapping[str, Any] = field(default_factory=dict, repr=False)
    since: str | None = None
    until: str | None = None
    include_phi: bool = False
    workers: int = 4
    page_size: int = 100
    max_offset: int = 1_000_000
    max_results: int | None = None
    instance_page_size: int = 1000
    zone: tzinfo | None = None
    instances_by_series: bool = False
    """Ask instances series by series (a server whose instance searches need a series)."""
    server_profile: str = "generic"
    server_profile_how: str = "default"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.since and self.until and self.since > self.until:
            raise ConfigError(f"the window starts ({self.since}) after it ends ({self.until})", setting="since")
        _check_fhir_auth(self.fhir_user, self.fhir_password, self.fhir_token)
        check_kind(self.fhir_auth, fhir=True)
        _check_fhir_credentials_need_a_server(self.fhir_url, self.fhir_auth, self.fhir_auth_options)
        for name in ("page_size", "workers", "instance_page_size", "max_offset"):
            _check_count(self, name, 1)


def _check_count(config: object, name: str, minimum: int) -> None:
    value = getattr(config, name)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        words = name.replace("_", " ")
        raise ConfigError(f"{words} must be an integer >= {minimum}, not {value!r}", setting=name)


def _check_fhir_credentials_need_a_server(url: str | None, kind: str | None, options: Mapping[str, Any]) -> None:
    """A FHIR server's kind of credentials or OAuth settings without the server would be read and
    then ignored: refused. (Its user, password and token may come from the environment for every
    job, so they are not.)"""
    if url is None and (kind is not None or options):
        raise ConfigError("the FHIR server's credentials (--fhir-auth, --fhir-oauth-*) need a FHIR server (--fhir-url)",
                          setting="fhir_auth")


def _check_fhir_auth(user: str | None, password: str | None, token: str | None) -> None:
    if (user is None) != (password is None):
        raise ConfigError("the FHIR user and password go together", setting="fhir_user")
    if token is not None:
        try:
            check_header_value("the FHIR bearer token", token)
        except ConfigError as exc:
            raise ConfigError(str(exc), setting="fhir_token") from None


def zone(name: str | None) -> tzinfo | None:
    """An IANA zone by name; None (this machine's local zone) for None or empty."""
    if not name:
        return None
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigError(f"unknown time zone {name!r} (use an IANA name such as Europe/Berlin)", setting="zone") from None

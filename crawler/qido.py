"""QIDO-RS over HTTP: query building, paging, retries, auth and request accounting.

The client streams: pages are yielded as they arrive and never gathered into one list. Query
strings are built by a pure function, sorted, with values sent raw where the standard allows it
(``,`` ``*`` ``-``), because some servers (Orthanc 1.10) do not percent-decode query values.
"""

from __future__ import annotations

import email.utils
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlsplit

import orjson
import requests
import tenacity

from .errors import ConfigError, FatalQidoError, QidoError, RetriableQidoError, SourceUnreachable

RETRIABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504})
_SAFE = ",*-.:/_~^="


def build_query(params: Sequence[tuple[str, str | int]]) -> str:
    """``key=value&...`` sorted by key then value; only characters that break a URL are encoded."""
    return "&".join(f"{quote(str(k), safe=_SAFE)}={quote(str(v), safe=_SAFE)}" for k, v in sorted(params, key=lambda p: (p[0], str(p[1]))))


def check_base_url(url: str) -> str:
    """Validate a DICOMweb base URL (``http(s)://host[:port]/path``) and return it without a trailing slash."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"not an http(s) URL: {redact(url)!r}")
    try:
        parts.port
    except ValueError:
        raise ConfigError(f"bad port in URL: {redact(url)!r}") from None
    if parts.query or parts.fragment:
        raise ConfigError(f"the DICOMweb base URL takes no query or fragment: {redact(url)!r}")
    return url.rstrip("/")


def redact(url: str) -> str:
    """The URL with any user:password@ removed, for messages."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return parts._replace(netloc=host).geturl()


@dataclass
class RequestCounts:
    """HTTP requests made, by kind (studies, series, instances, metadata); thread-safe."""

    by_kind: Counter = field(default_factory=Counter)
    retries: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, kind: str) -> None:
        with self._lock:
            self.by_kind[kind] += 1

    def add_retry(self) -> None:
        with self._lock:
            self.retries += 1

    @property
    def total(self) -> int:
        return sum(self.by_kind.values())

    def as_dict(self) -> dict[str, int]:
        with self._lock:
            return {"total": sum(self.by_kind.values()), **dict(sorted(self.by_kind.items())), "retries": self.retries}


class RateLimit:
    """At most ``rate`` requests per second across all threads (requests are spaced evenly)."""

    def __init__(self, rate: float, clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep) -> None:
        if rate <= 0:
            raise ConfigError(f"--max-rps must be above 0, not {rate}")
        self.interval = 1.0 / rate
        self._next = 0.0
        self._lock = threading.Lock()
        self._clock = clock
        self._sleep = sleep

    def wait(self) -> None:
        with self._lock:
            now = self._clock()
            start = max(now, self._next)
            self._next = start + self.interval
        if start > now:
            self._sleep(start - now)


def token_from_command(command: str) -> Callable[[], str]:
    """A token provider that runs ``command`` (no shell) and takes its standard output.

    The command's output is never logged; a failure names the command's program only.
    """
    import shlex
    import subprocess

    argv = shlex.split(command)
    if not argv:
        raise ConfigError("--token-command is empty")

    def provide() -> str:
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise ConfigError(f"--token-command {argv[0]!r} could not run: {type(exc).__name__}") from None
        token = done.stdout.strip()
        if done.returncode != 0 or not token:
            raise ConfigError(f"--token-command {argv[0]!r} failed (exit {done.returncode}, {len(token)} characters of output)")
        return token

    return provide


@dataclass(frozen=True)
class Page:
    items: list[dict[str, Any]]
    status: int
    warning: str | None = None


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 4
    max_seconds: float = 60.0
    base_delay: float = 0.5
    max_delay: float = 20.0


def retry_wait(policy: RetryPolicy, state: tenacity.RetryCallState) -> float:
    """Seconds before the next attempt: the server's Retry-After when it gave one (bounded by the
    policy's total time), else exponential backoff with jitter."""
    exc = state.outcome.exception() if state.outcome else None
    hinted = getattr(exc, "retry_after", None)
    if hinted is not None:
        return min(hinted, policy.max_seconds)
    backoff = policy.base_delay * 2 ** (state.attempt_number - 1)
    return min(policy.max_delay, backoff) * (0.5 + random.random() / 2)


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


class QidoClient:
    """A QIDO-RS (and WADO-RS metadata) client for one DICOMweb base URL."""

    def __init__(
        self,
        base_url: str,
        *,
        session: requests.Session | None = None,
        auth: tuple[str, str] | None = None,
        token: str | None = None,
        timeout: tuple[float, float] = (10.0, 120.0),
        retry: RetryPolicy = RetryPolicy(),
        pool_size: int = 4,
        verify: bool | str = True,
        sleep: Callable[[float], None] = time.sleep,
        token_provider: Callable[[], str] | None = None,
        headers: Mapping[str, str] | None = None,
        max_rps: float | None = None,
    ) -> None:
        self.base_url = check_base_url(base_url)
        self.session = session or requests.Session()
        adapter = requests.adapters.HTTPAdapter(pool_connections=1, pool_maxsize=max(pool_size, 1), max_retries=0)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        self.session.verify = verify
        if auth:
            self.session.auth = auth
        self.session.headers.update(headers or {})
        self._token_provider = token_provider
        self._token_lock = threading.Lock()
        if token_provider and not token:
            token = token_provider()
        if token:
            self.session.headers["Authorization"] = f"Bearer {token}"
        self.session.headers["Accept"] = "application/dicom+json"
        self._rate = RateLimit(max_rps) if max_rps else None
        self.timeout = timeout
        self.retry = retry
        self.counts = RequestCounts()
        self._sleep = sleep
        self.answered = False
        self.max_limit: int | None = None

    def close(self) -> None:
        self.session.close()

    def url(self, path: str, params: Sequence[tuple[str, str | int]] = ()) -> str:
        query = build_query(params)
        return f"{self.base_url}/{path.lstrip('/')}" + (f"?{query}" if query else "")

    def _wait(self, state: tenacity.RetryCallState) -> float:
        return retry_wait(self.retry, state)

    def get(self, kind: str, path: str, params: Sequence[tuple[str, str | int]] = ()) -> Page:
        """One GET with retries; returns the parsed page. Raises QidoError subclasses."""
        url = self.url(path, params)
        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception_type(RetriableQidoError),
            stop=tenacity.stop_after_attempt(self.retry.attempts) | tenacity.stop_after_delay(self.retry.max_seconds),
            wait=self._wait,
            sleep=self._sleep,
            before_sleep=lambda _: self.counts.add_retry(),
            reraise=True,
        )
        try:
            return retrying(self._get_once, kind, url)
        except RetriableQidoError as exc:
            if not self.answered and exc.status is None:
                raise SourceUnreachable(str(exc), url=exc.url) from None
            raise

    def _refresh_token(self, used: str | None) -> bool:
        """Run the token command again after a 401, once for all threads that saw the same token."""
        if self._token_provider is None:
            return False
        with self._token_lock:
            if self.session.headers.get("Authorization") == used:
                self.session.headers["Authorization"] = f"Bearer {self._token_provider()}"
        return True

    def _get_once(self, kind: str, url: str) -> Page:
        shown = redact(url)
        try:
            response = self._send(kind, url)
            if response.status_code == 401 and self._refresh_token(response.request.headers.get("Authorization")):
                response = self._send(kind, url)
            body = response.content
        except requests.exceptions.SSLError as exc:
            raise FatalQidoError(f"TLS error for {shown}: {_reason(exc)}", url=shown) from None
        except requests.exceptions.ConnectionError as exc:
            raise RetriableQidoError(f"cannot connect to {shown}: {_reason(exc)}", url=shown) from None
        except requests.exceptions.Timeout:
            raise RetriableQidoError(f"timed out: {shown}", url=shown) from None
        except requests.exceptions.RequestException as exc:
            raise RetriableQidoError(f"request failed: {shown}: {_reason(exc)}", url=shown) from None
        self.answered = True
        status = response.status_code
        if status == 204:
            return Page([], status, response.headers.get("Warning"))
        if status in RETRIABLE_STATUS:
            error = RetriableQidoError(f"HTTP {status} from {shown}", url=shown, status=status)
            error.retry_after = retry_after_seconds(response.headers.get("Retry-After"))  # type: ignore[attr-defined]
            raise error
        if status >= 400:
            hint = {401: " (authentication required or refused)", 403: " (forbidden)", 404: " (not found)", 413: " (query matches too much)"}
            raise FatalQidoError(f"HTTP {status}{hint.get(status, '')} from {shown}", url=shown, status=status)
        if not body.strip():
            return Page([], status, response.headers.get("Warning"))
        try:
            items = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise FatalQidoError(f"malformed JSON from {shown} ({len(body)} bytes)", url=shown, status=status) from None
        if not isinstance(items, list) or not all(isinstance(i, Mapping) for i in items):
            raise FatalQidoError(f"answer from {shown} is not a JSON array of objects", url=shown, status=status)
        return Page(items, status, response.headers.get("Warning"))

    def page_size(self, wanted: int) -> int:
        return min(wanted, self.max_limit) if self.max_limit else wanted

    def smaller_limit(self, exc: QidoError, page_size: int, offset: int) -> bool:
        """After a 400 on a first page, try half the limit (Azure refuses limits above 200);
        the smaller limit is kept for every later request."""
        if exc.status != 400 or offset or page_size <= 1:
            return False
        self.max_limit = page_size // 2
        return True

    def _send(self, kind: str, url: str) -> requests.Response:
        if self._rate:
            self._rate.wait()
        self.counts.add(kind)
        return self.session.get(url, timeout=self.timeout)

    def iter_pages(
        self, kind: str, path: str, params: Sequence[tuple[str, str | int]], page_size: int, max_pages: int = 100_000
    ) -> Iterator[Page]:
        """Pages of a search, by ``limit``/``offset``, until a short or empty page (or a 204).

        A page identical to the one before means the server ignores ``offset``: that raises
        instead of looping.
        """
        offset = 0
        previous: list[Any] | None = None
        for _ in range(max_pages):
            page_size = self.page_size(page_size)
            query = [*params, ("limit", page_size)] + ([("offset", offset)] if offset else [])
            try:
                page = self.get(kind, path, query)
            except FatalQidoError as exc:
                if self.smaller_limit(exc, page_size, offset):
                    continue
                raise
            if page.items and previous is not None and page.items == previous:
                raise FatalQidoError(f"{redact(self.url(path))} returned the same page again at offset {offset}: the server ignores offset", url=redact(self.url(path)))
            yield page
            if len(page.items) < page_size:
                return
            previous = page.items
            offset += len(page.items)
        raise FatalQidoError(f"{redact(self.url(path))}: more than {max_pages} pages", url=redact(self.url(path)))


def _reason(exc: Exception) -> str:
    text = str(exc)
    for marker in ("Connection refused", "Name or service not known", "No route to host", "timed out", "Connection reset"):
        if marker in text:
            return marker.lower()
    return type(exc).__name__


def client_from(settings: Any) -> QidoClient:
    """A client from any settings object with the connection fields of SyncConfig (url, user,
    password, token, token_command, headers, max_rps, timeout, retries, retry, verify, workers)."""
    from dataclasses import replace

    return QidoClient(
        settings.url,
        auth=(settings.user, settings.password) if settings.user is not None and settings.password is not None else None,
        token=settings.token,
        timeout=settings.timeout,
        retry=replace(settings.retry, attempts=settings.retries + 1),
        pool_size=settings.workers + 1,
        verify=settings.verify,
        token_provider=token_from_command(settings.token_command) if settings.token_command else None,
        headers=settings.headers,
        max_rps=settings.max_rps,
    )

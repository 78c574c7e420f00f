"""QIDO-RS over HTTP: query building, paging, retries, auth and request accounting.

The client streams: pages are yielded as they arrive and never gathered into one list. Query
strings are built by a pure function, sorted, with values sent raw where the standard allows it
(``,`` ``*`` ``-``), because some servers (Orthanc 1.10) do not percent-decode query values.

Requests are configured on a ``requests.Session`` (auth, headers, TLS, the environment's proxies
and CA bundle) but sent, where nothing needs requests' own handling, straight through the
session adapter's urllib3 pool (``LeanAdapter``): the same bytes on the wire for a fraction of
the CPU.
"""

from __future__ import annotations

import email.utils
import functools
import random
import threading
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlsplit

import orjson
import requests
import tenacity
import urllib3
from requests.adapters import HTTPAdapter
from requests.models import REDIRECT_STATI

from . import leanjson
from .errors import ConfigError, FatalQidoError, QidoError, RetriableQidoError, SourceUnreachable

RETRIABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504})
_SAFE = ",*-.:/_~^="


@functools.lru_cache(maxsize=4096)
def _quoted(text: str) -> str:
    return quote(text, safe=_SAFE)


def build_query(params: Sequence[tuple[str, str | int]]) -> str:
    """``key=value&...`` sorted by key then value; only characters that break a URL are encoded."""
    return "&".join(f"{_quoted(k)}={_quoted(v)}" for k, v in sorted([(str(k), str(v)) for k, v in params]))


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


@dataclass(frozen=True)
class Answer:
    status: int
    headers: Mapping[str, str]
    body: bytes
    authorization: str | None
    """The Authorization header the request carried (to tell a stale token after a 401)."""


def requests_error(exc: urllib3.exceptions.HTTPError | OSError) -> Exception:
    """The exception requests' ``HTTPAdapter.send`` raises for what urllib3 raised while sending."""
    rq = requests.exceptions
    if isinstance(exc, urllib3.exceptions.MaxRetryError):
        reason = exc.reason
        if isinstance(reason, urllib3.exceptions.ConnectTimeoutError) and not isinstance(reason, urllib3.exceptions.NewConnectionError):
            return rq.ConnectTimeout(exc)
        if isinstance(reason, urllib3.exceptions.ResponseError):
            return rq.RetryError(exc)
        if isinstance(reason, urllib3.exceptions.ProxyError):
            return rq.ProxyError(exc)
        if isinstance(reason, urllib3.exceptions.SSLError):
            return rq.SSLError(exc)
        return rq.ConnectionError(exc)
    if isinstance(exc, (urllib3.exceptions.ProtocolError, OSError, urllib3.exceptions.ClosedPoolError)):
        return rq.ConnectionError(exc)
    if isinstance(exc, urllib3.exceptions.ProxyError):
        return rq.ProxyError(exc)
    if isinstance(exc, urllib3.exceptions.SSLError):
        return rq.SSLError(exc)
    if isinstance(exc, urllib3.exceptions.ReadTimeoutError):
        return rq.ReadTimeout(exc)
    if isinstance(exc, urllib3.exceptions.InvalidHeader):
        return rq.InvalidHeader(exc)
    return exc


def requests_body_error(exc: urllib3.exceptions.HTTPError) -> Exception:
    """The exception requests raises for what urllib3 raised while reading a body."""
    rq = requests.exceptions
    if isinstance(exc, urllib3.exceptions.ProtocolError):
        return rq.ChunkedEncodingError(exc)
    if isinstance(exc, urllib3.exceptions.DecodeError):
        return rq.ContentDecodingError(exc)
    if isinstance(exc, urllib3.exceptions.ReadTimeoutError):
        return rq.ConnectionError(exc)
    if isinstance(exc, urllib3.exceptions.SSLError):
        return rq.SSLError(exc)
    return exc


class LeanAdapter(HTTPAdapter):
    """requests' adapter with a plain GET beside ``send``: straight to the urllib3 pool, the body
    read and decoded in one piece, no Request or Response objects, and the same exceptions as
    ``send``. requests' own work per request (merging settings, reading the environment,
    preparing, building the Response) costs the crawler more CPU than parsing most answers."""

    def pool(self, origin: Origin) -> urllib3.HTTPConnectionPool:
        """The origin's pool, kept until the pool manager closes it."""
        pool = origin.pools[0] if origin.pools else None
        if pool is None or pool.pool is None:
            pool = self.get_connection_with_tls_context(origin.request, origin.verify, proxies=None, cert=origin.cert)
            self.cert_verify(pool, origin.prefix, origin.verify, origin.cert)
            origin.pools[:] = [pool]
        return pool

    def get(self, origin: Origin, target: str, headers: Mapping[str, str], timeout: urllib3.Timeout) -> tuple[urllib3.BaseHTTPResponse, bytes]:
        try:
            response = self.pool(origin).urlopen(
                "GET", target, headers=headers, redirect=False, assert_same_host=False, preload_content=False,
                decode_content=True, retries=self.max_retries, timeout=timeout,
            )
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise requests_error(exc) from exc
        except ValueError as exc:
            raise requests.exceptions.InvalidHeader(exc) from exc
        try:
            if response.headers.get("content-encoding", "").strip().lower() == "gzip":
                body = gunzip(response.read(decode_content=False))
            else:
                body = response.read(decode_content=True)
        except urllib3.exceptions.HTTPError as exc:
            raise requests_body_error(exc) from exc
        finally:
            response.release_conn()
        return response, body


MAX_BODY = 512 << 20
"""The most a compressed answer may expand to: a guard against decompression bombs (a study's
WADO-RS metadata runs to tens of MB on cloud archives, a large QIDO page to about 60 MB)."""


class BodyTooLarge(urllib3.exceptions.DecodeError):
    """A compressed answer that expands past MAX_BODY."""


def gunzip(data: bytes) -> bytes:
    """A gzip body in one piece, as urllib3 decodes it (every member; a stream cut short gives
    what it holds, trailing garbage after a member is ignored) but in one zlib call per member:
    urllib3 works in pieces and copies them, 3-4 times the CPU on a study's metadata. Raises
    urllib3's DecodeError for a body that is not gzip, BodyTooLarge past MAX_BODY."""
    out = []
    size = 0
    while data:
        decoder = zlib.decompressobj(16 + zlib.MAX_WBITS)
        try:
            piece = decoder.decompress(data, MAX_BODY - size + 1)
        except zlib.error as exc:
            if out:  # trailing garbage after a whole member, which urllib3 also ignores
                break
            raise urllib3.exceptions.DecodeError("Received response with content-encoding: gzip, but failed to decode it.", exc) from exc
        size += len(piece)
        if size > MAX_BODY or decoder.unconsumed_tail:
            raise BodyTooLarge(f"gzip answer expands past {MAX_BODY} bytes")
        out.append(piece)
        if not decoder.eof:
            out.append(decoder.flush())
            break
        data = decoder.unused_data
    return out[0] if len(out) == 1 else b"".join(out)


@dataclass(frozen=True)
class Origin:
    """What a GET to the base URL's scheme://host:port needs to go through ``LeanAdapter.get``,
    resolved once from the session and the environment, as requests does for every request."""

    prefix: str
    adapter: LeanAdapter
    request: requests.PreparedRequest
    verify: bool | str
    cert: Any
    authorization: str | None
    """From the session's user and password, the URL's or .netrc, as requests adds it to every
    request; None when the Authorization header (if any) is the session's own."""
    pools: list[urllib3.HTTPConnectionPool] = field(default_factory=list, compare=False)


def resolve_origin(session: requests.Session, base_url: str) -> Origin | None:
    """None when requests to ``base_url`` need requests itself: a proxy, another adapter, an auth
    object other than user and password, session-wide query parameters or response hooks."""
    adapter = session.get_adapter(base_url)
    if not isinstance(adapter, LeanAdapter) or not hasattr(adapter, "get_connection_with_tls_context"):
        return None
    auth = session.auth
    if (auth is not None and not (isinstance(auth, tuple) and len(auth) == 2)) or session.params or any(session.hooks.values()):
        return None
    settings = session.merge_environment_settings(base_url, {}, None, None, None)
    if requests.utils.select_proxy(base_url, settings["proxies"]):
        return None
    prepared = session.prepare_request(requests.Request("GET", base_url))
    authorization = prepared.headers.get("Authorization")
    if authorization == session.headers.get("Authorization"):
        authorization = None
    parts = urlsplit(base_url)
    return Origin(f"{parts.scheme}://{parts.netloc}", adapter, prepared, settings["verify"], settings["cert"], authorization)


def urllib3_timeout(timeout: float | tuple[float, float] | urllib3.Timeout | None) -> urllib3.Timeout:
    if isinstance(timeout, urllib3.Timeout):
        return timeout
    if isinstance(timeout, tuple):
        connect, read = timeout
        return urllib3.Timeout(connect=connect, read=read)
    return urllib3.Timeout(connect=timeout, read=timeout)


class QidoClient:
    """A QIDO-RS (and WADO-RS metadata) client for one DICOMweb base URL.

    GETs to the base URL's host go straight through urllib3 (``LeanAdapter.get``) unless something
    needs requests' own handling: a proxy, cookies the server has set, a redirect; those go
    through the session.
    """

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
        self._closed = threading.Event()
        self.session = session or requests.Session()
        adapter = LeanAdapter(pool_connections=1, pool_maxsize=max(pool_size, 1), max_retries=0)
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
        self.answered = False
        self.max_limit: int | None = None
        self._retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception_type(RetriableQidoError),
            stop=_give_up,
            wait=_wait,
            sleep=sleep,
            before_sleep=_count_retry,
            reraise=True,
        )
        self._origin: Origin | None = None
        self._origin_lock = threading.Lock()
        self._resolved = False
        self._timeout: tuple[Any, urllib3.Timeout] = (timeout, urllib3_timeout(timeout))

    def close(self) -> None:
        """Close the connections; any later request (from a thread still running, such as the
        listing read ahead of a run that stopped) fails at once instead of opening new ones."""
        self._closed.set()
        self.session.close()

    def url(self, path: str, params: Sequence[tuple[str, str | int]] = ()) -> str:
        query = build_query(params)
        return f"{self.base_url}/{path.lstrip('/')}" + (f"?{query}" if query else "")

    def get(self, kind: str, path: str, params: Sequence[tuple[str, str | int]] = (), keep: leanjson.Selection | None = None) -> Page:
        """One GET with retries; returns the parsed page, its datasets reduced to the attributes
        in ``keep`` when given (see leanjson). Raises QidoError subclasses."""
        url = self.url(path, params)
        try:
            return self._retrying(QidoClient._get_once, self, kind, url, keep)
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

    def _get_once(self, kind: str, url: str, keep: leanjson.Selection | None = None) -> Page:
        if self._closed.is_set():
            raise FatalQidoError(f"the client was closed: {redact(url)} not asked", url=redact(url))
        try:
            answer = self._send(kind, url)
            if answer.status == 401 and self._refresh_token(answer.authorization):
                answer = self._send(kind, url)
        except (requests.exceptions.RequestException, urllib3.exceptions.HTTPError) as exc:
            raise transport_failure(exc, redact(url)) from None
        self.answered = True
        return page_of(answer, url, keep)

    def page_size(self, wanted: int) -> int:
        return min(wanted, self.max_limit) if self.max_limit else wanted

    def smaller_limit(self, exc: QidoError, page_size: int, offset: int) -> bool:
        """After a 400 on a first page, try half the limit (Azure refuses limits above 200);
        the smaller limit is kept for every later request."""
        if exc.status != 400 or offset or page_size <= 1:
            return False
        self.max_limit = page_size // 2
        return True

    def _send(self, kind: str, url: str) -> Answer:
        if self._rate:
            self._rate.wait()
        self.counts.add(kind)
        return self.fetch(url)

    def fetch(self, url: str) -> Answer:
        """One GET, no retries; raises requests' exceptions."""
        origin = self._direct_origin()
        session = self.session
        if origin is None or not url.startswith(origin.prefix + "/") or session.cookies:
            return self._fetch_by_session(url)
        headers = session.headers.copy()
        if origin.authorization:
            headers["Authorization"] = origin.authorization
        if None in headers.values():
            headers = requests.structures.CaseInsensitiveDict((k, v) for k, v in headers.items() if v is not None)
        response, body = origin.adapter.get(origin, url[len(origin.prefix):], headers, self._urllib3_timeout())
        if response.status in REDIRECT_STATI and "location" in response.headers:
            return self._fetch_by_session(url)
        if "set-cookie" in response.headers:
            requests.cookies.extract_cookies_to_jar(session.cookies, requests.Request("GET", url, headers=headers).prepare(), response)
        return Answer(response.status, response.headers, body, headers.get("Authorization"))

    def _fetch_by_session(self, url: str) -> Answer:
        response = self.session.get(url, timeout=self.timeout)
        return Answer(response.status_code, response.headers, response.content, response.request.headers.get("Authorization"))

    def _urllib3_timeout(self) -> urllib3.Timeout:
        if self._timeout[0] is not self.timeout:
            self._timeout = (self.timeout, urllib3_timeout(self.timeout))
        return self._timeout[1]

    def _direct_origin(self) -> Origin | None:
        if not self._resolved:
            with self._origin_lock:
                if not self._resolved:
                    self._origin = resolve_origin(self.session, self.base_url)
                    self._resolved = True
        return self._origin

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


def transport_failure(exc: Exception, shown: str) -> QidoError:
    if isinstance(exc, requests.exceptions.ContentDecodingError) and any(isinstance(arg, BodyTooLarge) for arg in exc.args):
        return FatalQidoError(f"answer from {shown} refused: the compressed answer expands past {MAX_BODY >> 20} MB", url=shown)
    if isinstance(exc, requests.exceptions.SSLError):
        return FatalQidoError(f"TLS error for {shown}: {_reason(exc)}", url=shown)
    if isinstance(exc, requests.exceptions.ConnectionError):
        return RetriableQidoError(f"cannot connect to {shown}: {_reason(exc)}", url=shown)
    if isinstance(exc, requests.exceptions.Timeout):
        return RetriableQidoError(f"timed out: {shown}", url=shown)
    return RetriableQidoError(f"request failed: {shown}: {_reason(exc)}", url=shown)


def page_of(answer: Answer, url: str, keep: leanjson.Selection | None = None) -> Page:
    """The answer's items (with only the attributes ``keep`` selects when given); raises QidoError for
    error statuses and bodies that are no array of objects."""
    status, body = answer.status, answer.body
    if status == 204:
        return Page([], status, answer.headers.get("Warning"))
    if status in RETRIABLE_STATUS:
        shown = redact(url)
        error = RetriableQidoError(f"HTTP {status} from {shown}", url=shown, status=status)
        error.retry_after = retry_after_seconds(answer.headers.get("Retry-After"))  # type: ignore[attr-defined]
        raise error
    if status >= 400:
        shown = redact(url)
        hint = {401: " (authentication required or refused)", 403: " (forbidden)", 404: " (not found)", 413: " (query matches too much)"}
        raise FatalQidoError(f"HTTP {status}{hint.get(status, '')} from {shown}", url=shown, status=status)
    if not body.strip():
        return Page([], status, answer.headers.get("Warning"))
    try:
        items = orjson.loads(body) if keep is None else leanjson.datasets(body, keep)
    except orjson.JSONDecodeError:
        shown = redact(url)
        raise FatalQidoError(f"malformed JSON from {shown} ({len(body)} bytes)", url=shown, status=status) from None
    except leanjson.NotDatasets:
        items = None
    if type(items) is not list or not all(type(item) is dict for item in items):
        shown = redact(url)
        raise FatalQidoError(f"answer from {shown} is not a JSON array of objects", url=shown, status=status)
    return Page(items, status, answer.headers.get("Warning"))


# A client's Retrying is built once and shared by its copies (distributed.py gives each task a
# copy that counts on its own): these read the client an attempt was made with from its arguments.


def _give_up(state: tenacity.RetryCallState) -> bool:
    policy: RetryPolicy = state.args[0].retry
    return (tenacity.stop_after_attempt(policy.attempts) | tenacity.stop_after_delay(policy.max_seconds))(state)


def _wait(state: tenacity.RetryCallState) -> float:
    return retry_wait(state.args[0].retry, state)


def _count_retry(state: tenacity.RetryCallState) -> None:
    state.args[0].counts.add_retry()


def _reason(exc: Exception) -> str:
    text = str(exc)
    for marker in ("Connection refused", "Name or service not known", "No route to host", "timed out", "Connection reset"):
        if marker in text:
            return marker.lower()
    if isinstance(exc, requests.exceptions.ContentDecodingError):
        return "the compressed answer does not decode"
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

"""The crawler's one HTTP transport: deadlines, size caps, redirects, retries, redaction, limits.

Every answer is read by ``read_answer``: within a total deadline (connect and the whole body,
``total_deadline``), up to a size cap on the wire and after decoding (gzip, x-gzip, deflate; other
encodings are refused), so that a hostile server can neither hold a run nor exhaust its memory.
The deadline also covers the status line and headers: ``WATCHDOG`` shuts down the socket of a
request past it (connections made through ``DeadlineAdapter``). Redirects are followed only within
the request's origin (``same_origin``, ``follow_redirect``): another host would receive the custom
headers (API keys) and its data would pass for the source's.

``Retrier`` is the one retry loop of the crawler (the QIDO client, the FHIR sink and the FHIR
reader): which failures are asked again (``Retriable``, ``retriable_error``, ``RETRIABLE_STATUS``),
how long to wait (``retry_wait``: the server's Retry-After, else exponential backoff with jitter),
when to give up (``RetryPolicy``: attempts and total seconds), and an injectable ``sleep``.

``LeanAdapter`` sends a plain GET straight through requests' urllib3 pool: the same bytes on the
wire as ``requests.Session.get`` for a fraction of the CPU. These helpers take a urllib3 response
(``requests.Response.raw`` too) and raise requests' exceptions.
"""

from __future__ import annotations

import contextlib
import email.utils
import heapq
import itertools
import math
import random
import re
import socket
import threading
import time
import weakref
import zlib
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import urljoin, urlsplit, urlunsplit

import requests
import tenacity
import urllib3
from requests.adapters import HTTPAdapter
from requests.models import REDIRECT_STATI

from .errors import ConfigError

_T = TypeVar("_T")

RETRIABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504})


def check_base_url(url: str) -> str:
    """Validate a DICOMweb base URL (``http(s)://host[:port]/path``) and return it without a trailing slash."""
    try:
        parts = urlsplit(url)
    except ValueError:
        raise ConfigError(f"not a valid URL: {redact(url)!r}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"not an http(s) URL: {redact(url)!r}")
    try:
        parts.port
    except ValueError:
        raise ConfigError(f"bad port in URL: {redact(url)!r}") from None
    if parts.query or parts.fragment:
        raise ConfigError(f"the DICOMweb base URL takes no query or fragment: {redact(url)!r}")
    return url.rstrip("/")


def redact(url: str, *, keep_user: bool = False) -> str:
    """``url`` without its secrets, for messages: the ``user:password@`` part removed (with
    ``keep_user``, as for a state's database URL, where the login tells which account is used:
    the user kept and the password shown as ``***``), and the value of a ``password=`` query
    parameter (libpq takes it there) shown as ``***``. Everything else keeps its bytes. From a URL
    that does not parse (a broken IPv6 address) everything between ``//`` and ``@`` goes."""
    if "@" not in url and "password=" not in url.lower():
        return url
    try:
        parts = urlsplit(url)
    except ValueError:
        return _hide_password_parameter(re.sub(r"//[^/?#]*@", "//", url))
    head, slashes, tail = url.partition("//")
    netloc = parts.netloc
    if slashes and "@" in netloc and tail.startswith(netloc):
        userinfo, _, hosts = netloc.rpartition("@")
        user, colon, _ = userinfo.partition(":")
        shown = f"{user}{':***' if colon else ''}@{hosts}" if keep_user else hosts
        url = f"{head}//{shown}{tail[len(netloc):]}"
    return _hide_password_parameter(url)


_PASSWORD_PARAMETER = re.compile(r"(^|&)(password=)[^&#]*", re.IGNORECASE)


def _hide_password_parameter(url: str) -> str:
    before, mark, after = url.partition("?")
    if not mark:
        return url
    query, hash_mark, fragment = after.partition("#")
    query = _PASSWORD_PARAMETER.sub(r"\g<1>\g<2>***", query)
    return f"{before}?{query}{hash_mark}{fragment}"


def origin_of(url: str) -> str:
    """``scheme://host:port`` of a URL (default port filled in), without credentials, path or query:
    what a message may show of a URL a server sent. Characters that cannot be in a host name are
    replaced by ``?``."""
    scheme, host, port = _origin_parts(url)
    host = re.sub(r"[^A-Za-z0-9.\-:\[\]]", "?", host)[:255]
    return f"{scheme}://{host}:{port}" if port is not None else f"{scheme}://{host}:(bad port)"


def same_origin(url: str, other: str) -> bool:
    """True when both URLs have the same scheme, host and port (RFC 6454), default ports filled in."""
    first, second = _origin_parts(url), _origin_parts(other)
    return first[2] is not None and first == second


def _origin_parts(url: str) -> tuple[str, str, int | None]:
    try:
        parts = urlsplit(url)
    except ValueError:
        return ("", "(invalid URL)", None)
    scheme = parts.scheme.lower()
    try:
        port = parts.port or {"http": 80, "https": 443}.get(scheme)
    except ValueError:
        port = None
    host = parts.hostname or ""
    return scheme, f"[{host}]" if ":" in host else host, port


def check_header_value(name: str, value: str) -> str:
    """``value``, or ConfigError naming ``name`` (never the value, which is often a secret) when it
    cannot be sent as an HTTP header: a line break or another control character (a token file
    read with its newline, a token command printing two lines), or a character outside Latin-1."""
    try:
        value.encode("latin-1")
    except UnicodeEncodeError:
        raise ConfigError(f"{name} contains characters that an HTTP header cannot carry") from None
    if any(c < " " and c != "\t" or c == "\x7f" for c in value):
        raise ConfigError(f"{name} contains a line break or another control character")
    return value


@dataclass
class RequestCounts:
    """HTTP requests made, by kind (studies, series, instances, metadata); thread-safe."""

    by_kind: Counter[str] = field(default_factory=Counter)
    retries: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, kind: str) -> None:
        with self._lock:
            self.by_kind[kind] += 1

    def add_retry(self) -> None:
        with self._lock:
            self.retries += 1

    def merge(self, other: RequestCounts) -> None:
        """Add ``other``'s requests (by kind) and retries to these, e.g. a task's counts to its
        run's. ``other`` is read under its own lock and then added under this one: never both
        at once, so two counters merged into each other from two threads cannot deadlock."""
        with other._lock:
            by_kind, retries = Counter(other.by_kind), other.retries
        with self._lock:
            self.by_kind.update(by_kind)
            self.retries += retries

    @property
    def total(self) -> int:
        with self._lock:   # another thread may add a kind meanwhile
            return sum(self.by_kind.values())

    def as_dict(self) -> dict[str, int]:
        with self._lock:
            return {"total": sum(self.by_kind.values()), **dict(sorted(self.by_kind.items())), "retries": self.retries}


class RateLimit:
    """At most ``rate`` requests per second across all threads (requests are spaced evenly)."""

    def __init__(self, rate: float, clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep) -> None:
        if rate <= 0:
            raise ConfigError(f"the request rate must be above 0 per second, not {rate}", setting="max_rps")
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
        raise ConfigError("the token command is empty", setting="token_command")

    def provide() -> str:
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise ConfigError(f"the token command {argv[0]!r} could not run: {type(exc).__name__}", setting="token_command") from None
        token = done.stdout.strip()
        if done.returncode != 0 or not token:
            raise ConfigError(f"the token command {argv[0]!r} failed (exit {done.returncode}, {len(token)} characters of output)",
                              setting="token_command")
        return token

    return provide

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
    hinted: float | None = getattr(exc, "retry_after", None)
    if hinted is not None:
        return min(hinted, policy.max_seconds)
    backoff: float = policy.base_delay * 2 ** (state.attempt_number - 1)
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


def server_wait(headers: Mapping[str, str]) -> float | None:
    """Seconds the server asked to wait before the next attempt: ``Retry-After`` (RFC 9110), else
    ``x-ms-retry-after-ms`` (Azure's Cosmos DB backed services answer throttling with it)."""
    hinted = retry_after_seconds(headers.get("Retry-After"))
    if hinted is not None:
        return hinted
    value = headers.get("x-ms-retry-after-ms")
    try:
        return max(0.0, float(value) / 1000.0) if value else None
    except ValueError:
        return None


class Retriable(Exception):
    """A request that failed in a way asking again may fix: no connection, a timeout, an answer cut
    short (``retriable_error``) or a status in RETRIABLE_STATUS. ``connect``: the server was not
    reached at all; ``retry_after``: the seconds the server asked to wait (``server_wait``)."""

    def __init__(self, reason: str, *, status: int | None = None, connect: bool = False, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status
        self.connect = connect
        self.retry_after = retry_after


def retriable_error(exc: BaseException) -> bool:
    """Whether a request that raised ``exc`` (requests' or urllib3's exceptions) may succeed when
    sent again: connection errors, timeouts (the total deadline among them), answers cut short or
    garbled on the way. Not a TLS error, a refused redirect, too many redirects, an answer over the
    size cap or in an encoding that is not read: asking again gets the same."""
    if isinstance(exc, (BodyTooLarge, UnsupportedEncoding, RedirectRefused, requests.exceptions.TooManyRedirects, requests.exceptions.SSLError)):
        return False
    return isinstance(exc, (requests.exceptions.RequestException, urllib3.exceptions.HTTPError))


class Retrier:
    """The crawler's one retry loop: ``retrier(request, *args)`` calls ``request(*args)`` again
    while it raises one of ``retry_on`` (``Retriable`` unless told otherwise), waiting
    ``retry_wait`` between attempts (the failure's ``retry_after`` when the server gave one, capped
    by the policy's total time; else exponential backoff with jitter), and gives up after
    ``policy.attempts`` attempts or ``policy.max_seconds``, raising the last failure as it was.

    ``on_retry`` is called before each wait (to count retries); ``sleep`` is injectable so that
    tests do not wait. One retrier may serve several threads."""

    def __init__(
        self,
        policy: RetryPolicy,
        *,
        retry_on: type[BaseException] | tuple[type[BaseException], ...] = Retriable,
        sleep: Callable[[float], None] = time.sleep,
        on_retry: Callable[[], None] | None = None,
    ) -> None:
        self.policy = policy
        self._on_retry = on_retry
        self._retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception_type(retry_on),
            stop=tenacity.stop_after_attempt(policy.attempts) | tenacity.stop_after_delay(policy.max_seconds),
            wait=self._wait,
            sleep=sleep,
            before_sleep=self._before_sleep,
            reraise=True,
        )

    def __call__(self, request: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
        return self._retrying(request, *args, **kwargs)

    def _wait(self, state: tenacity.RetryCallState) -> float:
        return retry_wait(self.policy, state)

    def _before_sleep(self, state: tenacity.RetryCallState) -> None:
        if self._on_retry is not None:
            self._on_retry()


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


class Watchdog:
    """Shuts a request's socket down when the request's total deadline passes, wherever it waits.

    Reading the body piece by piece bounds a trickling body (``read_capped``), but http.client
    reads the status line, the headers and each chunk-size line in loops of reads that no single
    timeout covers: a server sending one header byte a second would hold a request forever. One
    daemon thread keeps the deadlines of the requests in flight (``deadline``) and shuts down the
    socket of any request past its own (connections made through ``DeadlineAdapter``), so that
    the blocked read ends at once.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, _Watched]] = []
        self._live = 0
        self._order = itertools.count()
        self._local = threading.local()
        self._thread: threading.Thread | None = None

    @contextlib.contextmanager
    def deadline(self, deadline: float) -> Iterator[_Watched]:
        """Watch the connections this thread uses until the block ends; ``.fired`` tells afterwards
        whether the watchdog cut one of them."""
        watched = _Watched(deadline)
        outer = getattr(self._local, "watched", None)
        self._local.watched = watched
        try:
            yield watched
        finally:
            self._local.watched = outer
            with self._cond:
                if watched.sockets and not watched.done:
                    self._live -= 1
                watched.done = True
                watched.sockets.clear()

    def watch(self, sock: socket.socket | None) -> None:
        """Called by a connection about to wait for an answer: watch ``sock`` for this thread's request."""
        watched = getattr(self._local, "watched", None)
        if watched is None or sock is None:
            return
        with self._cond:
            if watched.done:
                return
            if not watched.sockets:
                earliest = self._heap[0][0] if self._heap else math.inf
                self._live += 1
                heapq.heappush(self._heap, (watched.deadline, next(self._order), watched))
                if len(self._heap) > 2 * self._live + 1000:
                    self._heap = [entry for entry in self._heap if not entry[2].done]
                    heapq.heapify(self._heap)
                if watched.deadline < earliest:  # else the thread wakes early enough by itself
                    self._cond.notify()
            watched.sockets.append(weakref.ref(sock))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="qido-deadlines", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        with self._cond:
            while True:
                while self._heap and self._heap[0][2].done:
                    heapq.heappop(self._heap)
                if not self._heap:
                    self._cond.wait()
                    continue
                wait = self._heap[0][0] - time.monotonic()
                if wait > 0:
                    self._cond.wait(wait)
                    continue
                watched = heapq.heappop(self._heap)[2]
                watched.done = watched.fired = True
                self._live -= 1
                for ref in watched.sockets:
                    sock = ref()
                    if sock is not None:
                        try:
                            sock.shutdown(socket.SHUT_RDWR)
                        except OSError:
                            pass


@dataclass(eq=False)
class _Watched:
    deadline: float
    sockets: list[weakref.ref[socket.socket]] = field(default_factory=list)
    done: bool = False
    fired: bool = False


WATCHDOG = Watchdog()


class _WatchedConnection:
    def getresponse(self, *args: Any, **kwargs: Any) -> Any:
        WATCHDOG.watch(getattr(self, "sock", None))
        return super().getresponse(*args, **kwargs)  # type: ignore[misc]


class _WatchedHTTPConnection(_WatchedConnection, urllib3.connection.HTTPConnection):
    pass


class _WatchedHTTPSConnection(_WatchedConnection, urllib3.connection.HTTPSConnection):
    pass


class _WatchedHTTPPool(urllib3.HTTPConnectionPool):
    ConnectionCls = _WatchedHTTPConnection


class _WatchedHTTPSPool(urllib3.HTTPSConnectionPool):
    ConnectionCls = _WatchedHTTPSConnection


class DeadlineAdapter(HTTPAdapter):
    """requests' adapter whose connections ``WATCHDOG`` can cut: requests sent through it inside
    ``with WATCHDOG.deadline(...)`` end at that deadline, headers included."""

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {"http": _WatchedHTTPPool, "https": _WatchedHTTPSPool}

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> urllib3.PoolManager:
        manager: urllib3.PoolManager = super().proxy_manager_for(proxy, **proxy_kwargs)
        if not proxy.lower().startswith("socks"):
            manager.pool_classes_by_scheme = {"http": _WatchedHTTPPool, "https": _WatchedHTTPSPool}
        return manager


class LeanAdapter(DeadlineAdapter):
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

    def get(
        self, origin: Origin, target: str, headers: Mapping[str, str], timeout: urllib3.Timeout, *, limit: int, deadline: float
    ) -> tuple[urllib3.BaseHTTPResponse, bytes]:
        """The answer and its decoded body, read by ``read_answer`` (cap and deadline)."""
        try:
            response = self.pool(origin).urlopen(
                "GET", target, headers=headers, redirect=False, assert_same_host=False, preload_content=False,
                decode_content=False, retries=self.max_retries, timeout=timeout,
            )
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise requests_error(exc) from exc
        except ValueError as exc:
            raise requests.exceptions.InvalidHeader(exc) from exc
        return response, read_answer(response, limit, deadline, timeout.read_timeout)


MAX_BODY = 240 << 20
"""The default cap on an answer, on the wire and decoded (``--max-response-mb``). The largest
legitimate answer is a large study's WADO-RS metadata: 10,000 CT instances measured 195 MB on
Orthanc, which indents its JSON (19.5 KB per instance of pydicom's CT_small; about 11 KB compact).
An uncompressed answer without Content-Length has to be held up to the cap before it can be
refused: with 240 MB that peaks at 280 MB of RSS, under the 300 MB that a bomb may cost."""

INFLATE_STEP = 32 << 20
"""Compressed answers that decode to at most this are inflated in one zlib call. Larger ones are
first measured in pieces of this size that are not kept, then inflated in one call: refusing a
bomb never holds more than a piece, and a legitimate large answer costs a second inflation."""

READ_PIECE = 1 << 20
MAX_REDIRECTS = 5
ACCEPT_ENCODING = "gzip, deflate"
"""The encodings asked for, and the only ones decoded (each with the cap): Brotli or zstd would
need a decoder whose output can be bounded per call."""


def describe_size(limit: int) -> str:
    return f"{limit >> 20} MB" if limit and not limit % (1 << 20) else f"{limit} bytes"


class BodyTooLarge(requests.exceptions.RequestException):
    """An answer larger than the cap, on the wire or decoded."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"larger than {describe_size(limit)}")
        self.limit = limit


class UnsupportedEncoding(requests.exceptions.RequestException):
    """A Content-Encoding that was not asked for and is not decoded."""


class RedirectRefused(requests.exceptions.RequestException):
    """A redirect to another origin (scheme, host or port), or to a URL that does not parse."""


class DeadlineExceeded(requests.exceptions.ReadTimeout):
    """The whole answer did not arrive within the request's total deadline."""

    def __init__(self) -> None:
        super().__init__("no complete answer within the request's total deadline")


def total_deadline(timeout: float | tuple[float, float]) -> float:
    """Seconds one request may take from connecting to the body's last byte: the connect timeout
    plus the read timeout (as the FHIR sink's deadline). The read timeout alone bounds each wait for
    bytes; a server sending one byte now and then would hold the request (and the run) forever."""
    connect, read = timeout if isinstance(timeout, tuple) else (timeout, timeout)
    return connect + read


def read_answer(response: urllib3.BaseHTTPResponse, limit: int, deadline: float, read_timeout: float | None = None) -> bytes:
    """The body of ``response`` (opened with ``preload_content=False``), decoded, read by
    ``read_capped`` and ``decode_body``; the connection goes back to its pool after a whole body,
    and is closed after anything else. Raises requests' exceptions (BodyTooLarge,
    UnsupportedEncoding, DeadlineExceeded among them)."""
    try:
        body = decode_body(read_capped(response, limit, deadline, read_timeout), response.headers.get("content-encoding", ""), limit)
    except urllib3.exceptions.HTTPError as exc:
        response.close()
        raise requests_body_error(exc) from exc
    except requests.exceptions.RequestException:  # an OSError too: BodyTooLarge, DeadlineExceeded
        response.close()
        raise
    except OSError as exc:  # the socket itself (closed, reset): as requests reports it
        response.close()
        raise requests.exceptions.ConnectionError(exc) from exc
    except BaseException:
        response.close()
        raise
    response.release_conn()
    return body


def read_capped(response: urllib3.BaseHTTPResponse, limit: int, deadline: float, read_timeout: float | None = None) -> bytes:
    """The raw body (content coding not undone), read in pieces as they arrive: at most ``limit``
    bytes (a Content-Length above it is refused before reading) and until ``deadline``
    (``time.monotonic()``); each wait for bytes is bounded by ``read_timeout`` and by the time left."""
    length = response.headers.get("content-length", "").strip()
    if length.isdigit() and int(length) > limit:
        raise BodyTooLarge(limit)
    pieces: list[bytes] = []
    size = 0
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise DeadlineExceeded
        # the connection goes back to its pool once the last byte is read (and a full pool
        # closes it): its socket is the response's only while the response still holds it
        sock = getattr(getattr(response, "connection", None), "sock", None)
        if sock is not None:
            try:
                sock.settimeout(min(left, read_timeout) if read_timeout else left)
            except OSError:
                pass
        try:
            piece = response.read1(READ_PIECE, decode_content=False)
        except urllib3.exceptions.ReadTimeoutError:
            if deadline - time.monotonic() <= 0:
                raise DeadlineExceeded from None
            raise
        if not piece:
            if time.monotonic() >= deadline:
                raise DeadlineExceeded
            break
        size += len(piece)
        if size > limit:
            raise BodyTooLarge(limit)
        pieces.append(piece)
    return pieces[0] if len(pieces) == 1 else b"".join(pieces)


def decode_body(data: bytes, content_encoding: str, limit: int) -> bytes:
    """``data`` with its content codings undone (gzip, x-gzip, deflate, identity), never larger
    than ``limit``: raises BodyTooLarge past it, UnsupportedEncoding for other codings and
    urllib3's DecodeError for data that does not decode."""
    codings = [c.strip().lower() for c in content_encoding.split(",") if c.strip() and c.strip().lower() != "identity"]
    for coding in codings:
        if coding not in ("gzip", "x-gzip", "deflate"):
            raise UnsupportedEncoding(f"Content-Encoding {re.sub(r'[^A-Za-z0-9._-]', '?', coding)[:40]!r} is not supported")
    if len(codings) > 2:
        raise UnsupportedEncoding(f"{len(codings)} content codings in one answer are not supported")
    for coding in reversed(codings):
        data = gunzip(data, limit) if coding != "deflate" else inflate(data, limit)
    if len(data) > limit:
        raise BodyTooLarge(limit)
    return data


def gunzip(data: bytes, limit: int | None = None) -> bytes:
    """A gzip body in one piece, as urllib3 decodes it (every member; a stream cut short gives
    what it holds, trailing garbage after a member is ignored) but in one zlib call per member
    (see ``_inflate``): urllib3 works in pieces and copies them, 3-4 times the CPU on a study's
    metadata. Raises urllib3's DecodeError for a body that is not gzip, BodyTooLarge past
    ``limit`` (default MAX_BODY)."""
    room = MAX_BODY if limit is None else limit
    out: list[bytes] = []
    while data:
        try:
            piece, decoder = _inflate(data, 16 + zlib.MAX_WBITS, room)
        except zlib.error as exc:
            if out:  # trailing garbage after a whole member, which urllib3 also ignores
                break
            raise urllib3.exceptions.DecodeError("Received response with content-encoding: gzip, but failed to decode it.", exc) from exc
        room -= len(piece)
        out.append(piece)
        if not decoder.eof:
            out.append(decoder.flush())
            break
        data = decoder.unused_data
    return out[0] if len(out) == 1 else b"".join(out)


def inflate(data: bytes, limit: int | None = None) -> bytes:
    """A ``deflate`` body: zlib-wrapped as RFC 9110 says, or raw deflate as some servers send it
    (urllib3 accepts both the same way). Raises DecodeError or BodyTooLarge as ``gunzip``."""
    room = MAX_BODY if limit is None else limit
    try:
        out, decoder = _inflate(data, zlib.MAX_WBITS, room)
    except zlib.error:
        try:
            out, decoder = _inflate(data, -zlib.MAX_WBITS, room)
        except zlib.error as exc:
            raise urllib3.exceptions.DecodeError("Received response with content-encoding: deflate, but failed to decode it.", exc) from exc
    return out if decoder.eof else out + decoder.flush()


def _inflate(data: bytes, wbits: int, room: int) -> tuple[bytes, Any]:
    """One zlib stream from ``data``: (its output, the decoder, which holds ``unused_data``).
    Output up to INFLATE_STEP comes from one call; a larger output is first measured piece by piece
    without being kept (BodyTooLarge past ``room``), then made again in one call."""
    decoder = zlib.decompressobj(wbits)
    asked = min(room, INFLATE_STEP) + 1
    out = decoder.decompress(data, asked)
    if len(out) < asked:
        return out, decoder
    size = len(out)
    del out
    while size <= room and not decoder.eof:
        piece = len(decoder.decompress(decoder.unconsumed_tail, INFLATE_STEP))
        if not piece:
            break
        size += piece
    if size > room:
        raise BodyTooLarge(room)
    decoder = zlib.decompressobj(wbits)
    return decoder.decompress(data, room + 1), decoder


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
    object other than user and password, session-wide query parameters or response hooks.

    A ``session.verify`` other than True (a CA bundle, or False) was chosen by the caller and wins
    over REQUESTS_CA_BUNDLE and CURL_CA_BUNDLE, which requests would let win; with True the
    environment's bundle applies, as in requests."""
    adapter = session.get_adapter(base_url)
    if not isinstance(adapter, LeanAdapter) or not hasattr(adapter, "get_connection_with_tls_context"):
        return None
    auth = session.auth
    if (auth is not None and not (isinstance(auth, tuple) and len(auth) == 2)) or session.params or any(session.hooks.values()):
        return None
    settings = session.merge_environment_settings(base_url, {}, None, None, None)
    if requests.utils.select_proxy(base_url, settings["proxies"]):
        return None
    verify = settings["verify"] if session.verify is True else session.verify
    prepared = session.prepare_request(requests.Request("GET", base_url))
    authorization = header_text(prepared.headers.get("Authorization"))
    if authorization == session.headers.get("Authorization"):
        authorization = None
    parts = urlsplit(base_url)
    return Origin(f"{parts.scheme}://{parts.netloc}", adapter, prepared, verify, settings["cert"], authorization)


def urllib3_timeout(timeout: float | tuple[float, float] | urllib3.Timeout | None) -> urllib3.Timeout:
    """urllib3's timeout for requests' ``(connect, read)``, with ``total_deadline`` as its total."""
    if isinstance(timeout, urllib3.Timeout) or timeout is None:
        return urllib3.Timeout() if timeout is None else timeout
    connect, read = timeout if isinstance(timeout, tuple) else (timeout, timeout)
    return urllib3.Timeout(connect=connect, read=read, total=total_deadline((connect, read)))


def header_text(value: str | bytes | None) -> str | None:
    """A header value as text: requests keeps what it was given, which may be bytes (Latin-1 on the wire)."""
    return value.decode("latin-1") if isinstance(value, bytes) else value


def redirect_location(status: int, headers: Mapping[str, str]) -> str | None:
    """Where an answer redirects to: its Location when its status is a redirect, else None."""
    return headers.get("location") if status in REDIRECT_STATI else None


def follow_redirect(url: str, location: str) -> str:
    """The URL a redirect from ``url`` to ``location`` leads to, with ``url``'s scheme and netloc
    (so its credentials and connection pool apply); RedirectRefused when ``location`` is another
    origin: the request's headers (API keys) would go to another host, and its answers would pass
    for the source's. The message shows both origins only (``origin_of``)."""
    target = urljoin(url, location.strip())
    if not same_origin(url, target):
        raise RedirectRefused(f"redirect from {origin_of(url)} to {origin_of(target)} refused (another origin)")
    base, parts = urlsplit(url), urlsplit(target)
    return urlunsplit((base.scheme, base.netloc, parts.path, parts.query, ""))

def failure_reason(exc: Exception) -> str:
    """A short cause of a failed request for messages, never the exception's text (it carries the URL)."""
    text = str(exc)
    for marker in ("Connection refused", "Name or service not known", "No route to host", "timed out", "Connection reset"):
        if marker in text:
            return marker.lower()
    if isinstance(exc, requests.exceptions.ContentDecodingError):
        return "the compressed answer does not decode"
    return type(exc).__name__

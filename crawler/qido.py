"""QIDO-RS over HTTP: query building, paging, per-server fallbacks, auth and request accounting.

The client streams: pages are yielded as they arrive and never gathered into one list. Query
strings are built by a pure function, sorted, with values sent raw where the standard allows it
(``,`` ``*`` ``-``), because some servers (Orthanc 1.10) do not percent-decode query values.

Requests are configured on a ``requests.Session`` (auth, headers, TLS, the environment's proxies
and CA bundle) but sent, where nothing needs requests' own handling, straight through the
session adapter's urllib3 pool (``http.LeanAdapter``): the same bytes on the wire for a fraction
of the CPU. Deadlines, size caps, redirects and retries are the transport's (``crawler.http``).
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import orjson
import requests
import urllib3

from . import auth as credentials_kinds, dicomjson, http, leanjson
from .auth import Credentials, SessionAuth, Static
from .auth.plain import TokenCommand
from .errors import FatalQidoError, QidoError, RetriableQidoError, SourceUnreachable
from .http import (
    ACCEPT_ENCODING,
    MAX_REDIRECTS,
    RETRIABLE_STATUS,
    WATCHDOG,
    Answer,
    DeadlineExceeded,
    LeanAdapter,
    Origin,
    RateLimit,
    RedirectRefused,
    RequestCounts,
    Retrier,
    RetryPolicy,
    check_base_url,
    check_header_value,
    failure_reason,
    follow_redirect,
    header_text,
    read_answer,
    redact,
    redirect_location,
    resolve_origin,
    retriable_error,
    server_wait,
    total_deadline,
    urllib3_timeout,
)

_SAFE = ",*-.:/_~^="


@functools.lru_cache(maxsize=4096)
def _quoted(text: str) -> str:
    return quote(text, safe=_SAFE)


def build_query(params: Sequence[tuple[str, str | int]]) -> str:
    """``key=value&...`` sorted by key then value; only characters that break a URL are encoded."""
    return "&".join(f"{_quoted(k)}={_quoted(v)}" for k, v in sorted([(str(k), str(v)) for k, v in params]))


@dataclass(frozen=True)
class Page:
    items: list[dict[str, Any]]
    status: int
    warning: str | None = None


class QidoClient:
    """A QIDO-RS (and WADO-RS metadata) client for one DICOMweb base URL.

    GETs to the base URL's host go straight through urllib3 (``LeanAdapter.get``) unless something
    needs requests' own handling: a proxy, cookies the server has set; those go through the
    session. Either way an answer is capped at ``max_body`` bytes (default MAX_BODY) and bounded
    by ``total_deadline(timeout)``; redirects within the base URL's origin are followed (at most
    MAX_REDIRECTS), a redirect elsewhere is refused.
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
        max_body: int | None = None,
        credentials: Credentials | None = None,
    ) -> None:
        """``credentials`` give every request its auth headers (``crawler.auth``); ``token`` (a
        bearer token) and ``token_provider`` (a token command, run again after a 401) are kinds of
        them. ``auth`` (user, password) is requests' own basic auth, as in the URL or .netrc."""
        self.base_url = check_base_url(base_url)
        self.max_body = http.MAX_BODY if max_body is None else max_body
        self._closed = threading.Event()
        self.session = session or requests.Session()
        adapter = LeanAdapter(pool_connections=1, pool_maxsize=max(pool_size, 1), max_retries=0)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        self.session.verify = verify
        if auth:
            self.session.auth = auth
        for name, value in (headers or {}).items():
            self.session.headers[name] = check_header_value(f"the {name} header", value)
        if credentials is None and token_provider is not None:
            credentials = TokenCommand(token_provider, token)
        elif credentials is None and token:
            credentials = Static({"Authorization": _bearer(token)})
        self.credentials = credentials
        self._session_auth = SessionAuth(credentials) if credentials is not None else None
        self.session.headers["Accept"] = "application/dicom+json"
        self.session.headers["Accept-Encoding"] = ACCEPT_ENCODING
        self._rate = RateLimit(max_rps) if max_rps else None
        self.timeout = timeout
        self.retry = retry
        self.counts = RequestCounts()
        self.answered = False
        self.max_limit: int | None = None
        self._sleep = sleep
        self._retrier = self._new_retrier()
        self._origin: Origin | None = None
        self._origin_lock = threading.Lock()
        self._resolved = False
        self._timeout: tuple[Any, urllib3.Timeout] = (timeout, urllib3_timeout(timeout))

    def for_task(self) -> QidoClient:
        """A client for one task of a run (a Dask task, a worker): it shares this client's session
        (connection pool, headers, the token and its refresh), rate limit, size cap, timeouts,
        retry policy and the server limits learned so far, and closes with it, but counts its
        requests and retries on its own (``counts``; add them to the run's with
        ``RequestCounts.merge``)."""
        task = object.__new__(QidoClient)
        task.__dict__.update(self.__dict__)
        task.counts = RequestCounts()
        task._retrier = task._new_retrier()
        return task

    def __copy__(self) -> QidoClient:
        """``copy.copy(client)`` is ``client.for_task()``: a plain shallow copy would share this
        client's retrier, and so count its retries here."""
        return self.for_task()

    def _new_retrier(self) -> Retrier:
        return Retrier(self.retry, retry_on=RetriableQidoError, sleep=self._sleep, on_retry=self._count_retry)

    def _count_retry(self) -> None:
        self.counts.add_retry()

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
            return self._retrier(self._get_once, kind, url, keep)
        except RetriableQidoError as exc:
            if not self.answered and exc.status is None:
                raise SourceUnreachable(str(exc), url=exc.url) from None
            raise

    def renew_credentials(self, used: str | None) -> bool:
        """After a 401 to a request that carried the Authorization ``used``: new credentials (a
        token fetched or printed again), once for all threads that sent the same; True when asking
        again may help."""
        return self.credentials is not None and self.credentials.refresh(credentials_kinds.used(used))

    def _get_once(self, kind: str, url: str, keep: leanjson.Selection | None = None) -> Page:
        if self._closed.is_set():
            raise FatalQidoError(f"the client was closed: {redact(url)} not asked", url=redact(url))
        try:
            answer = self._send(kind, url)
            if answer.status == 401 and self.renew_credentials(answer.authorization):
                answer = self._send(kind, url)
        except (requests.exceptions.RequestException, urllib3.exceptions.HTTPError) as exc:
            raise transport_failure(exc, redact(url)) from None
        self.answered = True
        return page_of(answer, url, keep, listing=kind == "studies")

    def page_size(self, wanted: int) -> int:
        return min(wanted, self.max_limit) if self.max_limit else wanted

    def learn_max_limit(self, limit: int | None) -> None:
        """Keep ``limit`` as the largest page limit to ask for when it is smaller than the one
        kept (another client of the run, e.g. a Dask task, found the server refusing more)."""
        if limit and (not self.max_limit or limit < self.max_limit):
            self.max_limit = limit

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

    def fetch(self, url: str, accept: str | None = None) -> Answer:
        """One GET, no retries, following redirects within the origin (at most MAX_REDIRECTS), all
        within one total deadline; raises requests' exceptions (RedirectRefused for a redirect to
        another origin, BodyTooLarge, DeadlineExceeded). ``accept`` replaces the Accept header
        (e.g. for Orthanc's REST API)."""
        timeout = self._urllib3_timeout()
        total = timeout.total
        deadline = time.monotonic() + (total if isinstance(total, (int, float)) and total else total_deadline(self.timeout))
        with WATCHDOG.deadline(deadline) as watched:
            try:
                for _ in range(MAX_REDIRECTS + 1):
                    answer, location = self._fetch_one(url, timeout, deadline, accept)
                    if watched.fired:
                        raise DeadlineExceeded
                    if location is None:
                        return answer
                    url = follow_redirect(url, location)
            except (requests.exceptions.RequestException, urllib3.exceptions.HTTPError):
                if watched.fired:
                    raise DeadlineExceeded from None
                raise
        raise requests.exceptions.TooManyRedirects(f"more than {MAX_REDIRECTS} redirects")

    def _fetch_one(self, url: str, timeout: urllib3.Timeout, deadline: float, accept: str | None = None) -> tuple[Answer, str | None]:
        """The answer, and where it redirects to (None when it does not)."""
        origin = self._direct_origin()
        session = self.session
        if origin is None or not url.startswith(origin.prefix + "/") or session.cookies:
            return self._fetch_by_session(url, timeout, deadline, accept)
        headers = session.headers.copy()
        if accept:
            headers["Accept"] = accept
        if origin.authorization:
            headers["Authorization"] = origin.authorization
        if self.credentials is not None:
            headers.update(self.credentials.headers("GET", url))
        if None in headers.values():
            headers = requests.structures.CaseInsensitiveDict((k, v) for k, v in headers.items() if v is not None)
        response, body = origin.adapter.get(origin, url[len(origin.prefix):], headers, timeout, limit=self.max_body, deadline=deadline)
        if "set-cookie" in response.headers:
            requests.cookies.extract_cookies_to_jar(session.cookies, requests.Request("GET", url, headers=headers).prepare(), response)
        return Answer(response.status, response.headers, body, header_text(headers.get("Authorization"))), redirect_location(response.status, response.headers)

    def _fetch_by_session(self, url: str, timeout: urllib3.Timeout, deadline: float, accept: str | None = None) -> tuple[Answer, str | None]:
        verify = None if self.session.verify is True else self.session.verify
        headers = {"Accept": accept} if accept else None
        # requests takes urllib3's Timeout as it is (HTTPAdapter.send), though its stubs say otherwise
        response = self.session.get(url, timeout=timeout, verify=verify, stream=True, allow_redirects=False, headers=headers, auth=self._session_auth)  # type: ignore[arg-type]
        body = read_answer(response.raw, self.max_body, deadline, self.timeout[1] if isinstance(self.timeout, tuple) else self.timeout)
        answer = Answer(response.status_code, response.headers, body, header_text(response.request.headers.get("Authorization")))
        return answer, redirect_location(response.status_code, response.headers)

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


def _bearer(token: str) -> str:
    return "Bearer " + check_header_value("the bearer token (given, or printed by the token command)", token)


def transport_failure(exc: Exception, shown: str) -> QidoError:
    """The QidoError for a request to ``shown`` that raised ``exc``: RetriableQidoError when asking
    again may help (``http.retriable_error``), else FatalQidoError."""
    if isinstance(exc, RedirectRefused):
        return FatalQidoError(f"{exc}: {shown}", url=shown)
    if isinstance(exc, requests.exceptions.SSLError):
        return FatalQidoError(f"TLS error for {shown}: {failure_reason(exc)}", url=shown)
    if not retriable_error(exc):
        return FatalQidoError(f"answer from {shown} refused: {exc}", url=shown)
    if isinstance(exc, DeadlineExceeded):
        return RetriableQidoError(f"timed out: {shown}: {exc}", url=shown)
    if isinstance(exc, requests.exceptions.ConnectionError):
        return RetriableQidoError(f"cannot connect to {shown}: {failure_reason(exc)}", url=shown)
    if isinstance(exc, requests.exceptions.Timeout):
        return RetriableQidoError(f"timed out: {shown}", url=shown)
    return RetriableQidoError(f"request failed: {shown}: {failure_reason(exc)}", url=shown)


def page_of(answer: Answer, url: str, keep: leanjson.Selection | None = None, listing: bool = False) -> Page:
    """The answer's items (with only the attributes ``keep`` selects when given); raises QidoError for
    error statuses and bodies that are no array of objects. A study ``listing`` that does not
    decode as a whole is decoded entry by entry (see dicomjson.salvage_listing)."""
    status, body = answer.status, answer.body
    if status == 204:
        return Page([], status, answer.headers.get("Warning"))
    if status in RETRIABLE_STATUS:
        shown = redact(url)
        error = RetriableQidoError(f"HTTP {status} from {shown}", url=shown, status=status)
        error.retry_after = server_wait(answer.headers)
        raise error
    if status >= 400:
        shown = redact(url)
        hint = {401: " (authentication required or refused)", 403: " (forbidden)", 404: " (not found)", 413: " (query matches too much)"}
        cause = _refusal_cause(answer) if status in (401, 403) else None
        raise FatalQidoError(f"HTTP {status}{f' (AWS {cause})' if cause else hint.get(status, '')} from {shown}", url=shown, status=status)
    if not body.strip():
        return Page([], status, answer.headers.get("Warning"))
    try:
        items = orjson.loads(body) if keep is None else leanjson.datasets(body, keep)
    except orjson.JSONDecodeError as exc:
        items = dicomjson.salvage_listing(body) if listing and keep is None else None
        if items is None:
            shown = redact(url)
            raise FatalQidoError(f"{dicomjson.json_problem(body, exc)} in the answer from {shown} ({len(body)} bytes)", url=shown, status=status) from None
    except leanjson.NotDatasets:
        items = None
    if type(items) is not list or not all(type(item) is dict for item in items):
        shown = redact(url)
        raise FatalQidoError(f"answer from {shown} is not a JSON array of objects", url=shown, status=status)
    return Page(items, status, answer.headers.get("Warning"))


def _refusal_cause(answer: Answer) -> str | None:
    """The cause AWS gives for a refusal (AWS HealthImaging: a wrong secret or region, a clock
    that is off), by its error code only (``auth.aws.refusal_cause``)."""
    from .auth.aws import refusal_cause

    return refusal_cause(answer.headers, answer.body)


def client_from(settings: Any) -> QidoClient:
    """A client from a ``config.Connection`` (a SyncConfig, an AuditConfig), whose ``retry``
    carries the attempts its ``retries`` give, and ``workers`` (the pool's size) when it has them."""
    credentials = credentials_kinds.for_source(settings)
    if credentials is not None:
        credentials.headers("GET", settings.url)   # a token fetched now: refused credentials stop the run before it starts
    return QidoClient(
        settings.url,
        timeout=settings.timeout,
        retry=settings.retry,
        pool_size=getattr(settings, "workers", 1) + 1,
        verify=settings.verify,
        headers=settings.headers,
        max_rps=settings.max_rps,
        max_body=_max_body(getattr(settings, "max_response_mb", None)),
        credentials=credentials,
    )


def _max_body(megabytes: int | None) -> int | None:
    return None if megabytes is None else megabytes << 20

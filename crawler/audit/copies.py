"""Reading the copies the audit compares with the PACS: the state database and a FHIR server.

Both are only read. The state is opened read-only (SQLite ``mode=ro``; a sync may be running
at the same time, WAL lets it). The FHIR server is asked with plain GETs and the same
credentials the FHIR sink uses: a search ``[base]/ImagingStudy?_count=N&_elements=...``
followed along its ``next`` links, keeping the resources whose id is the one this source
would give their Study Instance UID (``crawler.mapping.ids.study_id``). A server that cannot
search ImagingStudy (400/404/405/501) is read study by study (``GET ImagingStudy/{id}``) instead,
and then extra resources cannot be found. Every GET goes through the crawler's transport
(``crawler.http``): its retries, a total deadline, a size cap, redirects within the origin only.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson
import requests

from ..auth import Credentials, SessionAuth, Static, used
from ..auth.plain import basic_header
from ..errors import SinkError
from ..http import (
    MAX_REDIRECTS,
    RETRIABLE_STATUS,
    WATCHDOG,
    Answer,
    BodyTooLarge,
    DeadlineAdapter,
    DeadlineExceeded,
    RedirectRefused,
    Retriable,
    Retrier,
    RetryPolicy,
    UnsupportedEncoding,
    check_base_url,
    follow_redirect,
    read_answer,
    redact,
    redirect_location,
    retriable_error,
    server_wait,
    total_deadline,
)
from ..mapping.ids import study_id
from ..mapping.r5 import DICOM_UID
from ..state import State
from .findings import CopyRow

log = logging.getLogger("crawler")

SEARCH_COUNT = 200
ELEMENTS = "identifier,numberOfSeries,numberOfInstances,started"
NO_SEARCH = frozenset({400, 404, 405, 501})
MAX_ANSWER = 64 << 20
"""Bytes of an answer at most (on the wire and decoded): a search page of SEARCH_COUNT
ImagingStudy resources reduced to ELEMENTS is tens of kilobytes."""


def read_state(path: Path | str, source: str) -> tuple[dict[str, CopyRow], tuple[int | None, int]]:
    """(rows by Study UID, (the result cap the sync learned, the listing size verified uncapped)),
    read through a read-only ``State`` (SQLite or PostgreSQL)."""
    state = State.open(path, read_only=True)
    try:
        rows = {row.study_uid: CopyRow(row.n_series, row.n_instances, row.study_hash, row.status, row.study_date)
                for row in state.iter_study_rows(source)}
        return rows, state.source_facts(source)
    finally:
        state.close()


def included_tags(path: Path | str, source: str) -> tuple[str, ...]:
    """The ``--include-tag`` signature the sync of ``source`` hashed its studies with."""
    state = State.open(path, read_only=True)
    try:
        return state.included_tags(source)
    finally:
        state.close()


def _uid_of(resource: dict[str, Any]) -> str | None:
    for identifier in resource.get("identifier") or []:
        if isinstance(identifier, dict) and identifier.get("system") == DICOM_UID:
            value = identifier.get("value")
            if isinstance(value, str) and value.startswith("urn:oid:"):
                return value[len("urn:oid:"):]
    return None


def _day(started: object) -> str | None:
    if isinstance(started, str) and len(started) >= 10 and started[4] == "-" and started[7] == "-":
        return started[:4] + started[5:7] + started[8:10]
    return None


def _count(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _origin(url: str) -> str:
    """scheme://host:port of a URL, with any character that has no place there replaced (the
    URL came from a remote server)."""
    parts = urlsplit(url)
    host = re.sub(r"[^A-Za-z0-9.:\-\[\]]", "?", parts.netloc.rpartition("@")[2])[:100]
    return f"{re.sub(r'[^a-z+]', '?', parts.scheme.lower())[:10]}://{host}"


class FhirReader:
    """Reads ImagingStudy resources of one source from a FHIR server (plain GETs)."""

    def __init__(
        self,
        base_url: str,
        *,
        auth: tuple[str, str] | None = None,
        token: str | None = None,
        verify: bool | str = True,
        timeout: tuple[float, float] = (10.0, 120.0),
        retries: int = 4,
        retry: RetryPolicy | None = None,
        sleep: Callable[[float], None] = time.sleep,
        session: requests.Session | None = None,
        max_answer: int = MAX_ANSWER,
        credentials: Credentials | None = None,
    ) -> None:
        self.base_url = check_base_url(base_url)
        self.session = session or requests.Session()
        adapter = DeadlineAdapter(pool_connections=1, pool_maxsize=2, max_retries=0)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        self.session.verify = verify
        if credentials is None and token:
            credentials = Static({"Authorization": f"Bearer {token}"})
        elif credentials is None and auth:
            credentials = Static({"Authorization": basic_header(*auth)})
        self.credentials = credentials
        if credentials is not None:
            self.session.auth = SessionAuth(credentials)
        self.session.headers["Accept"] = "application/fhir+json"
        self.timeout = timeout
        self.deadline = total_deadline(timeout)
        """Seconds a request may take in all (connect, redirects, the whole answer)."""
        self.max_answer = max_answer
        self.retries = retries
        self._retrier = Retrier(replace(retry or RetryPolicy(), attempts=retries + 1), sleep=sleep)
        """The waits of ``retry`` (the connection's policy), ``retries`` + 1 attempts."""
        self.requests = 0
        self.searched = False
        self.problems: list[str] = []
        """What kept the search from being read to its end (the audit reports it as incomplete)."""

    def close(self) -> None:
        self.session.close()

    def _get(self, url: str, allowed: Iterable[int] = ()) -> Answer:
        """GET with the transport's retries (connection errors, timeouts, 408/429/5xx); raises SinkError."""
        try:
            answer = self._retrier(self._get_once, url)
        except Retriable as exc:
            if exc.status is None:
                raise SinkError(f"cannot reach FHIR server {redact(self.base_url)}: {exc.reason}") from None
            raise SinkError(f"FHIR server answered HTTP {exc.status} for GET {redact(url)}") from None
        if answer.status in (401, 403):
            raise SinkError(f"FHIR server {redact(self.base_url)} refused the credentials (HTTP {answer.status})")
        if answer.status == 200 or answer.status in allowed:
            return answer
        raise SinkError(f"FHIR server answered HTTP {answer.status} for GET {redact(url)}")

    def _get_once(self, url: str) -> Answer:
        """One GET and its whole answer, within the total deadline (``WATCHDOG`` cuts a server
        sending its headers a byte at a time) and up to ``max_answer`` bytes on the wire and
        decoded; redirects followed within the origin only (``http.follow_redirect``: another
        host would get the credentials, and its answers would pass for this server's)."""
        self.requests += 1
        deadline = time.monotonic() + self.deadline
        target = url
        with WATCHDOG.deadline(deadline) as watched:
            try:
                for attempt in range(2):   # a 401: the credentials refreshed (a new token), then once more
                    for _ in range(MAX_REDIRECTS + 1):
                        response = self.session.get(target, timeout=self.timeout, stream=True, allow_redirects=False)
                        location = redirect_location(response.status_code, response.headers)
                        if location is None:
                            break
                        response.close()
                        target = follow_redirect(target, location)
                    else:
                        raise SinkError(f"FHIR server {redact(self.base_url)} redirected GET more than {MAX_REDIRECTS} times")
                    if attempt or response.status_code != 401 or self.credentials is None:
                        break
                    sent = response.request.headers.get("Authorization") if response.request is not None else None
                    if not self.credentials.refresh(used(sent.decode("latin-1") if isinstance(sent, bytes) else sent)):
                        break
                    response.close()
                    target = url
                body = read_answer(response.raw, self.max_answer, deadline, self.timeout[1])
            except RedirectRefused as exc:
                raise SinkError(f"FHIR server {redact(self.base_url)}: {exc}") from None
            except (BodyTooLarge, UnsupportedEncoding) as exc:
                raise SinkError(f"FHIR server {redact(self.base_url)}: the answer to GET {redact(url)} was refused: {exc}") from None
            except requests.RequestException as exc:
                if watched.fired or isinstance(exc, DeadlineExceeded):
                    raise Retriable(f"no complete answer within {self.deadline:g} s") from None
                if not retriable_error(exc):
                    raise SinkError(f"cannot reach FHIR server {redact(self.base_url)}: {type(exc).__name__}") from None
                raise Retriable(type(exc).__name__, connect=True) from None
        if watched.fired:
            raise Retriable(f"no complete answer within {self.deadline:g} s")
        if response.status_code in RETRIABLE_STATUS:
            raise Retriable(f"HTTP {response.status_code}", status=response.status_code, retry_after=server_wait(response.headers))
        return Answer(response.status_code, response.headers, body, None)

    def _same_origin(self, url: str) -> bool:
        a, b = urlsplit(url), urlsplit(self.base_url)
        return (a.scheme, a.netloc) == (b.scheme, b.netloc)

    def rows(self, source: str, uids: Iterable[str]) -> dict[str, CopyRow]:
        """ImagingStudy rows by Study UID: by search when the server can, else by id for ``uids``
        (``searched`` then stays False: extras cannot be known)."""
        uids = list(uids)
        url = f"{self.base_url}/ImagingStudy?_count={SEARCH_COUNT}&_elements={ELEMENTS}"
        first = self._get(url, allowed=NO_SEARCH)
        if first.status != 200:
            log.warning("the FHIR server cannot search ImagingStudy (HTTP %d): reading study by study; extra resources are not looked for", first.status)
            return self._by_id(source, uids)
        out: dict[str, CopyRow] = {}
        seen_urls = {url}
        response = first
        for _ in range(1_000_000):
            try:
                bundle = orjson.loads(response.body)
            except orjson.JSONDecodeError:
                raise SinkError(f"FHIR server {redact(self.base_url)} answered a search with malformed JSON") from None
            if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
                raise SinkError(f"FHIR server {redact(self.base_url)} answered a search without a Bundle")
            for entry in bundle.get("entry") or []:
                resource = entry.get("resource") if isinstance(entry, dict) else None
                if not isinstance(resource, dict) or resource.get("resourceType") != "ImagingStudy":
                    continue
                uid = _uid_of(resource)
                if uid is None or resource.get("id") != study_id(source, uid):
                    continue   # not from this source (or not ours at all)
                out[uid] = CopyRow(_count(resource.get("numberOfSeries")), _count(resource.get("numberOfInstances")),
                                   study_date=_day(resource.get("started")))
            following = next((link.get("url") for link in bundle.get("link") or []
                              if isinstance(link, dict) and link.get("relation") == "next"), None)
            if not following:
                self.searched = True
                return out
            refused = None
            if not self._same_origin(following):
                refused = f"pages its ImagingStudy search to another origin ({_origin(following)}, not {_origin(self.base_url)}): not followed"
            elif following in seen_urls:
                refused = "returned the same ImagingStudy search page twice"
            if refused is not None:
                problem = f"FHIR server {redact(self.base_url)} {refused}; the studies it did not show were read by id, extra resources not looked for"
                log.warning("%s", problem)
                self.problems.append(problem)
                out.update(self._by_id(source, [uid for uid in uids if uid not in out]))
                return out
            seen_urls.add(following)
            response = self._get(following)
        raise SinkError(f"FHIR server {redact(self.base_url)}: search has too many pages")

    def _by_id(self, source: str, uids: Iterable[str]) -> dict[str, CopyRow]:
        out: dict[str, CopyRow] = {}
        for uid in uids:
            response = self._get(f"{self.base_url}/ImagingStudy/{study_id(source, uid)}", allowed=(404, 410))
            if response.status != 200:
                continue
            try:
                resource = orjson.loads(response.body)
            except orjson.JSONDecodeError:
                raise SinkError(f"FHIR server {redact(self.base_url)} answered malformed JSON for an ImagingStudy") from None
            if isinstance(resource, dict):
                out[uid] = CopyRow(_count(resource.get("numberOfSeries")), _count(resource.get("numberOfInstances")),
                                   study_date=_day(resource.get("started")))
        return out

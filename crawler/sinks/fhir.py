"""A FHIR server as a sink: transaction Bundles of ``PUT`` (update as create) and ``DELETE`` entries.

    sink = FhirServer("https://fhir.example.org/fhir", fhir_version="R5", token=...)
    sink.check()                      # GET [base]/metadata: reachable, authorised, right FHIR version
    sink.add(study_uid, resources)    # queued; every ``batch_size`` studies one transaction is sent
    sink.delete(study_uid, "ImagingStudy", resource_id)
    refused = sink.flush()            # {study_uid: "HTTP 422 Unprocessable Entity: ..."}
    sink.finish()                     # "FHIR server https://fhir.example.org/fhir"

What the FHIR RESTful API (R4 and R5 ``http.html``) says and this module relies on:

* A transaction is ``POST [base]`` with a Bundle of type ``transaction``; the server accepts all
  entries (``200`` and a ``transaction-response`` Bundle, one entry per request entry, in the
  same order, each with ``response.status``) or rejects all (a ``4xx``/``5xx`` and an
  OperationOutcome). DELETEs are processed before PUTs, and a resource may appear only once per
  transaction (by identity), so a bundle never holds two entries for one ``type/id``: shared
  resources are sent once, and a DELETE and a PUT of the same resource go in different bundles.
* ``PUT [base]/[type]/[id]`` creates the resource with that id when it is new (``201``,
  "update as create", advertised as ``CapabilityStatement.rest.resource.updateCreate``) and
  updates it otherwise (``200``). Ids here are deterministic, so re-sending is idempotent: a
  transaction can be retried after a timeout without duplicating anything.
* ``DELETE`` of a resource the server does not have "should" answer ``200``/``204``; some servers
  answer ``404`` or ``410``, which count as success here too.
* ``GET [base]/metadata`` returns the CapabilityStatement; ``fhirVersion`` is ``5.0.x`` for R5,
  ``4.0.x`` for R4 and ``4.3.x`` for R4B (which an R4 sink accepts: the resources written here
  are the same in both).

When a bundle is refused (a ``4xx``, a ``5xx`` or ``429`` that outlasts the retries, or a
``200`` whose entries carry error statuses) its studies are sent again one transaction per
study, so one bad resource does not hold back the others; the studies still refused are named,
with a one-line reason (HTTP status and the OperationOutcome's first issue text, never the
resource body), by ``flush``. The sink is used from one thread.
"""

from __future__ import annotations

import http
import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

import orjson
import requests
import tenacity

from ..errors import ConfigError, SinkError
from ..qido import RETRIABLE_STATUS, RetryPolicy, check_base_url, redact, retry_after_seconds, retry_wait
from .base import Resource

log = logging.getLogger("crawler")

FHIR_JSON = "application/fhir+json"
ACCEPTED_VERSIONS = {"R5": ("5.0.",), "R4": ("4.0.", "4.3.")}
RELEASES = {"6.0.": "R6", "5.0.": "R5", "4.3.": "R4B", "4.0.": "R4", "3.0.": "STU3", "1.0.": "DSTU2"}
OWN_TYPE = "ImagingStudy"
"""The study's own resource; every other type a study brings (Endpoint, Patient) is shared."""
WRITTEN_TYPES = ("ImagingStudy", "Patient", "Endpoint")
GONE = frozenset({404, 410})
REASON_CHARS = 200
GIVE_UP_AFTER = 3
"""Studies in a row whose one-study transactions exhaust the retries before the rest are refused unsent."""
MAX_ENTRIES = 500
"""Entries per transaction at most (Azure Health Data Services' FHIR service refuses more than 500)."""
MAX_BYTES = 16 * 2**20
"""Resource bytes per transaction at most: the ImagingStudy of a 5,000-image study is megabytes."""
_TYPE = re.compile(r"[A-Z][A-Za-z]{1,63}")
_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")


class _Retriable(Exception):
    """A request that failed in a way asking again may fix (connection, timeout, 408/429/5xx)."""

    def __init__(self, reason: str, *, status: int | None = None, connect: bool = False, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status
        self.connect = connect
        self.retry_after = retry_after


class _Exhausted(Exception):
    """The server answered, but kept failing (5xx, 429, timeouts) until the retries ran out."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class _Unit:
    """One study's work: its resources to PUT, or one resource to DELETE."""

    key: str
    puts: tuple[Resource, ...] = ()
    delete: tuple[str, str] | None = None

    def identities(self) -> list[tuple[tuple[str, str], str]]:
        if self.delete is not None:
            return [(self.delete, "DELETE")]
        return [((t, i), "PUT") for t, i, _ in self.puts]


@dataclass(frozen=True)
class _Bundle:
    body: bytes
    methods: list[str]
    """The method of each entry, in the order they were written (for reading the response)."""
    n_puts: int
    n_deletes: int


class FhirServer:
    """A FHIR server (R5 or R4) that receives the crawl's resources as transaction Bundles.

    ``check()`` is a separate call (the constructor does no I/O): the sync calls it first, so a
    wrong URL, refused credentials or a version mismatch stop the run before any crawling. If it
    was not called, the first bundle sent calls it.

    Figures: ``requests`` (HTTP requests made, retries included), ``bundles`` (transaction
    Bundles sent, each counted once however often it was retried), ``resources_sent`` (PUT
    entries in transactions the server accepted), ``deleted`` (DELETE entries accepted),
    ``retries``, ``refused`` (studies refused), ``errors`` (OperationOutcomes passed to
    ``error``, which are not sent to the server).
    """

    def __init__(
        self,
        base_url: str,
        *,
        fhir_version: str = "R5",
        batch_size: int = 100,
        token: str | None = None,
        auth: tuple[str, str] | None = None,
        timeout: tuple[float, float] = (10.0, 120.0),
        retry: RetryPolicy = RetryPolicy(),
        verify: bool | str = True,
        sleep: Callable[[float], None] = time.sleep,
        session: requests.Session | None = None,
        max_entries: int = MAX_ENTRIES,
        max_bytes: int = MAX_BYTES,
    ) -> None:
        parts = urlsplit(base_url)
        if parts.query or parts.fragment:
            raise ConfigError(f"the FHIR base URL takes no query or fragment: {redact(base_url)!r}")
        url = check_base_url(base_url)
        if parts.username is not None or parts.password is not None:
            if auth is None and token is None:
                auth = (unquote(parts.username or ""), unquote(parts.password or ""))
            url = redact(url)
        self.base_url = url
        version = str(fhir_version).upper()
        if version not in ACCEPTED_VERSIONS:
            raise ConfigError(f"--fhir-version must be R5 or R4, not {fhir_version!r}")
        self.fhir_version = version
        if batch_size < 1:
            raise ConfigError(f"the FHIR batch size must be at least 1, not {batch_size}")
        if max_entries < 1 or max_bytes < 1:
            raise ConfigError(f"the FHIR bundle limits must be at least 1, not {max_entries} entries, {max_bytes} bytes")
        self.batch_size = batch_size
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.timeout = timeout
        self.retry = retry
        self._sleep = sleep
        self._own_session = session is None
        self.session = session or requests.Session()
        adapter = requests.adapters.HTTPAdapter(pool_connections=1, pool_maxsize=2, max_retries=0)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        self.session.verify = verify
        if token:   # a bearer token wins over user and password (both would set Authorization)
            self.session.headers["Authorization"] = f"Bearer {token}"
        elif auth:
            self.session.auth = auth
        self.session.headers["Accept"] = FHIR_JSON
        # figures
        self.requests = 0
        self.bundles = 0
        self.resources_sent = 0
        self.deleted = 0
        self.retries = 0
        self.refused = 0
        self.errors = 0
        # state
        self.server_version: str | None = None
        self._queue: list[_Unit] = []
        self._refused: dict[str, str] = {}
        self._closed = False

    # --- the Sink protocol ----------------------------------------------------------------

    def add(self, key: str, resources: Sequence[Resource]) -> None:
        self._open()
        for resource_type, resource_id, _ in resources:
            if not (_TYPE.fullmatch(resource_type) and _ID.fullmatch(resource_id)):
                self._refuse(key, f"not a valid FHIR type/id: {resource_type[:64]!r}/{resource_id[:64]!r}")
                return
        self._queue.append(_Unit(key, tuple(resources)))
        if len(self._queue) >= self.batch_size:
            self._send_queue()

    def delete(self, key: str, resource_type: str, resource_id: str) -> None:
        self._open()
        if not (_TYPE.fullmatch(resource_type) and _ID.fullmatch(resource_id)):
            self._refuse(key, f"not a valid FHIR type/id: {resource_type[:64]!r}/{resource_id[:64]!r}")
            return
        self._queue.append(_Unit(key, delete=(resource_type, resource_id)))
        if len(self._queue) >= self.batch_size:
            self._send_queue()

    def error(self, body: bytes) -> None:
        """Nothing to send: a failed study's OperationOutcome is the NDJSON sink's business."""
        self.errors += 1

    def flush(self) -> dict[str, str]:
        self._open()
        self._send_queue()
        refused, self._refused = self._refused, {}
        return refused

    def finish(self) -> str | None:
        if self._queue or self._refused:
            raise RuntimeError("FhirServer.finish() before flush(): queued studies or refusals were never reported")
        self.close()
        return f"FHIR server {self.base_url}"

    def abort(self) -> None:
        self._queue.clear()
        self._refused.clear()
        self.close()

    def close(self) -> None:
        if not self._closed and self._own_session:
            self.session.close()
        self._closed = True

    def figures(self) -> dict[str, int]:
        return {
            "requests": self.requests,
            "bundles": self.bundles,
            "resources_sent": self.resources_sent,
            "deleted": self.deleted,
            "retries": self.retries,
            "refused": self.refused,
            "errors": self.errors,
        }

    # --- capabilities ---------------------------------------------------------------------

    def check(self) -> str:
        """Read ``[base]/metadata`` and check the server's FHIR version; returns it (e.g. ``5.0.0``).

        SinkError when the server cannot be reached or refuses the credentials; ConfigError
        when it answers but is not a FHIR server of the version this sink writes.
        """
        self._open()
        url = f"{self.base_url}/metadata"
        try:
            response = self._send("GET", url)
        except _Retriable as exc:
            if exc.status is None:
                raise SinkError(f"cannot reach FHIR server {self.base_url}: {exc.reason}") from None
            raise SinkError(f"FHIR server {self.base_url} keeps failing: {exc.reason} for GET /metadata") from None
        if response.status_code != 200:
            raise ConfigError(
                f"{url} answered {_status_line(response.status_code)}: is {self.base_url} a FHIR server's base URL?"
            )
        try:
            statement = orjson.loads(response.content)
        except orjson.JSONDecodeError:
            raise ConfigError(f"{url} did not answer JSON: is {self.base_url} a FHIR server's base URL?") from None
        if not isinstance(statement, dict) or statement.get("resourceType") != "CapabilityStatement":
            raise ConfigError(f"{url} did not answer a CapabilityStatement: is {self.base_url} a FHIR server's base URL?")
        found = statement.get("fhirVersion")
        if not isinstance(found, str) or not found:
            raise ConfigError(f"the CapabilityStatement of {self.base_url} names no fhirVersion")
        if not found.startswith(ACCEPTED_VERSIONS[self.fhir_version]):
            release = next((name for prefix, name in RELEASES.items() if found.startswith(prefix)), "unknown release")
            wanted = " or ".join(f"{p}x" for p in ACCEPTED_VERSIONS[self.fhir_version])
            hint = f"; use --fhir-version {'R4' if release == 'R4B' else release}" if release in ("R4", "R4B", "R5") else ""
            raise ConfigError(
                f"FHIR version mismatch: {self.base_url} is FHIR {found} ({release}), "
                f"but --fhir-version {self.fhir_version} writes FHIR {wanted}{hint}"
            )
        self.server_version = found
        _warn_about_capabilities(statement, self.base_url)
        return found

    # --- sending --------------------------------------------------------------------------

    def _open(self) -> None:
        if self._closed:
            raise RuntimeError("FhirServer is closed (finish() or abort() was called)")

    def _refuse(self, key: str, reason: str) -> None:
        if key not in self._refused:
            self.refused += 1
            self._refused[key] = reason
        log.warning("FHIR server refused study %s: %s", key, reason)

    def _send_queue(self) -> None:
        if not self._queue:
            return
        if self.server_version is None:
            self.check()
        queue, self._queue = self._queue, []
        for chunk in self._chunks(queue):
            self._send_units(chunk)

    def _chunks(self, units: list[_Unit]) -> list[list[_Unit]]:
        """Cut the queue into bundles: at most ``max_entries`` entries and (about) ``max_bytes``,
        and never a PUT and a DELETE of the same resource in one (a transaction in which
        identities overlap fails). A study larger than the limits goes alone."""
        chunks: list[list[_Unit]] = []
        chunk: list[_Unit] = []
        methods: dict[tuple[str, str], str] = {}
        size = 0
        for unit in units:
            identities = unit.identities()
            clash = any(methods.get(identity, method) != method for identity, method in identities)
            new = {identity for identity, _ in identities if identity not in methods}
            weight = sum(len(body) for _, _, body in unit.puts)
            if chunk and (clash or len(methods) + len(new) > self.max_entries or size + weight > self.max_bytes):
                chunks.append(chunk)
                chunk, methods, size = [], {}, 0
            chunk.append(unit)
            methods.update(identities)
            size += weight
        if chunk:
            chunks.append(chunk)
        return chunks

    def _build(self, units: Sequence[_Unit]) -> _Bundle:
        """The transaction Bundle's bytes: shared resources first (each once, the latest
        version queued), then the studies' own, then the deletions. The resources' bytes are
        spliced in as they are, never parsed again."""
        shared: dict[tuple[str, str], bytes] = {}
        own: dict[tuple[str, str], bytes] = {}
        deletes: dict[tuple[str, str], None] = {}
        for unit in units:
            if unit.delete is not None:
                deletes[unit.delete] = None
            for resource_type, resource_id, body in unit.puts:
                (own if resource_type == OWN_TYPE else shared)[(resource_type, resource_id)] = body
        parts: list[bytes] = [b'{"resourceType":"Bundle","type":"transaction","entry":[']
        methods: list[str] = []
        for (resource_type, resource_id), body in (*shared.items(), *own.items()):
            path = f"{resource_type}/{resource_id}"
            parts += (
                b"," if methods else b"",
                b'{"fullUrl":', orjson.dumps(f"{self.base_url}/{path}"),
                b',"resource":', body.strip(),
                b',"request":{"method":"PUT","url":', orjson.dumps(path), b"}}",
            )
            methods.append("PUT")
        for resource_type, resource_id in deletes:
            path = f"{resource_type}/{resource_id}"
            parts += (b"," if methods else b"", b'{"request":{"method":"DELETE","url":', orjson.dumps(path), b"}}")
            methods.append("DELETE")
        parts.append(b"]}")
        return _Bundle(b"".join(parts), methods, len(shared) + len(own), len(deletes))  # each body copied once

    def _send_units(self, units: list[_Unit]) -> None:
        """One transaction for ``units``; if refused, one transaction per study."""
        try:
            reason = self._transact(units)
        except _Exhausted as exc:
            reason = exc.reason
        if reason is None:
            return
        if len(units) == 1:
            self._refuse(units[0].key, reason)
            return
        log.warning("FHIR transaction of %d studies refused (%s); sending them one by one", len(units), reason)
        failing = 0
        for n, unit in enumerate(units):
            try:
                single = self._transact([unit])
                failing = 0
            except _Exhausted as exc:
                # One study's transaction may fail with a 500 every time (a server bug that one
                # resource triggers); several in a row mean the server itself is failing: then
                # the rest are refused without hammering it study by study.
                failing += 1
                if failing < GIVE_UP_AFTER:
                    self._refuse(unit.key, exc.reason)
                    continue
                for rest in units[n:]:
                    self._refuse(rest.key, exc.reason)
                return
            if single is not None:
                self._refuse(unit.key, single)

    def _transact(self, units: Sequence[_Unit]) -> str | None:
        """Send ``units`` as one transaction: None when accepted, else a one-line reason.

        Raises _Exhausted when the server kept failing through the retries and SinkError when
        it cannot be reached or refuses the credentials."""
        bundle = self._build(units)
        self.bundles += 1
        try:
            response = self._send("POST", self.base_url, bundle.body)
        except _Retriable as exc:
            if exc.connect:
                raise SinkError(f"cannot reach FHIR server {self.base_url}: {exc.reason}") from None
            raise _Exhausted(exc.reason) from None
        status = response.status_code
        if 200 <= status < 300:
            reason = _entry_failure(response, bundle.methods)
            if reason is None:
                self.resources_sent += bundle.n_puts
                self.deleted += bundle.n_deletes
            return reason
        if status in GONE and bundle.methods == ["DELETE"]:
            self.deleted += 1    # a lone DELETE of a resource the server does not have
            return None
        return _outcome_line(status, response.content)

    # --- HTTP -----------------------------------------------------------------------------

    def _wait(self, state: tenacity.RetryCallState) -> float:
        return retry_wait(self.retry, state)

    def _retried(self, _: tenacity.RetryCallState) -> None:
        self.retries += 1

    def _send(self, method: str, url: str, body: bytes | None = None) -> requests.Response:
        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception_type(_Retriable),
            stop=tenacity.stop_after_attempt(self.retry.attempts) | tenacity.stop_after_delay(self.retry.max_seconds),
            wait=self._wait,
            sleep=self._sleep,
            before_sleep=self._retried,
            reraise=True,
        )
        return retrying(self._send_once, method, url, body)

    def _send_once(self, method: str, url: str, body: bytes | None) -> requests.Response:
        headers = {"Content-Type": FHIR_JSON, "Prefer": "return=minimal"} if body is not None else None
        self.requests += 1
        try:
            response = self.session.request(method, url, data=body, headers=headers, timeout=self.timeout)
            response.content  # noqa: B018 - read the body inside the try: a reset may come here
        except requests.exceptions.SSLError as exc:
            raise SinkError(f"TLS error talking to FHIR server {self.base_url}: {_reason(exc)}") from None
        except requests.exceptions.ConnectTimeout:
            raise _Retriable("connection timed out", connect=True) from None
        except requests.exceptions.ConnectionError as exc:
            raise _Retriable(_reason(exc), connect=True) from None
        except requests.exceptions.Timeout:
            raise _Retriable(f"no answer within {self.timeout[1]:g} s") from None
        except requests.exceptions.RequestException as exc:
            raise _Retriable(f"request failed: {_reason(exc)}") from None
        status = response.status_code
        if status in (401, 403):
            raise SinkError(
                f"FHIR server {self.base_url} refused authentication ({_status_line(status)}): check the FHIR server credentials"
            )
        if status in RETRIABLE_STATUS:
            hinted = retry_after_seconds(response.headers.get("Retry-After"))
            if hinted is None:
                hinted = _milliseconds(response.headers.get("x-ms-retry-after-ms"))
            raise _Retriable(_outcome_line(status, response.content), status=status, retry_after=hinted)
        return response


# --- reading answers -----------------------------------------------------------------------


def _entry_failure(response: requests.Response, methods: list[str]) -> str | None:
    """The first error status among a transaction-response's entries, as a one-line reason.

    A conformant server never answers 200 with failed entries; one that does (it processed the
    transaction like a batch) gets its studies sent again one by one. A 2xx that is not a
    readable Bundle is taken at its word."""
    try:
        bundle = orjson.loads(response.content)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle" or not isinstance(bundle.get("entry"), list):
        return None
    for method, entry in zip(methods, bundle["entry"]):
        answer = entry.get("response") if isinstance(entry, dict) else None
        if not isinstance(answer, dict):
            continue
        status = _status_of(answer.get("status"))
        if status is None or 200 <= status < 400 or (method == "DELETE" and status in GONE):
            continue
        outcome = answer.get("outcome")
        text = _issue_text(outcome) if isinstance(outcome, dict) else None
        return _one_line(_status_line(status), text)
    return None


def _status_of(value: Any) -> int | None:
    if not isinstance(value, str):
        return None
    head = value.strip().split(" ", 1)[0]
    return int(head) if head.isdigit() else None


def _outcome_line(status: int, body: bytes) -> str:
    """``HTTP 422 Unprocessable Entity: <first issue's text>``; the body is read only as an
    OperationOutcome, so nothing else the server echoes (such as the resource) is shown."""
    text = None
    try:
        outcome = orjson.loads(body) if body else None
    except orjson.JSONDecodeError:
        outcome = None
    if isinstance(outcome, dict) and outcome.get("resourceType") == "OperationOutcome":
        text = _issue_text(outcome)
    return _one_line(_status_line(status), text)


def _issue_text(outcome: dict[str, Any]) -> str | None:
    issues = outcome.get("issue")
    if not isinstance(issues, list):
        return None
    for issue in issues:
        if not isinstance(issue, dict):
            continue
        details = issue.get("details") if isinstance(issue.get("details"), dict) else {}
        codings = details.get("coding") if isinstance(details.get("coding"), list) else []
        for text in (issue.get("diagnostics"), details.get("text"), *(c.get("display") for c in codings if isinstance(c, dict))):
            if isinstance(text, str) and text.strip():
                return text
        if isinstance(issue.get("code"), str):
            return issue["code"]
    return None


def _one_line(head: str, text: str | None) -> str:
    if not text:
        return head
    text = " ".join(text.split())
    if len(text) > REASON_CHARS:
        text = text[: REASON_CHARS - 1] + "…"
    return f"{head}: {text}"


def _status_line(status: int) -> str:
    try:
        return f"HTTP {status} {http.HTTPStatus(status).phrase}"
    except ValueError:
        return f"HTTP {status}"


def _milliseconds(value: str | None) -> float | None:
    """Azure (Cosmos DB backed) throttling answers carry ``x-ms-retry-after-ms``."""
    try:
        return max(0.0, float(value) / 1000.0) if value else None
    except ValueError:
        return None


def _reason(exc: Exception) -> str:
    """A short cause, never the exception text itself (it carries the URL)."""
    text = str(exc)
    for marker in ("Connection refused", "Name or service not known", "No route to host", "timed out", "Connection reset",
                   "Remote end closed connection", "certificate verify failed"):
        if marker in text:
            return marker.lower()
    return type(exc).__name__


def _warn_about_capabilities(statement: dict[str, Any], shown: str) -> None:
    """Warn (only) when the CapabilityStatement says the server lacks what this sink uses."""
    for rest in statement.get("rest") or []:
        if not isinstance(rest, dict) or rest.get("mode", "server") != "server":
            continue
        codes = {i.get("code") for i in rest.get("interaction") or [] if isinstance(i, dict)}
        if codes and "transaction" not in codes:
            log.warning("the CapabilityStatement of %s does not list the transaction interaction", shown)
        for resource in rest.get("resource") or []:
            if isinstance(resource, dict) and resource.get("type") in WRITTEN_TYPES and resource.get("updateCreate") is False:
                log.warning(
                    "the CapabilityStatement of %s says %s does not allow update as create (PUT of a new id)",
                    shown, resource.get("type"),
                )

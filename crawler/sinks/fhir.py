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

What real servers do besides, and this module handles:

* Some run a ``transaction`` as a ``batch`` (Medplum, unless a project feature is on): the
  answer is ``200`` and each entry has its own ``response.status``, some of them ``4xx``. So no
  2xx is taken at its word: every entry's status is read, a study counts as accepted only when
  the entries of all its resources are ``2xx`` (``404``/``410`` for a DELETE), and ``Prefer:
  return=OperationOutcome`` is asked for (never ``return=minimal``, to which Medplum answers a
  batch with an empty ``200``). When the answer has no status for an entry (an empty body, not a
  Bundle, fewer entries, an entry without ``response.status``), the entry's resources are read
  back (``GET [type]?_id=a,b,...``) and compared with what was sent (``meta`` and ``text``
  aside): a study with a resource that is missing or different is refused, never recorded.
* Size limits: Medplum refuses a transaction with more than 50 updates ("Transaction contains
  more update operations than allowed", ``packages/fhir-router/src/batch.ts``), others answer
  ``413`` or an OperationOutcome with code ``too-costly`` (or ``not-supported`` and a size
  text). Such a refusal halves the entries per Bundle for the rest of the run (Medplum's: down
  to its known 50 at once) and the Bundle's studies are sent again in the smaller Bundles;
  ``learned_max_entries`` tells the sync, which keeps it in the state for the next runs.
* ``updateCreate: false`` in the CapabilityStatement (PUT of a new id refused): the ids here
  are assigned by the client, so ``check()`` stops with a ConfigError.
* Redirects: only to the same scheme, host and port (a ``307`` to another host would send the
  whole Bundle, with patient names, there); another origin is a SinkError naming both.
  Every request has a total deadline and a cap on the answer's size (every encoding).

When a bundle is refused whole (a ``4xx``, a ``5xx`` or ``429`` that outlasts the retries) its
studies are sent again one transaction per study, so one bad resource does not hold back the
others; the studies still refused are named by ``flush`` with a one-line reason: the HTTP status
and each issue's ``severity``, ``code`` and element paths (``expression``/``location``), never
the server's free text (``diagnostics``, ``details.text`` often echo names and values) unless
``server_text=True`` (``--log-server-text``), and never the resource body. The sink is used from
one thread.
"""

from __future__ import annotations

import http
import logging
import re
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote, urljoin, urlsplit

import orjson
import requests

from ..auth import Credentials, SessionAuth, Static, used
from ..auth.plain import basic_header
from ..errors import ConfigError, SinkError
from ..http import (
    RETRIABLE_STATUS,
    WATCHDOG,
    BodyTooLarge,
    DeadlineAdapter,
    DeadlineExceeded,
    Retriable,
    Retrier,
    RetryPolicy,
    UnsupportedEncoding,
    check_base_url,
    read_answer,
    redact,
    same_origin,
    server_wait,
)
from .base import Resource

log = logging.getLogger("crawler")

FHIR_JSON = "application/fhir+json"
ACCEPTED_VERSIONS = {"R5": ("5.0.",), "R4": ("4.0.", "4.3.")}
RELEASES = {"6.0.": "R6", "5.0.": "R5", "4.3.": "R4B", "4.0.": "R4", "3.0.": "STU3", "1.0.": "DSTU2"}
OWN_TYPE = "ImagingStudy"
"""The study's own resource; every other type a study brings (Endpoint, Patient) is shared."""
WRITTEN_TYPES = ("ImagingStudy", "Patient", "Endpoint")
GONE = frozenset({404, 410})
REDIRECTS = frozenset({301, 302, 303, 307, 308})
MAX_REDIRECTS = 5
REASON_CHARS = 200
MAX_ANSWER = 64 * 2**20
"""Bytes of an answer at most (after decoding): transaction-responses are small; a read-back of a
Bundle's resources is about the Bundle's size (``MAX_BYTES``)."""
READ_BACK_IDS = 50
"""Ids per ``_id`` search when reading back resources whose outcome the answer did not give."""
KNOWN_SIZE_LIMITS = {
    "Transaction contains more update operations than allowed": 50,
    "Transaction requires strict isolation but has too many entries": 8,
}
"""Refusal texts of known servers and the entries per transaction they allow (Medplum: its
``maxUpdates``, and ``maxSerializableTransactionEntries`` for transactions with conditional
writes, packages/fhir-router/src/batch.ts)."""
STUDY_SYSTEM = "urn:dicom:uid"
_REFERENCE = re.compile(r"(Endpoint|Patient|ImagingStudy)/([A-Za-z0-9\-.]{1,64})")
_LOCATION = re.compile(r"(?:^|/)([A-Z][A-Za-z]{1,63})/([A-Za-z0-9\-.]{1,64})(?:/_history/[^/]*)?/?$")
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_SIZE_TEXT = re.compile(r"too (many|large|big)|exceed|limit|maximum|more .{0,40} than allowed|size", re.IGNORECASE)
_PATH = re.compile(r"[A-Za-z][A-Za-z0-9_]*(\.[A-Za-z][A-Za-z0-9_]*|\[[0-9]{1,6}\])*")
"""An element path (``Bundle.entry[2].resource.subject``): what is kept of ``expression`` and
``location``. Anything else (FHIRPath with literals, which may hold values) is left out."""
GIVE_UP_AFTER = 3
"""Studies in a row whose one-study transactions exhaust the retries before the rest are refused unsent."""
MAX_ENTRIES = 500
"""Entries per transaction at most (Azure Health Data Services' FHIR service refuses more than 500)."""
MAX_BYTES = 16 * 2**20
"""Resource bytes per transaction at most: the ImagingStudy of a 5,000-image study is megabytes."""
_TYPE = re.compile(r"[A-Z][A-Za-z]{1,63}")
_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")


class _TooLarge(Exception):
    """The server refused a Bundle for its size (413, ``too-costly``, a known server's text)."""

    def __init__(self, reason: str, n_entries: int, known_limit: int | None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.n_entries = n_entries
        self.known_limit = known_limit


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


class _AnswerTooLarge(Exception):
    """An answer larger than the cap, or in an encoding this sink does not read."""


@dataclass(frozen=True)
class _Answer:
    status: int
    headers: Any
    content: bytes | None
    """None when the body could not be read whole (too large, unknown encoding)."""
    authorization: str | None = None
    """The Authorization header the request carried (to tell a stale token after a 401)."""


@dataclass(frozen=True)
class _Bundle:
    body: bytes
    methods: list[str]
    """The method of each entry, in the order they were written (for reading the response)."""
    identities: list[tuple[str, str]]
    """The (type, id) of each entry, in the same order."""
    bodies: list[bytes | None]
    """The resource sent in each entry (None for a DELETE)."""
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
        deadline: float | None = None,
        max_answer: int = MAX_ANSWER,
        server_text: bool = False,
        written_types: Sequence[str] = WRITTEN_TYPES,
        ids: str = "ours",
        credentials: Credentials | None = None,
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
            raise ConfigError(f"the FHIR version must be R5 or R4, not {fhir_version!r}", setting="fhir_version")
        self.fhir_version = version
        if batch_size < 1:
            raise ConfigError(f"the FHIR batch size must be at least 1, not {batch_size}")
        if max_entries < 1 or max_bytes < 1:
            raise ConfigError(f"the FHIR bundle limits must be at least 1, not {max_entries} entries, {max_bytes} bytes")
        self.batch_size = batch_size
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.timeout = timeout
        self.deadline = deadline if deadline is not None else float(sum(timeout))
        """Seconds a request may take in all (connect, wait, the whole answer)."""
        self.max_answer = max_answer
        self.server_text = server_text
        self.written_types = tuple(written_types)
        if ids not in ("ours", "server"):
            raise ConfigError(f"the FHIR ids must be ours or server, not {ids!r}", setting="fhir_ids")
        self.ids = ids
        self.server_id_lookup: Callable[[str, str], str | None] = lambda resource_type, resource_id: None
        """With ids="server": the server id of one of our resources that an earlier run learned."""
        self._server_ids: dict[tuple[str, str], str] = {}
        self._new_server_ids: dict[tuple[str, str], str] = {}
        self._conditions: dict[tuple[str, str], str] = {}
        self.learned_max_entries: int | None = None
        """Set when the server refused a Bundle for its size: the entries per Bundle it takes."""
        self.retry = retry
        self._retrier = Retrier(retry, sleep=sleep, on_retry=self._retried)
        self._own_session = session is None
        self.session = session or requests.Session()
        adapter = DeadlineAdapter(pool_connections=1, pool_maxsize=2, max_retries=0)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        self.session.verify = verify
        if credentials is None and token:   # a bearer token wins over user and password (both would set Authorization)
            credentials = Static({"Authorization": f"Bearer {token}"})
        elif credentials is None and auth:
            credentials = Static({"Authorization": basic_header(*auth)})
        self.credentials = credentials
        if credentials is not None:
            self.session.auth = SessionAuth(credentials)
        self.session.headers["Accept"] = FHIR_JSON
        # figures
        self.requests = 0
        self.bundles = 0
        self.resources_sent = 0
        self.deleted = 0
        self.retries = 0
        self.refused = 0
        self.errors = 0
        self.read_back = 0
        """Resources whose outcome the answer did not give, read back from the server."""
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
        if self.ids == "server":
            for resource_type, resource_id, body in resources:
                condition = _condition(orjson.loads(body))
                if condition is None:
                    self._refuse(key, f"its {resource_type} has no identifier with a system to find it by (--fhir-ids server)")
                    return
                self._conditions[(resource_type, resource_id)] = condition
        self._queue.append(_Unit(key, tuple(resources)))
        if len(self._queue) >= self.batch_size:
            self._send_queue()

    def delete(self, key: str, resource_type: str, resource_id: str) -> None:
        self._open()
        if not (_TYPE.fullmatch(resource_type) and _ID.fullmatch(resource_id)):
            self._refuse(key, f"not a valid FHIR type/id: {resource_type[:64]!r}/{resource_id[:64]!r}")
            return
        if self.ids == "server":
            # the study's own resource, found by its Study Instance UID (``key``)
            self._conditions[(resource_type, resource_id)] = _token("identifier", f"{STUDY_SYSTEM}|urn:oid:{key}")
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

    def take_server_ids(self) -> dict[tuple[str, str], str]:
        """With ids="server": the server ids learned since the last call, for the state to keep."""
        taken, self._new_server_ids = self._new_server_ids, {}
        return taken

    def unknown_to_server(self, resource_type: str, resource_id: str) -> bool:
        """With ids="server": whether no server id is known for one of our resources (it must be
        sent, even unchanged, before others can reference it)."""
        return self.ids == "server" and self._server_id(resource_type, resource_id) is None

    def _server_id(self, resource_type: str, resource_id: str) -> str | None:
        key = (resource_type, resource_id)
        if key not in self._server_ids:
            known = self.server_id_lookup(resource_type, resource_id)
            if known is None:
                return None
            self._server_ids[key] = known
        return self._server_ids[key]

    def _learn_server_id(self, identity: tuple[str, str], server_id: str) -> None:
        if self._server_id(*identity) != server_id:
            self._server_ids[identity] = server_id
            self._new_server_ids[identity] = server_id

    def figures(self) -> dict[str, int]:
        return {
            "requests": self.requests,
            "bundles": self.bundles,
            "resources_sent": self.resources_sent,
            "deleted": self.deleted,
            "retries": self.retries,
            "refused": self.refused,
            "errors": self.errors,
            "read_back": self.read_back,
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
        except Retriable as exc:
            if exc.status is None:
                raise SinkError(f"cannot reach FHIR server {self.base_url}: {exc.reason}") from None
            raise SinkError(f"FHIR server {self.base_url} keeps failing: {exc.reason} for GET /metadata") from None
        if response.status != 200:
            raise ConfigError(
                f"{url} answered {_status_line(response.status)}: is {self.base_url} a FHIR server's base URL?"
            )
        if response.content is None:
            raise SinkError(f"FHIR server {self.base_url}: the answer to GET /metadata is larger than {self.max_answer} bytes or unreadable")
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
        no_update_create = _check_capabilities(statement, self.base_url, self.written_types)
        if no_update_create and self.ids == "ours":
            raise ConfigError(
                f"FHIR server {self.base_url} does not allow update as create (PUT of a new id) for "
                f"{', '.join(no_update_create)} (CapabilityStatement updateCreate: false); qido-crawler assigns the "
                "resource ids itself and needs it: allow client-assigned ids on the server, or use --fhir-ids server"
            )
        self.server_version = found
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
        self._send_in_chunks(queue)

    def _send_in_chunks(self, units: list[_Unit]) -> None:
        """Bundles cut one at a time, so that a limit learned while sending one applies to the rest."""
        if self.ids == "server":
            units = [unit for unit in units if self._references_known(unit)]
        while units:
            chunk = self._chunks(units)[0]
            units = units[len(chunk):]
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

    def _references_known(self, unit: _Unit) -> bool:
        """With ids="server": whether every resource a study's resources reference is either sent
        with it or has a known server id; if not the study is refused (its reference would dangle)."""
        carried = {(t, i) for t, i, _ in unit.puts}
        for _, _, body in unit.puts:
            for target in sorted(_references(orjson.loads(body))):
                if target not in carried and self._server_id(*target) is None:
                    self._refuse(unit.key, f"the server id of its {target[0]} is not known (sent before without --fhir-ids server?)")
                    return False
        return True

    def _server_entry(self, resource_type: str, resource_id: str, body: bytes, in_bundle: set[tuple[str, str]]) -> bytes:
        """A resource as sent with server-assigned ids: no id, references to resources in the same
        Bundle by their ``urn:uuid`` fullUrl, to others by their server id."""
        resource = orjson.loads(body)
        resource.pop("id", None)

        def target(reference: str) -> str:
            found = _REFERENCE.fullmatch(reference)
            if found is None:
                return reference
            identity = (found[1], found[2])
            if identity in in_bundle:
                return _placeholder(found[2])
            known = self._server_id(*identity)
            return f"{found[1]}/{known}" if known else reference

        return orjson.dumps(_rewrite_references(resource, target))

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
        identities: list[tuple[str, str]] = []
        bodies: list[bytes | None] = []
        server = self.ids == "server"
        in_bundle = {*shared, *own}
        for (resource_type, resource_id), body in (*shared.items(), *own.items()):
            path = f"{resource_type}/{resource_id}"
            full_url = f"{self.base_url}/{path}"
            if server:
                body = self._server_entry(resource_type, resource_id, body, in_bundle)
                path, full_url = f"{resource_type}?{self._conditions[(resource_type, resource_id)]}", _placeholder(resource_id)
            parts += (
                b"," if methods else b"",
                b'{"fullUrl":', orjson.dumps(full_url),
                b',"resource":', body.strip(),
                b',"request":{"method":"PUT","url":', orjson.dumps(path), b"}}",
            )
            methods.append("PUT")
            identities.append((resource_type, resource_id))
            bodies.append(body)
        for resource_type, resource_id in deletes:
            path = f"{resource_type}/{resource_id}"
            if server:
                path = f"{resource_type}?{self._conditions[(resource_type, resource_id)]}"
            parts += (b"," if methods else b"", b'{"request":{"method":"DELETE","url":', orjson.dumps(path), b"}}")
            methods.append("DELETE")
            identities.append((resource_type, resource_id))
            bodies.append(None)
        parts.append(b"]}")
        # each body copied once
        return _Bundle(b"".join(parts), methods, identities, bodies, len(shared) + len(own), len(deletes))

    def _send_units(self, units: list[_Unit]) -> None:
        """One transaction for ``units``. Refused for its size: cut into smaller Bundles; refused
        whole for another reason: one transaction per study."""
        try:
            whole, refused = self._transact(units)
        except _Exhausted as exc:
            whole, refused = exc.reason, {}
        except _TooLarge as exc:
            self._shrink(exc.n_entries, exc.known_limit)
            if len(units) > 1:
                self._send_in_chunks(units)
                return
            whole, refused = exc.reason, {}
        for key, reason in refused.items():
            self._refuse(key, reason)
        if whole is None:
            return
        if len(units) == 1:
            self._refuse(units[0].key, whole)
            return
        log.warning("FHIR transaction of %d studies refused (%s); sending them one by one", len(units), whole)
        failing = 0
        for n, unit in enumerate(units):
            try:
                single, refused = self._transact([unit])
                failing = 0
            except _TooLarge as exc:
                single, refused = exc.reason, {}
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
            for key, reason in refused.items():
                self._refuse(key, reason)
            if single is not None:
                self._refuse(unit.key, single)

    def _shrink(self, n_entries: int, known_limit: int | None) -> None:
        """A Bundle of ``n_entries`` was refused for its size: half as many per Bundle from now on
        (a known server's limit at once when it is smaller)."""
        smaller = known_limit if known_limit is not None and known_limit < n_entries else max(1, n_entries // 2)
        if smaller < self.max_entries:
            self.max_entries = self.learned_max_entries = smaller
            log.warning(
                "FHIR server %s refused a Bundle of %d entries for its size; at most %d entries per Bundle from now on",
                self.base_url, n_entries, smaller,
            )

    def _transact(self, units: Sequence[_Unit]) -> tuple[str | None, dict[str, str]]:
        """Send ``units`` as one transaction: (None, {}) when every study is confirmed; (a
        one-line reason, {}) when the Bundle was refused whole; (None, {study: reason}) for the
        studies whose entries failed or could not be confirmed.

        Raises _TooLarge when the server refused the Bundle for its size, _Exhausted when it
        kept failing through the retries, and SinkError when it cannot be reached or refuses the
        credentials."""
        bundle = self._build(units)
        self.bundles += 1
        try:
            # equivalent mutant: "post" (requests sends the method upper-cased)
            answer = self._send("POST", self.base_url, bundle.body)
        except Retriable as exc:
            if exc.connect:
                raise SinkError(f"cannot reach FHIR server {self.base_url}: {exc.reason}") from None
            raise _Exhausted(exc.reason) from None
        status = answer.status
        if 200 <= status < 300:
            outcomes, locations = _entry_outcomes(answer.content, bundle, self.server_text)
            if self.ids == "server":
                for n, (outcome, location) in enumerate(zip(outcomes, locations)):
                    if outcome is None and bundle.methods[n] == "PUT":
                        if location is not None and location[0] == bundle.identities[n][0]:
                            self._learn_server_id(bundle.identities[n], location[1])
                        else:
                            outcomes[n] = _UNKNOWN    # accepted, but where? read back to learn its id
            unknown = [n for n, outcome in enumerate(outcomes) if outcome is _UNKNOWN]
            if unknown:
                self._read_back(bundle, unknown, outcomes)
            failed = {bundle.identities[n]: o for n, o in enumerate(outcomes) if o is not None}
            self.resources_sent += sum(o is None and m == "PUT" for o, m in zip(outcomes, bundle.methods))
            self.deleted += sum(o is None and m == "DELETE" for o, m in zip(outcomes, bundle.methods))
            refused: dict[str, str] = {}
            for unit in units:
                for identity, _ in unit.identities():
                    if identity in failed and unit.key not in refused:
                        refused[unit.key] = f"{failed[identity]} (its {identity[0]})"
            return None, refused
        if status in GONE and bundle.methods == ["DELETE"]:
            self.deleted += 1    # a lone DELETE of a resource the server does not have
            return None, {}
        # equivalent mutants: b"XXXX" for b"" in the next two calls (neither is JSON: both read as no body)
        reason = _outcome_line(status, answer.content or b"", self.server_text)
        too_large, known_limit = _size_refusal(status, answer.content or b"")
        if too_large and len(bundle.methods) > 1:
            raise _TooLarge(reason, len(bundle.methods), known_limit)
        return reason, {}

    def _read_back(self, bundle: _Bundle, unknown: list[int], outcomes: list[Any]) -> None:
        """Settle the entries the answer gave no status for by reading them back: a PUT is
        confirmed when the server holds what was sent (``meta`` and ``text`` aside), a DELETE
        when it holds nothing under that id. Fills in ``outcomes``."""
        if self.ids == "server":
            self._read_back_by_condition(bundle, unknown, outcomes)
            return
        by_type: dict[str, list[int]] = {}
        for n in unknown:
            by_type.setdefault(bundle.identities[n][0], []).append(n)
        for resource_type, entries in by_type.items():
            for start in range(0, len(entries), READ_BACK_IDS):
                part = entries[start:start + READ_BACK_IDS]
                held, failure = self._search_ids(resource_type, [bundle.identities[n][1] for n in part])
                for n in part:
                    self.read_back += 1
                    found = held.get(bundle.identities[n][1])
                    body = bundle.bodies[n]
                    if failure is not None:
                        outcomes[n] = f"no outcome in the answer, and reading it back failed: {failure}"
                    elif body is None:
                        outcomes[n] = None if found is None else "no outcome in the answer, and the server still holds it"
                    elif found is None:
                        outcomes[n] = "no outcome in the answer, and the server does not hold it"
                    else:
                        outcomes[n] = None if _same(found, body) else "no outcome in the answer, and the server holds another version"

    def _read_back_by_condition(self, bundle: _Bundle, unknown: list[int], outcomes: list[Any]) -> None:
        """``_read_back`` with server-assigned ids: each resource is searched by what it is
        addressed by (its identifier, the Endpoint's name), one search per resource; a PUT's
        content is compared with references aside (the server rewrites them), and its id is learned."""
        for n in unknown:
            self.read_back += 1
            resource_type = bundle.identities[n][0]
            condition = self._conditions[bundle.identities[n]]
            found, failure = self._search(f"{self.base_url}/{resource_type}?{condition}&_count=2", resource_type, None)
            body = bundle.bodies[n]
            if failure is not None:
                outcomes[n] = f"no outcome in the answer, and reading it back failed: {failure}"
            elif len(found) > 1:
                outcomes[n] = f"several {resource_type} resources on the server have its identifier"
            elif body is None:
                outcomes[n] = None if not found else "no outcome in the answer, and the server still holds it"
            elif not found:
                outcomes[n] = "no outcome in the answer, and the server does not hold it"
            else:
                (held_id, held), = found.items()
                if _same(held, body, references=False):
                    outcomes[n] = None
                    self._learn_server_id(bundle.identities[n], held_id)
                else:
                    outcomes[n] = "no outcome in the answer, and the server holds another version"

    def _search_ids(self, resource_type: str, ids: list[str]) -> tuple[dict[str, dict[str, Any]], str | None]:
        """``GET [base]/[type]?_id=a,b,...``: the resources found by id, or a reason it failed."""
        url = f"{self.base_url}/{resource_type}?_id={quote(','.join(ids), safe=',')}&_count={len(ids)}"
        return self._search(url, resource_type, ids)

    def _search(self, url: str, resource_type: str, ids: list[str] | None) -> tuple[dict[str, dict[str, Any]], str | None]:
        """The resources of ``resource_type`` a search answers (only those in ``ids`` if given), by id."""
        try:
            answer = self._send("GET", url)
        except Retriable as exc:
            if exc.connect:
                raise SinkError(f"cannot reach FHIR server {self.base_url}: {exc.reason}") from None
            return {}, exc.reason
        if answer.status != 200:
            return {}, _outcome_line(answer.status, answer.content or b"", self.server_text)
        try:
            found = orjson.loads(answer.content) if answer.content else None
        except orjson.JSONDecodeError:
            found = None
        if not isinstance(found, dict) or found.get("resourceType") != "Bundle":
            return {}, "the search did not answer a Bundle"
        held: dict[str, dict[str, Any]] = {}
        for entry in found.get("entry") or []:
            resource = entry.get("resource") if isinstance(entry, dict) else None
            if (isinstance(resource, dict) and resource.get("resourceType") == resource_type and isinstance(resource.get("id"), str)
                    and (ids is None or resource["id"] in ids)):
                held[resource["id"]] = resource
        return held, None

    # --- HTTP -----------------------------------------------------------------------------

    def _retried(self) -> None:
        self.retries += 1

    def _send(self, method: str, url: str, body: bytes | None = None) -> _Answer:
        return self._retrier(self._send_once, method, url, body)

    def _send_once(self, method: str, url: str, body: bytes | None) -> _Answer:
        started = time.monotonic()
        target = url
        # the watchdog shuts the socket at the deadline wherever the request waits: a server
        # sending its status line or headers a byte at a time is cut too (read timeouts are not)
        with WATCHDOG.deadline(started + self.deadline) as watched:
            for attempt in range(2):   # a 401: the credentials refreshed (a new token), then once more
                for _ in range(MAX_REDIRECTS + 1):
                    try:
                        answer = self._exchange(method, target, body, started)
                    except Retriable:
                        if watched.fired:
                            raise Retriable(f"the answer was not complete within {self.deadline:g} s") from None
                        raise
                    if watched.fired:
                        raise Retriable(f"the answer was not complete within {self.deadline:g} s")
                    location = answer.headers.get("Location")
                    if answer.status not in REDIRECTS or not location:
                        break
                    target = self._follow(method, target, location, answer.status)
                else:
                    raise SinkError(f"FHIR server {self.base_url} redirected {method} more than {MAX_REDIRECTS} times")
                if attempt or answer.status != 401 or self.credentials is None or not self.credentials.refresh(used(answer.authorization)):
                    break
                target = url
        status = answer.status
        if status in (401, 403):
            raise SinkError(
                f"FHIR server {self.base_url} refused authentication ({_status_line(status)}): check the FHIR server credentials"
            )
        if status in RETRIABLE_STATUS:
            raise Retriable(_outcome_line(status, answer.content or b"", self.server_text), status=status, retry_after=server_wait(answer.headers))
        return answer

    def _follow(self, method: str, current: str, location: str, status: int) -> str:
        """Where a redirect leads, if it may be followed: to the same scheme, host and port only (a
        Bundle holds patient names, the session the credentials), and for a POST only by 307/308."""
        target = urljoin(current, location)
        if not same_origin(current, target):
            raise SinkError(
                f"FHIR server {self.base_url} redirected {method} from {_shown_origin(current)} to another origin, "
                f"{_shown_origin(target)}: not followed (the request would go there with its data and credentials)"
            )
        if method not in ("GET", "HEAD") and status not in (307, 308):
            raise SinkError(f"FHIR server {self.base_url} answered {method} with {_status_line(status)}: not followed (it would drop the Bundle)")
        return target

    def _exchange(self, method: str, url: str, body: bytes | None, started: float) -> _Answer:
        """One HTTP request, its answer read whole within the deadline and the size cap."""
        headers = {"Content-Type": FHIR_JSON, "Prefer": "return=OperationOutcome"} if body is not None else None
        remaining = max(0.001, self.deadline - (time.monotonic() - started))
        timeout = (min(self.timeout[0], remaining), min(self.timeout[1], remaining))
        self.requests += 1
        try:
            # passed per request, --ca-bundle and --insecure win over REQUESTS_CA_BUNDLE and
            # CURL_CA_BUNDLE (requests lets the environment win over the session's setting)
            verify = None if self.session.verify is True else self.session.verify
            response = self.session.request(
                method, url, data=body, headers=headers, timeout=timeout, allow_redirects=False, stream=True, verify=verify
            )
            try:
                sent = response.request.headers.get("Authorization") if response.request is not None else None
                authorization = sent.decode("latin-1") if isinstance(sent, bytes) else sent
                if response.status_code in REDIRECTS:
                    return _Answer(response.status_code, response.headers, b"", authorization)
                try:
                    content: bytes | None = self._read(response, started)
                except _AnswerTooLarge:
                    content = None
                return _Answer(response.status_code, response.headers, content, authorization)
            finally:
                response.close()
        except requests.exceptions.SSLError as exc:
            raise SinkError(f"TLS error talking to FHIR server {self.base_url}: {_reason(exc)}") from None
        except requests.exceptions.ConnectTimeout:
            raise Retriable("connection timed out", connect=True) from None
        except requests.exceptions.ConnectionError as exc:
            raise Retriable(_reason(exc), connect=True) from None
        except requests.exceptions.Timeout:
            raise Retriable(f"no answer within {min(self.timeout[1], self.deadline):g} s") from None
        except requests.exceptions.RequestException as exc:
            raise Retriable(f"request failed: {_reason(exc)}") from None
        except OSError as exc:   # requests' own: a CA bundle (e.g. from REQUESTS_CA_BUNDLE) it cannot read
            raise ConfigError(f"cannot set up TLS for FHIR server {self.base_url}: {' '.join(str(exc).split())[:300]}") from None

    def _read(self, response: requests.Response, started: float) -> bytes:
        """The body, decoded, by the QIDO client's ``read_answer``: piece by piece against the
        request's deadline, capped at ``max_answer`` on the wire and after decoding (identity,
        gzip, x-gzip, deflate; other encodings are not read). _AnswerTooLarge when it is not read."""
        try:
            return read_answer(response.raw, self.max_answer, started + self.deadline, self.timeout[1])
        except (BodyTooLarge, UnsupportedEncoding, requests.exceptions.ContentDecodingError):
            raise _AnswerTooLarge from None
        except DeadlineExceeded:
            raise Retriable(f"the answer was not complete within {self.deadline:g} s") from None
        except (requests.exceptions.ConnectionError, requests.exceptions.ChunkedEncodingError) as exc:
            raise Retriable(f"the answer was cut short: {_reason(exc)}") from None


# --- reading answers -----------------------------------------------------------------------

_UNKNOWN = object()
"""An entry whose outcome the answer does not give."""


def _entry_outcomes(content: bytes | None, bundle: _Bundle, server_text: bool) -> tuple[list[Any], list[tuple[str, str] | None]]:
    """Per entry of ``bundle``: None (accepted), a one-line reason (refused) or _UNKNOWN; and
    the (type, id) its ``response.location`` names, if any.

    A conformant server never answers 200 with failed entries; one that ran the transaction as
    a batch does. An answer that is no Bundle, or has fewer entries, or entries without a
    status, leaves those entries unknown."""
    try:   # equivalent mutant: `content or True` (orjson refuses None with a JSONDecodeError too)
        answer = orjson.loads(content) if content else None
    except orjson.JSONDecodeError:
        answer = None   # equivalent mutant: "" (no dict either)
    entries: list[Any] = []
    if isinstance(answer, dict) and answer.get("resourceType") == "Bundle" and isinstance(answer.get("entry"), list):
        entries = answer["entry"]
    outcomes: list[Any] = []
    locations: list[tuple[str, str] | None] = []
    for n, method in enumerate(bundle.methods):
        entry = entries[n] if n < len(entries) else None
        response = entry.get("response") if isinstance(entry, dict) else None
        status = _status_of(response.get("status")) if isinstance(response, dict) else None
        location = response.get("location") if isinstance(response, dict) else None
        found = _LOCATION.search(location) if isinstance(location, str) else None
        locations.append((found[1], found[2]) if found else None)
        if status is None or 300 <= status < 400:
            outcomes.append(_UNKNOWN)
        # equivalent mutants: `<= 300`, `< 301` below (300 is taken above); `or True` in the
        # outcome's test (a status was read, so the response is a dict)
        elif 200 <= status < 300 or (method == "DELETE" and status in GONE):
            outcomes.append(None)
        else:
            outcome = response.get("outcome") if isinstance(response, dict) else None
            summary = _issue_summary(outcome, server_text) if isinstance(outcome, dict) else None
            outcomes.append(_one_line(_status_line(status), summary))
    return outcomes, locations


def _same(held: dict[str, Any], sent: bytes, references: bool = True) -> bool:
    """Whether the server holds what was sent, ``meta`` and ``text`` aside (and ``id`` and the
    references' targets when the server assigns ids)."""
    def content(resource: dict[str, Any]) -> Any:
        kept = {k: v for k, v in resource.items() if k not in ("meta", "text") and (references or k != "id")}
        # equivalent mutants: any other constant for "" (both sides are rewritten alike)
        return kept if references else _rewrite_references(kept, lambda reference: "")

    return bool(content(held) == content(orjson.loads(sent)))


def _condition(resource: dict[str, Any]) -> str | None:
    """The search a resource is addressed by with server-assigned ids: the Endpoint by its name
    (which holds its address; R4 and R5 have no search parameter for the address), the others
    by their first identifier with a system (one without a system could match another issuer's)."""
    if resource.get("resourceType") == "Endpoint":
        name = resource.get("name")
        return f"name:exact={quote(name, safe='')}" if isinstance(name, str) and name else None
    for identifier in resource.get("identifier") or []:
        if isinstance(identifier, dict) and isinstance(identifier.get("system"), str) and isinstance(identifier.get("value"), str):
            return _token("identifier", f"{identifier['system']}|{identifier['value']}")
    return None


def _token(name: str, value: str) -> str:
    return f"{name}={quote(value.replace(',', chr(92) + ','), safe=':/')}"


def _placeholder(resource_id: str) -> str:
    """The ``urn:uuid`` fullUrl of an entry (our ids are UUIDs; anything else gets one made from it)."""
    return f"urn:uuid:{resource_id if _UUID.fullmatch(resource_id) else uuid.uuid5(uuid.NAMESPACE_URL, resource_id)}"


def _references(resource: Any) -> set[tuple[str, str]]:
    found: set[tuple[str, str]] = set()

    def note(reference: str) -> str:
        match = _REFERENCE.fullmatch(reference)
        if match:
            found.add((match[1], match[2]))
        return reference

    _rewrite_references(resource, note)
    return found


def _rewrite_references(value: Any, change: Callable[[str], str]) -> Any:
    if isinstance(value, dict):
        return {k: (change(v) if k == "reference" and isinstance(v, str) else _rewrite_references(v, change)) for k, v in value.items()}
    if isinstance(value, list):
        return [_rewrite_references(v, change) for v in value]
    return value


def _status_of(value: Any) -> int | None:
    if not isinstance(value, str):
        return None
    head = value.strip().split(" ", 1)[0]
    return int(head) if head.isdigit() else None


def _outcome_line(status: int, body: bytes, server_text: bool = False) -> str:
    """``HTTP 422 Unprocessable Entity: error business-rule at ImagingStudy.subject``; the body is
    read only as an OperationOutcome, so nothing else the server echoes (such as the resource)
    is shown, and of the OperationOutcome only codes and element paths unless ``server_text``."""
    try:
        outcome = orjson.loads(body) if body else None
    except orjson.JSONDecodeError:
        outcome = None
    summary = None
    if isinstance(outcome, dict) and outcome.get("resourceType") == "OperationOutcome":
        summary = _issue_summary(outcome, server_text)
    return _one_line(_status_line(status), summary)


_CODE = re.compile(r"[a-z][a-z-]{0,39}")


def _issue_summary(outcome: dict[str, Any], server_text: bool = False) -> str | None:
    """Each issue's severity, code and element paths (at most three issues); the free text
    (``diagnostics``, ``details.text``, a coding's ``display``) only with ``server_text``."""
    issues = outcome.get("issue")
    if not isinstance(issues, list):
        return None
    parts = []
    for issue in issues[:3]:
        if not isinstance(issue, dict):
            continue
        words = [w for w in (issue.get("severity"), issue.get("code")) if isinstance(w, str) and _CODE.fullmatch(w)]
        paths = []
        for key in ("expression", "location"):
            values = issue.get(key)
            for value in values if isinstance(values, list) else []:
                if isinstance(value, str) and len(value) <= 200 and _PATH.fullmatch(value) and value not in paths:
                    paths.append(value)
        part = " ".join(words) or "issue"
        if paths:
            part += " at " + ", ".join(paths[:3])
        if server_text:
            text = _free_text(issue)
            if text:
                part += f" ({text})"
        parts.append(part)
    return "; ".join(parts) or None


def _free_text(issue: dict[str, Any]) -> str | None:
    details = issue.get("details")
    if not isinstance(details, dict):
        details = {}
    codings = details.get("coding")
    if not isinstance(codings, list):
        codings = []
    for text in (issue.get("diagnostics"), details.get("text"), *(c.get("display") for c in codings if isinstance(c, dict))):
        if isinstance(text, str) and text.strip():
            return "".join(c if c.isprintable() else " " for c in text)
    return None


def _size_refusal(status: int, body: bytes) -> tuple[bool, int | None]:
    """Whether an answer refuses a transaction for its size, and the known server's limit if any."""
    if status == 413:
        return True, None
    # equivalent mutants: `<= 500`, `< 501` (a 500 is retried, never refused here); `body or
    # True` (an empty body fails to decode: not a size refusal either way)
    if not 400 <= status < 500:
        return False, None
    try:
        outcome = orjson.loads(body) if body else None
    except orjson.JSONDecodeError:
        return False, None
    issues = outcome.get("issue") if isinstance(outcome, dict) else None
    for issue in issues if isinstance(issues, list) else []:
        if not isinstance(issue, dict):
            continue
        details = issue.get("details")
        if not isinstance(details, dict):
            details = {}
        texts = [t for t in (issue.get("diagnostics"), details.get("text")) if isinstance(t, str)]
        for text in texts:
            for known, limit in KNOWN_SIZE_LIMITS.items():
                if known in text:
                    return True, limit
        if issue.get("code") == "too-costly" or (issue.get("code") == "not-supported" and any(_SIZE_TEXT.search(t) for t in texts)):
            return True, None
    return False, None


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    try:
        port = parts.port or {"http": 80, "https": 443}.get(scheme)
    except ValueError:
        port = None
    return scheme, (parts.hostname or "").lower(), port


def _shown_origin(url: str) -> str:
    """scheme://host:port of a URL (never its user, password, path or query), made printable."""
    scheme, host, port = _origin(url)
    shown = f"{scheme}://{host}" + (f":{port}" if port is not None else "")
    shown = "".join(c if c.isprintable() and not c.isspace() else "?" for c in shown)
    return shown[:100]


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


def _reason(exc: Exception) -> str:
    """A short cause, never the exception text itself (it carries the URL)."""
    text = str(exc)
    for marker in ("Connection refused", "Name or service not known", "No route to host", "timed out", "Connection reset",
                   "Remote end closed connection", "certificate verify failed"):
        if marker in text:
            return marker.lower()
    return type(exc).__name__


def _check_capabilities(statement: dict[str, Any], shown: str, written: Sequence[str]) -> list[str]:
    """The written types the CapabilityStatement says cannot be created by PUT (``updateCreate:
    false``); a warning when it does not list the transaction interaction."""
    refused = []
    for rest in statement.get("rest") or []:
        if not isinstance(rest, dict) or rest.get("mode", "server") != "server":
            continue
        codes = {i.get("code") for i in rest.get("interaction") or [] if isinstance(i, dict)}
        if codes and "transaction" not in codes:
            log.warning("the CapabilityStatement of %s does not list the transaction interaction", shown)
        for resource in rest.get("resource") or []:
            if isinstance(resource, dict) and resource.get("type") in written and resource.get("updateCreate") is False:
                refused.append(str(resource["type"]))
    return sorted(set(refused))

"""OAuth2 client credentials (RFC 6749 section 4.4): ``--auth oauth`` and ``--fhir-auth oauth``.

The client authenticates to the token endpoint with a secret (HTTP Basic, RFC 6749 2.3.1; the
secret read from an environment variable or a file, never given on the command line) or with a
JWT signed by its private key (``private_key_jwt``, RFC 7523: RS384 for an RSA key, ES384 for an
EC P-384 key; signed by PyJWT, the ``oauth`` extra). The token is kept and fetched again when it
expires within ``EARLY`` seconds (from ``expires_in``) and after a 401, once for all threads.

What the endpoint says is never shown as it is: of a refusal only the OAuth ``error`` code
(``invalid_client``, ...), checked against the characters RFC 6749 allows; never the secret,
the assertion, the token or ``error_description``.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import orjson
import requests

from ..errors import ConfigError, CrawlerError
from ..http import (
    DeadlineAdapter,
    Retriable,
    Retrier,
    RetryPolicy,
    check_base_url,
    failure_reason,
    origin_of,
    read_answer,
    retriable_error,
    total_deadline,
)
from .plain import basic_header, bearer_header
from .settings import AuthSettings

log = logging.getLogger("crawler.auth")

EARLY = 60.0
"""A token is fetched again when it expires within this many seconds (a quarter of its life when
that is shorter: a token valid for two minutes is used for 90 s)."""
ASSERTION_LIFE = 300
"""Seconds a JWT client assertion is valid (SMART Backend Services: at most five minutes)."""
MAX_ANSWER = 1 << 20
TOKEN_RETRY = RetryPolicy(attempts=3, max_seconds=30.0, base_delay=0.5, max_delay=4.0)
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
_ERROR_CODE = re.compile(r"[a-z][a-z0-9_]{0,39}")
_Token = tuple[str | None, float | None, float]


class ClientCredentials:
    """A bearer token from an OAuth2 token endpoint by the client credentials grant. Thread-safe."""

    def __init__(
        self,
        settings: AuthSettings,
        *,
        session: requests.Session | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.settings = settings
        if not settings.client_id:
            raise settings.refused(f"OAuth for {settings.server} needs {settings.option('client_id')}", "client_id")
        self.client_id = settings.client_id
        self._secret: str | None = None
        self._key: Any = None
        self._algorithm = ""
        self._load_client_credentials()
        self._token_url = self._configured_token_url()
        self.scope = settings.scope or settings.default_scope
        self._session = session or requests.Session()
        adapter = DeadlineAdapter(pool_connections=1, pool_maxsize=2, max_retries=0)
        self._session.mount("http://", adapter)
        self._session.mount("https://", adapter)
        self._clock = clock
        self._wall_clock = wall_clock
        self._retrier = Retrier(TOKEN_RETRY, sleep=sleep)
        self._lock = threading.Lock()
        self._current: _Token = (None, None, EARLY)
        """The Authorization header, when it expires (monotonic clock) and how early to renew it."""
        self.fetched = 0
        """Tokens fetched so far."""

    # --- the seam -------------------------------------------------------------------------

    def headers(self, method: str, url: str, body: bytes = b"") -> Mapping[str, str]:
        current = self._current
        header, expires, early = current
        if header is None or (expires is not None and expires - self._clock() <= early):
            with self._lock:
                if self._current is current:
                    self._renew(current)
                header = self._current[0]
        assert header is not None
        return {"Authorization": header}

    def refresh(self, used: Mapping[str, str]) -> bool:
        with self._lock:
            if self._current[0] is None or used.get("Authorization") == self._current[0]:
                self._current = self._fetch()
        return True

    def __repr__(self) -> str:
        return f"{type(self).__name__}(client_id={self.client_id!r}, <secret hidden>)"

    # --- fetching -------------------------------------------------------------------------

    def _renew(self, current: _Token) -> None:
        """Fetch a token ahead of expiry; if the endpoint cannot be reached while the token kept
        is still valid, keep using it (the next request tries again)."""
        header, expires, _ = current
        try:
            self._current = self._fetch()
        except ConfigError:
            raise
        except CrawlerError as exc:
            if header is None or expires is None or expires <= self._clock():
                raise
            log.warning("%s; the token kept is valid for %d s more", exc, int(expires - self._clock()))

    def _fetch(self) -> _Token:
        """A new token: its Authorization header, when it expires, how early to renew it."""
        token_url = self.token_url()
        form: dict[str, str] = {"grant_type": "client_credentials"}
        if self.scope:
            form["scope"] = self.scope
        headers = {"Accept": "application/json", "Content-Type": "application/x-www-form-urlencoded"}
        if self._key is not None:
            form["client_assertion_type"] = ASSERTION_TYPE
            form["client_assertion"] = self._assertion(token_url)
        elif self.settings.client_auth == "post":
            assert self._secret is not None
            form["client_id"] = self.client_id
            form["client_secret"] = self._secret
        else:
            assert self._secret is not None
            headers["Authorization"] = basic_header(quote(self.client_id, safe=""), quote(self._secret, safe=""))
        started = self._clock()
        status, body = self._post(token_url, form, headers)
        grant = self._grant(token_url, status, body)
        token = grant.get("access_token")
        if not isinstance(token, str) or not token:
            raise self._refused(token_url, "answered no access_token")
        kind = grant.get("token_type")
        if not isinstance(kind, str) or kind.lower() != "bearer":
            raise self._refused(token_url, "issued a token that is not a bearer token")
        lifetime = grant.get("expires_in")
        if isinstance(lifetime, str) and lifetime.isdigit():
            lifetime = int(lifetime)
        expires, early = None, EARLY
        if isinstance(lifetime, (int, float)) and not isinstance(lifetime, bool) and lifetime > 0:
            expires, early = started + float(lifetime), min(EARLY, float(lifetime) / 4)
        self.fetched += 1
        log.debug("OAuth token %d for %s fetched from %s (expires in %s s)", self.fetched, self.settings.server,
                  origin_of(token_url), "?" if lifetime is None else lifetime)
        return bearer_header(token, f"the access token from {origin_of(token_url)}"), expires, early

    def _post(self, token_url: str, form: Mapping[str, str], headers: Mapping[str, str]) -> tuple[int, bytes]:
        try:
            return self._retrier(self._post_once, token_url, form, headers)
        except Retriable as exc:
            raise self.settings.unreachable(f"cannot get an OAuth token for {self.settings.server} from "
                                            f"{origin_of(token_url)}: {exc.reason}") from None

    def _post_once(self, token_url: str, form: Mapping[str, str], headers: Mapping[str, str]) -> tuple[int, bytes]:
        return self._exchange("POST", token_url, form, headers)

    def _exchange(self, method: str, url: str, form: Mapping[str, str] | None, headers: Mapping[str, str]) -> tuple[int, bytes]:
        timeout = self.settings.timeout
        deadline = time.monotonic() + total_deadline(timeout)
        verify = None if self.settings.verify is True else self.settings.verify
        try:
            response = self._session.request(method, url, data=form, headers=dict(headers), timeout=timeout, verify=verify,
                                             allow_redirects=False, stream=True)
            try:
                body = read_answer(response.raw, MAX_ANSWER, deadline, timeout[1])
            finally:
                response.close()
        except requests.exceptions.SSLError as exc:
            raise self.settings.unreachable(f"TLS error talking to {origin_of(url)} (OAuth for {self.settings.server}): "
                                            f"{failure_reason(exc)}") from None
        except (requests.exceptions.RequestException, OSError) as exc:
            if not isinstance(exc, requests.exceptions.RequestException) or retriable_error(exc):
                raise Retriable(failure_reason(exc), connect=True) from None
            raise self._refused(url, f"sent an answer that cannot be read ({type(exc).__name__})") from None
        if response.status_code in (429, 500, 502, 503, 504):
            raise Retriable(f"HTTP {response.status_code}", status=response.status_code)
        return response.status_code, body

    def _grant(self, token_url: str, status: int, body: bytes) -> dict[str, Any]:
        try:
            answer = orjson.loads(body) if body.strip() else None
        except orjson.JSONDecodeError:
            answer = None
        if status == 200 and isinstance(answer, dict):
            return answer
        code = answer.get("error") if isinstance(answer, dict) else None
        shown = code if isinstance(code, str) and _ERROR_CODE.fullmatch(code) else None
        if shown:
            raise self._refused(token_url, f"refused the client {self.client_id!r}: {shown} (HTTP {status})")
        if status == 200:
            raise self._refused(token_url, "answered something that is not a JSON object")
        raise self._refused(token_url, f"answered HTTP {status}")

    def _refused(self, token_url: str, what: str) -> ConfigError:
        return self.settings.refused(f"the OAuth token endpoint {origin_of(token_url)} (for {self.settings.server}) {what}")

    # --- client authentication ------------------------------------------------------------

    def _load_client_credentials(self) -> None:
        s = self.settings
        given = [key for key in ("client_secret_env", "client_secret_file", "private_key") if getattr(s, key)]
        if len(given) != 1:
            options = ", ".join(s.option(key) for key in ("client_secret_env", "client_secret_file", "private_key"))
            raise s.refused(f"OAuth for {s.server} needs exactly one of {options}"
                            + (f" (given: {', '.join(s.option(key) for key in given)})" if given else ""),
                            given[-1] if given else "client_secret_env")
        if s.client_auth not in (None, "basic", "post"):
            raise s.refused(f"{s.option('client_auth')} is basic or post, not {s.client_auth!r}", "client_auth")
        if s.client_auth is not None and s.private_key:
            raise s.refused(f"{s.option('client_auth')} says how a client secret is sent; "
                            f"{s.option('private_key')} signs an assertion instead", "client_auth")
        if s.private_key_passphrase_env and not s.private_key:
            raise s.refused(f"{s.option('private_key_passphrase_env')} goes with {s.option('private_key')}", "private_key_passphrase_env")
        if s.client_secret_env:
            secret = os.environ.get(s.client_secret_env)
            if not secret:
                raise s.refused(f"the environment variable {s.client_secret_env} is not set or empty", "client_secret_env")
            self._secret = secret
        elif s.client_secret_file:
            try:
                secret = Path(s.client_secret_file).read_text(encoding="utf-8").strip()
            except (OSError, UnicodeDecodeError) as exc:
                raise s.refused(f"cannot read the client secret file {s.client_secret_file}: "
                                f"{getattr(exc, 'strerror', None) or type(exc).__name__}", "client_secret_file") from None
            if not secret or "\n" in secret:
                raise s.refused(f"the client secret file {s.client_secret_file} must hold one line", "client_secret_file")
            self._secret = secret
        else:
            assert s.private_key is not None
            self._key, self._algorithm = load_private_key(s, s.private_key)

    def _assertion(self, token_url: str) -> str:
        """A JWT client assertion (RFC 7523; SMART Backend Services): iss = sub = the client id,
        aud = the token endpoint, valid for ASSERTION_LIFE seconds, a fresh jti each time."""
        import jwt

        now = int(self._wall_clock())
        claims = {"iss": self.client_id, "sub": self.client_id, "aud": token_url, "iat": now,
                  "exp": now + ASSERTION_LIFE, "jti": uuid.uuid4().hex}
        headers = {"kid": self.settings.key_id} if self.settings.key_id else None
        return jwt.encode(claims, self._key, algorithm=self._algorithm, headers=headers)

    # --- the token endpoint ---------------------------------------------------------------

    def _configured_token_url(self) -> str | None:
        url = self.settings.token_url
        if not url:
            raise self.settings.refused(f"OAuth for {self.settings.server} needs {self.settings.option('token_url')}", "token_url")
        return endpoint_url(self.settings, url, "token_url")

    def token_url(self) -> str:
        """The token endpoint (SMART finds it on the server first)."""
        assert self._token_url is not None
        return self._token_url


def endpoint_url(settings: AuthSettings, url: str, key: str) -> str:
    """``url`` checked as a token endpoint (http or https, no user or password in it)."""
    try:
        checked = check_base_url(url)
    except ConfigError as exc:
        raise settings.refused(str(exc), key) from None
    if urlsplit(checked).username or urlsplit(checked).password:
        raise settings.refused("the token endpoint's URL takes no user or password", key)
    return checked


def load_private_key(settings: AuthSettings, path: str) -> tuple[Any, str]:
    """The private key of a PEM file and the JWT algorithm it signs with (RS384: RSA of at least
    2048 bits; ES384: EC on P-384). ConfigError naming the file, never its content."""
    try:
        import jwt  # noqa: F401
        from cryptography.hazmat.primitives.asymmetric import ec, rsa
        from cryptography.hazmat.primitives.serialization import load_pem_private_key
    except ImportError:
        raise settings.refused("a private key for OAuth needs the oauth extra: pip install 'qido-crawler[oauth]'",
                               "private_key") from None
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise settings.refused(f"cannot read the private key {path}: {exc.strerror}", "private_key") from None
    passphrase = None
    variable = settings.private_key_passphrase_env
    if variable:
        passphrase = os.environ.get(variable)
        if not passphrase:
            raise settings.refused(f"the environment variable {variable} is not set or empty", "private_key_passphrase_env")
    try:
        key = load_pem_private_key(data, password=passphrase.encode() if passphrase else None)
    except TypeError:   # cryptography: a passphrase missing, or given for a key that has none
        if passphrase:
            raise settings.refused(f"the private key {path} is not encrypted: leave out {settings.option('private_key_passphrase_env')}",
                                   "private_key_passphrase_env") from None
        raise settings.refused(f"the private key {path} is encrypted: name the environment variable that holds its passphrase "
                               f"with {settings.option('private_key_passphrase_env')}", "private_key") from None
    except ValueError:
        if passphrase and b"ENCRYPTED" in data:
            raise settings.refused(f"the passphrase in {variable} does not decrypt the private key {path}",
                                   "private_key_passphrase_env") from None
        raise settings.refused(f"{path} is no PEM private key", "private_key") from None
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < 2048:
            raise settings.refused(f"the RSA key {path} has {key.key_size} bits: RS384 needs at least 2048", "private_key")
        return key, "RS384"
    if isinstance(key, ec.EllipticCurvePrivateKey):
        if not isinstance(key.curve, ec.SECP384R1):
            raise settings.refused(f"the EC key {path} is on {key.curve.name}: ES384 needs P-384 (secp384r1)", "private_key")
        return key, "ES384"
    raise settings.refused(f"the key {path} is neither RSA (RS384) nor EC P-384 (ES384)", "private_key")

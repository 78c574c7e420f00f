"""Google Cloud credentials (``--auth gcp``, the ``[gcp]`` extra): Application Default Credentials.

``google.auth.default`` finds them where Google's own tools do: ``GOOGLE_APPLICATION_CREDENTIALS``
(a service account key file or a workload identity federation configuration), the file that
``gcloud auth application-default login`` writes, or the metadata server of a Google Cloud VM,
Cloud Run or GKE. The access token is renewed by the library (``credentials.refresh``) when it
expires within a minute, under one lock, so that the crawl's threads share one renewal.
"""

from __future__ import annotations

import datetime
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from .cloud import Errors, Target, renew_after_refusal

SCOPE = "https://www.googleapis.com/auth/cloud-healthcare"
"""The scope of the Cloud Healthcare API (its DICOMweb and FHIR stores)."""

MARGIN = datetime.timedelta(seconds=60)
"""A token that expires within this is renewed before it is used (within a quarter of its life
when that is shorter, so that a short-lived token is not fetched for every request)."""

_ERROR_CODE = re.compile(r"[a-z_]{1,64}")


class GcpCredentials:
    """Bearer tokens from Google's Application Default Credentials, scope ``scopes`` (the Cloud
    Healthcare API's, for its DICOMweb and its FHIR stores alike).

    ``settings`` tells the DICOMweb server's credentials from the FHIR server's (for errors);
    ``credentials`` replaces ``google.auth.default``'s (tests give the library's own credential
    objects); ``request`` is the transport the token requests go through (default: a
    ``google.auth.transport.requests.Request``); ``now`` gives the time as google-auth keeps it
    (naive UTC)."""

    def __init__(
        self,
        settings: Target | None = None,
        *,
        scopes: Sequence[str] = (SCOPE,),
        credentials: Any = None,
        request: Any = None,
        now: Callable[[], datetime.datetime] | None = None,
    ) -> None:
        self._errors = errors = Errors.of(settings)
        try:
            import google.auth
            import google.auth.exceptions
            import google.auth.transport.requests
        except ImportError:
            raise errors.missing_extra("gcp") from None
        self._exceptions = google.auth.exceptions
        if credentials is None:
            try:
                credentials, _project = google.auth.default(scopes=list(scopes))
            except google.auth.exceptions.DefaultCredentialsError:
                raise errors.refused(
                    "no Google Application Default Credentials found: set GOOGLE_APPLICATION_CREDENTIALS to a key or "
                    "credential configuration file, run `gcloud auth application-default login`, or run on Google Cloud"
                ) from None
        self._credentials = credentials
        self._request = request if request is not None else google.auth.transport.requests.Request()
        self._now = now or _utcnow
        self._lock = threading.Lock()
        self._header = ""
        self._margin = MARGIN

    def headers(self, method: str, url: str, body: bytes = b"") -> Mapping[str, str]:
        with self._lock:
            if self._stale():
                self._renew()
            elif not self._header:
                self._header = self._errors.bearer(self._credentials.token, "Google")
            return {"Authorization": self._header}

    def refresh(self, used: Mapping[str, str]) -> bool:
        """A new token unless another thread has renewed the one ``used`` already; False when
        Google gives the same token again (the refusal is not the token's age)."""
        with self._lock:
            return renew_after_refusal(lambda: self._header, self._renew, used)

    def _stale(self) -> bool:
        """No token, or one that expires within its margin. Not google-auth's ``valid``, which turns
        False 3 min 45 s ahead: a token issued for less than that would be fetched for each
        request. Credentials without an expiry are as ``valid`` says."""
        credentials = self._credentials
        expiry = _naive_utc(credentials.expiry)
        if not credentials.token or expiry is None:
            return not credentials.valid
        return bool(expiry - self._now() <= self._margin)

    def _renew(self) -> None:
        google, errors = self._exceptions, self._errors
        try:
            self._credentials.refresh(self._request)
        except google.TransportError as exc:
            raise errors.unreachable(f"the Google token service could not be reached ({type(exc).__name__})") from None
        except google.RefreshError as exc:
            raise errors.refused(f"Google refused to issue an access token{_error_code(exc)}: check the Application Default Credentials") from None
        except google.GoogleAuthError as exc:
            raise errors.refused(f"the Google credentials cannot issue an access token ({type(exc).__name__})") from None
        self._header = errors.bearer(self._credentials.token, "Google")
        expiry = _naive_utc(self._credentials.expiry)
        self._margin = MARGIN if expiry is None else min(MARGIN, max(expiry - self._now(), datetime.timedelta(0)) / 4)

    def __repr__(self) -> str:
        return "GcpCredentials(<token hidden>)"


def _utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)


def _naive_utc(moment: datetime.datetime | None) -> datetime.datetime | None:
    """``moment`` as google-auth keeps expiries: naive, in UTC."""
    if moment is None or moment.tzinfo is None:
        return moment
    return moment.astimezone(datetime.timezone.utc).replace(tzinfo=None)


def _error_code(exc: BaseException) -> str:
    """The OAuth ``error`` code of a RefreshError (``invalid_grant``...), never its free text."""
    details = exc.args[1] if len(exc.args) > 1 else None
    code = details.get("error") if isinstance(details, dict) else None
    return f" ({code})" if isinstance(code, str) and _ERROR_CODE.fullmatch(code) else ""


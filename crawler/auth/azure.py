"""Azure credentials (``--auth azure``, the ``[azure]`` extra): ``DefaultAzureCredential``.

It finds an identity where Azure's own tools do: a service principal in the environment
(``AZURE_TENANT_ID``, ``AZURE_CLIENT_ID`` and ``AZURE_CLIENT_SECRET`` or a certificate), workload
identity, a managed identity, the Azure CLI's login. The token is kept until a minute before its
``expires_on`` and renewed under one lock, once for all the crawl's threads.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlsplit

from .cloud import Errors, Target, renew_after_refusal

DICOM_SCOPE = "https://dicom.healthcareapis.azure.com/.default"
"""The scope of every Azure Health Data Services DICOM service."""

MARGIN = 60.0
"""Seconds before its expiry at which a token is renewed before it is used (a quarter of its life
when that is shorter, so that a short-lived token is not asked for at every request)."""


def fhir_scope(fhir_url: str) -> str:
    """The scope of an Azure FHIR service: its origin followed by ``/.default``."""
    parts = urlsplit(fhir_url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}/.default"


class AzureCredentials:
    """Bearer tokens for ``scope`` from ``DefaultAzureCredential`` (or ``credential``: any object
    with azure-core's ``get_token(*scopes) -> AccessToken``, which tests give); ``clock`` is
    the Unix time that ``expires_on`` is compared with.

    The scope, unless given: the DICOM service's (``DICOM_SCOPE``) for the DICOMweb server, the
    FHIR service's own (``fhir_scope``) for the FHIR server of ``settings``."""

    def __init__(
        self, settings: Target | None = None, *, scope: str | None = None, credential: Any = None, clock: Callable[[], float] = time.time
    ) -> None:
        self._errors = errors = Errors.of(settings)
        try:
            import azure.core.exceptions
            from azure.identity import CredentialUnavailableError, DefaultAzureCredential
        except ImportError:
            raise errors.missing_extra("azure") from None
        if scope is None:
            scope = fhir_scope(settings.base_url) if settings is not None and settings.fhir else DICOM_SCOPE
        self._exceptions = azure.core.exceptions
        self._unavailable = CredentialUnavailableError
        if credential is None:
            credential = DefaultAzureCredential()
        self._credential = credential
        self.scope = scope
        self._clock = clock
        self._lock = threading.Lock()
        self._header: str | None = None
        self._renew_at = 0.0

    def headers(self, method: str, url: str, body: bytes = b"") -> Mapping[str, str]:
        with self._lock:
            if self._header is None or self._clock() >= self._renew_at:
                self._renew()
            assert self._header is not None
            return {"Authorization": self._header}

    def refresh(self, used: Mapping[str, str]) -> bool:
        """A token asked for again unless another thread has renewed the one ``used``; False when
        Azure gives the same token again (the refusal is not the token's age)."""
        with self._lock:
            return renew_after_refusal(lambda: self._header, self._renew, used)

    def _renew(self) -> None:
        azure, errors = self._exceptions, self._errors
        try:
            token = self._credential.get_token(self.scope)
        except (azure.ServiceRequestError, azure.ServiceResponseError) as exc:
            raise errors.unreachable(f"the Azure token service could not be reached ({type(exc).__name__})") from None
        except self._unavailable:
            raise errors.refused(
                "no Azure identity available: set AZURE_TENANT_ID, AZURE_CLIENT_ID and AZURE_CLIENT_SECRET (or a certificate), "
                "use a managed identity, or log in with `az login`"
            ) from None
        except azure.ClientAuthenticationError as exc:
            raise errors.refused(f"Azure refused to issue an access token for {self.scope}{_status(exc)}") from None
        except azure.AzureError as exc:
            raise errors.refused(f"the Azure credentials cannot issue an access token ({type(exc).__name__})") from None
        self._header = errors.bearer(token.token, "Azure")
        now, expires_on = self._clock(), float(token.expires_on)
        self._renew_at = expires_on - min(MARGIN, max(expires_on - now, 0.0) / 4)

    def __repr__(self) -> str:
        return f"AzureCredentials(scope={self.scope!r}, <token hidden>)"


def _status(exc: BaseException) -> str:
    status = getattr(exc, "status_code", None)
    return f" (HTTP {status})" if isinstance(status, int) else ""


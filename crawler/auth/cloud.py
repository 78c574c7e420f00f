"""What the cloud kinds (gcp, azure, aws) share: errors that name the server the credentials are
for and the option at fault, and never a secret."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from ..errors import ConfigError, SinkError, SourceUnreachable


class Target(Protocol):
    """What the cloud kinds read of the settings they are made from (``AuthSettings``)."""

    @property
    def base_url(self) -> str:
        """The server the credentials are for."""

    @property
    def fhir(self) -> bool:
        """True for the FHIR server's credentials, False for the DICOMweb server's."""

    @property
    def options(self) -> Mapping[str, Any]:
        """The kind's own settings (``region`` for aws)."""


def renew_after_refusal(held: Callable[[], str | None], renew: Callable[[], None], used: Mapping[str, str]) -> bool:
    """``refresh`` of a kind that keeps one bearer header (``held``), under the kind's lock: a
    new token unless another thread has renewed the one ``used`` already; False when the
    token service gives the same token again (the refusal is not the token's age)."""
    if used.get("Authorization") != held():
        return True
    before = held()
    renew()
    return held() != before


@dataclass(frozen=True)
class Errors:
    fhir: bool = False
    """Credentials for the FHIR server (else the DICOMweb server)."""

    @classmethod
    def of(cls, settings: Target | None) -> Errors:
        return cls(fhir=settings is not None and settings.fhir)

    @property
    def option(self) -> str:
        return "--fhir-auth" if self.fhir else "--auth"

    def refused(self, message: str, setting: str | None = None) -> ConfigError:
        """Credentials that are missing or refused for good: exit 2."""
        return ConfigError(message, setting=setting or ("fhir_auth" if self.fhir else "auth"))

    def unreachable(self, message: str) -> Exception:
        """A token service that cannot be reached: exit 3 either way."""
        return SinkError(message) if self.fhir else SourceUnreachable(message)

    def missing_extra(self, extra: str) -> ConfigError:
        return self.refused(f"{self.option} {extra} needs the {extra} extra: pip install 'qido-crawler[{extra}]'")

    def bearer(self, token: Any, issuer: str) -> str:
        """``Bearer token``; ConfigError (naming ``issuer``, never the token) for a token that is
        empty or holds characters an HTTP header cannot carry."""
        if not isinstance(token, str) or not token:
            raise self.refused(f"the {issuer} credentials gave no access token")
        if any(c < " " or c > "~" for c in token):
            raise self.refused(f"the {issuer} access token contains characters that an HTTP header cannot carry")
        return "Bearer " + token

"""SMART Backend Services (HL7 SMART App Launch 2, "Backend Services"): ``--fhir-auth smart``.

The client credentials grant of ``oauth`` with a JWT client assertion signed by the client's
private key (RS384 or ES384), the token endpoint read from the FHIR server's
``{base}/.well-known/smart-configuration`` (``token_endpoint``) unless
``--fhir-oauth-token-url`` names it. The scope asked for by default is what the FHIR sink does
with each type it writes, as SMART v2 scopes: ``system/<Type>.cruds`` (create and update by PUT,
DELETE with ``--prune``, search for ``--fhir-ids server``'s conditional updates, read back of
entries the transaction's answer did not describe); the audit asks for ``system/ImagingStudy.rs``.
"""

from __future__ import annotations

from collections.abc import Iterable

import orjson

from ..http import Retriable, origin_of
from .oauth import ClientCredentials, endpoint_url

WELL_KNOWN = ".well-known/smart-configuration"


def write_scope(types: Iterable[str]) -> str:
    """The SMART v2 system scopes for a sink that writes ``types``."""
    return " ".join(f"system/{name}.cruds" for name in types)


READ_SCOPE = "system/ImagingStudy.rs"


class BackendServices(ClientCredentials):
    """SMART Backend Services for a FHIR server. Thread-safe."""

    def _load_client_credentials(self) -> None:
        s = self.settings
        if s.client_secret_env or s.client_secret_file:
            given = s.option("client_secret_env" if s.client_secret_env else "client_secret_file")
            raise s.refused(f"SMART Backend Services authenticate with a private key ({s.option('private_key')}), not a secret ({given})",
                            "client_secret_env" if s.client_secret_env else "client_secret_file")
        if not s.private_key:
            raise s.refused(f"SMART Backend Services for {s.server} need {s.option('private_key')} (a signed JWT, no secret)",
                            "private_key")
        super()._load_client_credentials()

    def _configured_token_url(self) -> str | None:
        return endpoint_url(self.settings, self.settings.token_url, "token_url") if self.settings.token_url else None

    def token_url(self) -> str:
        if self._token_url is None:
            self._token_url = self._discover()
        return self._token_url

    def _discover(self) -> str:
        """``token_endpoint`` of the server's SMART configuration; ConfigError when it has none or
        does not take ``private_key_jwt``, the unreachable error when it cannot be read."""
        base = self.settings.base_url.rstrip("/")
        url = f"{base}/{WELL_KNOWN}"
        try:
            status, body = self._retrier(self._exchange, "GET", url, None, {"Accept": "application/json"})
        except Retriable as exc:
            raise self.settings.unreachable(f"cannot read the SMART configuration of {self.settings.server} "
                                            f"({origin_of(url)}): {exc.reason}") from None
        where = f"the SMART configuration ({WELL_KNOWN}) of {self.settings.server} at {origin_of(url)}"
        if status != 200:
            raise self.settings.refused(f"{where} answered HTTP {status}; name the token endpoint with "
                                        f"{self.settings.option('token_url')}", "token_url")
        try:
            found = orjson.loads(body)
        except orjson.JSONDecodeError:
            found = None
        endpoint = found.get("token_endpoint") if isinstance(found, dict) else None
        if not isinstance(endpoint, str) or not endpoint:
            raise self.settings.refused(f"{where} names no token_endpoint", "token_url")
        methods = found.get("token_endpoint_auth_methods_supported") if isinstance(found, dict) else None
        if isinstance(methods, list) and "private_key_jwt" not in methods:
            raise self.settings.refused(f"{where} does not take private_key_jwt client authentication", "token_url")
        return endpoint_url(self.settings, endpoint, "token_url")

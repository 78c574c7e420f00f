"""What any kind of credentials may need, gathered from a configuration (``--auth`` and the rest).

Each kind reads the fields it needs; ``target`` tells the source's credentials (``--oauth-...``)
from the FHIR server's (``--fhir-oauth-...``), so that an error names the option at fault.
Secrets are never fields: a client secret is named by the environment variable or the file that
holds it, a private key by its file, and read when the credentials are made.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError, SinkError, SourceUnreachable

OAUTH_KEYS = ("token_url", "client_id", "client_secret_env", "client_secret_file", "client_auth", "scope", "private_key", "key_id",
              "private_key_passphrase_env")
"""The keys of a configuration's ``auth_options`` that OAuth2 and SMART read (``--oauth-<key>``)."""


@dataclass(frozen=True)
class AuthSettings:
    base_url: str
    """The server the credentials are for (SMART finds its token endpoint there; a cloud kind
    may take its region or scope from it)."""
    target: str = "source"
    """``source`` (the DICOMweb server) or ``fhir`` (the FHIR server)."""
    kind: str | None = None
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)
    token_command: str | None = field(default=None, repr=False)
    token_url: str | None = None
    client_id: str | None = None
    client_secret_env: str | None = None
    client_secret_file: str | None = None
    client_auth: str | None = None
    """How the client secret goes to the token endpoint: ``basic`` (client_secret_basic, the
    default) or ``post`` (client_secret_post, in the form)."""
    scope: str | None = None
    default_scope: str | None = None
    """The scope asked for when ``scope`` is not given (SMART: what the FHIR sink writes)."""
    private_key: str | None = None
    """The path of a PEM private key (RS384 for RSA, ES384 for EC P-384) for a JWT client assertion."""
    key_id: str | None = None
    private_key_passphrase_env: str | None = None
    """The environment variable that holds the passphrase of an encrypted private key."""
    options: Mapping[str, Any] = field(default_factory=dict)
    """Every key of the configuration's ``auth_options`` (the cloud kinds read theirs here, e.g. ``region``)."""
    verify: bool | str = True
    timeout: tuple[float, float] = (10.0, 30.0)

    @property
    def fhir(self) -> bool:
        return self.target == "fhir"

    def setting(self, key: str) -> str:
        """The configuration setting of an OAuth key (ConfigError.setting: the CLI names its option)."""
        return f"fhir_oauth_{key}" if self.fhir else f"oauth_{key}"

    def option(self, key: str) -> str:
        return "--" + self.setting(key).replace("_", "-")

    @property
    def auth_setting(self) -> str:
        return "fhir_auth" if self.fhir else "auth"

    @property
    def server(self) -> str:
        return "the FHIR server" if self.fhir else "the DICOMweb server"

    def unreachable(self, message: str) -> Exception:
        """The error for a token endpoint that cannot be reached: exit 3 either way."""
        return SinkError(message) if self.fhir else SourceUnreachable(message)

    def refused(self, message: str, key: str | None = None) -> ConfigError:
        return ConfigError(message, setting=self.setting(key) if key else self.auth_setting)

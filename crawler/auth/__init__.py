"""How requests to the DICOMweb server and the FHIR server authenticate (``--auth``).

Every kind of credentials answers one question, ``Credentials.headers``: the headers one request
must carry (``base``). A kind with a token keeps it and fetches a new one ahead of its expiry and
after a 401 (``refresh``); a kind that signs (AWS Signature V4) signs each request. Secrets come
from the environment or files only and are never logged, shown in errors, stored in the state
or printed with ``--json``.

The kinds are registered in ``KINDS`` by name: the module that holds the class, the class (its
constructor takes one ``AuthSettings``), and the extra that installs what the module imports.
A module is imported only when its kind is chosen, so ``--auth gcp`` without the ``gcp`` extra is
a ConfigError naming the extra, and no other kind pays for it. ``make(settings)`` gives the
credentials of a kind (chosen with ``--auth``/``--fhir-auth`` or inferred from the options
given, as before ``--auth`` existed); ``for_source`` and ``for_fhir`` gather the settings from a
configuration.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any, NamedTuple

import requests

from ..errors import ConfigError
from .base import Credentials, Static
from .settings import OAUTH_KEYS, AuthSettings


class Kind(NamedTuple):
    module: str
    attribute: str
    """The class (or a function) in ``module`` that takes an AuthSettings and gives Credentials."""
    extra: str | None = None
    """The package extra that installs what the module needs (None: always there)."""


KINDS: dict[str, Kind] = {
    "basic": Kind("crawler.auth.plain", "basic"),
    "bearer": Kind("crawler.auth.plain", "bearer"),
    "token-command": Kind("crawler.auth.plain", "TokenCommand.of"),
    "oauth": Kind("crawler.auth.oauth", "ClientCredentials"),
    "smart": Kind("crawler.auth.smart", "BackendServices", "oauth"),
    "gcp": Kind("crawler.auth.gcp", "GcpCredentials", "gcp"),
    "azure": Kind("crawler.auth.azure", "AzureCredentials", "azure"),
    "aws": Kind("crawler.auth.aws", "AwsSigV4", "aws"),
}
SOURCE_KINDS = ("basic", "bearer", "token-command", "oauth", "gcp", "azure", "aws")
"""``--auth``'s choices (the DICOMweb server)."""
FHIR_KINDS = ("basic", "bearer", "oauth", "smart", "gcp", "azure")
"""``--fhir-auth``'s choices (the FHIR server)."""


def check_kind(kind: str | None, fhir: bool = False) -> None:
    """ConfigError unless ``kind`` is None or one of the kinds the server takes."""
    choices = FHIR_KINDS if fhir else SOURCE_KINDS
    if kind is not None and kind not in choices:
        raise ConfigError(f"the auth kind must be one of {', '.join(choices)}, not {kind!r}", setting="fhir_auth" if fhir else "auth")


def implied(settings: AuthSettings) -> list[str]:
    """The kinds the options given stand for (several when they contradict each other)."""
    kinds = []
    if settings.user is not None or settings.password is not None:
        kinds.append("basic")
    if settings.token:
        kinds.append("bearer")
    if settings.token_command:
        kinds.append("token-command")
    if any(getattr(settings, key) for key in OAUTH_KEYS):
        kinds.append("smart" if settings.fhir and not settings.token_url else "oauth")
    return kinds


def make(settings: AuthSettings) -> Credentials | None:
    """The credentials of ``settings.kind`` (inferred from the options when None); None when no
    credentials are given. ConfigError for options of another kind beside the one chosen, a kind
    whose extra is not installed, or what the kind itself refuses."""
    given = implied(settings)
    kind = settings.kind
    if kind is None:
        if not given:
            return None
        kind = given[0]
    others = [other for other in given if other != kind and {other, kind} != {"oauth", "smart"}]
    if others:
        prefix = "--fhir-" if settings.fhir else "--"
        raise settings.refused(f"{prefix}auth {kind} and the options of {', '.join(others)} auth do not go together")
    entry = KINDS[kind]
    try:
        module = importlib.import_module(entry.module)
    except ImportError as exc:
        if entry.extra is None:
            raise
        raise settings.refused(f"{kind} auth needs the {entry.extra} extra: pip install 'qido-crawler[{entry.extra}]' "
                               f"({type(exc).__name__}: {getattr(exc, 'name', None) or 'not installed'})") from None
    factory: Any = module
    for name in entry.attribute.split("."):
        factory = getattr(factory, name)
    credentials: Credentials = factory(settings)
    return credentials


def _token_timeout(timeout: tuple[float, float]) -> tuple[float, float]:
    return (timeout[0], min(timeout[1], 30.0))


def source_settings(config: Any) -> AuthSettings:
    """The AuthSettings of a ``config.Connection`` (a SyncConfig, an AuditConfig) for its DICOMweb server."""
    options: Mapping[str, Any] = getattr(config, "auth_options", None) or {}
    return AuthSettings(
        config.url,
        "source",
        getattr(config, "auth", None),
        config.user,
        config.password,
        config.token,
        config.token_command,
        options=dict(options),
        verify=config.verify,
        timeout=_token_timeout(config.timeout),
        **{key: options.get(key) for key in OAUTH_KEYS},
    )


def fhir_settings(config: Any, default_scope: str | None = None) -> AuthSettings:
    """The AuthSettings of a configuration's FHIR server (``fhir_url``, ``fhir_auth``, ...)."""
    options: Mapping[str, Any] = getattr(config, "fhir_auth_options", None) or {}
    return AuthSettings(
        config.fhir_url,
        "fhir",
        getattr(config, "fhir_auth", None),
        config.fhir_user,
        config.fhir_password,
        config.fhir_token,
        None,
        default_scope=default_scope,
        options=dict(options),
        verify=config.verify,
        timeout=_token_timeout(config.timeout),
        **{key: options.get(key) for key in OAUTH_KEYS},
    )


def for_source(config: Any) -> Credentials | None:
    return make(source_settings(config))


def for_fhir(config: Any, default_scope: str | None = None) -> Credentials | None:
    return make(fhir_settings(config, default_scope))


class SessionAuth(requests.auth.AuthBase):
    """Credentials as requests' ``auth``: each prepared request gets the headers ``headers`` gives
    for its method, URL and body (requests calls this for every request, redirects included)."""

    def __init__(self, credentials: Credentials) -> None:
        self.credentials = credentials

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        body = request.body
        data = body.encode("utf-8") if isinstance(body, str) else (body or b"")
        request.headers.update(self.credentials.headers(request.method or "GET", request.url or "", data if isinstance(data, bytes) else b""))
        return request

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SessionAuth) and other.credentials is self.credentials

    def __hash__(self) -> int:
        return id(self.credentials)


def used(authorization: str | None) -> Mapping[str, str]:
    """What a request carried, for ``Credentials.refresh``, from its Authorization header."""
    return {"Authorization": authorization} if authorization else {}


__all__ = ["KINDS", "AuthSettings", "Credentials", "Kind", "SessionAuth", "Static", "for_fhir", "for_source", "make", "used"]

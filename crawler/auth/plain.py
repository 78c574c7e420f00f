"""The kinds of credentials that need no library: basic, bearer, token-command."""

from __future__ import annotations

import base64
import threading
from collections.abc import Callable, Mapping

from ..http import check_header_value, token_from_command
from .base import Static
from .settings import AuthSettings


def basic_header(user: str, password: str) -> str:
    """``Basic base64(user:password)``, Latin-1 as requests encodes it (UTF-8 when that cannot)."""
    pair = f"{user}:{password}"
    try:
        raw = pair.encode("latin-1")
    except UnicodeEncodeError:
        raw = pair.encode("utf-8")
    return "Basic " + base64.b64encode(raw).decode("ascii")


def bearer_header(token: str, what: str = "the bearer token") -> str:
    return "Bearer " + check_header_value(what, token)


def basic(settings: AuthSettings) -> Static:
    if settings.user is None or settings.password is None:
        raise settings.refused(f"basic auth for {settings.server} needs a user and a password", "user")
    return Static({"Authorization": basic_header(settings.user, settings.password)})


def bearer(settings: AuthSettings) -> Static:
    if not settings.token:
        raise settings.refused(f"bearer auth for {settings.server} needs a token")
    return Static({"Authorization": bearer_header(settings.token)})


class TokenCommand:
    """A bearer token printed by a command (``--token-command``): run at once (unless a first
    token is given), and again after a 401, once for all threads that sent the same token."""

    def __init__(self, provide: Callable[[], str], token: str | None = None) -> None:
        self._provide = provide
        self._lock = threading.Lock()
        self._header = self._bearer(token if token else provide())

    @classmethod
    def of(cls, settings: AuthSettings) -> TokenCommand:
        if not settings.token_command:
            raise settings.refused(f"token-command auth for {settings.server} needs --token-command")
        return cls(token_from_command(settings.token_command))

    @staticmethod
    def _bearer(token: str) -> str:
        return bearer_header(token, "the bearer token (given, or printed by the token command)")

    def headers(self, method: str, url: str, body: bytes = b"") -> Mapping[str, str]:
        return {"Authorization": self._header}

    def refresh(self, used: Mapping[str, str]) -> bool:
        with self._lock:
            if used.get("Authorization") == self._header:
                self._header = self._bearer(self._provide())
        return True

    def __repr__(self) -> str:
        return "TokenCommand(<token hidden>)"

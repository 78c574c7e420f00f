"""The one seam between the HTTP clients and the kinds of credentials (see the package)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol


class Credentials(Protocol):
    """What a client asks of its credentials. Thread-safe: the crawl's threads share one."""

    def headers(self, method: str, url: str, body: bytes = b"") -> Mapping[str, str]:
        """The headers (e.g. ``Authorization``; for AWS also ``X-Amz-Date`` and the rest of a
        signature) that the request ``method url`` with ``body`` must carry, a token fetched or
        renewed first when it has expired or will within a minute. Raises ConfigError when the
        credentials are refused for good (a wrong secret, an unknown client), SourceUnreachable
        when the token endpoint cannot be reached."""

    def refresh(self, used: Mapping[str, str]) -> bool:
        """After a 401 to a request that carried ``used`` (what ``headers`` gave it): fetch a
        new token unless another thread already has; True when asking again may help."""


class Static:
    """Fixed headers (a bearer token given as it is, basic auth): nothing to renew."""

    def __init__(self, headers: Mapping[str, str]) -> None:
        self._headers = dict(headers)

    def headers(self, method: str, url: str, body: bytes = b"") -> Mapping[str, str]:
        return self._headers

    def refresh(self, used: Mapping[str, str]) -> bool:
        return False

    def __repr__(self) -> str:
        return "Static(<headers hidden>)"

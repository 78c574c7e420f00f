"""Deterministic resource ids: the same PACS and the same study always give the same id."""

from __future__ import annotations

import uuid
from functools import lru_cache
from typing import TYPE_CHECKING
from urllib.parse import urlsplit, urlunsplit

if TYPE_CHECKING:  # the builtin module has no stub; its sha1 is hashlib's without the dispatch
    from hashlib import sha1 as _sha1
else:
    try:
        from _sha1 import sha1 as _sha1
    except ImportError:  # pragma: no cover - interpreters without the builtin module
        from hashlib import sha1 as _sha1

NAMESPACE = uuid.UUID("6d1c4f8e-2f0a-5b7e-9a43-7c1f0e5d2b91")
_NAMESPACE_BYTES = NAMESPACE.bytes
_VARIANT = {digit: "89ab"[int(digit, 16) & 3] for digit in "0123456789abcdef"}
"""The first hex digit of a UUID's clock_seq_hi_and_reserved for the digest's: variant 10xx."""


@lru_cache(maxsize=64)
def normalise_base(url: str) -> str:
    """The base URL as ids see it: no credentials, lower-case scheme and host, no trailing slash."""
    parts = urlsplit(url.strip())
    host = (parts.hostname or "").lower()
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme.lower(), host, parts.path.rstrip("/"), parts.query, ""))


def resource_id(kind: str, *parts: str) -> str:
    return _uuid5("|".join((kind, *parts)))


def _uuid5(name: str) -> str:
    """``str(uuid.uuid5(NAMESPACE, name))``, from the SHA-1 digest directly: one id per study,
    and the uuid module's objects cost more than the hash."""
    h = _sha1(_NAMESPACE_BYTES + name.encode()).hexdigest()
    return f"{h[:8]}-{h[8:12]}-5{h[13:16]}-{_VARIANT[h[16]]}{h[17:20]}-{h[20:32]}"


@lru_cache(maxsize=64)
def endpoint_id(wado_base: str) -> str:
    return resource_id("Endpoint", normalise_base(wado_base))


def study_id(source: str, study_uid: str) -> str:
    return _uuid5(f"ImagingStudy|{normalise_base(source)}|{study_uid}")

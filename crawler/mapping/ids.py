"""Deterministic resource ids: the same PACS and the same study always give the same id."""

from __future__ import annotations

import uuid
from functools import lru_cache
from urllib.parse import urlsplit, urlunsplit

NAMESPACE = uuid.UUID("6d1c4f8e-2f0a-5b7e-9a43-7c1f0e5d2b91")


@lru_cache(maxsize=64)
def normalise_base(url: str) -> str:
    """The base URL as ids see it: no credentials, lower-case scheme and host, no trailing slash."""
    parts = urlsplit(url.strip())
    host = (parts.hostname or "").lower()
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme.lower(), host, parts.path.rstrip("/"), parts.query, ""))


def resource_id(kind: str, *parts: str) -> str:
    return str(uuid.uuid5(NAMESPACE, "|".join((kind, *parts))))


@lru_cache(maxsize=64)
def endpoint_id(wado_base: str) -> str:
    return resource_id("Endpoint", normalise_base(wado_base))


def study_id(source: str, study_uid: str) -> str:
    return resource_id("ImagingStudy", normalise_base(source), study_uid)

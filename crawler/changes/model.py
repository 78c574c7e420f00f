"""What every change source gives: the studies it names, and the cursor to store; and reading
one JSON answer of a change source through the run's client (its deadline, size cap and
same-origin redirects apply)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import orjson
import requests
import urllib3

from ..errors import FatalQidoError, RetriableQidoError
from ..http import redact
from ..qido import QidoClient, transport_failure


@dataclass(frozen=True)
class Change:
    """A study the source names as changed; ``deleted`` when the source said something of it was
    deleted (a deleted instance: the study may remain, so the run asks)."""

    study_uid: str
    deleted: bool = False


@dataclass(frozen=True)
class ChangesRead:
    """One read of a change source: the studies named, and the cursor to store once they are
    recorded. ``reset``: the source lost its log since the cursor (list everything once)."""

    changes: tuple[Change, ...]
    cursor: str
    reset: bool = False
    newest: datetime | None = None
    """When the newest change read was made (as the source dates it), if it says."""
    held: bool = False
    """Changes newer than the read's ``stable_before`` were left for a later read (the cursor
    stops before the first of them)."""


def get_json(client: QidoClient, url: str) -> object:
    """The JSON answer at ``url``, of whatever shape the server chose; ``{}`` for a 404."""
    client.counts.add("changes")
    try:  # through the client's fetch: its deadline, size cap and same-origin redirects apply
        response = client.fetch(url, accept="application/json")
        if response.status == 401 and client.renew_credentials(response.authorization):
            client.counts.add("changes")
            response = client.fetch(url, accept="application/json")
    except (requests.exceptions.RequestException, urllib3.exceptions.HTTPError) as exc:
        raise transport_failure(exc, redact(url)) from None
    except Exception as exc:  # noqa: BLE001 - anything else also means "not reached"
        raise RetriableQidoError(f"cannot read {redact(url)}: {type(exc).__name__}", url=redact(url)) from None
    if response.status == 404:
        return {}
    if response.status >= 400:
        raise FatalQidoError(f"HTTP {response.status} from {redact(url)}", url=redact(url), status=response.status)
    try:
        answer: object = orjson.loads(response.body)
    except ValueError:
        raise FatalQidoError(f"malformed JSON from {redact(url)}", url=redact(url)) from None
    return answer


def malformed(url: str, what: str) -> FatalQidoError:
    return FatalQidoError(f"answer from {redact(url)}: {what}", url=redact(url))

"""The transport's one retry loop (crawler.http.Retrier), alone: no server, no sleeping."""

from __future__ import annotations

import pytest
import requests

from crawler.errors import FatalQidoError, RetriableQidoError
from crawler.http import (
    BodyTooLarge,
    DeadlineExceeded,
    RedirectRefused,
    Retriable,
    Retrier,
    RetryPolicy,
    UnsupportedEncoding,
    retriable_error,
    server_wait,
)


class Flaky:
    """Raises the given failures one per call, then answers ``"ok"``."""

    def __init__(self, *failures: BaseException) -> None:
        self.failures = list(failures)
        self.calls = 0

    def __call__(self, value: str = "ok") -> str:
        self.calls += 1
        if self.failures:
            raise self.failures.pop(0)
        return value


def test_retriable_failures_are_asked_again_with_the_servers_wait_capped_and_counted():
    waits: list[float] = []
    retried: list[None] = []
    retrier = Retrier(RetryPolicy(attempts=4, max_seconds=30), sleep=waits.append, on_retry=lambda: retried.append(None))
    request = Flaky(Retriable("HTTP 429", status=429, retry_after=7), Retriable("HTTP 503", status=503, retry_after=3600),
                    Retriable("cannot connect", connect=True))
    assert retrier(request, "answer") == "answer"
    assert request.calls == 4 and len(retried) == 3
    assert waits[:2] == [7, 30] and 1.0 <= waits[2] <= 2.0   # the third: backoff, 0.5 * 2**2 s times 0.5 to 1


def test_the_last_failure_is_raised_as_it_was_after_the_attempts():
    waits: list[float] = []
    last = Retriable("HTTP 503", status=503)
    request = Flaky(Retriable("HTTP 503", status=503), Retriable("HTTP 503", status=503), last, Retriable("never reached"))
    with pytest.raises(Retriable) as raised:
        Retrier(RetryPolicy(attempts=3, base_delay=1, max_delay=4), sleep=waits.append)(request)
    assert raised.value is last and request.calls == 3
    assert len(waits) == 2 and 0.5 <= waits[0] <= 1 and 1 <= waits[1] <= 2


def test_other_failures_are_not_asked_again():
    request = Flaky(FatalQidoError("HTTP 404"), RetriableQidoError("HTTP 503"))
    with pytest.raises(FatalQidoError):
        Retrier(RetryPolicy(attempts=5), retry_on=RetriableQidoError, sleep=lambda s: None)(request)
    assert request.calls == 1
    request = Flaky(Retriable("not the kind this retrier asks again"))
    with pytest.raises(Retriable):
        Retrier(RetryPolicy(attempts=5), retry_on=RetriableQidoError, sleep=lambda s: None)(request)
    assert request.calls == 1


def test_which_transport_errors_are_worth_asking_again():
    assert retriable_error(requests.exceptions.ConnectionError("refused"))
    assert retriable_error(requests.exceptions.ReadTimeout("slow"))
    assert retriable_error(DeadlineExceeded())
    assert retriable_error(requests.exceptions.ChunkedEncodingError("cut"))
    assert not retriable_error(requests.exceptions.SSLError("bad certificate"))
    assert not retriable_error(BodyTooLarge(1 << 20))
    assert not retriable_error(UnsupportedEncoding("br"))
    assert not retriable_error(RedirectRefused("elsewhere"))
    assert not retriable_error(requests.exceptions.TooManyRedirects("loop"))
    assert not retriable_error(ValueError("not a transport error"))


def test_the_servers_wait_from_retry_after_or_azures_milliseconds():
    assert server_wait({"Retry-After": "7"}) == 7
    assert server_wait({"Retry-After": "7", "x-ms-retry-after-ms": "1500"}) == 7
    assert server_wait({"x-ms-retry-after-ms": "1500"}) == 1.5
    assert server_wait({"x-ms-retry-after-ms": "soon"}) is None
    assert server_wait({}) is None

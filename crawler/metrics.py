"""A watch's metrics over HTTP: Prometheus text on ``/metrics``, liveness on ``/healthz``.

The figures are read from the watch when Prometheus scrapes (``WatchFigures``, a snapshot), so
the watch's loop does no bookkeeping for them. ``prometheus-client`` (the ``watch`` extra) is
imported only when a metrics port is asked for. The server answers only GET of these two paths,
from its own daemon thread; it serves no patient data (figures, the change source's cursor and
the source's URL without credentials).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from .errors import ConfigError

PREFIX = "qido_crawler_watch"


@dataclass(frozen=True)
class WatchFigures:
    """What the metrics show, as the watch stands at one moment."""

    source: str
    feed: str
    cursor: str | None
    newest_change: datetime | None
    last_poll: datetime | None
    polls: int
    poll_errors: int
    failing: int
    """Failed attempts since the last success (0: healthy)."""
    runs: int
    reconciliations: int
    reconciled: int
    studies: dict[str, int] = field(default_factory=dict)
    """Studies by outcome: synced, failed, gone."""
    requests: dict[str, int] = field(default_factory=dict)
    """Requests by kind (``total`` and ``retries`` among them), as the run's counts hold them."""


def cursor_number(cursor: str | None) -> float | None:
    """The cursor as a number where it has one: Orthanc's sequence number, Azure's Sequence."""
    if cursor is None:
        return None
    tail = cursor.rpartition("|")[2]
    return float(tail) if tail.isdigit() else None


def _families(figures: WatchFigures, now: datetime) -> Iterator[Any]:
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        InfoMetricFamily,
    )

    labels = ["source", "feed"]
    key = [figures.source, figures.feed]

    def gauge(name: str, text: str, value: float | None) -> Any:
        family = GaugeMetricFamily(f"{PREFIX}_{name}", text, labels=labels)
        if value is not None:
            family.add_metric(key, value)
        return family

    def counter(name: str, text: str, value: float) -> Any:
        family = CounterMetricFamily(f"{PREFIX}_{name}", text, labels=labels)
        family.add_metric(key, value)
        return family

    lag = (now - figures.newest_change).total_seconds() if figures.newest_change else None
    yield gauge("lag_seconds", "now minus when the newest change processed was made", lag)
    yield gauge("cursor", "the change source's cursor, where it is a number (Orthanc Seq, Azure Sequence)", cursor_number(figures.cursor))
    info = InfoMetricFamily(f"{PREFIX}_cursor", "the change source's cursor as the state stores it", labels=labels)
    info.add_metric(key, {"cursor": figures.cursor or ""})
    yield info
    yield gauge("last_poll_timestamp_seconds", "when the change source was last read successfully (Unix time)",
                figures.last_poll.timestamp() if figures.last_poll else None)
    yield gauge("failing_attempts", "failed attempts since the last success (0: healthy)", figures.failing)
    yield counter("polls", "reads of the change source", figures.polls)
    yield counter("poll_errors", "polls, listings and run ends that failed and were tried again later", figures.poll_errors)
    yield counter("runs", "runs ended: the first listing, reconciliations, periods of polls", figures.runs)
    yield counter("reconciliations", "complete listings after the first", figures.reconciliations)
    yield counter("reconciled_studies", "studies the reconciliations found new, changed or gone", figures.reconciled)
    studies = CounterMetricFamily(f"{PREFIX}_studies", "studies by outcome", labels=[*labels, "outcome"])
    for outcome, count in sorted(figures.studies.items()):
        studies.add_metric([*key, outcome], count)
    yield studies
    requests = CounterMetricFamily(f"{PREFIX}_requests", "requests to the source by kind", labels=[*labels, "kind"])
    for kind, count in sorted(figures.requests.items()):
        if kind not in ("total", "retries"):
            requests.add_metric([*key, kind], count)
    yield requests
    yield counter("retries", "requests asked again after a failure that may pass", figures.requests.get("retries", 0))


class MetricsServer:
    """``/metrics`` and ``/healthz`` on ``port`` (0: any free port; see ``port`` once started)."""

    def __init__(self, port: int, read: Callable[[], WatchFigures], address: str = "") -> None:
        try:
            from prometheus_client import CollectorRegistry
            from prometheus_client.exposition import (
                CONTENT_TYPE_LATEST,
                generate_latest,
            )
        except ImportError:
            raise ConfigError("metrics need prometheus-client: pip install 'qido-crawler[watch]'", setting="metrics_port") from None
        registry = CollectorRegistry(auto_describe=False)

        class Collector:
            def collect(self) -> Iterator[Any]:
                yield from _families(read(), datetime.now(timezone.utc))

        registry.register(Collector())

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._send(200, CONTENT_TYPE_LATEST, generate_latest(registry))
                elif path == "/healthz":
                    failing = read().failing
                    self._send(503 if failing else 200, "text/plain; charset=utf-8",
                               f"failing: {failing} attempts\n".encode() if failing else b"ok\n")
                else:
                    self._send(404, "text/plain; charset=utf-8", b"not found\n")

            def _send(self, status: int, content_type: str, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        try:
            self.server = ThreadingHTTPServer((address, port), Handler)
        except OSError as exc:
            raise ConfigError(f"cannot serve metrics on port {port}: {exc.strerror}", setting="metrics_port") from None
        self.server.daemon_threads = True
        self.port = int(self.server.server_address[1])
        self.thread = threading.Thread(target=self.server.serve_forever, name="metrics", daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)
